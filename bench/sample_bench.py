"""Sampling speed: ours (JAX, bf16, one jitted scan) vs diffusers' `AnimateDiffPipeline`, same device.

    python bench/sample_bench.py                 # SD1.5 + AnimateDiff v2, 16 frames 512x512, 25 DDIM steps, CFG
    python bench/sample_bench.py --small         # same architecture, 2 frames 64x64, 2 steps (a CPU check)
    python bench/sample_bench.py --small --tiny  # tiny models: checks the script itself in seconds

Both sides sample one video from one prompt with classifier-free guidance batched (uncond + cond
in one UNet call) and decode `--decode-chunk` frames per VAE call (diffusers' default, 16).
Weights are random on both sides (independently drawn: speed does not depend on their values);
diffusers runs fp16 on CUDA, fp32 on CPU, with its default SDPA attention; ours runs in
`--ours-dtype` (bfloat16) under `jax.jit`. Compile time is reported apart and excluded; after
`--warmup` runs, the median of `--repeats` timed runs is reported, each synchronised
(`cuda.synchronize` / results on the host). Peak device memory comes from each framework's
allocator (GPU only). Achieved TFLOP/s uses the compute budget of docs/reference.md: 0.93 PFLOP
for 16 frames 512x512, 25 steps, CFG (0.89 in the UNet, 0.04 in the VAE decode), scaled
linearly by frames x pixels (x steps for the UNet part) for other sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "a cat and the dog"  # the random-weight models' tokenizer is a tiny BPE vocabulary
UNET_PFLOP, VAE_PFLOP = 0.89, 0.04  # per 16 frames 512x512 (25 steps, CFG for the UNet)


def estimated_flop(frames: int, height: int, width: int, steps: int) -> float:
    scale = frames / 16 * (height * width) / 512**2
    return (UNET_PFLOP * steps / 25 + VAE_PFLOP) * scale * 1e15


def device_name(torch_device: str) -> str:
    if torch_device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------


def bench_diffusers(size: str, args, torch_device: str, tok_dir: str) -> dict:
    import torch

    from animatediff_jax.parity import build_random_pipeline

    t0 = time.perf_counter()
    pipe, _ = build_random_pipeline(size, workdir=tok_dir)
    dtype = torch.float16 if torch_device == "cuda" else torch.float32
    pipe.to(torch_device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    attn = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})

    def run():
        with torch.inference_mode():
            out = pipe(prompt=[PROMPT], negative_prompt=[""], num_frames=args.frames, height=args.height,
                       width=args.width, num_inference_steps=args.steps, guidance_scale=7.5,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                       decode_chunk_size=args.decode_chunk)
        if torch_device == "cuda":
            torch.cuda.synchronize()
        return out

    if torch_device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(run, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated() if torch_device == "cuda" else None
    result = dict(name=f"diffusers AnimateDiffPipeline (torch {torch.__version__}, {str(dtype).split('.')[-1]}, "
                       f"{'/'.join(attn)})", times=times, peak_bytes=peak, build_s=build_s, compile_s=0.0)
    return result


# ----------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------


def random_pipeline(size: str, dtype: str, tok_dir: str, attention: str = "auto"):
    """Our pipeline with random weights drawn on the host straight in `dtype` (no float32 copy)."""
    import jax.numpy as jnp

    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import sd15_unet, tiny_unet
    from animatediff_jax.models.init import random_params
    from animatediff_jax.models.shapes import clip_shapes, unet_shapes, vae_shapes
    from animatediff_jax.models.vae import VAEConfig
    from animatediff_jax.sampling import AnimationPipeline
    from animatediff_jax.testing.tiny import write_tiny_tokenizer
    from animatediff_jax.text import Tokenizer

    text = CLIPTextConfig.tiny() if size == "tiny" else CLIPTextConfig.sd15()
    unet = tiny_unet("v2", cross_attention_dim=text.hidden_size) if size == "tiny" else sd15_unet("v2")
    vae = VAEConfig.tiny() if size == "tiny" else VAEConfig.sd15()
    np_dtype = jnp.dtype(dtype)
    params = {
        "unet": random_params(unet_shapes(unet), 0, np_dtype),
        "vae": random_params(vae_shapes(vae), 1, np_dtype),
        "text_encoder": random_params(clip_shapes(text), 2, np_dtype),
    }
    folder = os.path.join(tok_dir, "tokenizer_ours")
    write_tiny_tokenizer(folder)
    return AnimationPipeline(unet, vae, text, params, Tokenizer(folder), dtype=np_dtype, attention=attention)


def bench_ours(size: str, args, tok_dir: str, attention: str = "auto") -> dict:
    import jax

    from animatediff_jax.models import attention as attention_lib
    from animatediff_jax.sampling import generate, sampling_mesh

    t0 = time.perf_counter()
    pipe = random_pipeline(size, args.ours_dtype, tok_dir, attention).on(sampling_mesh(1))  # placed once
    tokens = (args.height // 8) * (args.width // 8)
    kernel = attention_lib.resolve(attention, (1, tokens, 8, 40), (1, tokens, 8, 40), jax.numpy.dtype(args.ours_dtype))
    build_s = time.perf_counter() - t0
    kw = dict(num_frames=args.frames, height=args.height, width=args.width, steps=args.steps, guidance_scale=7.5,
              decode_chunk=args.decode_chunk, progress=False)

    def run():
        return generate(pipe, [PROMPT], [""], [0], **kw)

    first = run()  # compiles (text encoder, denoising scan, decode)
    times = timed(run, max(0, args.warmup - 1), args.repeats)
    stats = jax.local_devices()[0].memory_stats() or {}
    last = run().timings
    return dict(name=f"ours (JAX {jax.__version__}, {args.ours_dtype}, jit, {jax.default_backend()}, attention "
                     f"{attention} = {kernel} at {tokens} tokens)", attention=attention, times=times,
                peak_bytes=stats.get("peak_bytes_in_use"), build_s=build_s, compile_s=first.timings["compile_s"],
                stages={k: last[k] for k in ("text_s", "denoise_s", "decode_s")})


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def report(results: list[dict], flop: float | None) -> None:
    for r in results:
        t = statistics.median(r["times"])
        r["s_per_video"] = t
        r["tflops"] = None if flop is None else flop / t / 1e12
        rate = "n/a (tiny models)" if flop is None else f"{r['tflops']:.3g} TFLOP/s"
        extra = ""
        if "stages" in r:
            extra = " [" + ", ".join(f"{k[:-2]} {v:.3f}s" for k, v in r["stages"].items()) + "]"
        print(f"{r['name']}:\n    {t:.3f} s/video (median of {len(r['times'])}; min {min(r['times']):.3f}, "
              f"max {max(r['times']):.3f}){extra}; compile {r['compile_s']:.1f} s (excluded); "
              f"peak device memory {_gib(r['peak_bytes'])}; {rate}; model build {r['build_s']:.1f} s")
    ref = next((r for r in results if "attention" not in r), None)
    for ours in (r for r in results if "attention" in r and ref is not None):
        ratio = ref["s_per_video"] / ours["s_per_video"]
        ours["ratio_vs_diffusers"] = ratio
        print(f"ratio diffusers/ours (attention {ours['attention']}): {ratio:.2f}x "
              f"({'ours faster' if ratio > 1 else 'diffusers faster'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="2 frames 64x64, 2 steps (CPU-sized)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of SD1.5 + v2")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--decode-chunk", type=int, default=16, help="frames per VAE decode call, both sides")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed runs (default 5; 2 with --small)")
    p.add_argument("--ours-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--attention", default="auto",
                   help="comma-separated models.attention implementations to run ours with (e.g. xla,chunked,cudnn)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    small = dict(frames=2, height=64, width=64, steps=2) if not args.tiny else dict(frames=4, height=32, width=32, steps=2)
    full = dict(frames=16, height=512, width=512, steps=25)
    for k, v in (small if args.small else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats is None:
        args.repeats = 2 if args.small else 5

    import tempfile

    import jax
    import torch

    torch_device = args.torch_device if args.torch_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    size = "tiny" if args.tiny else "full"
    arch = "tiny random models" if args.tiny else "SD1.5 + AnimateDiff v2 (random weights)"
    print(f"device: {device_name(torch_device)}; torch on {torch_device}, JAX on {jax.default_backend()} "
          f"({jax.devices()[0].device_kind})")
    print(f"workload: {arch}, 1 video x {args.frames} frames {args.height}x{args.width}, {args.steps} DDIM steps, "
          f"CFG 7.5 (batched), decode chunk {args.decode_chunk}; median of {args.repeats} after {args.warmup} warm-up")
    flop = None if args.tiny else estimated_flop(args.frames, args.height, args.width, args.steps)
    if flop is not None:
        print(f"estimated compute: {flop / 1e12:.2f} TFLOP per video")
    with tempfile.TemporaryDirectory() as tok_dir:
        results = [bench_ours(size, args, tok_dir, a) for a in args.attention.split(",")]
        if not args.skip_diffusers:
            results.append(bench_diffusers(size, args, torch_device, tok_dir))
    report(results, flop)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=device_name(torch_device), flop=flop, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
