"""Memory and compute accounting of the attention implementations, from XLA's compiled programs.

    python bench/memory_bench.py                       # SD1.5 + v2, 16 frames: UNet/sampler at 512², train at 256²
    python bench/memory_bench.py --only unet,tpu       # just one CFG UNet call and the TPU lowering
    python bench/memory_bench.py --small               # tiny-width SD1.5 layout, 2 frames (a CPU check in seconds)

Nothing runs on CPU: every program is `jax.jit(f).lower(*ShapeDtypeStructs).compile()`d and
XLA's accounting is read back, `memory_analysis()` (temp / argument / output bytes) and
`cost_analysis()` (flops, bytes accessed). On GPU/TPU each program also runs once on zeros and
the device's `peak_bytes_in_use` is reported (a running peak of the process: the table says
when an earlier program peaked higher, so the figure is not this program's).

XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip count (a
25-step `lax.scan` reads as one step, and the blockwise "chunked" attention, itself two nested
loops, as one block). The TFLOP and "GiB accessed" columns are therefore loop-aware
(`animatediff_jax.xla_cost.loop_aware_cost`): every loop body is costed on its own and
multiplied by its trip count. XLA's raw figure is printed next
to it ("raw"), as that is what `cost_analysis()` says. "bytes accessed" is XLA's model (each
fusion's operands + result, no caches): the blockwise kernel moves about as many score bytes
as the plain one in this model; what it removes is the live score matrix (temp).

Parts (`--only`), per attention implementation (`--attention`; "auto" is what runs by default
on this host: blockwise "chunked" on CPU, cuDNN flash on GPU, splash on TPU, XLA for short
sequences):
  unet     one CFG UNet call: latents [2, F, S/8, S/8, 4] (uncond + cond), timesteps [2],
           context [2, 77, 768]; bf16 compute and params.
  sampler  the denoising `lax.scan` (`--steps` DDIM steps with CFG over the UNet call, as
           `sampling.denoise`) and the VAE decode of the F frames in chunks of 4
           (`models.vae.decode_video`): two programs, as `generate` compiles them, plus their sum
           (temp: the larger of the two).
  train    the stage-2 gradient: `jax.grad` of the training step's loss (`training.step.make_loss_fn`:
           noise, timesteps, epsilon MSE) w.r.t. the motion-module params (float32), the frozen rest
           bf16, bf16 compute, latents [B, F, T/8, T/8, 4] (T = `--train-size`, 256), context
           [B, 77, 768], per `--batch` and `--remat` policy.
  control  the CFG UNet call with a control model's residuals (`sampling.control`): an SD1.5 ControlNet
           (condition pixels [2, F, S, S, 3]) and SparseCtrl RGB (latents + mask, its motion modules):
           what a ControlNet / SparseCtrl adds to every step, against the "unet" row.
  tpu      the UNet call lowered for TPU on this host (`target_platform("tpu")`,
           `lowering_platforms=("tpu",)`) with "splash" and with "auto": the number of Pallas
           kernels ("tpu_custom_call") in the module.
Note: CPU's `memory_analysis` does not show what remat saves (docs/reference.md): judge remat
by its FLOPs on CPU and by memory only on a device.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # measured peaks are the programs', not a pool
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2**30
PARTS = ("unet", "sampler", "train", "tpu", "control")
DEFAULT_REMAT = ("none", "full", "dots_with_no_batch_dims_saveable")

# Targets of the issue (full size only): (description, part, selector, metric, limit).
TARGET_UNET_TEMP_GIB = 8.0  # baseline "xla": 54.6 GiB
TARGET_UNET_ACCESSED_GIB = 400.0  # baseline "xla": 770 GiB
TARGET_TRAIN_TEMP_GIB = 10.0  # baseline "xla", remat none: 24 GiB
TARGET_TPU_CALLS = 5


# ----------------------------------------------------------------------------------------------
# Loop-aware cost analysis
# ----------------------------------------------------------------------------------------------

from animatediff_jax.xla_cost import loop_aware_cost  # noqa: E402  (every loop counted as often as it runs)

# ----------------------------------------------------------------------------------------------
# Shapes and configs
# ----------------------------------------------------------------------------------------------


def model_configs(small: bool):
    """(UNet config, VAE config): SD1.5 + v2 and SD1.5's VAE, or the same layouts at tiny width."""
    from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet
    from animatediff_jax.models.vae import VAEConfig

    if not small:
        return sd15_unet("v2"), VAEConfig.sd15()
    # SD1.5's layout (4 levels, cross-attention in the first 3, 8 heads, 768-wide text context,
    # v2 motion modules at every level and in the mid block) at 1/10 of the width and one layer
    # per block instead of two (half the graph: compiles in half the time).
    unet = UNetConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, layers_per_block=1).with_motion(
        MotionConfig.for_version("v2", norm_num_groups=8))
    vae = VAEConfig(block_out_channels=(16, 32, 32, 32), norm_num_groups=8)
    return unet, vae


