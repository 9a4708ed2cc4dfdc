#!/usr/bin/env python3
"""Multi-host training on a GKE TPU slice: renders an Indexed Job (one pod per TPU host) + headless Service.

GKE's TPU webhook sets TPU_WORKER_ID / TPU_WORKER_HOSTNAMES in pods of an Indexed Job that has a
headless Service, so `jax.distributed.initialize()` finds its peers without arguments.

  python launch/gke.py --name ad-stage2 --image REGISTRY/animatediff-jax:latest \
      --accelerator tpu-v5p-slice --topology 2x2x4 --chips-per-host 4 \
      --config configs/train/stage2_motion_module.py --dry-run -- --config.train.steps=100000

Without `--dry-run` the manifest is piped to `kubectl apply -f -`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys

MANIFEST = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: None
  selector:
    job-name: {name}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
  completionMode: Indexed
  completions: {hosts}
  parallelism: {hosts}
  backoffLimit: 0
  template:
    spec:
      subdomain: {name}
      restartPolicy: Never
      nodeSelector:
        cloud.google.com/gke-tpu-accelerator: {accelerator}
        cloud.google.com/gke-tpu-topology: {topology}
      containers:
      - name: train
        image: {image}
        command: ["bash", "-c"]
        args:
        - {command}
        ports:
        - containerPort: 8471
        - containerPort: 8080
        resources:
          limits:
            google.com/tpu: {chips}
"""


def hosts_for(topology: str, chips_per_host: int) -> int:
    chips = math.prod(int(d) for d in topology.split("x"))
    if chips % chips_per_host:
        raise ValueError(f"topology {topology} ({chips} chips) is not a multiple of {chips_per_host} chips per host")
    return chips // chips_per_host


def render(args) -> str:
    overrides = " ".join(shlex.quote(o) for o in args.overrides)
    command = f"animatediff-jax train --config {shlex.quote(args.config)} {overrides}".strip()
    return MANIFEST.format(
        name=args.name,
        hosts=hosts_for(args.topology, args.chips_per_host),
        accelerator=args.accelerator,
        topology=args.topology,
        image=args.image,
        chips=args.chips_per_host,
        command=json_quote(command),
    )


def json_quote(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a valid YAML scalar


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True, help="container image with animatediff-jax and jax[tpu] installed")
    p.add_argument("--accelerator", default="tpu-v5p-slice")
    p.add_argument("--topology", default="2x2x4")
    p.add_argument("--chips-per-host", type=int, default=4)
    p.add_argument("--config", default="configs/train/stage2_motion_module.py")
    p.add_argument("--dry-run", action="store_true", help="print the manifest instead of applying it")
    args = p.parse_args(argv)
    args.overrides = rest
    try:
        manifest = render(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(manifest, end="")
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
