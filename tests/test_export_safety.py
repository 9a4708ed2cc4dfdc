"""Exports never destroy a file: atomic writes (a failed write leaves the previous file byte for byte, a
MotionAdapter folder is complete or absent), no overwrite without `--overwrite`, never the input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from animatediff_jax.checkpoints.load import load_motion
from animatediff_jax.checkpoints.params_io import save_motion
from animatediff_jax.cli import main as cli
from animatediff_jax.io.fs import atomic_file, atomic_folder
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.shapes import motion_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_unet("v2")


def motion_file(path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    motion = unflatten_dict({p: rng.standard_normal(s.shape).astype(np.float32)
                        for p, s in flatten_dict(motion_shapes(CFG)).items()})
    save_motion(path, motion, CFG)
    return str(path)


def run(argv, capsys) -> tuple[int, str]:
    rc = cli(["export"] + [str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_existing_output_needs_overwrite_and_the_input_is_never_replaced(tmp_path, capsys):
    mm = motion_file(tmp_path / "mm.safetensors", 0)
    out = tmp_path / "mm.ckpt"
    assert run(["motion", mm, "--out", out], capsys)[0] == 0
    before = out.read_bytes()
    rc, err = run(["motion", motion_file(tmp_path / "mm2.safetensors", 1), "--out", out], capsys)
    assert rc == 2 and "exists; pass --overwrite to replace it" in err, err
    assert out.read_bytes() == before
    rc, err = run(["motion", tmp_path / "mm2.safetensors", "--out", out, "--overwrite"], capsys)
    assert rc == 0 and out.read_bytes() != before, err
    rc, err = run(["motion", mm, "--out", mm, "--overwrite"], capsys)
    assert rc == 2 and "is the input" in err, err
    folder = tmp_path / "adapter"
    assert run(["motion", mm, "--out", folder, "--format", "diffusers"], capsys)[0] == 0
    rc, err = run(["motion", mm, "--out", folder, "--format", "diffusers"], capsys)
    assert rc == 2 and "exists" in err


CHILD = """
import resource, signal, sys
from animatediff_jax.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("out,fmt", [("mm.ckpt", "original"), ("mm.safetensors", "original"), ("adapter", "diffusers")])
def test_a_write_that_fails_leaves_the_previous_output(tmp_path, capsys, out, fmt):
    """An export under `ulimit -f` (the disk filling up): exit 1, one line, the previous file (or folder)
    byte for byte, no temporary left behind."""
    mm = motion_file(tmp_path / "in.safetensors", 0)
    target = tmp_path / out
    assert run(["motion", mm, "--out", target, "--format", fmt], capsys)[0] == 0
    files = sorted(target.rglob("*")) if target.is_dir() else [target]
    before = {f: f.read_bytes() for f in files if f.is_file()}
    limit = max(len(b) for b in before.values()) // 2
    new = motion_file(tmp_path / "in2.safetensors", 1)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(limit), "export", "motion", new, "--out", str(target), "--format", fmt,
         "--overwrite"], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("error: cannot write"), proc.stderr[-2000:]
    assert "nothing was replaced" in lines[-1]
    after = {f: f.read_bytes() for f in (sorted(target.rglob("*")) if target.is_dir() else [target]) if f.is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == sorted(["in.safetensors", "in2.safetensors", out])  # no temporaries
    load_motion(str(target), tiny_unet(None))  # and it still loads


def test_atomic_helpers_keep_the_old_content_on_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    with atomic_file(path) as tmp:
        open(tmp, "wb").write(b"new")
    assert path.read_bytes() == b"new"
    folder = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("{}")
            raise RuntimeError("killed before the weights")
    assert not folder.exists() and os.listdir(tmp_path) == ["f.bin"]  # absent, not half-written
    with atomic_folder(folder) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    with atomic_folder(folder) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert os.listdir(folder) == ["b"] and sorted(os.listdir(tmp_path)) == ["d", "f.bin"]
