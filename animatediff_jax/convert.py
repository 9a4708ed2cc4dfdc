"""`animatediff-jax convert`: PyTorch weight files -> animatediff-jax params files (then no torch is needed).

  animatediff-jax convert sd15 PATH --out DIR [--base SD15_FOLDER]
      PATH: a diffusers SD1.5 folder or a single-file LDM checkpoint (.safetensors/.ckpt).
      Writes DIR/params.safetensors (unet, vae, text_encoder + configs) and DIR/tokenizer/.
  animatediff-jax convert sdxl PATH --out DIR [--base SDXL_FOLDER]
      PATH: a diffusers SDXL folder (fp16 variants too) or a single-file SGM checkpoint
      (sd_xl_base_1.0.safetensors, CivitAI SDXL files). Writes DIR/params.safetensors (unet, vae,
      text_encoder, text_encoder_2 + configs), DIR/tokenizer/ and DIR/tokenizer_2/.
  animatediff-jax convert motion PATH --out FILE [--base-config sd15]
      PATH: an original AnimateDiff motion module (mm_sd_v15*.ckpt, v3_sd15_mm.ckpt, .safetensors)
      or a diffusers MotionAdapter folder; the version (v1/v2/v3) is detected.
      Writes a motion file: {"unet": motion modules}, meta kind "motion_module" + the UNet config.
  animatediff-jax convert lora PATH --kind motion_lora|domain_adapter|lora --out FILE [--base-config sd15]
      PATH: a MotionLoRA, the v3 domain adapter, or a personalised LoRA (original AnimateDiff,
      diffusers/PEFT or kohya naming). Writes a LoRA file: {"unet": LoRA[, "text_encoder": LoRA]}.

--base-config names the base UNet (and text encoder) the file is for: `sd15` (default), `sdxl`, a converted
or diffusers SD folder, an animatediff-jax params file, or a .json UNet config (our fields or a
diffusers UNet2DConditionModel config.json).

Outputs are written atomically (a folder complete or absent; a failed or interrupted run leaves the
previous output, if any, as it was: Ctrl-C / SIGTERM exit 130 with one line). An existing `--out` is
replaced only with `--overwrite`, and never an input (`io.fs.check_output`, the rule of every command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from animatediff_jax import interrupts
from animatediff_jax.checkpoints.torch_io import CheckpointError, nonfinite_allowed
from animatediff_jax.cli import run_command
from animatediff_jax.io import fs


def resolve_base(spec: str | None):
    """`(UNetConfig, CLIPTextConfig | None)` named by a `--base-config` value (see the module doc)."""
    from animatediff_jax.checkpoints import params_io
    from animatediff_jax.checkpoints.params_io import params_file
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import UNetConfig, sd15_unet

    if spec in (None, "sd15"):
        return sd15_unet(), CLIPTextConfig.sd15()
    if spec == "sdxl":  # (its first text encoder is SD1.5's ViT-L tower)
        from animatediff_jax.models.config import sdxl_unet

        return sdxl_unet(), CLIPTextConfig.sd15()

    def from_json(path: str):
        try:
            with fs.open(path) as f:
                d = json.load(f)
            if "_class_name" in d or "down_block_types" in d:
                return UNetConfig.from_diffusers(d)
            return params_io.config_from_dict(UNetConfig, d.get("unet_config", d))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a UNet config ({type(e).__name__}: {e})") from e

    p = params_file(spec)
    if p is not None:
        _, meta = params_io.load_params(p)
        if "unet_config" not in meta:
            raise CheckpointError(f"{p}: the params file names no unet_config")
        text = meta.get("text_config")
        return (params_io.config_from_dict(UNetConfig, meta["unet_config"]),
                params_io.config_from_dict(CLIPTextConfig, text) if text else None)
    if fs.isdir(spec):
        unet_json = os.path.join(spec, "unet", "config.json")
        if fs.isfile(unet_json):  # a diffusers SD folder
            text_json = os.path.join(spec, "text_encoder", "config.json")
            text = None
            if fs.isfile(text_json):
                with fs.open(text_json) as f:
                    text = CLIPTextConfig.from_transformers(json.load(f))
            return from_json(unet_json), text
        if fs.isfile(os.path.join(spec, "config.json")):
            return from_json(os.path.join(spec, "config.json")), None
        raise CheckpointError(f"{spec}: no unet/config.json, config.json or params file: not a base model folder")
    if spec.lower().endswith(".json"):
        return from_json(spec), None
    raise CheckpointError(f"--base-config {spec!r}: expected sd15, a folder, a params file or a .json config")


def _base(args) -> None:
    """`convert sd15|sdxl`: the base (and `--base` for what a single file lacks) to a converted folder."""
    if args.kind == "sdxl":
        from animatediff_jax.checkpoints.sdxl import load_sdxl as load
        from animatediff_jax.checkpoints.sdxl import save_converted_sdxl as save
    else:
        from animatediff_jax.checkpoints.sd15 import load_sd15 as load
        from animatediff_jax.checkpoints.sd15 import save_converted as save

    base = load(args.base) if args.base else None
    t0 = time.time()
    print(f"converting {args.path} ...", file=sys.stderr)
    model = load(args.path, base=base)
    with fs.atomic_folder(args.out) as tmp:  # complete or absent (params + tokenizers)
        save(tmp, model)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s", file=sys.stderr)


def _motion(args) -> None:
    from animatediff_jax.checkpoints.load import load_motion
    from animatediff_jax.checkpoints.params_io import save_motion

    base, _ = resolve_base(args.base_config)
    params, config = load_motion(args.path, base)
    save_motion(args.out, params, config)
    mm = config.motion
    print(f"wrote {args.out}: {mm.version} motion module ({mm.max_positions} positions)", file=sys.stderr)


def _lora(args) -> None:
    from animatediff_jax.checkpoints.load import load_lora
    from animatediff_jax.checkpoints.params_io import KIND_NAMES, save_lora
    from animatediff_jax.lora import lora_layers

    base, text_config = resolve_base(args.base_config)
    b = load_lora(args.path, args.lora_kind, base=base, text_config=text_config, motion_version=args.motion_version)
    save_lora(args.out, b.unet, b.kind, b.unet_config, b.text_encoder, text_config=b.text_config)
    text = f" + {len(lora_layers(b.text_encoder))} text-encoder layers" if b.text_encoder else ""
    print(f"wrote {args.out}: {KIND_NAMES[b.kind]}, {len(lora_layers(b.unet))} UNet layers{text}", file=sys.stderr)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="animatediff-jax convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("sd15", help="Stable Diffusion 1.5 (diffusers folder or LDM single file)")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--base", help="diffusers SD1.5 folder supplying parts a single file lacks (and the tokenizer)")
    s.set_defaults(run=_base)
    s = sub.add_parser("sdxl", help="Stable Diffusion XL (diffusers folder or SGM single file)")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--base", help="diffusers SDXL folder supplying parts a single file lacks (and the tokenizers)")
    s.set_defaults(run=_base)
    base_help = "the base model: sd15 (default), sdxl, a converted or diffusers SD folder, a params file, a .json config"
    s = sub.add_parser("motion", help="AnimateDiff motion module (original .ckpt/.safetensors or MotionAdapter folder)")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output params file (.safetensors)")
    s.add_argument("--base-config", default="sd15", help=base_help)
    s.set_defaults(run=_motion)
    s = sub.add_parser("lora", help="MotionLoRA, v3 domain adapter or personalised LoRA")
    s.add_argument("path")
    s.add_argument("--kind", dest="lora_kind", required=True, choices=("motion_lora", "domain_adapter", "lora"))
    s.add_argument("--out", required=True, help="output params file (.safetensors)")
    s.add_argument("--base-config", default="sd15", help=base_help)
    s.add_argument("--motion-version", choices=("v1", "v2", "v3"),
                   help="MotionLoRA layout (default: v2 if the file adapts the mid-block motion module, else v3)")
    s.set_defaults(run=_lora)
    for s in sub.choices.values():
        s.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN/Inf (warns)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    args = p.parse_args(argv)
    if args.kind not in ("sd15", "sdxl") and not args.out.lower().endswith(".safetensors"):
        raise CheckpointError(f"{args.out}: params files are .safetensors")
    inputs = [args.path] + [q for q in (getattr(args, "base", None), getattr(args, "base_config", None))
                            if q and q not in ("sd15", "sdxl")]
    fs.check_output(args.out, tuple(inputs), overwrite=args.overwrite)
    interrupts.output(args.out)
    with nonfinite_allowed() if args.allow_nonfinite else contextlib.nullcontext():
        args.run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)
