"""Ctrl-C / SIGTERM for every command (`animatediff_jax.interrupts`, through `cli.run_command`): the real
command in a subprocess, a signal at a known phase, then exit code 130, one line on stderr that starts
with "interrupted" (`interrupted (SIGINT); nothing written`, or the complete files kept and where),
no traceback, and no partial or temporary file in the output folder.

After the signal, stderr holds that one line and nothing else but, at most, progress-bar updates that
were already under way (tqdm's `denoising` bar, frozen when the signal arrives).

Phases: `sample` while XLA compiles (it used to segfault there, rc -11, after a 40-60 line traceback)
and while denoising (one compiled call: the main thread is blocked in C++, so the watcher thread
ends the process), `export` right after it starts, and a command body interrupted in the middle of
an atomic write (the graceful path) or blocked in native code (the watcher's path).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sample", "tiny.py")


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    e["XLA_FLAGS"] = xla_flags()
    return e


def run_and_signal(argv, when, sig=signal.SIGINT, timeout=300.0, cwd=ROOT, then_wait=0.0):
    """Runs `argv`, reads its stderr until `when(stderr so far)` holds (or, `when` a number, waits that
    many seconds), waits `then_wait` seconds more, sends `sig`; returns (rc, the stderr before the
    signal, the stderr after it, seconds from the signal to the exit)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before, deadline = b"", time.time() + timeout
    try:
        if isinstance(when, (int, float)):
            time.sleep(when)
            assert proc.poll() is None, f"exited (rc {proc.returncode}) before the signal: {proc.stderr.read()[-3000:]}"
        while not isinstance(when, (int, float)) and not when(before.decode("utf-8", "replace")):
            ch = proc.stderr.read(1)
            assert ch, f"exited (rc {proc.wait()}) before the phase:\n{before.decode()[-3000:]}"
            before += ch
            assert time.time() < deadline, before.decode()[-3000:]
        time.sleep(then_wait)
        proc.send_signal(sig)
        t0 = time.time()
        after = proc.stderr.read()
        rc = proc.wait(timeout=60)
        return rc, before.decode("utf-8", "replace"), after.decode("utf-8", "replace"), time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()


PROGRESS = re.compile(r"\d+/\d+ \[[^\]]*\]$")  # a tqdm bar's update: `denoising:  10%|# | 4/40 [00:03<...]`


def assert_one_line(rc: int, after: str, start: str = "interrupted (SIGINT); ") -> str:
    """rc 130, no traceback, and (progress updates aside) one line, the last, starting with `start`."""
    lines = [line.strip() for line in after.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not PROGRESS.search(line)]  # a bar already under way
    assert rc == 130, (rc, after[-3000:])
    assert "Traceback" not in after and "Exception ignored" not in after, after[-3000:]
    assert len(lines) == 1 and lines[0].startswith(start), lines
    return lines[0]


def leftovers(folder) -> list[str]:
    """Temporary or partial files under `folder` (atomic writes name theirs `.NAME.tmp-PID-RANDOM`)."""
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in fs + ds if ".tmp" in n or n.startswith(".")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from animatediff_jax.testing.tiny import write_tiny_models

    folder = str(tmp_path_factory.mktemp("tiny_models"))
    write_tiny_models(folder)
    return folder


def sample_argv(models, out, *extra):
    return [sys.executable, "-m", "animatediff_jax.cli", "sample", "--config", f"{TINY}:{models}",
            f"--config.output.dir={out}", "--config.compilation_cache=off", *extra]


@pytest.mark.parametrize("delay", [0.0, 1.5], ids=["tracing", "in_xla"])
def test_sample_interrupted_while_compiling(models, tmp_path, delay):
    """SIGINT just after "sampling N video(s)" (jax traces the text encoder), or 1.5 s later (XLA compiles
    the denoising loop: minutes for a real model; what used to end in a segfault)."""
    out = tmp_path / "run"
    rc, before, after, took = run_and_signal(sample_argv(models, out, "--config.steps=40", "--config.L=16"),
                                             lambda err: "sampling 2 video(s)" in err and err.endswith("\n"),
                                             then_wait=delay)
    print(f"sample interrupted {delay}s after 'sampling': exit in {took:.1f}s: {after.strip()!r}")
    assert "denoising" not in before
    assert assert_one_line(rc, after) == "interrupted (SIGINT); nothing written"
    assert not out.exists() or os.listdir(out) == []
    assert leftovers(tmp_path) == []


