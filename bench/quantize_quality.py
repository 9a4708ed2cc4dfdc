"""What int8 does to a trained model's videos: the toy world's shipped checkpoint (base + motion module +
domain adapter) sampled in float32, bf16 and the two int8 modes (`--config.quantize`), scored by the toy
world's motion metric (direction accuracy against the prompt, jitter) and compared frame by frame.

    python bench/quantize_quality.py            # 8 prompts per direction (32 videos per mode), ~3 min on 2 cores

CPU is enough: it measures numerics, not speed (for speed: `animatediff-jax compile sample ...
--config.quantize=...`, BENCHMARKS.md's TPU section).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

MODES = (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8_weights"), ("bfloat16", "int8"))


def measure(per_direction: int = 8, modes: tuple = MODES, steps: int | None = None, log=print) -> dict[str, dict]:
    """Per mode (float32 and bfloat16 among them): the toy metric's `Summary` row, and the frames' mean
    |difference| / 255 against float32 (`vs_float32`, `share_over_8`) and against bf16 (`vs_bfloat16`).
    `steps`: sampling steps (None: the demo's 20)."""
    import jax.numpy as jnp

    from animatediff_jax.sampling.pipeline import cast_floating, quantize_unet
    from animatediff_jax.toy import demo, metrics, world

    toy = demo.load_toy(demo.ASSETS)
    prompts, seeds = demo.prompt_set(world.TRANSLATIONS, per_direction)
    expected = [world.parse_caption(x)["motion"] for x in prompts]
    base = demo.pipeline(toy, motion=True)
    settings = demo.FULL if steps is None else dataclasses.replace(demo.FULL, sample_steps=steps)
    videos: dict[str, np.ndarray] = {}
    rows: dict[str, metrics.Summary] = {}
    for dtype, mode in modes:
        name = f"{dtype} {mode}" if mode != "none" else dtype
        unet = quantize_unet(toy.motion_config, base.params["unet"], mode)
        params = cast_floating({**base.params, "unet": unet}, getattr(jnp, dtype))
        pipe = dataclasses.replace(base, params=params, dtype=getattr(jnp, dtype), quantize=mode)
        t0 = time.perf_counter()
        videos[name] = demo.sample(toy, pipe, prompts, seeds, settings).astype(np.float64)
        rows[name] = metrics.summarize(videos[name].astype(np.uint8), expected)
        log(f"{name}: {len(prompts)} videos in {time.perf_counter() - t0:.0f} s")
    log(metrics.format_table(rows, demo.CHANCE))
    out = {}
    for name, v in videos.items():
        d = np.abs(v - videos["float32"])
        out[name] = {**rows[name].row(), "vs_float32": float(d.mean()), "share_over_8": float((d > 8).mean()),
                     "vs_bfloat16": float(np.abs(v - videos["bfloat16"]).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-direction", type=int, default=8)
    args = p.parse_args(argv)
    result = measure(args.per_direction)
    print(f"\n{'frames vs':<28}{'float32: mean |d| / 255':>24}{'> 8 / 255':>11}{'bfloat16: mean |d|':>20}")
    for name, r in result.items():
        print(f"{name:<28}{r['vs_float32']:>24.2f}{r['share_over_8']:>11.3f}{r['vs_bfloat16']:>20.2f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
