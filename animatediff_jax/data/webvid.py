"""WebVid-style video/caption source, and the clip sampling every video source shares.

Clip sampling follows the original AnimateDiff `WebVid10M` dataset: a clip spans
`min(num_frames, (n_frames - 1) * stride + 1)` frames from a random start, `n_frames`
indices evenly spaced over it (`np.linspace(..., dtype=int)`); frames are resized so the
shorter side is `size` (bilinear, antialiased), center-cropped to `size x size`, randomly
flipped left-right, and scaled to [-1, 1]. `is_image=True` takes one random frame instead
(stage 1, the domain adapter), as a 1-frame clip.

Sources cut clips as uint8; `get(..., pixels="float32")` (the default) scales them to [-1, 1] on
the host, `pixels="uint8"` keeps them uint8 so the training step scales them on the device
(`pixels_to_float`, bit-identical to the host's `to_float`): a quarter of the bytes through the
data-loading workers and the host-to-device copy.

Records are deterministic functions of `(seed, index, epoch)`, so a pipeline can be stopped
and resumed exactly. A record that cannot be produced (missing, unreadable or too short video)
comes back as a `Skipped` marker that the pipeline drops and counts; it never raises.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import sys
from typing import Any, Callable

import numpy as np

from animatediff_jax.io import fs
from animatediff_jax.io.video import VideoReadError, count_frames, local_video, read_video

Record = dict[str, Any]

# Independent random streams per record, so e.g. caption dropout does not depend on how many
# random numbers clip sampling drew (and cached sources make the same dropout decisions).
STREAM_CAPTION, STREAM_CLIP, STREAM_LATENT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for a record that could not be loaded; `pipeline` filters these out and counts them."""

    index: int
    reason: str


def record_rng(seed: int, index: int, epoch: int, stream: int) -> np.random.Generator:
    """The random generator of one record in one epoch (one independent stream per purpose)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(epoch), int(stream)])


def drop_caption(seed: int, index: int, epoch: int, p: float) -> bool:
    """Whether this record's caption becomes "" (classifier-free guidance training)."""
    return p > 0 and bool(record_rng(seed, index, epoch, STREAM_CAPTION).random() < p)


