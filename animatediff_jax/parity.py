"""Parity of our sampler with diffusers' `AnimateDiffPipeline`, stage by stage, from the same noise.

    animatediff-jax parity --tiny          # tiny random models, CPU, seconds
    animatediff-jax parity --full-size     # SD1.5 + v2 layout, random weights, 16x512x512
    animatediff-jax parity --model SD15_DIR --motion-adapter ADAPTER   # real files

Both sides get the very same weights: the diffusers pipeline is built (or loaded) in PyTorch and
its modules are converted to our params. Both start from the same initial latents (ours,
`normal(key(seed))` per sample, handed to diffusers as `latents=`), and the script prints the max
and mean absolute difference of the text embeddings, the guided UNet output at step 0, the
latents after the loop and the decoded frames.

GroupNorm semantics: diffusers' motion modules normalise across frames, the original
AnimateDiff per frame (our default; see docs/reference.md). Here the diffusers pipeline runs as
shipped and our UNet is configured with `norm_per_frame=False` (diffusers' numerics). Only
deterministic samplers are compared (the two sides draw different random numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax import schedulers as S
from animatediff_jax.checkpoints.sd15 import convert_clip_text
from animatediff_jax.models.attention import IMPLEMENTATIONS
from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet, tiny_unet
from animatediff_jax.models.vae import VAEConfig, decode_video
from animatediff_jax.sampling import (
    AnimationPipeline,
    encode_text,
    generate,
    predict_noise,
)

NORM_NOTE = (
    "motion-module GroupNorm: diffusers' semantics (across frames) on both sides -- diffusers as shipped, "
    "ours with norm_per_frame=False (the original AnimateDiff, our default, normalises per frame)"
)
REFERENCE_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",
}


# ----------------------------------------------------------------------------------------------
# Building the diffusers pipeline (tiny / full-size random weights, or from files).
# ----------------------------------------------------------------------------------------------


def write_tiny_tokenizer(folder: str, pad_token: str | None = None) -> dict[str, int]:
    """A small CLIP BPE vocabulary (`</w>` word ends, a few merges) that transformers' CLIPTokenizer reads.
    `pad_token`: a token of the vocabulary to pad with (SDXL's `tokenizer_2/` pads with "!"); default
    the end-of-text token, as SD1.5's tokenizer."""
    os.makedirs(folder, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.!")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>", "a n", "an d</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    # Without model_max_length the tokenizer would pad "to max length" 1e30 tokens.
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                   **({"pad_token": pad_token} if pad_token is not None else {})}, f)
    return vocab


def randomize(module, seed: int = 0, scale: float = 0.2):
    """Seeded random weights everywhere (zero-initialised projections too), so every path is exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (scale if p.ndim == 1 else fan_in**-0.5))
    return module.eval()


def diffusers_scheduler(name: str, options: dict | None = None):
    """The diffusers scheduler with our defaults (the original AnimateDiff's) overlaid by `options`."""
    import diffusers

    if name not in REFERENCE_SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(REFERENCE_SCHEDULERS)}")
    config = S.scheduler_config(name, **(options or {}))
    config.pop("eta", None)  # DDIM's eta is a call argument in diffusers
    return getattr(diffusers, REFERENCE_SCHEDULERS[name])(**config)


