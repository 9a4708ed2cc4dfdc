"""The pod launchers, checked by their dry-run output (the exact commands/manifest a user would run)."""

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: str, *args: str) -> str:
    """Runs `launch/<script> ARGS --dry-run` (the flag goes before any `--` overrides)."""
    i = args.index("--") if "--" in args else len(args)
    cmd = [sys.executable, str(ROOT / "launch" / script), *args[:i], "--dry-run", *args[i:]]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


COMMON = ["--name", "ad", "--zone", "us-east5-a", "--project", "proj"]


def test_tpu_create():
    (line,) = dry_run("tpu.py", "create", *COMMON, "--accelerator-type", "v5p-64").splitlines()
    assert shlex.split(line) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "ad", "--zone=us-east5-a", "--project=proj",
        "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
    ]


def test_tpu_setup_copies_then_installs_on_all_workers():
    copy, install = [shlex.split(l) for l in dry_run("tpu.py", "setup", *COMMON).splitlines()]
    assert copy[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".", "ad:~/animatediff-jax"]
    assert "--worker=all" in copy and "--worker=all" in install
    assert "pip install -e '.[data]'" in install[-1] and "jax[tpu]" in install[-1]


def test_tpu_run_passes_overrides_to_every_worker():
    (line,) = dry_run("tpu.py", "run", *COMMON, "--config", "configs/train/stage3_motion_lora.py", "--",
                      "--config.train.steps=10", "--config.name=a b").splitlines()
    cmd = shlex.split(line)
    assert cmd[4:6] == ["ssh", "ad"] and "--worker=all" in cmd
    remote = cmd[-1].removeprefix("--command=")
    train = shlex.split(remote.split("&&", 1)[1].split(">")[0])
    assert train == ["nohup", "animatediff-jax", "train", "--config", "configs/train/stage3_motion_lora.py",
                     "--config.train.steps=10", "--config.name=a b"]


def test_tpu_delete():
    (line,) = dry_run("tpu.py", "delete", *COMMON).splitlines()
    assert shlex.split(line)[4:6] == ["delete", "ad"] and line.endswith("--quiet")


def test_gke_manifest_one_pod_per_host():
    out = dry_run("gke.py", "--name", "job", "--image", "img:1", "--topology", "2x2x4", "--chips-per-host", "4",
                  "--", "--config.train.steps=5")
    assert "kind: Service" in out and "clusterIP: None" in out
    assert "completionMode: Indexed" in out
    assert "completions: 4\n" in out and "parallelism: 4\n" in out  # 16 chips / 4 per host
    assert "google.com/tpu: 4" in out and "gke-tpu-topology: 2x2x4" in out
    assert '"animatediff-jax train --config configs/train/stage2_motion_module.py --config.train.steps=5"' in out


def test_gke_rejects_bad_topology():
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "gke.py"), "--name", "j", "--image", "i",
                        "--topology", "3x3", "--chips-per-host", "4", "--dry-run"], capture_output=True, text=True)
    assert r.returncode != 0 and "not a multiple of 4" in r.stderr
