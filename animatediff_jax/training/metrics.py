"""What a run reports: the console line, `workdir/metrics.jsonl` and TensorBoard.

The step's metrics stay on the device until a log step (`Progress`), so the host never waits per
step; the JSONL is strict JSON and a resumed run never repeats a step in it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from animatediff_jax import parallel
from animatediff_jax.io import fs


def log(msg: str) -> None:
    """One `[train]` line on the console of process 0."""
    if jax.process_index() == 0:
        print(f"[train] {msg}", flush=True)


class MetricsWriter:
    """`workdir/metrics.jsonl` always; TensorBoard event files too when `tensorboardX` is importable.

    A workdir in a bucket: both are written to a local folder and uploaded whole at every write
    (`io.fs.SyncedFolder`), the JSONL first downloaded to append to it."""

    def __init__(self, workdir: str, tensorboard: bool = True, start: int | None = None):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        fs.makedirs(workdir, exist_ok=True)
        self.folder = fs.SyncedFolder(workdir)
        self.folder.fetch("metrics.jsonl")
        path = os.path.join(self.folder.path, "metrics.jsonl")
        if start is not None and os.path.exists(path):
            _truncate_metrics(path, start)
        self.jsonl = open(path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.folder.path, "tensorboard"))
            except ImportError:
                print("[train] tensorboardX not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if row[k] is not None:  # TensorBoard gets no NaN/inf either
                    self.tb.add_scalar(f"train/{k}", float(v), step)
            self.tb.flush()
        self.folder.sync()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            self.folder.close()


def _json_number(v) -> float | int | None:
    """A metric as strict JSON: non-finite values become null (never a bare NaN / Infinity)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


def _truncate_metrics(path: str, start: int) -> None:
    """Drops the rows of steps after `start` (logged by a run that died before its next checkpoint),
    so a resumed run never repeats a step in `metrics.jsonl`."""
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= start:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
            continue
    if keep != lines:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_progress(step: int, total: int, m: Mapping[str, float]) -> str:
    rate = m.get("clips_per_s")
    line = (f"step {step}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad {m['grad_norm']:.3f} | "
            f"{f'{rate:.2f}' if rate is not None else '-'} clips/s | ETA {_duration(m.get('eta_s', float('nan')))}")
    if m.get("nonfinite_steps"):
        line += f" | {int(m['nonfinite_steps'])} non-finite step(s) skipped"
    if m.get("skipped"):
        line += f" | {int(m['skipped'])} unreadable videos skipped"
    return line


class Progress:
    """The steps since the last log (their metrics still on the device) and the rate since then.

    `add` every step; `log` fetches, averages and writes them (loss and grad norm over the finite
    steps; `nonfinite_steps` counts the skipped ones) and returns each step's non-finite flag.
    Rates count from the end of the first step of the run (the one that compiles).
    """

    def __init__(self, writer: MetricsWriter, global_batch: int, start: int, end: int,
                 skipped: Callable[[], int] | None = None):
        self.writer, self.global_batch, self.start, self.end, self.skipped = writer, global_batch, start, end, skipped
        self.pending: list[Any] = []
        self.last: dict[str, float] = {}
        self.t0, self.n0 = time.perf_counter(), start

    def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self.pending.append(metrics)
        if step == self.start + 1:
            jax.block_until_ready(metrics)
            self.t0, self.n0 = time.perf_counter(), step

    def log(self, step: int) -> list[int]:
        if not self.pending:
            return []
        vals = parallel.fetch(self.pending)
        flags = [int(v.get("nonfinite", 0)) for v in vals]
        ok = [v for v, f in zip(vals, flags) if not f]
        m = {k: (float(np.mean([v[k] for v in ok])) if ok else float("nan"))
             for k in vals[0] if k not in ("lr", "nonfinite")}
        m["lr"] = float(vals[-1]["lr"])
        m["nonfinite_steps"] = int(sum(flags))
        if self.skipped is not None:
            m["skipped"] = int(self.skipped())
        dt = time.perf_counter() - self.t0
        if step > self.n0 and dt > 0:
            rate = (step - self.n0) / dt
            m["clips_per_s"] = rate * self.global_batch
            m["eta_s"] = (self.end - step) / rate
        self.writer.write(step, m)
        log(format_progress(step, self.end, m))
        self.pending, self.last = [], m
        self.t0, self.n0 = time.perf_counter(), step
        return flags
