"""The toy world: coloured shapes on textured backgrounds, moving as their captions say.

Each clip is one shape (red/green/blue/yellow circle/square/triangle) on a low-saturation
procedural texture (stripes, checks or smooth noise). The shape moves at a constant speed the
way its colour moves (red left, green right, blue up, yellow down: `DIRECTION_OF`), or the
camera zooms in/out about the centre (shape and texture grow or shrink). Captions say exactly
that: "a red circle moving left", "a blue square zooming in".

Two visual domains, as in AnimateDiff: *images* (clean frames: the personalised text-to-image
model's domain) and *videos* (the same world with a watermark-like bar in the bottom-right
corner, as WebVid's). The domain adapter of stage 1 learns the watermark, so the motion module
of stage 2 need not, and sampling with a lower adapter scale removes it.

Datasets are written exactly like real data: a WebVid-style CSV (`videoid`, `name`,
`page_dir`) plus one MP4 per clip, rendered at `render_size` (4x the model resolution, so
H.264's chroma subsampling and the reader's antialiased resize keep edges and colours
clean), then read by `animatediff_jax.data.WebVidSource`. A `meta.jsonl` next to the CSV
holds each clip's ground truth (motion, per-frame centre and size in model pixels).

Coordinates are in model pixels: pixel `i` covers `[i, i + 1)`, its centre is `i + 0.5`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 50),
    "blue": (45, 75, 235),
    "yellow": (235, 205, 30),
}
SHAPES = ("circle", "square", "triangle")
TRANSLATIONS = ("left", "right", "up", "down")
ZOOMS = ("zoom in", "zoom out")
MOTIONS = TRANSLATIONS + ZOOMS
# Unit direction of each translation in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                               "down": (0.0, 1.0)}

# The watermark of the video domain: a white bar over pixel rows 13-14, columns 9-14 of a
# 16-pixel frame (scaled with the frame size), blended at WATERMARK_ALPHA.
WATERMARK_BOX = (13 / 16, 15 / 16, 9 / 16, 15 / 16)  # top, bottom, left, right (fractions of the frame)
WATERMARK_ALPHA = 0.6
# The world's one law of motion: each colour moves its own way. The motion module has no text
# input (in AnimateDiff as here): it sees the frozen image model's features, so the motion it can
# learn is motion that follows the content, and the prompt picks the content. A colour is what a
# tiny image model renders most reliably, so it carries the direction.
DIRECTION_OF: dict[str, str] = {"red": "left", "green": "right", "blue": "up", "yellow": "down"}
COLOUR_OF: dict[str, str] = {d: c for c, d in DIRECTION_OF.items()}


def caption(colour: str, shape: str, motion: str) -> str:
    """`"a red circle moving left"` / `"a red circle zooming in"`."""
    if motion in TRANSLATIONS:
        return f"a {colour} {shape} moving {motion}"
    if motion in ZOOMS:
        return f"a {colour} {shape} zooming {motion.split()[1]}"
    raise ValueError(f"unknown motion {motion!r}: expected one of {MOTIONS}")


def parse_caption(text: str) -> dict[str, str | None]:
    """`{"colour", "shape", "motion"}` named in a caption (or a file name made from one); None if absent."""
    words = text.lower().replace("_", " ").replace("-", " ").split()
    out: dict[str, str | None] = {"colour": None, "shape": None, "motion": None}
    for w in words:
        if w in COLOURS:
            out["colour"] = w
        elif w in SHAPES:
            out["shape"] = w
    for i, w in enumerate(words):
        if w == "moving" and i + 1 < len(words) and words[i + 1] in TRANSLATIONS:
            out["motion"] = words[i + 1]
        elif w in ("zooming", "zoom") and i + 1 < len(words) and words[i + 1] in ("in", "out"):
            out["motion"] = f"zoom {words[i + 1]}"
    return out


# ----------------------------------------------------------------------------------------------
# One clip: its random description, then rendering.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Clip:
    """Everything that determines a clip (all lengths in model pixels of a `size`-pixel frame).

    The shape sits at `start` (world coordinates) and moves `speed` px/frame along its
    direction; for zooms the camera scale is `zoom_rate ** t` about the frame centre.
    `background`: texture kind, base colour (0-1 RGB), contrast, period/angle; `watermark`: video domain.
    """

    colour: str
    shape: str
    motion: str
    start: tuple[float, float]
    radius: float
    speed: float
    zoom_rate: float
    background: dict
    watermark: bool
    frames: int
    size: int

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.motion)


def _background(rng: np.random.Generator) -> dict:
    """A low-saturation texture: a grey with a faint tint, and a contrast colour around it.

    Periods of 5-9 pixels (of a 16-pixel frame) and a faint contrast: finer or stronger textures
    look like noise to a 16x16 denoiser and slow its training down a lot."""
    grey = rng.uniform(0.3, 0.7)
    tint = rng.uniform(-0.035, 0.035, 3)
    contrast = rng.uniform(0.03, 0.08) * rng.choice([-1.0, 1.0])
    kind = str(rng.choice(["stripes", "checks", "noise"]))
    bg = {"kind": kind, "base": (grey + tint).tolist(), "contrast": float(contrast),
          "period": float(rng.uniform(5.0, 9.0)), "angle": float(rng.choice([0.0, 45.0, 90.0, 135.0]))}
    if kind == "noise":
        bg["waves"] = [[float(rng.uniform(0.3, 0.8)) * c for c in (math.cos(a), math.sin(a))] + [float(p)]
                       for a, p in zip(rng.uniform(0, 2 * math.pi, 4), rng.uniform(0, 2 * math.pi, 4))]
    return bg


def random_clip(rng: np.random.Generator, motion: str | None = None, *, size: int = 16, frames: int = 10,
                watermark: bool = False, colour: str | None = None, shape: str | None = None) -> Clip:
    """A random clip of `motion` (random translation when None) whose shape stays inside the frame.

    A translating shape has the colour that moves that way (`DIRECTION_OF`) unless `colour` is
    given; zooms are camera motion and take any colour."""
    motion = str(rng.choice(TRANSLATIONS)) if motion is None else motion
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}: expected one of {MOTIONS}")
    if colour is None:
        colour = COLOUR_OF[motion] if motion in TRANSLATIONS else str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES)) if shape is None else shape
    s = size / 16.0  # every length below is designed for a 16-pixel frame
    steps = frames - 1
    if motion in TRANSLATIONS:
        radius = rng.uniform(2.6, 3.4) * s
        margin = radius + 0.6 * s
        room = size - 2 * margin
        speed = min(rng.uniform(0.7, 0.9) * s, room / max(steps, 1))
        travel = speed * steps
        dx, dy = DIRECTIONS[motion]
        along = rng.uniform(margin, max(margin, size - margin - travel))
        across = rng.uniform(margin, size - margin)
        # Moving towards -x or -y starts at the far end of the path.
        a0 = along + travel if (dx < 0 or dy < 0) else along
        start = (a0, across) if dx else (across, a0)
        zoom_rate = 1.0
    else:
        grow = rng.uniform(1.6, 1.9)
        zoom_rate = grow ** (1.0 / max(steps, 1)) if motion == "zoom in" else grow ** (-1.0 / max(steps, 1))
        radius = (rng.uniform(2.0, 2.4) if motion == "zoom in" else rng.uniform(3.6, 4.2)) * s
        start = tuple(size / 2 + rng.uniform(-1.0, 1.0, 2) * s)
        speed = 0.0
    return Clip(colour, shape, motion, (float(start[0]), float(start[1])), float(radius), float(speed),
                float(zoom_rate), _background(rng), watermark, frames, size)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean coverage of a shape of nominal radius `r` at offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.88 * r
    if shape == "triangle":  # pointing up; apex at -1.15r, base at +0.85r
        top, bottom, half = -1.15 * r, 0.85 * r, 1.15 * r
        return (dy <= bottom) & (dy >= top) & (np.abs(dx) <= half * (dy - top) / (bottom - top))
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def _texture(bg: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of the background at world coordinates (x, y) (16-pixel-frame units)."""
    kind, period = bg["kind"], bg["period"]
    if kind == "stripes":
        a = math.radians(bg["angle"])
        v = np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period)
    elif kind == "checks":
        v = np.sin(math.pi * x / (period / 2)) * np.sin(math.pi * y / (period / 2))
        v = np.tanh(3 * v)
    else:
        v = sum(np.sin(kx * x + ky * y + p) for kx, ky, p in bg["waves"]) / 2.0
    base = np.asarray(bg["base"], np.float32)
    return base + bg["contrast"] * np.clip(v, -1, 1)[..., None]


