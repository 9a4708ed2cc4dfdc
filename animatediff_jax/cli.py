"""`animatediff-jax <command> ...`: one entry point, each command in its own module (imported lazily)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "convert": ("animatediff_jax.convert", "PyTorch weights (SD1.5, motion modules, LoRAs) -> params files"),
    "demo": ("animatediff_jax.toy.demo", "the whole recipe in a toy world on CPU: train or load, GIFs, motion metrics"),
    "export": ("animatediff_jax.export", "motion modules, MotionLoRAs, domain adapters -> PyTorch files"),
    "prepare": ("animatediff_jax.prepare", "VAE/text-encode a WebVid-style dataset once into a latent cache"),
    "parity": ("animatediff_jax.parity", "compare each sampling stage with diffusers' AnimateDiffPipeline"),
    "sample": ("animatediff_jax.sample", "text to video from a prompt config (GIF/MP4/PNG, grid)"),
    "train": ("animatediff_jax.train", "train a stage: domain adapter, motion module, MotionLoRA"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: animatediff-jax <command> [options]", "", "commands:"]
        lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