def build_random_pipeline(size: str = "tiny", seed: int = 0, workdir: str | None = None) -> tuple[Any, str]:
    """(diffusers AnimateDiffPipeline with seeded random weights, its tokenizer folder) on CPU, fp32.

    size "tiny": two-level UNet (32/64 channels) + v2 motion modules, 2-level VAE, 3-layer CLIP.
    size "full": SD1.5 UNet + AnimateDiff v2 motion modules, SD1.5 VAE and CLIP ViT-L text tower.
    The tokenizer is a tiny BPE vocabulary in both cases (no files can be downloaded).
    """
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )
    from transformers import CLIPTextConfig as HFCLIPConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer

    from animatediff_jax.checkpoints.motion import motion_adapter_kwargs

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    text_cfg = CLIPTextConfig.tiny() if size == "tiny" else CLIPTextConfig.sd15()
    unet_cfg = tiny_unet("v2", cross_attention_dim=text_cfg.hidden_size) if size == "tiny" else sd15_unet("v2")
    vae_cfg = VAEConfig.tiny() if size == "tiny" else VAEConfig.sd15()

    folder = os.path.join(workdir or tempfile.mkdtemp(prefix="adj-parity-"), "tokenizer")
    vocab = write_tiny_tokenizer(folder)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(**unet_cfg.to_diffusers(), sample_size=8)
    adapter = MotionAdapter(**motion_adapter_kwargs(unet_cfg))
    unet = randomize(UNetMotionModel.from_unet2d(unet2d, adapter), seed)
    del unet2d
    vae = randomize(AutoencoderKL(**vae_cfg.to_diffusers()), seed + 1)
    hf_cfg = HFCLIPConfig(**text_cfg.transformers_kwargs(), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    text = randomize(HFCLIPTextModel(hf_cfg), seed + 2)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    pipe = AnimateDiffPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, motion_adapter=adapter,
        scheduler=diffusers_scheduler("ddim"),
    )
    return pipe, folder


def load_pipeline(model_dir: str, motion_adapter: str) -> tuple[Any, str]:
    """(AnimateDiffPipeline, tokenizer folder) from a diffusers SD1.5 folder and a motion adapter.

    `motion_adapter`: a diffusers `MotionAdapter` folder, or an original AnimateDiff motion
    module file (read with `MotionAdapter.from_single_file`).
    """
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer

    for path in (model_dir, motion_adapter):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(motion_adapter):
        adapter = MotionAdapter.from_pretrained(motion_adapter, local_files_only=True)
    else:
        adapter = MotionAdapter.from_single_file(motion_adapter, local_files_only=True)
    tok = os.path.join(model_dir, "tokenizer")
    unet2d = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    pipe = AnimateDiffPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True),
        text_encoder=HFCLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(tok, local_files_only=True),
        unet=UNetMotionModel.from_unet2d(unet2d, adapter),
        motion_adapter=adapter,
        scheduler=diffusers_scheduler("ddim"),
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    return pipe, tok


# ----------------------------------------------------------------------------------------------
# diffusers modules -> our pipeline.
# ----------------------------------------------------------------------------------------------


def unet_config_of(motion_unet_config: dict) -> UNetConfig:
    """Our config for a diffusers `UNetMotionModel` config, with diffusers' GroupNorm semantics."""
    cfg = dict(motion_unet_config)
    cfg["down_block_types"] = [t.replace("Motion", "2D") for t in cfg["down_block_types"]]
    layers = cfg.get("temporal_transformer_layers_per_block", 1)
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"per-block temporal transformer depths {layers} are not supported")
        layers = layers[0]
    motion = MotionConfig(
        heads=cfg["motion_num_attention_heads"],
        num_layers=layers,
        max_positions=cfg["motion_max_seq_length"],
        mid_block=cfg["use_motion_mid_block"],
        norm_per_frame=False,  # diffusers' AnimateDiffTransformer3D normalises across frames
        norm_num_groups=cfg.get("norm_num_groups", 32),  # diffusers uses the UNet's groups
    )
    return UNetConfig.from_diffusers(cfg, motion=motion).replace(spatial_norm_per_frame=True)


def _to_device_inplace(tree: dict) -> None:
    """Host arrays -> device arrays one leaf at a time, so a full-size model is not held twice on the host."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _to_device_inplace(v)
        else:
            tree[k] = jnp.asarray(v)


def ours_from_diffusers(pipe, tokenizer_folder: str, dtype=jnp.float32, attention: str = "auto") -> AnimationPipeline:
    """Our pipeline holding the weights of a diffusers `AnimateDiffPipeline` (converted on the host);
    `attention`: the UNet's `models.attention` implementation."""
    from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict, convert_vae
    from animatediff_jax.models.shapes import clip_shapes
    from animatediff_jax.text import Tokenizer

    def host(module) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}

    unet_cfg = unet_config_of(dict(pipe.unet.config))
    vae_cfg = VAEConfig.from_diffusers(dict(pipe.vae.config))
    text_cfg = CLIPTextConfig.from_transformers(pipe.text_encoder.config.to_dict())
    params = {
        "unet": convert_unet_state_dict(host(pipe.unet), unet_cfg, what="diffusers UNetMotionModel"),
        "vae": convert_vae(host(pipe.vae), vae_cfg, what="diffusers AutoencoderKL"),
        "text_encoder": convert_clip_text(host(pipe.text_encoder), clip_shapes(text_cfg)),
    }
    _to_device_inplace(params)
    return AnimationPipeline(unet_cfg, vae_cfg, text_cfg, params, Tokenizer(tokenizer_folder), dtype, attention)


