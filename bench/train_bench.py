"""Stage-2 training speed: our motion-module train step (JAX) vs a PyTorch/diffusers reference step, same device.

    python bench/train_bench.py                  # SD1.5 + AnimateDiff v2, 16 frames 256x256, batch 4 per device
    python bench/train_bench.py --small          # same architecture, 2 frames 64x64, batch 1 (a CPU check)
    python bench/train_bench.py --small --tiny   # tiny models: checks the script (compile-bound, < 1 min on CPU)
    python bench/train_bench.py --remat-sweep none,full,dots_with_no_batch_dims_saveable,dots_saveable
                                                 # compile only: FLOPs / XLA temp bytes of the stage-2 gradient per remat policy

Two variants of the step, both sides: `cached` (the batch holds VAE latents and text contexts, as
after `animatediff-jax prepare`) and `online` (the batch holds pixels; the frozen VAE encodes them
inside the step, under no_grad on the torch side). Text contexts are cached in both.

Ours: the trainer of `animatediff_jax.training` (`build_trainer`, stage `motion_module`, random
SD1.5 + v2 weights from `random_params`) on a 1x1 mesh of one device, `--ours-dtype` compute
(auto: bfloat16 on GPU/TPU, float32 on CPU like torch), float32 trainable params, AdamW, one
jitted step with the train state donated. On a shared CPU machine set OMP_WAIT_POLICY=PASSIVE:
torch's spinning OpenMP threads otherwise stall for seconds per step (see BENCHMARKS.md).
Reference: diffusers' `UNetMotionModel.from_unet2d` with random weights (`tests/torch_refs.py`),
only the motion modules trainable, AdamW(lr 1e-4, wd 1e-2), grad-norm clip 1.0, bf16 autocast on
CUDA (fp32 on CPU), SDPA attention (`AttnProcessor2_0`), DDPM noising and epsilon MSE. Both sides
draw fresh noise and one timestep per clip every step. diffusers' motion modules normalise across
frames (the original: per frame); the difference is one reshape, irrelevant to speed.

`--remat-sweep` runs nothing: it compiles the stage-2 gradient (loss of `training.step`, motion
modules trainable, frozen base in `--frozen-dtype`, cached latents) from `ShapeDtypeStruct`s for
each listed policy and prints XLA's `cost_analysis` FLOPs and `memory_analysis` temp bytes. On CPU
the temp bytes do not show what remat saves (docs/reference.md): judge remat there by the FLOP
overhead, and by memory on a device only.

Compile time is reported apart and excluded; after `--warmup` steps, the median of `--repeats`
synchronised steps is reported. TFLOP/s uses the budget of docs/reference.md: ~9.4 TFLOP forward +
backward per 16x256x256 clip (+~47% with online VAE encode), scaled by frames x pixels for other
sizes (not computed for tiny models); MFU divides it by the device's dense bf16 peak (table below;
unknown devices: omitted). Peak memory: torch's `max_memory_allocated` per variant; JAX's
`memory_stats()["peak_bytes_in_use"]` (a running peak since start: the second variant's includes
the first) where the backend has it, plus XLA's compiled temp-buffer size per variant.
Torch runs first, then frees its memory (`empty_cache`), so that JAX's allocator, which keeps
what it takes, does not starve it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

from sample_bench import device_name, timed

TRAIN_TFLOP_PER_CLIP = 9.4  # forward + backward, one 16x256x256 clip, cached latents
ONLINE_VAE_FACTOR = 1.47
VARIANTS = ("cached", "online")
# Dense bf16 peak TFLOP/s per device (H100/H200: SXM), matched against the device name in order.
PEAK_TFLOPS = (("h100", 989.0), ("h200", 989.0), ("a100", 312.0), ("v5p", 459.0), ("v5 lite", 197.0),
               ("v5e", 197.0), ("tpu v5", 459.0), ("v4", 275.0))


def peak_tflops(device: str) -> float | None:
    d = device.lower()
    return next((v for k, v in PEAK_TFLOPS if k in d), None)


def flop_per_clip(frames: int, resolution: int, variant: str) -> float:
    scale = frames / 16 * resolution**2 / 256**2
    return TRAIN_TFLOP_PER_CLIP * 1e12 * scale * (ONLINE_VAE_FACTOR if variant == "online" else 1.0)


def model_configs(tiny: bool):
    """The UNet (+ v2 motion modules) and VAE configs `load_models` builds for `model.size`."""
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import MotionConfig, sd15_unet, tiny_unet
    from animatediff_jax.models.vae import VAEConfig

    if tiny:
        return (tiny_unet(None, cross_attention_dim=CLIPTextConfig.tiny().hidden_size).with_motion(
            MotionConfig.for_version("v2")), VAEConfig.tiny())
    return sd15_unet("v2"), VAEConfig.sd15()


def release_host_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc keeps them otherwise), so
    that the side that runs next, on a CPU host, sees the memory the previous one freed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def host_batch(args, unet_cfg, vae_cfg, variant: str, seed: int = 0) -> dict:
    """Random inputs, channels-last (ours): latents `[b, F, h, w, 4]` or pixels `[b, F, H, W, 3]`, context `[b, 77, D]`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, f, r = args.batch, args.frames, args.resolution
    out = {"context": rng.standard_normal((b, 77, unet_cfg.cross_attention_dim), np.float32)}
    if variant == "cached":
        h = r // vae_cfg.downscale
        out["latents"] = rng.standard_normal((b, f, h, h, unet_cfg.in_channels), np.float32)
    else:
        out["video"] = rng.uniform(-1, 1, (b, f, r, r, 3)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# PyTorch / diffusers
# ----------------------------------------------------------------------------------------------


def bench_torch(args, unet_cfg, vae_cfg, torch_device: str) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler

    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
    from torch_refs import randomize, torch_motion_unet

    cuda = torch_device == "cuda"
    t0 = time.perf_counter()
    unet = torch_motion_unet(unet_cfg).to(torch_device).train()
    unet.freeze_unet2d_params()  # motion modules trainable, the rest requires_grad=False
    if args.remat != "none":
        unet.enable_gradient_checkpointing()
    vae = randomize(AutoencoderKL(**vae_cfg.to_diffusers()), 1).to(torch_device).requires_grad_(False).eval() \
        if "online" in args.variants else None
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    build_s = time.perf_counter() - t0
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    dtype = "bfloat16 autocast" if cuda else "float32"
    n_train = sum(p.numel() for p in params)
    result = dict(name=f"diffusers UNetMotionModel (torch {torch.__version__}, {dtype}, {'/'.join(attn)})",
                  device=device_name(torch_device), trainable_params=n_train,
                  frozen_params=sum(p.numel() for p in unet.parameters()) - n_train, build_s=build_s, variants={})

    def to_torch(x):
        return torch.from_numpy(x).to(torch_device)

    def run_variant(variant: str) -> dict:
        hb = host_batch(args, unet_cfg, vae_cfg, variant)
        ctx = to_torch(hb["context"])
        # Channels first: latents [b, 4, F, h, w] (UNetMotionModel's layout), pixels [b, F, 3, H, W].
        lat = to_torch(hb["latents"]).permute(0, 4, 1, 2, 3).contiguous() if variant == "cached" else None
        video = to_torch(hb["video"]).permute(0, 1, 4, 2, 3).contiguous() if variant == "online" else None
        losses = []

        def step():
            b, f = args.batch, args.frames
            if video is not None:
                with torch.no_grad(), autocast():
                    z = vae.encode(video.flatten(0, 1)).latent_dist.sample() * vae_cfg.scaling_factor
                latents = z.float().unflatten(0, (b, f)).transpose(1, 2)  # [b, 4, F, h, w]
            else:
                latents = lat
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=torch_device)
            noisy = sched.add_noise(latents, noise, t)
            with autocast():
                pred = unet(noisy, t, encoder_hidden_states=ctx.repeat_interleave(f, 0)).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            losses.append(loss.detach())

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()  # first step: creates the optimizer state (lazily) and warms up kernels / the allocator
        first_s = time.perf_counter() - t0
        times = timed(step, max(0, args.warmup - 1), args.repeats)
        return dict(times=times, first_step_s=first_s, compile_s=0.0, loss=float(losses[-1]),
                    peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)

    for variant in args.variants:
        result["variants"][variant] = run_variant(variant)
    return result  # the models and optimizer go with this frame (main() then releases the memory)


