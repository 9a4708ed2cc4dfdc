"""`animatediff-jax export`: trained (or converted) motion modules and LoRAs -> the files PyTorch users load.

  animatediff-jax export motion INPUT --out PATH [--format original|diffusers] [--dtype float32|float16]
      original:  PATH.ckpt or PATH.safetensors in the original AnimateDiff layout, key for key
                 what mm_sd_v15.ckpt (v1) / mm_sd_v15_v2.ckpt (v2) / v3_sd15_mm.ckpt (v3) hold,
                 `pos_encoder.pe` tables [1, 24 or 32, C] included (original scripts, ComfyUI,
                 diffusers' MotionAdapter.from_single_file); AnimateDiff-SDXL as mm_sdxl_v10_beta.ckpt,
                 HotshotXL as hsxl_temporal_layers.safetensors (`temporal_attentions`).
      diffusers: a MotionAdapter folder PATH/ (config.json + diffusion_pytorch_model.safetensors)
                 for MotionAdapter.from_pretrained.
  animatediff-jax export motion-lora INPUT --out FILE [--format original|diffusers] [--dtype ...]
      original: `...attention_blocks.0.processor.to_q_lora.down.weight` (.ckpt/.safetensors);
      diffusers: PEFT `unet....lora_A.weight` .safetensors for AnimateDiffPipeline.load_lora_weights.
  animatediff-jax export domain-adapter INPUT --out FILE [--format original|diffusers] [--dtype ...]
      original: the v3 adapter layout (v3_sd15_adapter.ckpt: `...attn1.processor.to_q_lora.down.weight`).
  animatediff-jax export lora INPUT --out FILE [--format diffusers|kohya] [--dtype ...]

--dtype: float32 (default) or float16, by any of their names (fp32, f32, fp16, f16, half: the
vocabulary of every command, `animatediff_jax.dtypes`).

Every output is written atomically (the previous file, if any, stays intact when a write fails or
the command is interrupted: Ctrl-C / SIGTERM exit 130 with one line, no partial file); an existing
`--out` is replaced only with `--overwrite`, and never the input itself (`io.fs.check_output`, the rule
of every command).

INPUT is an animatediff-jax params file (what training writes per stage, or `animatediff-jax
convert motion|lora` made) or any PyTorch file of that kind (then `--base-config`, as in
`convert`, says which UNet it is for). A file that lacks the requested part is an error that
says what the file holds instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

import numpy as np

from animatediff_jax import dtypes, interrupts
from animatediff_jax.checkpoints.load import Lora, load_lora, load_motion
from animatediff_jax.checkpoints.motion import (
    save_motion_adapter,
    save_motion_module_hotshot,
    save_motion_module_original,
)
from animatediff_jax.checkpoints.params_io import KIND_NAMES
from animatediff_jax.checkpoints.torch_io import CheckpointError, ModelSizeError, nonfinite_allowed
from animatediff_jax.cli import one_line, run_command
from animatediff_jax.errors import ConfigError
from animatediff_jax.io.fs import check_output

DTYPES = {"float32": np.float32, "float16": np.float16}  # by any of their names in animatediff_jax.dtypes
WEIGHT_EXTENSIONS = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


def write_lora(path: str | os.PathLike, lora: Lora, fmt: str, dtype: Any = np.float32) -> None:
    """A LoRA in the `original` AnimateDiff, `diffusers` (PEFT) or `kohya` naming."""
    from animatediff_jax.checkpoints import lora_formats as lf

    def conv1x1(p):
        return not lora.unet_config.use_linear_projection and lf.sd15_conv1x1(p)

    if fmt == "original":
        if lora.text_encoder:
            raise CheckpointError("the original AnimateDiff LoRA format has no text encoder; use --format diffusers")
        lf.save_lora_original(path, lora.unet, dtype)
    elif fmt == "diffusers":
        lf.save_lora_diffusers(path, lora.unet, lora.text_encoder, dtype, conv1x1=conv1x1)
    elif fmt == "kohya":
        lf.save_lora_kohya(path, lora.unet, lora.text_encoder, dtype, conv1x1=conv1x1)
    else:
        raise ConfigError(f"unknown LoRA format {fmt!r}: expected original, diffusers or kohya")


# ------------------------------------------------------------------ CLI


@contextlib.contextmanager
def _base_hint(args, noun: str):
    """A PyTorch file made for another model size than the base assumed without --base-config (SD1.5):
    the mismatch in one line, and the option that names the right base."""
    try:
        yield
    except ModelSizeError as e:
        if args.base_config:
            raise
        raise ModelSizeError(f"{one_line(e)}; pass --base-config <the base the {noun} was trained on> "
                             "(SD1.5 was assumed)") from None


def _check_out(out: str, fmt: str, part: str) -> None:
    lower = out.lower()
    if part == "motion_module" and fmt == "diffusers":
        if lower.endswith(WEIGHT_EXTENSIONS):
            raise CheckpointError(f"{out}: --format diffusers writes a MotionAdapter folder; give a folder path")
        return
    allowed = (".safetensors",) if fmt in ("diffusers", "kohya") else WEIGHT_EXTENSIONS
    if not lower.endswith(allowed):
        raise CheckpointError(f"{out}: a {fmt} {KIND_NAMES[part]} file ends with {' or '.join(allowed)}")


def _motion(args) -> str:
    from animatediff_jax.convert import resolve_base

    _check_out(args.out, args.format, "motion_module")
    check_output(args.out, (args.input,), overwrite=args.overwrite)
    base = resolve_base(args.base_config)[0] if args.base_config else None
    with _base_hint(args, "module"):
        params, config = load_motion(args.input, base)
    mm = config.motion
    if args.format == "diffusers" and mm.version == "hotshot_xl":
        raise CheckpointError(f"{args.input}: HotshotXL motion modules have no diffusers MotionAdapter form (its UNet "
                              "normalises the resnets across frames): use --format original (hsxl_temporal_layers)")
    if args.format == "original" and not mm.norm_per_frame and mm.family == "sd15":
        raise CheckpointError(
            f"{args.input}: its motion modules were trained with GroupNorm across frames (diffusers'), which the "
            "original AnimateDiff format cannot say (its models normalise per frame): use --format diffusers")
    if args.format == "diffusers" and mm.norm_per_frame:
        print("note: diffusers' MotionAdapter normalises the motion modules across frames; this module was trained "
              "per frame (as the original's): outputs there differ slightly (see `animatediff-jax parity`)",
              file=sys.stderr)
    if args.format == "diffusers" and mm.norm_num_groups != config.norm_num_groups:
        print(f"note: diffusers' UNetMotionModel gives motion-module GroupNorms the UNet's {config.norm_num_groups} "
              f"groups, not this module's {mm.norm_num_groups}", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    if args.format == "original":  # (HotshotXL's original is its own release's naming)
        save = save_motion_module_hotshot if mm.version == "hotshot_xl" else save_motion_module_original
        save(args.out, params, config, dtype)
    else:
        save_motion_adapter(args.out, params, config, dtype)
    return f"motion module ({mm.version} layout, {mm.max_positions} positions)"


def _lora(args) -> str:
    from animatediff_jax.convert import resolve_base

    _check_out(args.out, args.format, args.part)
    check_output(args.out, (args.input,), overwrite=args.overwrite)
    base, text_config = resolve_base(args.base_config) if args.base_config else (None, None)
    with _base_hint(args, KIND_NAMES[args.part]):
        lora = load_lora(args.input, args.part, base=base, text_config=text_config, motion_version=args.motion_version)
    try:
        write_lora(args.out, lora, args.format, DTYPES[args.dtype])
    except ValueError as e:  # a layer the format cannot hold
        raise CheckpointError(f"{args.input}: cannot be written as a {args.format} {KIND_NAMES[args.part]}: {e}") from e
    return KIND_NAMES[lora.kind]


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="animatediff-jax export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part_name", required=True)
    parts = [
        ("motion", ["motion_module", "motion-module"], "motion_module", ("original", "diffusers"), _motion),
        ("motion-lora", ["motion_lora"], "motion_lora", ("original", "diffusers"), _lora),
        ("domain-adapter", ["domain_adapter"], "domain_adapter", ("original", "diffusers"), _lora),
        ("lora", [], "lora", ("diffusers", "kohya"), _lora),
    ]
    for name, aliases, part, formats, run in parts:
        s = sub.add_parser(name, aliases=aliases, help=f"export a {KIND_NAMES[part]}")
        s.add_argument("input", help="animatediff-jax params file, or a PyTorch file of this kind")
        s.add_argument("--out", required=True, help="output file (folder for a diffusers MotionAdapter)")
        s.add_argument("--format", choices=formats, default=formats[0])
        s.add_argument("--dtype", default="float32", help="float32 or float16 (fp32, fp16, half, ...)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the input)")
        s.add_argument("--allow-nonfinite", action="store_true", help="export weights holding NaN/Inf (warns)")
        s.add_argument("--base-config", help="for PyTorch inputs: sd15 (default), a converted or diffusers SD "
                                             "folder, a params file or a UNet config .json")
        if part == "motion_lora":
            s.add_argument("--motion-version", choices=("v1", "v2", "v3"),
                           help="for PyTorch MotionLoRAs: the motion layout (default: v2 if it adapts the mid block)")
        s.set_defaults(run=run, part=part, motion_version=None)
    args = p.parse_args(argv)
    args.dtype = dtypes.canonical(args.dtype, "--dtype", tuple(DTYPES))
    interrupts.output(args.out)
    try:
        with nonfinite_allowed() if args.allow_nonfinite else contextlib.nullcontext():
            what = args.run(args)
    except (FileExistsError, FileNotFoundError):
        raise
    except OSError as e:  # disk full, file size limit, permissions: name --out, not a temporary file
        raise OSError(e.errno, e.strerror or str(e), args.out) from e
    print(f"wrote {args.out}: {what}, {args.format} format, {args.dtype}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)