def _cast_shapes(tree, dtype):
    import jax
    import jax.numpy as jnp

    def cast(s):
        dt = dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
        return jax.ShapeDtypeStruct(s.shape, dt)

    return jax.tree.map(cast, tree)


def unet_params(cfg, dtype):
    from animatediff_jax.models.shapes import unet_shapes

    return _cast_shapes(unet_shapes(cfg), dtype)


def vae_params(cfg, dtype):
    from animatediff_jax.models.shapes import vae_shapes

    return _cast_shapes(vae_shapes(cfg), dtype)


# ----------------------------------------------------------------------------------------------
# The programs
# ----------------------------------------------------------------------------------------------


def unet_program(cfg, impl: str, frames: int, size: int):
    import jax
    import jax.numpy as jnp

    from animatediff_jax.models.unet import UNet3D

    unet = UNet3D(cfg, dtype=jnp.bfloat16, attention=impl)
    lat = size // 8

    def fn(params, x, t, ctx):
        return unet.apply({"params": params}, x, t, ctx)

    args = (unet_params(cfg, jnp.bfloat16),
            jax.ShapeDtypeStruct((2, frames, lat, lat, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.int32),
            jax.ShapeDtypeStruct((2, 77, cfg.cross_attention_dim), jnp.bfloat16))
    return fn, args


def control_config(cfg, kind: str):
    """The control model for the UNet `cfg` (its spatial layout): an SD1.5 ControlNet or SparseCtrl RGB."""
    from animatediff_jax.models.controlnet import sd15_controlnet, sparsectrl_config

    spatial = cfg.replace(motion=None)
    if kind == "controlnet":
        return sd15_controlnet(unet=spatial)
    motion = cfg.motion.replace(mid_block=False, self_attentions=1)
    return sparsectrl_config("rgb").replace(unet=spatial.with_motion(motion))


def control_program(cfg, impl: str, frames: int, size: int, kind: str):
    import jax
    import jax.numpy as jnp

    from animatediff_jax.models.controlnet import ControlNet
    from animatediff_jax.models.shapes import controlnet_shapes
    from animatediff_jax.models.unet import UNet3D

    ccfg = control_config(cfg, kind)
    unet = UNet3D(cfg, dtype=jnp.bfloat16, attention=impl)
    control = ControlNet(ccfg, dtype=jnp.bfloat16, attention=impl)
    lat = size // 8
    side = lat if ccfg.latent_condition else size

    def fn(params, cparams, x, t, ctx, cond, mask):
        down, mid = control.apply({"params": cparams}, x, t, ctx, cond, mask, 1.0)
        return unet.apply({"params": params}, x, t, ctx, down, mid)

    args = (unet_params(cfg, jnp.bfloat16), _cast_shapes(controlnet_shapes(ccfg), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, frames, lat, lat, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.int32),
            jax.ShapeDtypeStruct((2, 77, cfg.cross_attention_dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, frames, side, side, ccfg.conditioning_channels), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, frames), jnp.bfloat16) if ccfg.concat_conditioning_mask else None)
    return fn, args