# ----------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------


def ours_config(args):
    from animatediff_jax.training import base_config

    c = base_config()
    c.stage = "motion_module"
    c.model.pretrained = ""
    c.model.size = "tiny" if args.tiny else "sd15"
    c.model.random_init = "fast"  # host numpy: Flax init of the full UNet would compile for minutes
    c.model.motion_version = "v2"
    c.model.vae = "online" in args.variants
    c.model.text_encoder = False  # contexts are cached in both variants
    c.train.batch_size = args.batch
    c.train.num_frames = args.frames
    c.train.resolution = args.resolution
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    c.parallel.compute_dtype = args.ours_dtype
    c.parallel.frozen_dtype = args.frozen_dtype
    c.parallel.remat = args.remat
    c.parallel.attention = args.attention
    return c


def remat_sweep(args, unet_cfg, policies) -> dict:
    """Compile-only FLOPs and XLA temp bytes of the stage-2 gradient for each remat policy."""
    import jax
    import jax.numpy as jnp

    from animatediff_jax.models.shapes import unet_shapes
    from animatediff_jax.models.unet import UNet3D
    from animatediff_jax.training import stages
    from animatediff_jax.training.step import StepSpec, make_loss_fn

    compute = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.ours_dtype]
    frozen_dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.frozen_dtype]
    shapes = unet_shapes(unet_cfg)
    trainable, frozen = stages.partition(shapes, stages.is_motion_module)
    trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), trainable)
    frozen = {"unet": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, frozen_dt), frozen)}
    h = args.resolution // 8
    batch = {"latents": jax.ShapeDtypeStruct((args.batch, args.frames, h, h, unet_cfg.in_channels), jnp.float32),
             "context": jax.ShapeDtypeStruct((args.batch, 77, unet_cfg.cross_attention_dim), jnp.float32)}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    rows = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    out = {}
    for policy in policies:
        spec = StepSpec(stage=stages.get_stage("motion_module"),
                        unet=UNet3D(unet_cfg, dtype=compute, remat=policy, attention=args.attention))
        grad = jax.jit(jax.value_and_grad(make_loss_fn(spec)))
        t0 = time.perf_counter()
        compiled = grad.lower(trainable, frozen, batch, key, rows).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
        out[policy] = dict(flops=float(cost.get("flops", float("nan"))),
                           temp_bytes=getattr(mem, "temp_size_in_bytes", None),
                           compile_s=time.perf_counter() - t0)
        base = out.get("none", out[policies[0]])["flops"]
        r = out[policy]
        print(f"remat {policy:34s}: {r['flops'] / 1e12:.3f} TFLOP ({100 * (r['flops'] / base - 1):+.1f}% vs "
              f"{'none' if 'none' in out else policies[0]}), XLA temp {_gib(r['temp_bytes'])}, "
              f"compile {r['compile_s']:.0f} s", flush=True)
    return out


