"""`animatediff-jax` itself: `--version`, no arguments, and the error contract every command shares
(`cli.run_command`): the user's errors (`ConfigError`, `CheckpointError`, a missing or existing path)
are one line and exit 2, a failed write one line and exit 1, anything else is a bug and keeps its
traceback; `--debug`, before or after the command's name, shows the traceback of a user error too."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from animatediff_jax import __version__, cli
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.errors import ConfigError, FieldError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "animatediff_jax.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_version_and_usage(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"animatediff-jax {__version__}"
    assert cli.main([]) == 2  # no command: usage on stderr
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: animatediff-jax") and "sample" in captured.err
    assert cli.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: animatediff-jax")
    assert cli.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    done = run_cli("--version")  # the installed entry point's module, as a shell runs it
    assert done.returncode == 0 and done.stdout.strip() == f"animatediff-jax {__version__}", done.stderr
    done = run_cli()
    assert done.returncode == 2 and done.stdout == "" and "usage: animatediff-jax" in done.stderr


def raising(e: BaseException):
    def body(argv):
        raise e

    return body


@pytest.mark.parametrize("error", [
    ConfigError("steps=0: must be >= 1"), FieldError("steps", "=0: must be >= 1"), CheckpointError("x.ckpt: not a checkpoint"),
    FileNotFoundError("x.ckpt: no such file"), FileExistsError("out: exists; pass --overwrite to replace it"),
], ids=["ConfigError", "FieldError", "CheckpointError", "FileNotFoundError", "FileExistsError"])
def test_user_errors_are_one_line_exit_2(error, capsys):
    assert cli.run_command(raising(error), []) == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n", err


def test_a_failed_write_is_one_line_exit_1(capsys):
    e = OSError(errno.ENOSPC, "No space left on device", "out/x.safetensors")
    assert cli.run_command(raising(e), []) == 1
    assert capsys.readouterr().err == "error: cannot write out/x.safetensors: No space left on device (nothing was replaced)\n"


def test_other_exceptions_are_bugs_with_their_traceback(capsys):
    """A plain ValueError (or KeyError, TypeError, ...) is not the user's: it propagates (its traceback)."""
    for e in (ValueError("an internal invariant"), KeyError("unet"), RuntimeError("XLA")):
        with pytest.raises(type(e)):
            cli.run_command(raising(e), [])
    assert capsys.readouterr().err == ""
    code = ("from animatediff_jax.cli import run_command\n"
            "def body(argv):\n    raise ValueError('shapes (3,) and (4,) not aligned')\n"
            "raise SystemExit(run_command(body, []))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT), check=False)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr, done.stderr
    assert done.stderr.strip().endswith("ValueError: shapes (3,) and (4,) not aligned")


def test_debug_shows_the_traceback_of_a_user_error(capsys):
    seen = []

    def body(argv):
        seen.append(argv)
        raise ConfigError("steps=0: must be >= 1")

    assert cli.run_command(body, ["--config", "x.py", "--debug"]) == 2
    err = capsys.readouterr().err
    assert seen == [["--config", "x.py"]]  # the command never sees --debug
    assert "Traceback (most recent call last)" in err and err.endswith("error: steps=0: must be >= 1\n"), err
    assert cli.run_command(body, []) == 2 and capsys.readouterr().err == "error: steps=0: must be >= 1\n"  # off again
    # The real command line, --debug before and after the command's name.
    for argv in (["--debug", "convert", "motion", "/nowhere/mm.ckpt", "--out", "/nowhere/x.safetensors"],
                 ["convert", "motion", "/nowhere/mm.ckpt", "--debug", "--out", "/nowhere/x.safetensors"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("error: "), err
    assert cli.main(["convert", "motion", "/nowhere/mm.ckpt", "--out", "/nowhere/x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_config_flag_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="--config is required"):
        cli.parse_config_flags(["--config.W=8"], "sample", "configs/sample/tiny.py")
    with pytest.raises(ConfigError, match="unexpected arguments"):
        cli.parse_config_flags(["--config", os.path.join(ROOT, "configs", "sample", "tiny.py"), "stray"], "sample",
                               "configs/sample/tiny.py")


def test_a_bare_string_is_one_value_of_a_tuple_field():
    """`--config.prompt="a cat"` is one prompt (absl alone would fail to parse it as a tuple), as
    `--config.seed=42` is one seed; tuples still parse as tuples and string fields stay strings."""
    from animatediff_jax.cli import parse_config_flags

    c, _ = parse_config_flags(["--config", "configs/sample/tiny.py", "--config.prompt=a cat, 4k",
                               "--config.n_prompt=blurry", "--config.seed=42", "--config.base_model=models/x"],
                              "sample", "configs/sample/tiny.py")
    assert (c.prompt, c.n_prompt, c.seed, c.base_model) == (("a cat, 4k",), ("blurry",), (42,), "models/x")
    c, _ = parse_config_flags(["--config", "configs/sample/tiny.py", "--config.prompt=('a', 'b')"], "sample", "x")
    assert c.prompt == ("a", "b")
    c, _ = parse_config_flags(["--config", "configs/train/tiny_stage2.py", "--config.log.sample_prompts=a dog"],
                              "train", "x")
    assert c.log.sample_prompts == ("a dog",)