def sample_clip_indices(
    num_frames: int, n_frames: int, stride: int, rng: np.random.Generator, is_image: bool = False
) -> np.ndarray:
    """Frame indices as the original dataset picks them (see module docstring)."""
    if num_frames < 1:
        raise ValueError("video has no frames")
    if is_image:
        return np.array([rng.integers(0, num_frames)], dtype=np.int64)
    clip_length = min(num_frames, (n_frames - 1) * stride + 1)
    start = int(rng.integers(0, num_frames - clip_length + 1))
    return np.linspace(start, start + clip_length - 1, n_frames, dtype=int).astype(np.int64)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Shorter side -> `size`, longer side scaled and truncated (torchvision `Resize(int)`)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def center_crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centered `size x size` crop (torchvision `CenterCrop` rounding)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def resize_center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[F, H, W, 3]` -> uint8 `[F, size, size, 3]`: bilinear (antialiased) resize + center crop."""
    from PIL import Image

    f, h, w, _ = frames.shape
    nh, nw = resized_size(h, w, size)
    if (nh, nw) != (h, w):
        frames = np.stack(
            [np.asarray(Image.fromarray(x).resize((nw, nh), Image.Resampling.BILINEAR)) for x in frames]
        )
    top, left = center_crop_box(nh, nw, size)
    return frames[:, top : top + size, left : left + size]


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (torchvision `Normalize(0.5, 0.5)` after `ToTensor`)."""
    return frames.astype(np.float32) / 127.5 - 1.0


PIXELS = ("float32", "uint8")
_PIXEL_TABLE = to_float(np.arange(256, dtype=np.uint8))  # to_float of every uint8 value


def pixels_to_float(video):
    """uint8 pixels -> float32 in [-1, 1], the very values `to_float` gives; anything else unchanged.

    numpy in, numpy out; a JAX array (also inside `jit`: the train step calls this on the batch's
    `video`) is converted on its device to the 256 values of `to_float`, because XLA compiles
    `x / 127.5` as `x * (1 / 127.5)`, which is one ulp off for 205 of the 256 values. Not by
    indexing the table: a gather, which on TPU XLA models (and runs) as reading the table per pixel
    (515 GiB for one 16x256x256 clip); a sum over the 256 values masked by `x == k` is one fused
    elementwise loop, exact (one nonzero term).
    """
    if np.dtype(video.dtype) != np.uint8:
        return video
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(video, jax.Array):
        import jax.numpy as jnp

        hit = video[..., None] == jnp.arange(256, dtype=jnp.uint8)
        return jnp.sum(jnp.where(hit, jnp.asarray(_PIXEL_TABLE), jnp.float32(0)), axis=-1)
    return to_float(np.asarray(video))


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from a video (shared by WebVid and TFDS sources)."""

    n_frames: int = 16
    stride: int = 4
    size: int = 256
    is_image: bool = False
    flip: bool = True
    min_frames: int | None = None  # default: n_frames (videos too short to fill a clip are skipped)

    def __post_init__(self):
        if self.n_frames < 1 or self.stride < 1 or self.size < 1:
            raise ValueError(f"n_frames, stride and size must be >= 1: {self}")

    @property
    def required_frames(self) -> int:
        if self.min_frames is not None:
            return max(1, self.min_frames)
        return 1 if self.is_image else self.n_frames


def clip_frames(
    num_frames: int, read: Callable[[np.ndarray], np.ndarray], opts: ClipOptions, rng: np.random.Generator
) -> np.ndarray:
    """uint8 `[F, size, size, 3]` from a video of `num_frames` frames; `read(indices)` -> uint8 frames."""
    indices = sample_clip_indices(num_frames, opts.n_frames, opts.stride, rng, opts.is_image)
    flip = opts.flip and bool(rng.random() < 0.5)
    frames = resize_center_crop(np.asarray(read(indices)), opts.size)
    if flip:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


def make_clip(
    num_frames: int, read: Callable[[np.ndarray], np.ndarray], opts: ClipOptions, rng: np.random.Generator
) -> np.ndarray:
    """float32 `[F, size, size, 3]` in [-1, 1]: `clip_frames` scaled by `to_float`."""
    return to_float(clip_frames(num_frames, read, opts, rng))


class ClipSource:
    """Base of the clip sources: grain `RandomAccessDataSource` protocol plus `get(index, epoch, seed)`.

    `source[i]` is record `i` of epoch 0 with the source's own seed; the pipeline calls `get`
    with its seed and the epoch so augmentations change per epoch yet stay reproducible.
    Subclasses implement `_load(index, epoch, seed) -> {"video": ..., "text": ...}` and may raise
    anything: the failure becomes a counted `Skipped` record. A uint8 `video` is scaled to [-1, 1]
    by `get` unless it is asked for `pixels="uint8"`; other dtypes are returned as they are.
    """

    def __init__(self, *, caption_dropout: float = 0.1, seed: int = 0):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.caption_dropout = float(caption_dropout)
        self.seed = int(seed)
        self.skipped = 0  # records skipped in this process (workers keep their own count)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Record | Skipped:
        return self.get(int(index))

    def _load(self, index: int, epoch: int, seed: int) -> Record:
        raise NotImplementedError

    def get(
        self, index: int, epoch: int = 0, *, seed: int | None = None, caption_dropout: float | None = None,
        pixels: str = "float32",
    ) -> Record | Skipped:
        """Record `index` in `epoch`; `caption_dropout=0.0` keeps the caption (e.g. for caching);
        `pixels="uint8"` keeps the clip's pixels uint8 (see `pixels_to_float`)."""
        if pixels not in PIXELS:
            raise ValueError(f"pixels={pixels!r} is not one of: {', '.join(PIXELS)}")
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        seed = self.seed if seed is None else int(seed)
        p = self.caption_dropout if caption_dropout is None else caption_dropout
        try:
            record = self._load(index, epoch, seed)
        except Exception as e:  # never crash a run on one bad video
            self.skipped += 1
            return Skipped(index, f"{type(e).__name__}: {e}")
        if drop_caption(seed, index, epoch, p):
            record["text"] = ""
        if pixels == "float32" and "video" in record:
            record["video"] = pixels_to_float(record["video"])
        return record


def _open_text(path: str):
    return fs.open(path, newline="", encoding="utf-8")


class WebVidSource(ClipSource):
    """A WebVid-style CSV (`videoid`, `name` = caption, `page_dir`) plus a folder of `{videoid}.mp4` files.

    Videos are looked up at `{video_folder}/{videoid}.mp4`, then `{video_folder}/{page_dir}/{videoid}.mp4`.
    Captions are kept as one UTF-8 blob plus offsets, so the source stays small when pickled to
    data-loading worker processes even for millions of rows. `drop_missing=True` removes rows
    without a video file up front (one `stat` per row); otherwise they are skipped when read.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        video_folder: str | os.PathLike,
        n_frames: int = 16,
        stride: int = 4,
        size: int = 256,
        *,
        is_image: bool = False,
        flip: bool = True,
        min_frames: int | None = None,
        caption_dropout: float = 0.1,
        seed: int = 0,
        drop_missing: bool = False,
        extension: str = ".mp4",
    ):
        super().__init__(caption_dropout=caption_dropout, seed=seed)
        self.opts = ClipOptions(n_frames, stride, size, is_image, flip, min_frames)
        self.video_folder = os.fspath(video_folder)
        self.extension = extension
        ids, dirs, caps = [], [], []
        with _open_text(os.fspath(csv_path)) as f:
            reader = csv.DictReader(f)
            missing = {"videoid", "name"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; has {reader.fieldnames}")
            for row in reader:
                vid, page = row["videoid"].strip(), (row.get("page_dir") or "").strip()
                if drop_missing and self._find(vid, page) is None:
                    continue
                ids.append(vid)
                dirs.append(page)
                caps.append(row["name"] or "")
        self._ids = np.array(ids, dtype=np.str_)
        self._dirs = np.array(dirs, dtype=np.str_)
        encoded = [c.encode("utf-8") for c in caps]
        self._caption_blob = b"".join(encoded)
        self._caption_offsets = np.cumsum([0] + [len(c) for c in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def caption(self, index: int) -> str:
        a, b = self._caption_offsets[index], self._caption_offsets[index + 1]
        return self._caption_blob[a:b].decode("utf-8")

    def _candidates(self, videoid: str, page_dir: str) -> tuple[str, str]:
        name = videoid + self.extension
        return os.path.join(self.video_folder, name), os.path.join(self.video_folder, page_dir, name)

    def _find(self, videoid: str, page_dir: str) -> str | None:
        for path in self._candidates(videoid, page_dir):
            if fs.isfile(path):
                return path
        return None

    def video_path(self, index: int) -> str | None:
        return self._find(str(self._ids[index]), str(self._dirs[index]))

    def _load(self, index: int, epoch: int, seed: int) -> Record:
        path = self.video_path(index)
        if path is None:
            tried = dict.fromkeys(self._candidates(str(self._ids[index]), str(self._dirs[index])))
            raise FileNotFoundError(f"no video for videoid {self._ids[index]} (tried {', '.join(tried)})")
        with local_video(path) as local:  # a video in a bucket: one temporary local copy
            num = count_frames(local)
            if num < self.opts.required_frames:
                raise VideoReadError(f"{path}: {num} frames, need at least {self.opts.required_frames}")
            read = functools.partial(read_video, local)
            try:
                video = clip_frames(num, read, self.opts, record_rng(seed, index, epoch, STREAM_CLIP))
            except VideoReadError:
                # The container's frame count can exceed what decodes (edit lists, truncated files):
                # count by decoding and sample again, with the same random stream.
                num = count_frames(local, decode=True)
                if num < self.opts.required_frames:
                    raise
                video = clip_frames(num, read, self.opts, record_rng(seed, index, epoch, STREAM_CLIP))
        return {"video": video, "text": self.caption(index)}