def test_sample_interrupted_while_denoising(models, tmp_path):
    """SIGINT once the denoising bar has counted a step (40 steps of 16 frames: seconds): the main thread
    waits in XLA, so the watcher thread cleans up and exits. Nothing is written yet."""
    out = tmp_path / "run"
    rc, before, after, took = run_and_signal(
        sample_argv(models, out, "--config.steps=40", "--config.L=16", "--config.output.formats=('gif', 'png')"),
        lambda err: re.search(r"denoising: .*\| [1-9]\d*/40 \[.*\]$", err.rsplit("\r", 1)[-1]) is not None)
    print(f"sample interrupted while denoising: exit in {took:.1f}s: {after.strip()!r}")
    assert assert_one_line(rc, after) == "interrupted (SIGINT); nothing written"
    assert took < 20, took
    assert not out.exists() or os.listdir(out) == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_export_interrupted_right_after_start(tmp_path, sig):
    from flax.traverse_util import flatten_dict, unflatten_dict

    from animatediff_jax.checkpoints.params_io import save_motion
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.shapes import motion_shapes

    cfg = tiny_unet("v2")
    rng = np.random.default_rng(0)
    save_motion(tmp_path / "mm.safetensors", unflatten_dict(
        {p: rng.standard_normal(s.shape).astype(np.float32) for p, s in flatten_dict(motion_shapes(cfg)).items()}), cfg)
    out = tmp_path / "out" / "mm.ckpt"
    argv = [sys.executable, "-m", "animatediff_jax.cli", "export", "motion", str(tmp_path / "mm.safetensors"),
            "--out", str(out)]
    rc, _, after, took = run_and_signal(argv, 1.0, sig=sig)  # (importing jax, torch, ... takes seconds)
    print(f"export interrupted after 1s ({signal.Signals(sig).name}): exit in {took:.1f}s: {after.strip()!r}")
    name = signal.Signals(sig).name
    assert assert_one_line(rc, after, f"interrupted ({name}); ") == f"interrupted ({name}); nothing written"
    assert not out.exists() and leftovers(tmp_path) == []


BODY = """
import os, signal, sys, time
import numpy as np
from animatediff_jax.cli import run_command
from animatediff_jax.interrupts import output
from animatediff_jax.io import fs
from animatediff_jax.io.video import write_gif

out, blocked = sys.argv[1], sys.argv[2] == "blocked"

def body(argv):
    output(out)
    write_gif(os.path.join(out, "a.gif"), np.zeros((2, 8, 8, 3), np.uint8))  # complete
    with fs.local_output(os.path.join(out, "b.gif")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"GIF89a half")
        if blocked:  # as in a long XLA call: no Python handler runs in the main thread
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print("writing b.gif", file=sys.stderr, flush=True)
        time.sleep(60)
    return 0

sys.exit(run_command(body, []))
"""


@pytest.mark.parametrize("blocked", [False, True], ids=["unwinds", "blocked_in_native_code"])
def test_interrupted_mid_write_keeps_only_complete_files(tmp_path, blocked):
    """The graceful path (KeyboardInterrupt unwinds, the atomic write removes its temporary) and the
    watcher's (the main thread never runs Python again: the registered temporary is removed for it)."""
    out = tmp_path / "out"
    argv = [sys.executable, "-c", textwrap.dedent(BODY), str(out), "blocked" if blocked else "plain"]
    rc, _, after, took = run_and_signal(argv, lambda err: "writing b.gif\n" in err, sig=signal.SIGTERM, timeout=120)
    line = assert_one_line(rc, after, "interrupted (SIGTERM); ")
    assert line == f"interrupted (SIGTERM); kept 1 complete file(s) in {out}: a.gif; nothing partial", line
    assert sorted(os.listdir(out)) == ["a.gif"]
    assert took < (10 if blocked else 5), took