def render(clip: Clip, render_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames `[F, R, R, 3]` at `render_size` (default 4x `clip.size`) and the ground truth
    `[F, 3]` (centre x, centre y, sqrt(area)) in model pixels, from the rendered coverage."""
    size = clip.size
    rs = render_size or 4 * size
    k = rs / size
    px = (np.arange(rs, dtype=np.float32) + 0.5) / k  # pixel centres in model pixels
    sx, sy = np.meshgrid(px, px)
    colour = np.asarray(COLOURS[clip.colour], np.float32) / 255.0
    s16 = size / 16.0
    c = size / 2.0
    frames, truth = [], []
    for t in range(clip.frames):
        zoom = clip.zoom_rate ** t
        wx, wy = c + (sx - c) / zoom, c + (sy - c) / zoom  # screen -> world
        if clip.motion in TRANSLATIONS:
            ddx, ddy = DIRECTIONS[clip.motion]
            cx, cy = clip.start[0] + ddx * clip.speed * t, clip.start[1] + ddy * clip.speed * t
        else:
            cx, cy = clip.start
        mask = _inside(clip.shape, wx - cx, wy - cy, clip.radius)
        img = _texture(clip.background, wx / s16, wy / s16)
        img = np.where(mask[..., None], colour, img)
        if clip.watermark:
            top, bottom, left, right = (round(v * rs) for v in WATERMARK_BOX)
            box = np.zeros((rs, rs), bool)
            box[top:bottom, left:right] = True
            img = np.where(box[..., None], (1 - WATERMARK_ALPHA) * img + WATERMARK_ALPHA, img)
        frames.append(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
        area = mask.sum() / (k * k)
        truth.append((float((sx * mask).sum() / max(mask.sum(), 1)), float((sy * mask).sum() / max(mask.sum(), 1)),
                      float(math.sqrt(area))))
    return np.stack(frames), np.asarray(truth, np.float32)


# ----------------------------------------------------------------------------------------------
# Datasets on disk: WebVid-style CSV + MP4s (+ ground truth).
# ----------------------------------------------------------------------------------------------


def write_dataset(folder: str | os.PathLike, clips: Iterable[Clip], *, prefix: str = "clip",
                  render_size: int | None = None, fps: float = 8.0) -> str:
    """Renders `clips` to `folder/videos/{videoid}.mp4`, writes `folder/data.csv` (WebVid columns)
    and `folder/meta.jsonl` (ground truth); returns the CSV's path."""
    from animatediff_jax.io.video import write_mp4

    folder = os.fspath(folder)
    videos = os.path.join(folder, "videos")
    os.makedirs(videos, exist_ok=True)
    csv_path = os.path.join(folder, "data.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f, \
            open(os.path.join(folder, "meta.jsonl"), "w", encoding="utf-8") as meta:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        for i, clip in enumerate(clips):
            vid = f"{prefix}{i:05d}"
            frames, truth = render(clip, render_size)
            write_mp4(os.path.join(videos, vid + ".mp4"), frames, fps=fps)
            w.writerow([vid, clip.caption, ""])
            meta.write(json.dumps({"videoid": vid, "caption": clip.caption, "motion": clip.motion,
                                   "track": np.round(truth, 3).tolist(), "clip": dataclasses.asdict(clip)}) + "\n")
    return csv_path


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """How many clips of each dataset `make_world` writes.

    `images`: clean clips of every motion (the base model trains on their single frames);
    `videos`: watermarked translations (stages 1 and 2); `zoom`: a handful of watermarked
    zoom-in clips (stage 3's MotionLoRA).
    """

    images: int = 256
    videos: int = 256
    zoom: int = 8
    size: int = 16
    frames: int = 10
    seed: int = 0


DATASETS = ("images", "videos", "zoom")


def make_world(root: str | os.PathLike, spec: WorldSpec = WorldSpec()) -> dict[str, str]:
    """Writes the three datasets under `root/{images,videos,zoom}`; returns `{name: csv path}`.

    Shapes and motions are balanced (cycled; translations in their colour, zooms in every
    colour), the rest is random from `spec.seed`.
    """
    root = os.fspath(root)
    out = {}
    for d, (name, n) in enumerate((("images", spec.images), ("videos", spec.videos), ("zoom", spec.zoom))):
        rng = np.random.default_rng([spec.seed, d])
        motions = {"images": MOTIONS, "videos": TRANSLATIONS, "zoom": ("zoom in",)}[name]
        combos = [(COLOUR_OF[m] if m in TRANSLATIONS else c, s, m) for m in motions for c in COLOURS for s in SHAPES]
        order = rng.permutation(len(combos))
        clips = []
        for i in range(n):
            c, s, m = combos[order[i % len(combos)]]
            clips.append(random_clip(rng, m, size=spec.size, frames=spec.frames, watermark=name != "images",
                                     colour=c, shape=s))
        out[name] = write_dataset(os.path.join(root, name), clips, prefix=name[:3])
    return out


def read_meta(folder: str | os.PathLike) -> list[dict]:
    """The ground-truth records `write_dataset` wrote in `folder/meta.jsonl`."""
    with open(os.path.join(os.fspath(folder), "meta.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
