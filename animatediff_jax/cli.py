"""`animatediff-jax <command> ...`: one entry point, each command in its own module (imported lazily).

Every command runs through `run_command`, so all of them answer `-h` the same way and end the same
way: exit 0 when done; 2 for input the user can fix (a bad config, argument or weight file, a file
that exists or is missing: one line `error: ...` naming it, before anything long starts); 1 when
writing failed (disk full, permissions: nothing was replaced); 3 when training diverged.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

BAD_INPUT, WRITE_FAILED = 2, 1


def one_line(e: BaseException) -> str:
    """An error message on one line (loaders report several lines: a key list per problem)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None, doc: str | None = None) -> int:
    """`body(argv)` with the exit-code convention above. With `doc`, `-h`/`--help` prints it (commands
    that parse with argparse pass None: it prints their help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if doc is not None and any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    try:
        return int(body(argv) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError) as e:  # the config, arguments or files given (CheckpointError, ConfigError)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:
        what = f"{e.filename}: " if e.filename else ""
        print(f"error: cannot write {what}{e.strerror or one_line(e)} (nothing was replaced)", file=sys.stderr)
        return WRITE_FAILED
    except RuntimeError as e:
        code = getattr(e, "exit_code", None)  # training.config.TrainingError (diverged: 3)
        if code is None:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return int(code)

COMMANDS = {
    "convert": ("animatediff_jax.convert", "PyTorch weights (SD1.5, motion modules, LoRAs) -> params files"),
    "demo": ("animatediff_jax.toy.demo", "the whole recipe in a toy world on CPU: train or load, GIFs, motion metrics"),
    "export": ("animatediff_jax.export", "motion modules, MotionLoRAs, domain adapters -> PyTorch files"),
    "prepare": ("animatediff_jax.prepare", "VAE/text-encode a WebVid-style dataset once into a latent cache"),
    "parity": ("animatediff_jax.testing.parity", "compare each sampling stage with diffusers' AnimateDiffPipeline"),
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
