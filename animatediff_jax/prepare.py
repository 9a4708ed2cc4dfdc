"""`animatediff-jax prepare`: VAE-encode video clips and text-encode captions once, into ArrayRecord shards.

Stage 2 then trains from the cache (`--config.data.source=cache --config.data.cache_dir=OUT`), skipping
the VAE encoder (~1/3 of the step). Exit codes (`animatediff_jax.cli`): 0 written, 2 bad model files or
nothing readable, 1 a write failed.

  animatediff-jax prepare --model PATH --csv webvid.csv --videos VIDEO_DIR --out cache/ \
      [--n-frames 16 --stride 4 --size 256 --batch-size 8 --num-shards 16]

PATH: a converted model folder, a diffusers SD1.5 folder, or (with --base) a single-file checkpoint.
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
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--latent-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--limit", type=int, help="encode only the first N clips")
    args = p.parse_args(argv)

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
        batch_size=args.batch_size, num_shards=args.num_shards,
        latent_dtype=args.latent_dtype, limit=args.limit,
    )
    if not info.get("num_records"):
        raise FileNotFoundError(f"no clip of {args.csv} could be read from {args.videos} "
                                f"({info.get('skipped', 0)} skipped): nothing was cached")
    print(f"cached {info.get('num_records')} clips to {args.out} ({info.get('skipped', 0)} skipped)", file=sys.stderr)
    return 0
