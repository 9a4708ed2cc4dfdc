"""`animatediff-jax convert`: PyTorch weight files -> animatediff-jax params files (then no torch is needed).

  animatediff-jax convert sd15 PATH --out DIR [--base SD15_FOLDER]
      PATH: a diffusers SD1.5 folder or a single-file LDM checkpoint (.safetensors/.ckpt).
      Writes DIR/params.safetensors (unet, vae, text_encoder + configs) and DIR/tokenizer/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from animatediff_jax.checkpoints.torch_io import CheckpointError


def _sd15(args) -> None:
    from animatediff_jax.checkpoints.params_io import save_converted
    from animatediff_jax.checkpoints.sd15 import load_sd15

    base = load_sd15(args.base) if args.base else None
    t0 = time.time()
    print(f"converting {args.path} ...", file=sys.stderr)
    model = load_sd15(args.path, base=base)
    save_converted(args.out, model)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s", file=sys.stderr)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="animatediff-jax convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("sd15", help="Stable Diffusion 1.5 (diffusers folder or LDM single file)")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--base", help="diffusers SD1.5 folder supplying parts a single file lacks (and the tokenizer)")
    s.set_defaults(run=_sd15)
    args = p.parse_args(argv)
    try:
        args.run(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
