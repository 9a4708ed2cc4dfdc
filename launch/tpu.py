#!/usr/bin/env python3
"""Run animatediff-jax training on a Cloud TPU VM pod slice: create, set up, run on all workers, tail, delete.

Every step is a `gcloud` command; `--dry-run` prints them instead of running them, so you can
read (or paste) exactly what would happen. Multi-host: the same command runs on every worker
(`--worker=all`); `jax.distributed.initialize()` discovers the slice by itself on TPU VMs.

  python launch/tpu.py create --name ad-v5p --zone us-east5-a --accelerator-type v5p-64 --dry-run
  python launch/tpu.py setup  --name ad-v5p --zone us-east5-a
  python launch/tpu.py run    --name ad-v5p --zone us-east5-a \
      --config configs/train/stage2_motion_module.py -- --config.data.csv=gs://bucket/webvid.csv
  python launch/tpu.py logs   --name ad-v5p --zone us-east5-a
  python launch/tpu.py delete --name ad-v5p --zone us-east5-a
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

REMOTE_DIR = "animatediff-jax"
LOG = "~/train.log"


def _base(args, verb: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def _ssh(args, remote: str) -> list[str]:
    return _base(args, "ssh") + ["--worker=all", f"--command={remote}"]


def plan(args) -> list[list[str]]:
    """The gcloud commands for `args.action`, in order."""
    if args.action == "create":
        cmd = _base(args, "create") + [
            f"--accelerator-type={args.accelerator_type}",
            f"--version={args.runtime_version}",
        ]
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    if args.action == "setup":
        # scp takes SRC DST where `_base` puts the TPU name.
        copy = _base(args, "scp")
        copy[5:6] = ["--recurse", args.source, f"{args.name}:~/{REMOTE_DIR}"]
        copy.append("--worker=all")
        install = f"cd ~/{REMOTE_DIR} && pip install -U 'jax[tpu]' && pip install -e '.[data]'"
        return [copy, _ssh(args, install)]
    if args.action == "run":
        overrides = " ".join(shlex.quote(o) for o in args.overrides)
        train = f"animatediff-jax train --config {shlex.quote(args.config)} {overrides}".strip()
        remote = f"cd ~/{REMOTE_DIR} && nohup {train} > {LOG} 2>&1 &"
        return [_ssh(args, remote)]
    if args.action == "logs":
        return [_base(args, "ssh") + ["--worker=0", f"--command=tail -f {LOG}"]]
    if args.action == "delete":
        return [_base(args, "delete") + ["--quiet"]]
    raise ValueError(args.action)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["create", "setup", "run", "logs", "delete"])
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--accelerator-type", default="v5p-8", help="e.g. v4-32, v5p-64, v5litepod-16")
    p.add_argument("--runtime-version", default="v2-alpha-tpuv5", help="TPU VM software version")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--source", default=".", help="local checkout copied to every worker by `setup`")
    p.add_argument("--config", default="configs/train/stage2_motion_module.py")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    rest: list[str] = []
    if "--" in argv:  # everything after `--` goes to `animatediff-jax train` untouched
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    args = p.parse_args(argv)
    args.overrides = rest
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    for cmd in plan(args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd)
            if rc:
                print(f"failed ({rc}): {shlex.join(cmd)}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
