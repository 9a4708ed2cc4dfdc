"""Did the model learn motion? Track the toy world's shape in generated frames and score it.

The shape is the only saturated thing in a toy frame (backgrounds are near-grey, the
watermark white), so its per-pixel weight is the saturation `max(rgb) - min(rgb)` ramped
from `SAT_LO` to `SAT_HI`; the track is the weighted centroid and `sqrt(weight sum)` (the
size, in pixels) per frame. A least-squares line through the track gives the velocity
`(vx, vy)` and the zoom rate `vs` = d log(size)/d frame. Lengths are in *pixels of a
16-pixel frame* (the toy's training resolution), whatever the video's size, so upscaled GIFs
score the same as the model's raw output.

* **Direction**: the motion with the largest score among `right = vx`, `left = -vx`,
  `down = vy`, `up = -vy`, `zoom in = 16 * vs`, `zoom out = -16 * vs` (which puts a zoom from
  1x to ~1.7x over 8 frames on the scale of a ~1 px/frame translation), or "static" when no
  score reaches `STATIC_SPEED` px/frame; "none" when the shape is lost in some frame. **Direction accuracy** = fraction of videos whose motion is the prompt's.
* **Smoothness**: `jitter` = RMS second difference of the centre track (px/frame^2; 0 for
  constant velocity, large for frames that jump about), `smoothness = 1 / (1 + jitter)`.
* **Watermark**: mean luma of the watermark bar minus that of the band just above it
  (about 0 on clean frames, ~0.3 on the video domain's frames).

As a script: `python -m animatediff_jax.toy.metrics <gif|mp4|folder> ... [--prompt TEXT]`
prints one line per video and the summary; the expected motion comes from `--prompt`, or
from the file name (the demo names files after their prompt: `red_circle_moving_left_s0.gif`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from animatediff_jax.toy.world import DIRECTIONS, MOTIONS, WATERMARK_BOX, parse_caption

SAT_LO, SAT_HI = 0.2, 0.45  # saturation ramp: backgrounds stay below ~0.12, shapes are above ~0.6
UNIT = 16  # lengths are reported in pixels of a UNIT-pixel-wide frame
MIN_AREA = 2.0  # unit px^2: less than this is "no shape"
STATIC_SPEED = 0.25  # unit px/frame
CLASSES = MOTIONS + ("static", "none")


def _as_float(video: np.ndarray) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [F, H, W, 3], got shape {v.shape}")
    return v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v.astype(np.float32)


def shape_weights(video: np.ndarray) -> np.ndarray:
    """Per-pixel shape weight in [0, 1], `[F, H, W]`, from saturation (uint8 or [0, 1] floats)."""
    v = _as_float(video)
    sat = v.max(-1) - v.min(-1)
    return np.clip((sat - SAT_LO) / (SAT_HI - SAT_LO), 0.0, 1.0)


def track(video: np.ndarray) -> np.ndarray:
    """`[F, 3]`: centre x, centre y (pixel centres at i + 0.5) and size sqrt(area) per frame, in
    unit pixels (see module docstring); NaN where no shape."""
    w = shape_weights(video)
    _, h, wd = w.shape
    k = UNIT / wd  # unit px per video px
    ys, xs = np.mgrid[0:h, 0:wd].astype(np.float32) + 0.5
    mass = w.sum((1, 2))
    ok = mass * k * k >= MIN_AREA
    safe = np.where(ok, mass, 1.0)
    cx = (w * xs).sum((1, 2)) / safe
    cy = (w * ys).sum((1, 2)) / safe
    out = np.stack([cx, cy, np.sqrt(mass)], -1) * k
    out[~ok] = np.nan
    return out


@dataclasses.dataclass(frozen=True)
class Motion:
    """The motion of one video: velocity (px/frame), zoom rate (log size/frame), class, jitter."""

    vx: float
    vy: float
    vs: float
    predicted: str
    jitter: float
    found: float  # fraction of frames where the shape was found

    @property
    def smoothness(self) -> float:
        return 1.0 / (1.0 + self.jitter) if np.isfinite(self.jitter) else 0.0


def classify(vx: float, vy: float, vs: float) -> str:
    """The motion class of a velocity (unit px/frame) and zoom rate (see module docstring)."""
    scores = {"right": vx, "left": -vx, "down": vy, "up": -vy, "zoom in": UNIT * vs, "zoom out": -UNIT * vs}
    best = max(scores, key=scores.get)
    return best if scores[best] >= STATIC_SPEED else "static"


def measure(video: np.ndarray) -> Motion:
    """Tracks the shape in `video` (`[F, H, W, 3]`) and fits its motion."""
    tr = track(video)
    f = tr.shape[0]
    found = float(np.isfinite(tr[:, 0]).mean())
    if found < 1.0:
        return Motion(np.nan, np.nan, np.nan, "none", np.nan, found)
    if f < 2:  # a still image (a GIF of identical frames reads back as one frame)
        return Motion(0.0, 0.0, 0.0, "static", 0.0, found)
    t = np.arange(f, dtype=np.float64)
    t -= t.mean()
    den = float((t * t).sum())
    vx, vy = (float((t * tr[:, i]).sum() / den) for i in (0, 1))
    vs = float((t * np.log(tr[:, 2])).sum() / den)
    jitter = float(np.sqrt((np.diff(tr[:, :2], 2, axis=0) ** 2).sum(-1).mean())) if f >= 3 else 0.0
    return Motion(vx, vy, vs, classify(vx, vy, vs), jitter, found)


def progress(m: Motion, expected: str) -> float:
    """Speed along the expected motion, unit px/frame (zooms: `16 * vs`); negative = the wrong way."""
    if not np.isfinite(m.vx):
        return float("nan")
    if expected in DIRECTIONS:
        dx, dy = DIRECTIONS[expected]
        return m.vx * dx + m.vy * dy
    sign = 1.0 if expected == "zoom in" else -1.0
    return sign * UNIT * m.vs


def watermark_score(video: np.ndarray) -> float:
    """Mean luma of the watermark bar minus the band of the same height just above it."""
    v = _as_float(video)
    h, w = v.shape[1:3]
    top, bottom, left, right = (round(f * n) for f, n in zip(WATERMARK_BOX, (h, h, w, w)))
    luma = v @ np.asarray([0.299, 0.587, 0.114], np.float32)
    bar = luma[:, top:bottom, left:right].mean()
    above = luma[:, 2 * top - bottom:top, left:right].mean()
    return float(bar - above)


@dataclasses.dataclass
class Summary:
    """Aggregates over a set of videos (NaN-free: lost shapes count as wrong and jitter-less)."""

    n: int
    accuracy: float
    progress: float  # mean speed along the prompted motion (px/frame)
    jitter: float
    smoothness: float
    found: float
    watermark: float
    predicted: dict

    def row(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def summarize(videos: Sequence[np.ndarray], expected: Sequence[str | None]) -> Summary:
    """Direction accuracy vs `expected` (per video; None = not scored), smoothness, watermark."""
    ms = [measure(v) for v in videos]
    scored = [(m, e) for m, e in zip(ms, expected) if e is not None]
    acc = float(np.mean([m.predicted == e for m, e in scored])) if scored else float("nan")
    prog = [progress(m, e) for m, e in scored]
    prog = [p for p in prog if np.isfinite(p)]
    jit = [m.jitter for m in ms if np.isfinite(m.jitter)]
    counts: dict[str, int] = {}
    for m in ms:
        counts[m.predicted] = counts.get(m.predicted, 0) + 1
    return Summary(
        n=len(ms),
        accuracy=acc,
        progress=float(np.mean(prog)) if prog else float("nan"),
        jitter=float(np.mean(jit)) if jit else float("nan"),
        smoothness=float(np.mean([m.smoothness for m in ms])),
        found=float(np.mean([m.found for m in ms])),
        watermark=float(np.mean([watermark_score(v) for v in videos])),
        predicted=dict(sorted(counts.items())),
    )


def format_table(rows: dict[str, Summary], chance: float | None = None) -> str:
    """A fixed-width table, one row per named summary."""
    head = f"{'':<34}{'n':>4}{'dir acc':>9}{'progress':>10}{'jitter':>8}{'smooth':>8}{'found':>7}{'watermark':>10}"
    lines = [head]
    for name, s in rows.items():
        lines.append(f"{name:<34}{s.n:>4}{s.accuracy:>9.2f}{s.progress:>10.2f}{s.jitter:>8.2f}{s.smoothness:>8.2f}"
                     f"{s.found:>7.2f}{s.watermark:>10.3f}")
    if chance is not None:
        lines.append(f"(chance direction accuracy: {chance:.2f}; progress in px/frame along the prompted motion)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Script.
# ----------------------------------------------------------------------------------------------

_EXTS = (".gif", ".mp4", ".webm", ".avi", ".mov")


def _files(paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p)
                          if f.lower().endswith(_EXTS) and not f.lower().startswith("grid."))  # the demo's tiling
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m animatediff_jax.toy.metrics",
                                 description="Track the toy shape in videos; direction accuracy and smoothness.")
    ap.add_argument("paths", nargs="+", help="GIF/MP4 files or folders of them")
    ap.add_argument("--prompt", default=None, help="the prompt of every video (default: parsed from file names)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    from animatediff_jax.io.video import read_video

    files = _files(args.paths)
    if not files:
        print("no videos found", file=sys.stderr)
        return 2
    videos, expected = [], []
    for path in files:
        video = read_video(path)
        motion = parse_caption(args.prompt or os.path.basename(path))["motion"]
        m = measure(video)
        videos.append(video)
        expected.append(motion)
        ok = "" if motion is None else ("  ok" if m.predicted == motion else "  WRONG")
        print(f"{os.path.basename(path)}: {m.predicted:<9} v=({m.vx:+.2f}, {m.vy:+.2f}) px/frame "
              f"zoom={m.vs:+.3f}/frame jitter={m.jitter:.2f} expected={motion}{ok}")
    s = summarize(videos, expected)
    print(json.dumps(s.row()) if args.json else format_table({"all": s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
