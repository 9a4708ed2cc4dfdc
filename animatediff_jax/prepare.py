"""`animatediff-jax prepare`: VAE-encode video clips and text-encode captions once, into ArrayRecord shards.

Stage 2 then trains from the cache (`--config.data.source=cache --config.data.cache_dir=OUT`), skipping
the VAE encoder (~1/3 of the step). Exit codes (`animatediff_jax.cli`): 0 written, 2 bad model files or
nothing readable, 1 a write failed.

  animatediff-jax prepare --model PATH --csv webvid.csv --videos VIDEO_DIR --out cache/ \
      [--n-frames 16 --stride 4 --size 256 --batch-size 8 --num-shards 16 --clips-per-video 1 \
       --latent-dtype float32|float16|bfloat16 (or fp16, bf16, ...) --read-threads 8 --workers 0]

PATH: a converted model folder, a diffusers SD1.5 folder, or (with --base) a single-file checkpoint.
Every path (the model, --csv, --videos, --out) may be in a bucket (gs://...; needs gcsfs): each video
is read through a temporary local copy, each shard written locally and uploaded when complete.

On several hosts (a TPU slice, a GPU cluster) run the same command on every host, with an --out folder
that all of them see (a bucket folder, or a shared filesystem): JAX's distributed runtime starts as for training (found by itself on Cloud TPU
and from JAX_COORDINATOR_ADDRESS & co.; elsewhere --coordinator HOST:PORT --num-processes P
--process-id I). Process I writes shards I, I+P, ... (each over its own devices); process 0 writes
the index, cache_info.json, when all are done. Rerun the same command after an interruption: the
shards already complete are kept, the others rewritten.

--out: a new or empty folder, or one an interrupted run left (only shard files, no cache_info.json:
the run resumes). A complete cache or a folder holding anything else is replaced only with
--overwrite (shards from other inputs are rewritten, other files left alone); never an input folder
(`io.fs.check_output`, the rule of every command). Ctrl-C / SIGTERM: exit 130 with one line saying
which shards are complete (no partial file left); rerun the same command to go on.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

from animatediff_jax import dtypes, interrupts
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.cli import one_line, run_command
from animatediff_jax.errors import ConfigError
from animatediff_jax.io import fs

# What a prepare run writes into --out (`data.cache`): shards, their done files, temporaries, the index.
_CACHE_FILE = re.compile(r"^(shard-\d{5}-of-\d{5}\.p\d{3}\.array_record(\.done\.json)?(\.tmp)?|null_text\.npz"
                         r"|cache_info\.json|\..+\.tmp-\d+-[0-9a-f]{8}(\.\w+)?)$")


def resumable(out: str) -> bool:
    """Whether `out` is what an interrupted `prepare` left: prepare's own files only, and no index."""
    if not fs.isdir(out):
        return False
    names = fs.listdir(out)
    return bool(names) and "cache_info.json" not in names and all(_CACHE_FILE.match(n) for n in names)


def _complete_shards(out: str) -> int:
    try:
        return sum(n.endswith(".array_record.done.json") for n in fs.listdir(out))
    except OSError:
        return 0


def _remove_partial_shards(out: str, process: int) -> None:
    """This process's shard temporaries (`data.cache` writes `<shard>.tmp`, `<done file>.tmp`)."""
    if fs.is_remote(out):
        return  # (staged in a local temporary folder, removed by its writer)
    for p in glob.glob(os.path.join(glob.escape(out), f"shard-*-of-*.p{process:03d}.array_record*.tmp")):
        try:
            os.remove(p)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="animatediff-jax prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--base", help="SD1.5 folder for parts (and the tokenizer) a single file lacks")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    p.add_argument("--csv", required=True, help="WebVid-style CSV: videoid, name (caption), page_dir")
    p.add_argument("--videos", required=True, help="folder of {videoid}.mp4")
    p.add_argument("--out", required=True, help="cache folder (new, empty, or an interrupted run's: resumed)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing cache or non-empty folder "
                   "(shards from other inputs rewritten); never an input folder")
    p.add_argument("--n-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8,
                   help="clips per encoder call in each process (rounded up to a multiple of its devices)")
    p.add_argument("--num-shards", type=int, help="shards in all (default: one per process); each process "
                   "writes whole shards, so more shards lose less work to an interruption")
    p.add_argument("--clips-per-video", type=int, default=1, help="clips cut from each video, each from its own "
                   "random start (and flip)")
    p.add_argument("--latent-dtype", default="float32", help="how latents are stored: float32, float16 or bfloat16 "
                   "(any name of animatediff_jax.dtypes: fp16, bf16, half, ...)")
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
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before anything loads (the output by `fs.check_output`'s one rule)."""
    for name in ("n_frames", "stride", "size", "batch_size", "clips_per_video", "num_shards"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: must be >= 1")
    if args.read_threads < 0 or args.workers < 0:
        raise ConfigError("--read-threads and --workers must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit={args.limit}: must be >= 1")
    args.latent_dtype = dtypes.canonical(args.latent_dtype, "--latent-dtype")
    inputs = tuple(q for q in (args.model, args.base, args.tokenizer, args.csv, args.videos) if q)
    fs.check_output(args.out, inputs, overwrite=args.overwrite or resumable(args.out))


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    from animatediff_jax import parallel

    # Before anything touches a JAX backend, as training does.
    parallel.maybe_initialize_distributed(args.distributed, args.coordinator, args.num_processes, args.process_id)

    import jax

    if args.num_shards is not None and args.num_shards < jax.process_count():
        raise ConfigError(f"--num-shards={args.num_shards} is fewer than the {jax.process_count()} processes "
                          "(each writes whole shards)")
    process = jax.process_index()
    interrupts.on_interrupt(lambda: _remove_partial_shards(args.out, process))
    interrupts.output(args.out, note=lambda: f"rerun the same command to resume ({_complete_shards(args.out)} "
                      "complete shard(s) kept)")

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
    try:
        source = WebVidSource(args.csv, args.videos, n_frames=args.n_frames, stride=args.stride, size=args.size)
    except ValueError as e:  # the CSV (a missing column) or the clip options
        raise ConfigError(one_line(e)) from e
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
