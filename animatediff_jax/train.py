"""`animatediff-jax train --config configs/train/<stage>.py [--config.<field>=<value> ...]`

Runs one training stage from an `ml_collections` config file (a Python file with
`get_config()`); every field can be overridden on the command line, e.g.

    animatediff-jax train --config configs/train/stage2_motion_module.py \\
        --config.model.pretrained=models/sd15 --config.data.csv=webvid.csv \\
        --config.data.video_folder=videos --config.train.batch_size=64 \\
        --config.parallel.mesh_shape.fsdp=4

On a TPU pod slice run the same command on every host; `jax.distributed` is initialised from
the environment (`--config.parallel.distributed=auto`). A run resumes from the latest intact
checkpoint in `workdir/checkpoints` and exports its trained params to `workdir/`.

SIGTERM / SIGINT: the step in progress finishes, a checkpoint is saved at it, exit 0 (rerun the
same command to resume); before the first step (loading, compiling) or on a second signal the run
stops at once, as every command does (`animatediff_jax.interrupts`: one line, exit 130). Exit codes: 0 done or stopped by a signal; 2 a bad config (one line,
before anything loads) or no readable data; 3 diverged (`train.max_nonfinite_steps` non-finite
steps in a row) or refused to save non-finite params.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def parse_config(argv: list[str]):
    """The `ConfigDict` selected and overridden by `argv` (flags only, no command name), and
    `--print_config`; a mistake is a one-line `ValueError` naming the field (`cli.parse_config_flags`)."""
    from animatediff_jax.cli import parse_config_flags

    return parse_config_flags(argv, "train", "configs/train/stage2_motion_module.py")


def main(argv: list[str] | None = None, run: Callable[[Any], Any] | None = None) -> int:
    """The `train` command; `run(config)` (default `training.loop.train`) does the work, so other
    trainers (the toy base model) share its config flags and error handling (`cli.run_command`)."""
    from animatediff_jax.cli import run_command

    def command(args: list[str]) -> None:
        config, print_only = parse_config(args)
        if print_only:
            print(config)
            return
        train = run
        if train is None:
            from animatediff_jax.training.config import validate_config
            from animatediff_jax.training.loop import train

            config = validate_config(config)  # once, before anything loads, compiles or creates the workdir
        train(config)

    return run_command(command, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
