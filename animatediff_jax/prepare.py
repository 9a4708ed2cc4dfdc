"""`animatediff-jax prepare`: VAE-encode video clips and text-encode captions once, into ArrayRecord shards.

Stage 2 then trains from the cache (`--config.data.source=cache --config.data.cache_dir=OUT`), skipping
the VAE encoder (~1/3 of the step). Exit codes (`animatediff_jax.cli`): 0 written, 2 bad model files or
nothing readable, 1 a write failed.

  animatediff-jax prepare --model PATH --csv webvid.csv --videos VIDEO_DIR --out cache/ \
      [--n-frames 16 --stride 4 --size 256 --batch-size 8 --num-shards 16 --clips-per-video 1 \
       --latent-dtype float32|float16|bfloat16 --read-threads 8 --workers 0]

PATH: a converted model folder, a diffusers SD1.5 folder, or (with --base) a single-file checkpoint.
Every path (the model, --csv, --videos, --out) may be in a bucket (gs://...; needs gcsfs): each video
is read through a temporary local copy, each shard written locally and uploaded when complete.

On several hosts (a TPU slice, a GPU cluster) run the same command on every host, with an --out folder
that all of them see (a bucket folder, or a shared filesystem): JAX's distributed runtime starts as for training (found by itself on Cloud TPU
and from JAX_COORDINATOR_ADDRESS & co.; elsewhere --coordinator HOST:PORT --num-processes P
--process-id I). Process I writes shards I, I+P, ... (each over its own devices); process 0 writes
the index, cache_info.json, when all are done. Rerun the same command after an interruption: the
shards already complete are kept, the others rewritten.
"""

from __future__ import annotations

import argparse
import sys

from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.cli import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="animatediff-jax prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--base", help="SD1.5 folder for parts (and the tokenizer) a single file lacks")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    p.add_argument("--csv", required=True, help="WebVid-style CSV: videoid, name (caption), page_dir")
    p.add_argument("--videos", required=True, help="folder of {videoid}.mp4")
    p.add_argument("--out", required=True)
    p.add_argument("--n-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8,
                   help="clips per encoder call in each process (rounded up to a multiple of its devices)")
    p.add_argument("--num-shards", type=int, help="shards in all (default: one per process); each process "
                   "writes whole shards, so more shards lose less work to an interruption")
    p.add_argument("--clips-per-video", type=int, default=1, help="clips cut from each video, each from its own "
                   "random start (and flip)")
    p.add_argument("--latent-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0, help="clip sampling (start frames, flips)")
    p.add_argument("--limit", type=int, help="encode only the first N rows of the CSV")
    p.add_argument("--read-threads", type=int, default=8, help="decoding threads (in each worker, with --workers)")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes (0: threads of this one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (process 0 shows one)")
    p.add_argument("--distributed", default="auto", choices=["auto", "true", "false"],
                   help="jax.distributed.initialize(): auto (Cloud TPU, JAX_COORDINATOR_ADDRESS, ...) | true | false")
    p.add_argument("--coordinator", default="", help="HOST:PORT of process 0 (off Cloud TPU)")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)
    args = p.parse_args(argv)
    for name in ("n_frames", "stride", "size", "batch_size", "clips_per_video", "num_shards"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value}: must be >= 1")
    if args.read_threads < 0 or args.workers < 0:
        raise ValueError("--read-threads and --workers must be >= 0")

    from animatediff_jax import parallel

    # Before anything touches a JAX backend, as training does.
    parallel.maybe_initialize_distributed(args.distributed, args.coordinator, args.num_processes, args.process_id)

    import jax

    from animatediff_jax.checkpoints.sd15 import load_sd15
    from animatediff_jax.data.cache import prepare_cache
    from animatediff_jax.data.webvid import WebVidSource
    from animatediff_jax.models.clip_text import CLIPTextModel
    from animatediff_jax.models.vae import AutoencoderKL
    from animatediff_jax.text import Tokenizer

    base = load_sd15(args.base) if args.base else None
    model = load_sd15(args.model, base=base)
    tok_dir = args.tokenizer or model.tokenizer_path
    if not tok_dir:
        raise CheckpointError(f"{args.model}: no tokenizer folder: pass --tokenizer or --base")
    source = WebVidSource(args.csv, args.videos, n_frames=args.n_frames, stride=args.stride, size=args.size)
    info = prepare_cache(
        source,
        AutoencoderKL(model.vae_config), model.params["vae"],
        CLIPTextModel(model.text_config), model.params["text_encoder"],
        Tokenizer(tok_dir), args.out,
        batch_size=args.batch_size, num_shards=args.num_shards, seed=args.seed,
        latent_dtype=args.latent_dtype, limit=args.limit, clips_per_video=args.clips_per_video,
        read_threads=args.read_threads, worker_count=args.workers, progress=not args.no_progress,
    )
    if not info.get("num_records"):
        raise FileNotFoundError(f"no clip of {args.csv} could be read from {args.videos} "
                                f"({info.get('skipped', 0)} skipped): nothing was cached")
    if jax.process_index() == 0:
        print(f"cached {info.get('num_records')} clips to {args.out} ({info.get('skipped', 0)} skipped)",
              file=sys.stderr)
    return 0