def bench_ours(args, unet_cfg, vae_cfg) -> dict:
    import jax

    from animatediff_jax import parallel
    from animatediff_jax.training import build_trainer, load_models, stages

    device = jax.local_devices()[0]
    t0 = time.perf_counter()
    config = ours_config(args)
    models = load_models(config)
    assert models.unet_config == unet_cfg, "bench configs drifted from load_models'"
    trainer = build_trainer(config, models, parallel.make_mesh({"data": 1, "fsdp": 1}, [device]))
    models.unet = models.vae = None  # the host copies (the trainer holds device copies)
    del models
    release_host_memory()
    build_s = time.perf_counter() - t0
    n_train = stages.count_params(trainer.state.params)
    frozen_unet = stages.count_params(trainer.frozen["unet"])
    result = dict(name=f"ours (JAX {jax.__version__}, {args.ours_dtype} compute, frozen {args.frozen_dtype}, "
                       f"remat {args.remat}, attention {args.attention}, jit, {jax.default_backend()})",
                  device=device.device_kind if device.platform != "cpu" else device_name("cpu"),
                  trainable_params=n_train, frozen_params=frozen_unet, build_s=build_s, variants={})

    def run_variant(variant: str) -> dict:
        batch = trainer.put_batch(host_batch(args, unet_cfg, vae_cfg, variant))
        t0 = time.perf_counter()
        compiled = trainer.step_fn(batch).lower(trainer.state, trainer.frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        metrics = []

        def step():
            trainer.state, m = compiled(trainer.state, trainer.frozen, batch)
            jax.block_until_ready((trainer.state, m))
            metrics.append(m)

        t0 = time.perf_counter()
        step()
        first_s = time.perf_counter() - t0
        times = timed(step, max(0, args.warmup - 1), args.repeats)
        stats = device.memory_stats() or {}
        try:
            temp = compiled.memory_analysis().temp_size_in_bytes
        except Exception:  # not every backend / version reports it
            temp = None
        return dict(times=times, first_step_s=first_s, compile_s=compile_s, loss=float(metrics[-1]["loss"]),
                    peak_bytes=stats.get("peak_bytes_in_use"), temp_bytes=temp)

    for variant in args.variants:
        result["variants"][variant] = run_variant(variant)
    return result


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def summarise(r: dict, args) -> None:
    """Adds s_per_step, clips_per_s, tflops, mfu to each variant of one side's result, and prints them."""
    peak = peak_tflops(r["device"])
    print(f"{r['name']} on {r['device']}: {r['trainable_params'] / 1e6:.1f}M trainable / "
          f"{r['frozen_params'] / 1e6:.1f}M frozen UNet params; model build {r['build_s']:.1f} s")
    for variant, v in r["variants"].items():
        t = statistics.median(v["times"])
        flop = None if args.tiny else flop_per_clip(args.frames, args.resolution, variant) * args.batch
        v.update(s_per_step=t, clips_per_s=args.batch / t, tflops=None if flop is None else flop / t / 1e12)
        v["mfu"] = None if v["tflops"] is None or peak is None else v["tflops"] / peak
        rate = "TFLOP/s n/a (tiny models)" if flop is None else f"{v['tflops']:.3g} TFLOP/s"
        mfu = "MFU n/a" if v["mfu"] is None else f"MFU {100 * v['mfu']:.1f}%"
        temp = f" (XLA temp {_gib(v['temp_bytes'])})" if v.get("temp_bytes") is not None else ""
        print(f"  {variant:6s}: {t:.4f} s/step (median of {len(v['times'])}; min {min(v['times']):.4f}, "
              f"max {max(v['times']):.4f}), {v['clips_per_s']:.3g} clips/s, {rate}, {mfu}; "
              f"compile {v['compile_s']:.1f} s, first step {v['first_step_s']:.1f} s (excluded); "
              f"peak memory {_gib(v['peak_bytes'])}{temp}; loss {v['loss']:.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="2 frames 64x64, batch 1 (CPU-sized)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of SD1.5 + v2")
    p.add_argument("--batch", type=int, help="clips per step (one device), default 4 (1 with --small)")
    p.add_argument("--frames", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--variants", default="cached,online", help="comma list of: cached (latents), online (VAE)")
    p.add_argument("--warmup", type=int, default=2, help="steps after the first (compiling) one, untimed")
    p.add_argument("--repeats", type=int, help="timed steps (default 5; 3 with --small)")
    p.add_argument("--ours-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="our compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU (as torch's autocast policy)")
    p.add_argument("--frozen-dtype", default="float32", choices=("bfloat16", "float32"),
                   help="storage of our frozen weights (torch keeps fp32 weights under autocast)")
    p.add_argument("--remat", default="none",
                   help="our per-block remat policy; anything but 'none' also turns on torch's gradient checkpointing")
    p.add_argument("--attention", default="auto",
                   help="our UNet's attention kernel (models.attention.IMPLEMENTATIONS: auto, xla, chunked, cudnn, splash)")
    p.add_argument("--remat-sweep", default="",
                   help="comma list of remat policies: compile only (nothing runs) and print FLOPs / temp bytes of each")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up when redirected to a file
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    from animatediff_jax.models.attention import IMPLEMENTATIONS

    if args.attention not in IMPLEMENTATIONS:
        p.error(f"--attention {args.attention!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: expected a comma list of {VARIANTS}")
    if args.tiny:
        size = dict(batch=2, frames=4, resolution=32)
    elif args.small:
        size = dict(batch=1, frames=2, resolution=64)
    else:
        size = dict(batch=4, frames=16, resolution=256)
    for k, v in size.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats is None:
        args.repeats = 3 if args.small else 5

    import jax

    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as e:
        if not args.skip_torch:
            print(f"torch/diffusers not available ({e}): reference skipped")
        args.skip_torch, torch = True, None
    torch_device = "cpu"
    if torch is not None:
        torch_device = args.torch_device if args.torch_device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        if args.torch_device == "auto" and torch_device == "cpu" and jax.default_backend() != "cpu":
            print(f"no CUDA for torch while JAX runs on {jax.default_backend()}: reference skipped "
                  "(--torch-device cpu forces it onto the host)")
            args.skip_torch = True
    if args.ours_dtype == "auto":
        args.ours_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    unet_cfg, vae_cfg = model_configs(args.tiny)
    if args.remat_sweep:
        policies = [x.strip() for x in args.remat_sweep.split(",") if x.strip()]
        print(f"remat sweep (compile only): stage-2 gradient, {'tiny' if args.tiny else 'SD1.5 + v2'}, "
              f"{args.batch} x {args.frames} frames {args.resolution}x{args.resolution}, {args.ours_dtype} compute, "
              f"frozen {args.frozen_dtype}, attention {args.attention}, {jax.default_backend()}")
        sweep = remat_sweep(args, unet_cfg, policies)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(args=vars(args), remat_sweep=sweep), f, indent=2, default=str)
        return 0
    arch = "tiny random models" if args.tiny else "SD1.5 + AnimateDiff v2 (random weights)"
    print(f"JAX on {jax.default_backend()} ({jax.devices()[0].device_kind}); torch on {torch_device}")
    print(f"workload: stage-2 train step, {arch}, {args.batch} clip(s) x {args.frames} frames "
          f"{args.resolution}x{args.resolution}, variants {', '.join(args.variants)}; "
          f"median of {args.repeats} after {args.warmup} warm-up step(s) + the first")
    if not args.tiny:
        print("estimated compute: " + ", ".join(
            f"{v} {flop_per_clip(args.frames, args.resolution, v) * args.batch / 1e12:.3g} TFLOP/step"
            for v in args.variants))
    results = {}
    if not args.skip_torch:
        results["torch"] = bench_torch(args, unet_cfg, vae_cfg, torch_device)
        release_host_memory()
        if torch_device == "cuda":
            torch.cuda.empty_cache()  # JAX's allocator takes from what torch's cache gives back
        summarise(results["torch"], args)
    if not args.skip_ours:
        results["ours"] = bench_ours(args, unet_cfg, vae_cfg)
        summarise(results["ours"], args)
    ratios = {}
    if len(results) == 2:
        for v in args.variants:
            ratios[v] = results["ours"]["variants"][v]["clips_per_s"] / results["torch"]["variants"][v]["clips_per_s"]
        print("ratio ours/torch (clips/s): " + ", ".join(
            f"{v} {r:.2f}x ({'ours faster' if r > 1 else 'torch faster'})" for v, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results, ratio_ours_over_torch=ratios), f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