def denoise_program(cfg, impl: str, frames: int, size: int, steps: int):
    import jax
    import jax.numpy as jnp

    from animatediff_jax import schedulers as S
    from animatediff_jax.models.unet import UNet3D
    from animatediff_jax.sampling import denoise

    unet = UNet3D(cfg, dtype=jnp.bfloat16, attention=impl)
    sched = S.make_scheduler("ddim", steps)
    lat = size // 8

    def fn(params, sched, noise, cond, uncond, g, key_data):
        return denoise(unet, params, sched, noise * sched.init_noise_sigma, cond, uncond, g, key_data)

    ctx = jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim), jnp.bfloat16)
    args = (unet_params(cfg, jnp.bfloat16),
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sched),
            jax.ShapeDtypeStruct((1, frames, lat, lat, cfg.in_channels), jnp.float32),
            ctx, ctx,
            jax.ShapeDtypeStruct((), jnp.float32),
            jax.ShapeDtypeStruct((1, 2), jnp.uint32))
    return fn, args


def decode_program(vae_cfg, impl: str, frames: int, size: int, chunk: int = 4):
    import jax
    import jax.numpy as jnp

    from animatediff_jax.models.vae import AutoencoderKL, decode_video

    vae = AutoencoderKL(vae_cfg, dtype=jnp.bfloat16, attention=impl)
    lat = size // vae_cfg.downscale

    def fn(params, latents):
        return decode_video(vae, params, latents, chunk)

    args = (vae_params(vae_cfg, jnp.bfloat16),
            jax.ShapeDtypeStruct((1, frames, lat, lat, vae_cfg.latent_channels), jnp.float32))
    return fn, args


def train_program(cfg, impl: str, frames: int, size: int, batch: int, remat: str):
    """The gradient of the training step's own loss (`training.step.make_loss_fn`, stage 2: the
    motion modules train, float32; the frozen rest bf16; bf16 compute) on cached latents and contexts:
    noise, timesteps and the epsilon MSE as `train` computes them."""
    import jax
    import jax.numpy as jnp

    from animatediff_jax.models.shapes import is_motion_path
    from animatediff_jax.models.unet import UNet3D
    from animatediff_jax.training import stages
    from animatediff_jax.training.step import LossConfig, StepSpec, make_loss_fn

    spec = StepSpec(stage=stages.get_stage("motion_module"), loss=LossConfig(),
                    unet=UNet3D(cfg, dtype=jnp.bfloat16, remat=remat, attention=impl))
    grad = jax.grad(make_loss_fn(spec))
    lat = size // 8

    def fn(motion, frozen, batch, key_data, rows):
        return grad(motion, frozen, batch, jax.random.wrap_key_data(key_data), rows)

    motion, rest = stages.partition(unet_params(cfg, jnp.float32), is_motion_path)
    data = {"latents": jax.ShapeDtypeStruct((batch, frames, lat, lat, cfg.in_channels), jnp.float32),
            "context": jax.ShapeDtypeStruct((batch, 77, cfg.cross_attention_dim), jnp.bfloat16)}
    args = (motion, {"unet": _cast_shapes(rest, jnp.bfloat16)}, data, jax.ShapeDtypeStruct((2,), jnp.uint32),
            jax.ShapeDtypeStruct((batch,), jnp.int32))
    return fn, args


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def _zeros(args):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), args)