# ----------------------------------------------------------------------------------------------
# The comparison.
# ----------------------------------------------------------------------------------------------


def _diff(ours, ref) -> dict[str, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {ours.shape} vs reference {ref.shape}")
    err = np.abs(ours - ref)
    return dict(max_abs=float(err.max()), mean_abs=float(err.mean()), ref_max_abs=float(np.abs(ref).max()))


def _needs_clip_skip_shim(torch_pipe, clip_skip: int) -> bool:
    return bool(clip_skip) and not hasattr(torch_pipe.text_encoder, "text_model")


def _clip_skip_embeds(torch_pipe, prompts: Sequence[str], clip_skip: int):
    """diffusers' `encode_prompt` text path: layer `-(clip_skip + 1)` through the final layer norm."""
    tok = torch_pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(torch_pipe.device)
    te = torch_pipe.text_encoder
    if not clip_skip:
        return te(ids)[0]
    hidden = te(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return getattr(te, "text_model", te).final_layer_norm(hidden)


def _text_stages(torch_pipe, ours: AnimationPipeline, prompts: list[str], neg: list[str], do_cfg: bool,
                 clip_skip: int, stages: dict) -> tuple[Any, Any, dict, list[str]]:
    """Both sides' text embeddings compared (into `stages`); ours, the torch pipeline's text arguments, notes."""
    import torch

    notes = []
    device = torch_pipe.device
    pipe_text = dict(prompt=prompts, negative_prompt=neg if do_cfg else None, clip_skip=clip_skip or None)
    with torch.no_grad():
        if _needs_clip_skip_shim(torch_pipe, clip_skip):
            notes.append("clip_skip: diffusers 0.42's encode_prompt reads text_encoder.text_model, which "
                         "transformers 5 removed; the torch embeddings are computed as encode_prompt does "
                         "and passed to the pipeline as prompt_embeds")
            pe, ne = _clip_skip_embeds(torch_pipe, prompts, clip_skip), _clip_skip_embeds(torch_pipe, neg, 0)
            pipe_text = dict(prompt_embeds=pe, negative_prompt_embeds=ne if do_cfg else None)
        else:
            pe, ne = torch_pipe.encode_prompt(prompts, device, 1, do_cfg, neg if do_cfg else None,
                                              clip_skip=clip_skip or None)
    cond, uncond, _ = encode_text(ours, prompts, neg if do_cfg else None, clip_skip, syntax="plain")  # (diffusers')
    stages["text embeddings (prompts)"] = _diff(cond, pe.float().cpu().numpy())
    if do_cfg:
        stages["text embeddings (negative)"] = _diff(uncond, ne.float().cpu().numpy())
    return cond, uncond, pipe_text, notes


def _diffusers_run(torch_pipe, pipe_text: dict, noise: np.ndarray, **kwargs) -> tuple[dict, np.ndarray, float]:
    """diffusers' whole pipeline from `noise`: the first UNet output and last latents it made
    (`captured`), its [0, 1] frames, and its seconds."""
    import torch

    captured: dict[str, np.ndarray] = {}

    def unet_hook(module, args, output):
        if "unet0" not in captured:
            captured["unet0"] = output.sample.detach().float().cpu().numpy()

    def on_step(pipe, i, t, kw):
        captured["latents"] = kw["latents"].detach().float().cpu().numpy()
        return {}

    hook = torch_pipe.unet.register_forward_hook(unet_hook)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = torch_pipe(**pipe_text, **kwargs, output_type="np", callback_on_step_end=on_step,
                             latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()).to(torch_pipe.device))
    finally:
        hook.remove()
    return captured, np.asarray(out.frames, np.float32), time.perf_counter() - t0


def _report(log: Callable[[str], None], stages: dict, notes: list[str], what: str, device: Any) -> None:
    log(f"parity: ours (JAX, {jax.default_backend()}) vs diffusers AnimateDiffPipeline (torch, {device}), {what}")
    log(NORM_NOTE)
    for note in notes:
        log(note)
    log(f"{'stage':<30} {'max abs':>11} {'mean abs':>11} {'ref max abs':>12}")
    for name, d in stages.items():
        if not name.startswith("_"):
            log(f"{name:<30} {d['max_abs']:>11.3e} {d['mean_abs']:>11.3e} {d['ref_max_abs']:>12.4g}")
    t = stages["_timings"]
    log(f"time: diffusers {t['diffusers_s']:.1f}s; ours compile {t['ours_compile_s']:.1f}s + run {t['ours_run_s']:.1f}s")


def run_parity(
    torch_pipe,
    ours: AnimationPipeline,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    num_frames: int = 16,
    height: int = 512,
    width: int = 512,
    steps: int = 25,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    scheduler_options: dict | None = None,
    clip_skip: int = 0,
    decode_chunk: int = 4,
    log: Callable[[str], None] | None = print,
) -> dict[str, dict[str, float]]:
    """Runs both pipelines from the same noise; returns `{stage: {max_abs, mean_abs, ref_max_abs}}`.

    Stages: "text embeddings (prompts)", "text embeddings (negative)" (with guidance), "unet
    output step 0 (guided)", "latents after loop", "decoded frames" (floats in [0, 1]) and
    "frames uint8" (in levels of 1/255). Also "_timings" (seconds; ours' compile apart).
    """
    log = log or (lambda s: None)
    prompts = list(prompts)
    n = len(prompts)
    seeds = list(seeds) if seeds is not None else list(range(n))
    opts = dict(scheduler_options or {})
    sched = S.make_scheduler(scheduler, steps, **opts)
    if sched.stochastic:
        raise ValueError(f"parity needs a deterministic sampler; {scheduler} {opts} draws random noise")
    do_cfg = guidance_scale > 1.0
    neg = list(negative_prompts) if negative_prompts is not None else [""] * n
    if len(neg) == 1:
        neg = neg * n
    device = torch_pipe.device
    torch_pipe.scheduler = diffusers_scheduler(scheduler, opts)
    torch_pipe.set_progress_bar_config(disable=True)

    lat_shape = (num_frames, height // ours.vae_config.downscale, width // ours.vae_config.downscale,
                 ours.unet_config.in_channels)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.key(s), lat_shape, jnp.float32)) for s in seeds])
    stages: dict[str, dict[str, float]] = {}

    cond, uncond, pipe_text, notes = _text_stages(torch_pipe, ours, prompts, neg, do_cfg, clip_skip, stages)
    captured, ref_frames, torch_s = _diffusers_run(torch_pipe, pipe_text, noise, num_frames=num_frames, height=height,
                                                   width=width, num_inference_steps=steps,
                                                   guidance_scale=guidance_scale, decode_chunk_size=decode_chunk)

    # UNet output (guided) at step 0, ours from the very function the loop uses.
    ref0 = captured["unet0"]
    if do_cfg:
        u, c = np.split(ref0, 2)
        ref0 = u + guidance_scale * (c - u)
    x0 = jnp.asarray(noise) * sched.init_noise_sigma
    eps0 = jax.jit(predict_noise, static_argnums=0)(
        ours.unet, ours.params["unet"], S.scale_model_input(sched, 0, x0), sched.timesteps[0], cond,
        uncond if do_cfg else None, jnp.float32(guidance_scale) if do_cfg else 1.0,
    )
    stages["unet output step 0 (guided)"] = _diff(np.asarray(eps0).transpose(0, 4, 1, 2, 3), ref0)

    # Our whole pipeline from the same noise.
    res = generate(
        ours, prompts, neg, seeds, num_frames=num_frames, height=height, width=width, steps=steps,
        guidance_scale=guidance_scale, scheduler=scheduler, scheduler_options=opts, clip_skip=clip_skip,
        decode_chunk=decode_chunk, progress=False, init_latents=noise, prompt_syntax="plain",
    )
    stages["latents after loop"] = _diff(res.latents.transpose(0, 4, 1, 2, 3), captured["latents"])
    # [0, 1] frames, as diffusers' VaeImageProcessor post-processes
    frames = np.clip(np.asarray(decode_video(ours.vae, ours.params["vae"], jnp.asarray(res.latents), decode_chunk))
                     / 2 + 0.5, 0.0, 1.0)
    stages["decoded frames"] = _diff(frames, ref_frames)
    stages["frames uint8"] = _diff(res.frames.astype(np.int32), np.round(ref_frames * 255).astype(np.int32))
    stages["_timings"] = dict(diffusers_s=torch_s, **{f"ours_{k}": v for k, v in res.timings.items()})

    _report(log, stages, notes, f"{n} video(s) x {num_frames} frames {height}x{width}, {scheduler} {steps} steps, "
            f"guidance {guidance_scale}, fp32", device)
    return stages


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------

