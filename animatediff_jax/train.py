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
same command to resume). Exit codes: 0 done or stopped by a signal; 2 a bad config (one line,
before anything loads) or no readable data; 3 diverged (`train.max_nonfinite_steps` non-finite
steps in a row) or refused to save non-finite params.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags


def parse_config(argv: list[str]):
    """The `ConfigDict` selected and overridden by `argv` (flags only, no command name)."""
    full = ["animatediff-jax train"] + list(argv)
    fv = flags.FlagValues()  # private: no global flag state, so main() can run more than once
    # config_flags finds the `--config.x=...` override names in `sys_argv` (default: sys.argv).
    config_flags.DEFINE_config_file("config", None, "training config file (get_config())", flag_values=fv,
                                    lock_config=True, sys_argv=full)
    flags.DEFINE_bool("print_config", False, "print the resolved config and exit", flag_values=fv)
    rest = fv(full)
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments: {rest[1:]}")
    if fv.config is None:
        raise flags.Error("--config is required (e.g. --config configs/train/stage2_motion_module.py)")
    return fv.config, fv.print_config


def main(argv: list[str] | None = None, run: Callable[[Any], Any] | None = None) -> int:
    """The `train` command; `run(config)` (default `training.loop.train`) does the work, so other
    trainers (the toy base model) share its config flags and error handling."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        config, print_only = parse_config(argv)
    except (AttributeError, KeyError) as e:
        # Unknown `--config.x` fields surface as AttributeError/KeyError from ml_collections.
        print(f"error: {_unknown_field(argv) or _one_line(e).strip(chr(39))}", file=sys.stderr)
        return 2
    except (flags.Error, ValueError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if print_only:
        print(config)
        return 0
    from animatediff_jax.training.config import ConfigError, TrainingError

    if run is None:
        from animatediff_jax.training.config import validate_config
        from animatediff_jax.training.loop import train as run

        try:  # before anything loads, compiles or creates the workdir
            validate_config(config)
        except ConfigError as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
    try:
        run(config)
    except ConfigError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _unknown_field(argv: list[str]) -> str | None:
    """Which `--config.<field>` override names no field of the config file (one line), if any."""
    from animatediff_jax.training.config import unknown_field

    names, plain, skip = [], [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--config."):
            names.append(a[len("--config."):].split("=", 1)[0])
            skip = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        else:
            plain.append(a)
    try:
        config, _ = parse_config(plain)
    except Exception:
        return None
    for name in names:
        msg = unknown_field(config, name)
        if msg:
            return msg
    return None


if __name__ == "__main__":
    sys.exit(main())
