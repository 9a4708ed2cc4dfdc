"""`animatediff-jax <command> ...`: one entry point, each command in its own module (imported lazily).

Every command runs through `run_command`, so all of them answer `-h` the same way and end the same
way (the error contract):

* 0 when done;
* 2 for input the user can fix: a `errors.ConfigError` (a bad config field or argument), a
  `checkpoints.torch_io.CheckpointError` (an unusable weight file), a missing or existing path the
  user named (`FileNotFoundError`, `FileExistsError`, `NotADirectoryError`, `IsADirectoryError`):
  one line `error: ...` naming it, before anything long starts;
* 1 when writing failed (disk full, permissions: one line, nothing was replaced), and for a bug:
  any other exception keeps its traceback;
* 3 when training diverged (`training.config.TrainingError.exit_code`);
* 130 when stopped by Ctrl-C (SIGINT) or SIGTERM (`animatediff_jax.interrupts`): one line
  `interrupted (SIGINT); nothing written` (or which complete files were written, and where), no
  traceback, no partial file (`train` instead finishes its step, saves and exits 0).

`--debug` (anywhere on the command line: `animatediff-jax --debug sample ...` or after the command's
name) shows the traceback of a user error too (then the same one line and exit code).
`animatediff-jax --version` prints the version. Commands run from a config file (`sample`, `train`)
read it with `parse_config_flags` (`ml_collections.config_flags`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import traceback
from typing import Callable, Iterator, Sequence

from animatediff_jax import interrupts
from animatediff_jax.errors import ConfigError

OK, BAD_INPUT, WRITE_FAILED = 0, 2, 1
DEBUG_FLAG = "--debug"
_debug = False  # set by `--debug` (or ANIMATEDIFF_JAX_DEBUG=1)
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def one_line(e: BaseException) -> str:
    """An error message on one line (loaders report several lines: a key list per problem)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def debugging() -> bool:
    return _debug or os.environ.get("ANIMATEDIFF_JAX_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def _debug_flag(argv: list[str]) -> Iterator[list[str]]:
    """`argv` without `--debug`; with it, debugging is on for the block (then as it was)."""
    global _debug
    before = _debug
    if DEBUG_FLAG in argv:
        _debug = True
        argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        yield argv
    finally:
        _debug = before


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix (one line, exit 2): everything else is a bug."""
    types: tuple[type[BaseException], ...] = (ConfigError,) + PATH_ERRORS
    torch_io = sys.modules.get("animatediff_jax.checkpoints.torch_io")  # (not imported: none was raised)
    if torch_io is not None:
        types += (torch_io.CheckpointError,)
    return types


def _fail(e: BaseException, line: str, code: int) -> int:
    if debugging():
        traceback.print_exception(type(e), e, e.__traceback__)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None, doc: str | None = None) -> int:
    """`body(argv)` with the exit codes above (`--debug` is taken out of `argv` first). With `doc`,
    `-h`/`--help` prints it (commands that parse with argparse pass None: it prints their help).
    Ctrl-C / SIGTERM end the process here (`interrupts.exit_interrupted`: it does not return)."""
    with _debug_flag(list(sys.argv[1:] if argv is None else argv)) as argv:
        return _run(body, argv, doc)


def _run(body: Callable[[list[str]], int | None], argv: list[str], doc: str | None) -> int:
    if doc is not None and any(a in ("-h", "--help") for a in argv):
        print(doc)
        return OK
    with interrupts.handling():
        try:
            code = int(body(argv) or 0)
            if interrupts.received():  # a signal the command went on past (a library swallowed it)
                interrupts.exit_interrupted()
            return code
        except KeyboardInterrupt:
            interrupts.exit_interrupted()
        except user_error_types() as e:  # the config, arguments or files given
            return _fail(e, one_line(e), BAD_INPUT)
        except OSError as e:
            what = f"{e.filename}: " if e.filename else ""
            return _fail(e, f"cannot write {what}{e.strerror or one_line(e)} (nothing was replaced)", WRITE_FAILED)
        except RuntimeError as e:
            code = getattr(e, "exit_code", None)  # training.config.TrainingError (diverged: 3)
            if code is None:
                raise
            return _fail(e, one_line(e), int(code))


def unknown_field(config, dotted: str) -> str | None:
    """The message for `--config.<dotted>` when it names no field of the ConfigDict `config` (None if it does)."""
    from ml_collections import ConfigDict

    node, path = config, []
    for part in dotted.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            group = ".".join(path)
            valid = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            where = f" (fields of {group or 'the config'}: {', '.join(valid)})" if valid else ""
            return f"unknown config field {'.'.join(path + [part])!r}{where}"
        node, path = node[part], path + [part]
    return None


def _unknown_override(argv: Sequence[str], command: str, example: str) -> str | None:
    """Which `--config.<field>` override names no field of the config file (one line), if any."""
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
        config, _ = parse_config_flags(plain, command, example)
    except ValueError:
        return None
    return next((msg for msg in (unknown_field(config, name) for name in names) if msg), None)


def _flag_error(e: BaseException) -> str:
    """absl's message, on one line; a config file that raised keeps only its exception's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "Traceback (most recent call last):" not in lines:
        return one_line(e)
    name, _, msg = lines[-1].partition(": ")
    return f"{lines[0].split(': Error whilst')[0]}: {name.rsplit('.', 1)[-1]}: {msg}"


def parse_config_flags(argv: Sequence[str], command: str, example: str):
    """`(config, print_config)` from `--config FILE[:ARG] [--config.<field>=<value> ...] [--print_config]`,
    parsed by `ml_collections.config_flags` as every command does (the file's `get_config(ARG)`, each
    override typed by its field). Every mistake (an unknown field, a value of the wrong type, a config
    file that fails, a stray argument) is a `ConfigError` (a `ValueError`) of one line naming it."""
    from absl import flags
    from ml_collections import config_flags

    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        raise ConfigError(f"--config is required (e.g. --config {example})")
    full = [f"animatediff-jax {command}"] + _one_value_tuples(argv, command)
    fv = flags.FlagValues()  # private: no global flag state, so main() can run more than once
    # config_flags finds the `--config.x=...` override names in `sys_argv` (default: sys.argv).
    config_flags.DEFINE_config_file("config", None, f"{command} config file (get_config())", flag_values=fv,
                                    lock_config=True, sys_argv=full)
    flags.DEFINE_bool("print_config", False, "print the resolved config and exit", flag_values=fv)
    try:
        rest = fv(full)
    except (AttributeError, KeyError) as e:  # how ml_collections answers an unknown `--config.x`
        raise ConfigError(_unknown_override(argv, command, example) or one_line(e).strip("'\"")) from None
    except flags.Error as e:
        raise ConfigError(_flag_error(e)) from None
    except Exception as e:  # the config file's get_config failed
        raise ConfigError(f"--config: get_config failed: {type(e).__name__}: {one_line(e)}") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {rest[1:]}")
    try:
        fv.config.keys  # config_flags defers "no such file" to the first access
    except OSError:
        raise FileNotFoundError(f"--config {config_flags.get_config_filename(fv['config'])}: no such file") from None
    return fv.config, fv.print_config


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _one_value_tuples(argv: Sequence[str], command: str) -> list[str]:
    """`argv` with `--config.<field>=<text>` written as a 1-tuple where the field is a tuple and the text
    is not a Python literal (or is a quoted string): `--config.prompt="a cat"` is one prompt, as
    `--config.seed=42` is one seed. The config file is read once more for its fields' types."""
    import ast

    from absl import flags
    from ml_collections import config_flags

    argv, spec = list(argv), _config_spec(argv)
    overrides = [i for i, a in enumerate(argv) if re.match(r"--config\.[\w.]+=", a)]
    if spec is None or not overrides:
        return argv
    fv = flags.FlagValues()
    prog = [f"animatediff-jax {command}", "--config", spec]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False, sys_argv=prog)
    try:
        fv(prog)
        config = fv.config
    except Exception:  # the file fails: the real parse says how
        return argv
    for i in overrides:
        name, text = argv[i][len("--config."):].split("=", 1)
        node = config
        for part in name.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(node, tuple) and isinstance(value, str):
            argv[i] = f"--config.{name}={(value,)!r}"
    return argv