DEFAULTS = {
    "tiny": dict(frames=6, height=16, width=16, steps=5),
    "full": dict(frames=16, height=512, width=512, steps=25),
}
PROMPTS = ["a cat and the dog", "the dog"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="animatediff-jax parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="tiny random models (the default)")
    which.add_argument("--full-size", action="store_true", help="SD1.5 + v2 architecture, random weights (GPU)")
    which.add_argument("--model", help="diffusers SD1.5 folder (needs --motion-adapter)")
    p.add_argument("--motion-adapter", help="diffusers MotionAdapter folder or original motion module file")
    p.add_argument("--prompt", action="append", help="repeatable (default: two fixed prompts; one at full size)")
    p.add_argument("--negative-prompt", action="append")
    p.add_argument("--seed", type=int, action="append", help="one per prompt (default 0, 1, ...)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=sorted(REFERENCE_SCHEDULERS))
    p.add_argument("--scheduler-options", default="{}", help="JSON dict of scheduler options")
    p.add_argument("--clip-skip", type=int, default=0)
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS, help="our UNet's attention kernel")
    p.add_argument("--decode-chunk", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch device")
    p.add_argument("--tolerance", type=float, help="exit 1 when a float stage's max abs diff exceeds this")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch

    # fp32 parity: no TF32 on either side.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    try:
        if args.model:
            if not args.motion_adapter:
                p.error("--model needs --motion-adapter")
            size = "full"
            pipe, tok = load_pipeline(args.model, args.motion_adapter)
        else:
            size = "full" if args.full_size else "tiny"
            pipe, tok = build_random_pipeline(size)
        ours = ours_from_diffusers(pipe, tok, attention=args.attention)
        pipe.to(device)
        d = DEFAULTS[size]
        prompts = args.prompt or (PROMPTS if size == "tiny" else PROMPTS[:1])
        stages = run_parity(
            pipe, ours, prompts, args.negative_prompt, args.seed,
            num_frames=args.frames or d["frames"], height=args.height or d["height"], width=args.width or d["width"],
            steps=args.steps or d["steps"], guidance_scale=args.guidance_scale, scheduler=args.scheduler,
            scheduler_options=json.loads(args.scheduler_options), clip_skip=args.clip_skip,
            decode_chunk=args.decode_chunk,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stages, _note=NORM_NOTE, _device=device, _backend=jax.default_backend(),
                           _attention=args.attention), f, indent=2)
    if args.tolerance is not None:
        bad = [k for k, v in stages.items() if not k.startswith("_") and k != "frames uint8" and v["max_abs"] > args.tolerance]
        if bad:
            print(f"FAIL: {', '.join(bad)} above {args.tolerance}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
