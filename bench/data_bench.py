"""Host data throughput: clips/s of the input pipeline alone (no model), per decoding worker count.

    python bench/data_bench.py           # 32 videos of 96 frames at 336x596 (WebVid's size) -> 16x256x256
    python bench/data_bench.py --small   # 16 videos of 64 frames at 180x320 -> 16x128x128 (a CPU check)
    python bench/data_bench.py --workers 0,2,8,16 --json data.json

Two sources, each through `animatediff_jax.data.make_dataset` exactly as training uses it
(`pixels="uint8"`, per-process batch `--batch`, shuffled, repeating):

* `online`: a WebVid-style CSV over synthetic MP4s written with PyAV into a temporary folder
  (a textured background panning under a moving square: H.264 that compresses like real footage,
  not noise); each clip is decoded from frame 0 to its last frame, resized, cropped, flipped;
* `cache`: a latent cache (what `animatediff-jax prepare` writes) with records of the real SD1.5
  sizes for the clip (posterior mean + logvar `[F, size/8, size/8, 4]` float32, CLIP context
  `[77, 768]`, ids, caption), filled with random numbers: no model runs; each read draws the
  posterior sample, as training does.

For each `--workers` count (0: `--read-threads` threads in this process; N: N worker processes of
`--read-threads` threads each) the first batch is timed apart (worker start-up); then as many clips
as the readers can hold (`--prefetch` per reader, `--worker-buffer-size` per worker) are drained,
and `--batches` batches give the steady clips/s of the producers.

The table ends with the rate the pipeline must sustain to keep a device busy. Assumption: stage 2
at batch 4 per chip costs 9.4 TFLOP per 16x256x256 clip forward + backward (x1.47 with the VAE
encoder online; docs/reference.md), run at the compute floor (100% of TPU v5p's 459 TFLOP/s dense
bf16): a v5p chip then trains 48.8 clips/s from the cache and 33.2 clips/s online (~40 clips/s/chip
in round numbers), and a v5p host feeds 4 chips.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_TFLOP_PER_CLIP = 9.4  # stage 2, 16x256x256, forward + backward, cached latents
ONLINE_VAE_FACTOR = 1.47
V5P_TFLOPS, V5P_CHIPS_PER_HOST = 459.0, 4


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_videos(folder: str, n: int, frames: int, height: int, width: int, seed: int = 0) -> str:
    """`n` synthetic MP4s plus a WebVid-style CSV; returns the CSV's path."""
    from animatediff_jax.io import write_mp4

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        tex = rng.integers(0, 256, (height // 8 + 1, (width + frames * 2) // 8 + 1, 3)).astype(np.uint8)
        tex = np.repeat(np.repeat(tex, 8, 0), 8, 1)  # blocky texture, panned 2 px per frame
        video = np.stack([tex[:height, 2 * t : 2 * t + width] for t in range(frames)])
        side = max(4, height // 6)
        for t in range(frames):
            y, x = (t * 3) % (height - side), (t * 5) % (width - side)
            video[t, y : y + side, x : x + side] = (250, 40, 40)
        write_mp4(os.path.join(folder, f"{i}.mp4"), video, fps=25)
        rows.append((str(i), f"synthetic clip {i}", ""))
    path = os.path.join(folder, "videos.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        w.writerows(rows)
    return path


def write_cache(folder: str, n: int, n_frames: int, size: int, seed: int = 0) -> None:
    """A latent cache of `n` random records of the real sizes (one shard, the index `prepare` writes)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from animatediff_jax.data.cache import INFO_FILE, NULL_TEXT_FILE, serialize, shard_name

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lat = (n_frames, size // 8, size // 8, 4)
    name = shard_name(0, 1, 0)
    writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
    for i in range(n):
        writer.write(serialize({
            "index": np.int64(i), "mean": rng.standard_normal(lat, np.float32),
            "logvar": rng.standard_normal(lat, np.float32) - 4, "context": rng.standard_normal((77, 768), np.float32),
            "input_ids": rng.integers(0, 49408, 77).astype(np.int32), "text": np.str_(f"synthetic clip {i}")}))
    writer.close()
    np.savez(os.path.join(folder, NULL_TEXT_FILE), context=np.zeros((77, 768), np.float32),
             input_ids=np.zeros(77, np.int32))
    with open(os.path.join(folder, INFO_FILE), "w") as f:
        json.dump(dict(num_records=n, skipped=0, shards=[name], shard_records=[n], num_rows=n, clips_per_video=1,
                       scaling_factor=0.18215, latent_shape=list(lat), context_shape=[77, 768],
                       latent_dtype="float32", clip_skip=0, seed=0), f)


def measure(source, workers: int, args) -> dict:
    from animatediff_jax.data import make_dataset

    pipe = make_dataset(source, global_batch_size=args.batch, seed=0, shard_index=0, shard_count=1,
                        worker_count=workers, read_threads=args.read_threads, prefetch=args.prefetch,
                        worker_buffer_size=args.worker_buffer_size, pixels="uint8")
    it = iter(pipe)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    # What the readers had buffered by then would flatter the rate: drain it before timing.
    buffered = max(1, workers) * (args.prefetch + (args.worker_buffer_size if workers else 0))
    for _ in range(-(-buffered // args.batch)):
        next(it)
    t1 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t1
    it.close()
    return dict(workers=workers, first_batch_s=first, clips_per_s=args.batches * args.batch / dt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="16 videos of 64 frames at 180x320 -> 16x128x128")
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--video-frames", type=int, default=96)
    p.add_argument("--video-size", default="336x596", help="HxW of the synthetic MP4s")
    p.add_argument("--n-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="clips per batch (one process)")
    p.add_argument("--batches", type=int, default=16, help="timed batches per measurement, after the first")
    p.add_argument("--workers", default="0,1,2,4")
    p.add_argument("--read-threads", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=8, help="read-ahead per reader (drained before timing)")
    p.add_argument("--worker-buffer-size", type=int, default=2)
    p.add_argument("--sources", default="online,cache")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.small:
        args.videos, args.video_frames, args.video_size, args.size = 16, 64, "180x320", 128
    height, width = (int(v) for v in args.video_size.split("x"))
    workers = [int(w) for w in args.workers.split(",")]
    sources = args.sources.split(",")

    from animatediff_jax.data import CachedLatentSource, WebVidSource

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        made = {}
        if "online" in sources:
            csv_path = write_videos(os.path.join(tmp, "videos"), args.videos, args.video_frames, height, width)
            made["online"] = WebVidSource(csv_path, os.path.join(tmp, "videos"), n_frames=args.n_frames,
                                          stride=args.stride, size=args.size, caption_dropout=0.1)
        if "cache" in sources:
            write_cache(os.path.join(tmp, "cache"), max(64, args.videos), args.n_frames, args.size)
            made["cache"] = CachedLatentSource(os.path.join(tmp, "cache"))
        print(f"[data_bench] wrote the inputs in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        for name in sources:
            for w in workers:
                r = measure(made[name], w, args)
                r["source"] = name
                rows.append(r)
                print(f"[data_bench] {name} workers={w}: {r['clips_per_s']:.1f} clips/s "
                      f"(first batch {r['first_batch_s']:.2f}s)", file=sys.stderr, flush=True)

    cached_chip = V5P_TFLOPS / TRAIN_TFLOP_PER_CLIP
    online_chip = cached_chip / ONLINE_VAE_FACTOR
    clip = f"{args.n_frames}x{args.size}x{args.size}"
    print(f"\nclips {clip} (stride {args.stride}) from {args.videos} MP4s of {args.video_frames} frames at "
          f"{height}x{width}; batch {args.batch}; {args.read_threads} read threads per process; "
          f"{os.cpu_count()} CPUs ({cpu_name()})\n")
    print("| source | workers | clips/s | first batch (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['workers']} | {r['clips_per_s']:.1f} | {r['first_batch_s']:.2f} |")
    print(f"\nto feed: stage 2 at batch 4 per chip, TPU v5p at the compute floor ({V5P_TFLOPS:g} TFLOP/s, "
          f"{TRAIN_TFLOP_PER_CLIP} TFLOP per 16x256x256 clip, x{ONLINE_VAE_FACTOR} online): "
          f"{cached_chip:.1f} clips/s/chip from the cache, {online_chip:.1f} online "
          f"({V5P_CHIPS_PER_HOST * cached_chip:.0f} / {V5P_CHIPS_PER_HOST * online_chip:.0f} clips/s per "
          f"{V5P_CHIPS_PER_HOST}-chip host)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, need_per_chip=dict(cache=cached_chip, online=online_chip)), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