COMMANDS = {
    "compile": ("animatediff_jax.compile", "compile train/sample for a TPU topology here: fits HBM? FLOPs, roofline"),
    "convert": ("animatediff_jax.convert", "PyTorch weights (SD1.5, motion modules, LoRAs) -> params files"),
    "demo": ("animatediff_jax.toy.demo", "the whole recipe in a toy world on CPU: train or load, GIFs, motion metrics"),
    "evaluate": ("animatediff_jax.evaluate", "CLIP metrics of videos: text alignment, domain similarity, smoothness"),
    "export": ("animatediff_jax.export", "motion modules, MotionLoRAs, domain adapters -> PyTorch files"),
    "prepare": ("animatediff_jax.prepare", "VAE/text-encode a WebVid-style dataset once into a latent cache"),
    "parity": ("animatediff_jax.parity", "compare each sampling stage with diffusers' AnimateDiffPipeline"),
    "sample": ("animatediff_jax.sample", "text to video from a prompt config (GIF/MP4/PNG, grid)"),
    "train": ("animatediff_jax.train", "train a stage: domain adapter, motion module, MotionLoRA"),
}


def usage() -> str:
    lines = ["usage: animatediff-jax [--version] [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "`animatediff-jax <command> --help` for a command's options; --debug shows tracebacks of user errors."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    with _debug_flag(list(sys.argv[1:] if argv is None else argv)) as argv:
        return _main(argv)


def _main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return OK
    if argv and argv[0] in ("-V", "--version"):
        from animatediff_jax import __version__

        print(f"animatediff-jax {__version__}")
        return OK
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
        return BAD_INPUT
    with interrupts.handling():  # (importing a command's module takes seconds: jax)
        try:
            module = importlib.import_module(COMMANDS[argv[0]][0])
        except KeyboardInterrupt:
            interrupts.exit_interrupted()
        return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":  # `python -m animatediff_jax.cli`: the package's module (one `--debug` state)
    from animatediff_jax.cli import main as _package_main

    sys.exit(_package_main())