def measure(fn, args, measure_peak: bool) -> dict:
    """Compile `fn` for `args` (ShapeDtypeStructs) and read XLA's accounting; optionally run once."""
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = loop_aware_cost(compiled)
    t3 = time.perf_counter()
    rec = dict(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
               output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(getattr(mem, "alias_size_in_bytes", 0)),
               flops=cost["flops"], bytes_accessed=cost["bytes accessed"], transcendentals=cost["transcendentals"],
               raw_flops=cost["raw_flops"], raw_bytes_accessed=cost["raw_bytes accessed"],
               unknown_trip_loops=cost["unknown_trip_loops"], loop_aware=cost["loop_aware"],
               loop_aware_error=cost.get("loop_aware_error"),
               lower_s=t1 - t0, compile_s=t2 - t1, analysis_s=t3 - t2, peak_bytes=None, peak_is_this_call=None)
    if measure_peak:
        dev = jax.local_devices()[0]
        before = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0)
        try:
            concrete = _zeros(args)
            jax.block_until_ready(compiled(*concrete))
            del concrete
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, go on with the next program
            rec["run_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"    run failed: {rec['run_error']}", flush=True)
            return rec
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
        rec["peak_bytes"] = peak
        rec["peak_is_this_call"] = None if peak is None else bool(peak > before)
        rec["run_s"] = time.perf_counter() - t3
    return rec


_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$\-]+)\(", re.M)
_CALL = re.compile(r"\b(?:func\.)?call @([\w.$\-]+)\(")


def count_kernel_calls(text: str, target: str = "tpu_custom_call") -> tuple[int, int]:
    """(kernel calls one run of `main` makes, kernel ops written in the module) for a StableHLO text.

    JAX lowers the kernel of a repeated shape once, as a private function called from every
    layer of that shape, so the ops written in the text undercount the calls: each function's
    own `target` ops are counted, plus its callees' times the call sites, from `main` down.
    """
    heads = [(m.start(), m.group(1)) for m in _FUNC.finditer(text)]
    bodies = {name: text[pos:(heads[i + 1][0] if i + 1 < len(heads) else len(text))]
              for i, (pos, name) in enumerate(heads)}
    memo: dict = {}

    def calls(name: str, depth: int = 0) -> int:
        if name not in memo:
            body = bodies.get(name, "")
            n = body.count("@" + target)
            if depth < 64:
                n += sum(calls(c, depth + 1) for c in _CALL.findall(body) if c in bodies and c != name)
            memo[name] = n
        return memo[name]

    entry = "main" if "main" in bodies else (heads[0][1] if heads else None)
    return (calls(entry) if entry else 0), text.count("@" + target)


def tpu_custom_calls(cfg, impl: str, frames: int, size: int) -> dict:
    """The UNet call lowered for TPU on this host; Pallas kernel calls in the module."""
    import jax

    from animatediff_jax.models import attention

    fn, args = unet_program(cfg, impl, frames, size)
    t0 = time.perf_counter()
    with attention.target_platform("tpu"):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    per_call, written = count_kernel_calls(text)
    return dict(tpu_custom_calls=per_call, tpu_custom_call_ops_in_text=written, lower_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gib(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| part | attention | remat | batch | GiB temp | GiB args | GiB out | TFLOP | GiB accessed "
            "| raw TFLOP / GiB accessed | compile s | peak GiB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r["part"] == "tpu":
            continue
        peak = _gib(r.get("peak_bytes"))
        if r.get("peak_is_this_call") is False:
            peak = f"<= {peak} (earlier)"
        if r.get("run_error"):
            peak = "run failed"
        lines.append(
            f"| {r['label']} | {r['attention']} | {r.get('remat', '-')} | {r.get('batch', '-')} "
            f"| {_gib(r['temp_bytes'])} | {_gib(r['argument_bytes'])} | {_gib(r['output_bytes'])} "
            f"| {r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / GiB:.1f} "
            f"| {r['raw_flops'] / 1e12:.2f} / {r['raw_bytes_accessed'] / GiB:.1f} "
            f"| {r['compile_s']:.0f} | {peak} |")
    return "\n".join(lines)


def tpu_table(rows: list[dict]) -> str:
    tpu = [r for r in rows if r["part"] == "tpu"]
    if not tpu:
        return ""
    lines = ["| TPU lowering of one CFG UNet call | attention | Pallas kernel calls per UNet call "
             "| distinct kernels (tpu_custom_call ops in the text) | lower s |",
             "|---|---|---|---|---|"]
    for r in tpu:
        lines.append(f"| {r['label']} | {r['attention']} | {r['tpu_custom_calls']} "
                     f"| {r['tpu_custom_call_ops_in_text']} | {r['lower_s']:.0f} |")
    return "\n".join(lines)


def check_targets(rows: list[dict], auto_name: str = "auto") -> list[dict]:
    """Pass/fail of the issue's targets (full-size runs only)."""
    out = []

    def find(part, attn, **kw):
        for r in rows:
            if r["part"] == part and r["attention"] == attn and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    def add(name, value, limit, ok, baseline=None):
        out.append(dict(target=name, value=value, limit=limit, passed=ok, baseline=baseline))

    unet = find("unet", auto_name)
    base = find("unet", "xla")
    if unet:
        add("UNet CFG call, temp GiB <=", unet["temp_bytes"] / GiB, TARGET_UNET_TEMP_GIB,
            unet["temp_bytes"] / GiB <= TARGET_UNET_TEMP_GIB, base and base["temp_bytes"] / GiB)
        add("UNet CFG call, GiB accessed (loop-aware) <=", unet["bytes_accessed"] / GiB, TARGET_UNET_ACCESSED_GIB,
            unet["bytes_accessed"] / GiB <= TARGET_UNET_ACCESSED_GIB, base and base["bytes_accessed"] / GiB)
        add("UNet CFG call, GiB accessed (XLA raw, loop bodies once) <=", unet["raw_bytes_accessed"] / GiB,
            TARGET_UNET_ACCESSED_GIB, unet["raw_bytes_accessed"] / GiB <= TARGET_UNET_ACCESSED_GIB,
            base and base["raw_bytes_accessed"] / GiB)
    for r in rows:
        if r["part"] == "train" and r["attention"] == auto_name and r.get("batch") == 1:
            b = find("train", "xla", batch=1, remat="none")
            add(f"train step batch 1 remat {r['remat']}, temp GiB <=", r["temp_bytes"] / GiB, TARGET_TRAIN_TEMP_GIB,
                r["temp_bytes"] / GiB <= TARGET_TRAIN_TEMP_GIB, b and b["temp_bytes"] / GiB)
    tpu = find("tpu", "splash")
    if tpu:
        add("TPU lowering with splash, Pallas calls per UNet call >=", tpu["tpu_custom_calls"], TARGET_TPU_CALLS,
            tpu["tpu_custom_calls"] >= TARGET_TPU_CALLS)
    return out


def device_name() -> str:
    import jax

    if jax.default_backend() != "cpu":
        return f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sample_bench import device_name as host_name  # one host-name reader for the benchmarks

    return host_name("cpu") + " (cpu)"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", default="xla,chunked,auto", help="comma-separated implementations")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    p.add_argument("--frames", type=int, help="frames per video (default 16; 2 with --small)")
    p.add_argument("--size", type=int, help="UNet/sampler/TPU resolution in pixels (default 512)")
    p.add_argument("--train-size", type=int, help="train resolution in pixels (default 256)")
    p.add_argument("--steps", type=int, help="DDIM steps of the sampler scan (default 25; 2 with --small)")
    p.add_argument("--batch", default="1,4", help="train batch sizes (comma-separated)")
    p.add_argument("--remat", default=",".join(DEFAULT_REMAT), help="train remat policies (comma-separated)")
    p.add_argument("--train-attention", help="implementations for the train part (default: --attention)")
    p.add_argument("--train-pairs", help="explicit train runs 'attention:remat:batch;...' (overrides the grid)")
    p.add_argument("--small", action="store_true",
                   help="tiny-width SD1.5 layout (1 layer per block), 2 frames, UNet/sampler at 512² (4096-token first level), "
                        "train at 256², 2 steps: compiles in seconds (CPU test)")
    p.add_argument("--no-peak", action="store_true", help="do not run the programs on GPU/TPU")
    p.add_argument("--run", action="store_true", help="run each program once on CPU too (no peak figure there)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)

    defaults = dict(frames=2, size=512, train_size=256, steps=2) if args.small else \
        dict(frames=16, size=512, train_size=256, steps=25)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    impls = _csv(args.attention)
    parts = _csv(args.only)
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--only: unknown parts {bad}; valid: {', '.join(PARTS)}")

    import jax

    from animatediff_jax.models import attention

    for impl in impls:
        attention.check_implementation(impl)
    from animatediff_jax.models.unet import REMAT_POLICIES

    remats = _csv(args.remat)
    for r in remats:
        if r not in REMAT_POLICIES:
            p.error(f"--remat: unknown policy {r!r}; valid: {', '.join(REMAT_POLICIES)}")
    batches = [int(b) for b in _csv(args.batch)]
    if args.train_pairs:
        train_runs = []
        for item in args.train_pairs.split(";"):
            a, r, b = item.split(":")
            train_runs.append((a.strip(), r.strip(), int(b)))
    else:
        timpls = _csv(args.train_attention) if args.train_attention else impls
        train_runs = [(a, r, b) for b in batches for r in remats for a in timpls]

    backend = jax.default_backend()
    measure_peak = (backend != "cpu" or args.run) and not args.no_peak
    unet_cfg, vae_cfg = model_configs(args.small)
    lat = args.size // 8
    arch = "tiny-width SD1.5 layout + v2" if args.small else "SD1.5 + AnimateDiff v2"
    auto_is = attention.resolve("auto", (2 * args.frames, lat * lat, 8, 40), (2 * args.frames, lat * lat, 8, 40),
                                "bfloat16")
    print(f"device: {device_name()}; JAX {jax.__version__}; "
          f"{'compile + one run per program (on zeros)' if measure_peak else 'compile only (nothing runs)'}")
    print(f"workload: {arch}, {args.frames} frames; UNet/sampler {args.size}x{args.size} "
          f"(latents {lat}x{lat}, {lat * lat} tokens at the first level), train {args.train_size}x{args.train_size}; "
          f"bf16 compute; 'auto' here = {auto_is} for the first-level self-attention")
    print("TFLOP and GiB accessed are loop-aware (while bodies x trip count); 'raw' is XLA's cost_analysis() "
          "(loop bodies once)", flush=True)

    rows: list[dict] = []
    t_start = time.perf_counter()

    def run(label, part, attn, make, **extra):
        t0 = time.perf_counter()
        fn, fargs = make()
        rec = measure(fn, fargs, measure_peak)
        rec.update(dict(label=label, part=part, attention=attn, **extra))
        rows.append(rec)
        print(f"  {label:<34} {attn:<8} {extra.get('remat', ''):<32} {str(extra.get('batch', '')):<3} "
              f"temp {_gib(rec['temp_bytes']):>7} GiB  args {_gib(rec['argument_bytes']):>6} GiB  "
              f"{rec['flops'] / 1e12:8.3f} TFLOP  {rec['bytes_accessed'] / GiB:8.1f} GiB acc "
              f"(raw {rec['raw_flops'] / 1e12:.3f} / {rec['raw_bytes_accessed'] / GiB:.1f})  "
              f"compile {rec['compile_s']:.0f}s, total {time.perf_counter() - t0:.0f}s"
              + (f"  peak {_gib(rec['peak_bytes'])} GiB" if rec["peak_bytes"] is not None else ""), flush=True)
        return rec

    if "unet" in parts:
        print(f"[unet] one CFG UNet call, latents [2, {args.frames}, {lat}, {lat}, 4]", flush=True)
        for impl in impls:
            run(f"UNet CFG call {args.frames}x{args.size}²", "unet", impl,
                functools.partial(unet_program, unet_cfg, impl, args.frames, args.size))
    if "sampler" in parts:
        print(f"[sampler] {args.steps}-step DDIM scan with CFG + VAE decode (chunks of 4)", flush=True)
        for impl in impls:
            d = run(f"sampler: denoise scan ({args.steps} steps)", "denoise", impl,
                    functools.partial(denoise_program, unet_cfg, impl, args.frames, args.size, args.steps))
            v = run(f"sampler: VAE decode ({args.frames} fr, chunks of 4)", "decode", impl,
                    functools.partial(decode_program, vae_cfg, impl, args.frames, args.size))
            tot = dict(label=f"sampler total ({args.steps} steps + decode)", part="sampler", attention=impl)
            for k in ("temp_bytes", "argument_bytes", "output_bytes"):
                tot[k] = max(d[k], v[k])
            for k in ("flops", "bytes_accessed", "raw_flops", "raw_bytes_accessed", "compile_s"):
                tot[k] = d[k] + v[k]
            peaks = [x["peak_bytes"] for x in (d, v) if x["peak_bytes"] is not None]
            tot["peak_bytes"] = max(peaks) if peaks else None
            tot["note"] = "two programs, as generate() runs them: temp/args/out = the larger, costs = the sum"
            rows.append(tot)
    if "train" in parts:
        tl = args.train_size // 8
        print(f"[train] stage-2 gradient w.r.t. motion params, latents [B, {args.frames}, {tl}, {tl}, 4]", flush=True)
        for impl, remat, b in train_runs:
            run(f"train grad {args.frames}x{args.train_size}²", "train", impl,
                functools.partial(train_program, unet_cfg, impl, args.frames, args.train_size, b, remat),
                remat=remat, batch=b)
    if "control" in parts:
        print(f"[control] one CFG UNet call + a control model's residuals, latents [2, {args.frames}, {lat}, {lat}, 4]",
              flush=True)
        for kind in ("controlnet", "sparsectrl"):
            for impl in impls:
                run(f"UNet + {'ControlNet' if kind == 'controlnet' else 'SparseCtrl RGB'} {args.frames}x{args.size}²",
                    "control", impl, functools.partial(control_program, unet_cfg, impl, args.frames, args.size, kind))
    if "tpu" in parts:
        print("[tpu] the UNet call lowered for TPU on this host", flush=True)
        for impl in ("splash", "auto"):
            rec = tpu_custom_calls(unet_cfg, impl, args.frames, args.size)
            rec.update(dict(label=f"UNet CFG call {args.frames}x{args.size}²", part="tpu", attention=impl))
            rows.append(rec)
            print(f"  {impl:<8} {rec['tpu_custom_calls']} Pallas kernel calls per UNet call "
                  f"({rec['tpu_custom_call_ops_in_text']} tpu_custom_call ops written; lowered in {rec['lower_s']:.0f}s)",
                  flush=True)
    total_s = time.perf_counter() - t_start

    print()
    print(table(rows))
    if "tpu" in parts:
        print()
        print(tpu_table(rows))
    full = not args.small and args.frames == 16 and args.size == 512 and args.train_size == 256
    targets = check_targets(rows) if full else []
    if targets:
        print("\ntargets (issue):")
        for t in targets:
            base = "" if t["baseline"] is None else f" (xla baseline {t['baseline']:.1f})"
            print(f"  [{'PASS' if t['passed'] else 'FAIL'}] {t['target']} {t['limit']}: {t['value']:.2f}{base}")
    elif not args.small:
        print("\ntargets: not checked (they are for 16 frames, UNet at 512², train at 256²)")
    print(f"\nwall time {total_s:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=device_name(), backend=backend, jax=jax.__version__,
                           date=datetime.date.today().isoformat(), auto_first_level=auto_is, rows=rows,
                           targets=targets, wall_s=total_s), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
