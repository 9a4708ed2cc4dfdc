"""Reading and writing videos as uint8 `[F, H, W, 3]` arrays: GIF (Pillow), MP4 (PyAV), PNG frames, grids.

Paths may be in a bucket (`io.fs`): a remote file is read from a temporary local copy and written
through one (uploaded when complete); errors name the bucket path.

Decoding is PyAV (FFmpeg), so anything FFmpeg reads works (mp4, webm, gif, ...). `read_video`
can keep only some frame indices, which is what training needs: a 16-frame clip out of a
30-second video without holding the whole video in memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

from animatediff_jax.errors import ConfigError
from animatediff_jax.io import fs

PathLike = str | os.PathLike


class VideoReadError(ConfigError, RuntimeError):
    """A video could not be opened or decoded (or has fewer frames than asked for): a user's file, so a
    `ConfigError` (one line, exit 2 in a command); still a `RuntimeError`, as it always was."""


def _array_module(x):
    """`jax.numpy` for JAX arrays (traced ones too), else numpy; jax is never imported here."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        import jax.numpy as jnp

        return jnp
    return np


def to_uint8(frames):
    """Model outputs in [-1, 1] -> uint8 (clipped, rounded as diffusers' `numpy_to_pil`).

    numpy in, numpy out; a JAX array (also inside `jit`) stays a JAX array, so the sampler's
    compiled decode ends with this very function and only uint8 frames leave the device.
    """
    xp = _array_module(frames)
    x = xp.asarray(frames, dtype=xp.float32)
    return xp.round(xp.clip(x / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(xp.uint8)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single image
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (use to_uint8 for [-1, 1] floats), got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("no frames to write")
    return frames


def _parent(path: PathLike) -> None:
    folder = os.path.dirname(os.fspath(path))
    if folder:
        fs.makedirs(folder, exist_ok=True)


# ----------------------------------------------------------------------------- writing


def write_gif(path: PathLike, frames, fps: float = 8.0, loop: int = 0) -> None:
    """An animated GIF (adaptive palette per frame, so at most 256 colours per frame).

    GIF delays are whole centiseconds, so `fps` is rounded to the nearest representable delay.
    Consecutive identical frames are merged by Pillow into one longer frame.
    """
    from PIL import Image

    frames = _check_frames(frames)
    _parent(path)
    duration_ms = max(10, int(round(100.0 / fps)) * 10)
    images = [Image.fromarray(f) for f in frames]
    with fs.local_output(path) as out:
        images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=loop)


def _mp4_codec() -> str:
    import av

    for name in ("libx264", "h264", "mpeg4"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # listed but no encoder in this build
                continue
    raise RuntimeError("this PyAV build has no H.264 or MPEG-4 encoder")


def write_mp4(path: PathLike, frames, fps: float = 8.0, crf: int = 17) -> None:
    """An H.264 MP4 (libx264 at constant quality `crf`; MPEG-4 Part 2 at high bitrate if the PyAV build lacks x264).

    yuv420p needs even sizes: an odd height/width is padded by repeating the last row/column.
    """
    import av

    frames = _check_frames(frames)
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    _parent(path)
    codec = _mp4_codec()
    rate = Fraction(fps).limit_denominator(1001)
    with fs.local_output(path) as out, av.open(out, mode="w") as container:
        options = {"crf": str(crf)} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec != "libx264":
            stream.bit_rate = max(2_000_000, int(w * h * float(rate) * 2))
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def write_pngs(folder: PathLike, frames, prefix: str = "") -> list[str]:
    """One PNG per frame (`{prefix}0000.png`, ...): lossless. Returns the paths."""
    from PIL import Image

    frames = _check_frames(frames)
    folder = os.fspath(folder)
    fs.makedirs(folder, exist_ok=True)
    width = max(4, len(str(len(frames) - 1)))
    paths = []
    for i, frame in enumerate(frames):
        p = os.path.join(folder, f"{prefix}{i:0{width}d}.png")
        with fs.local_output(p) as out:
            Image.fromarray(frame).save(out, format="PNG")
        paths.append(p)
    return paths


def tile_videos(videos, cols: int | None = None, padding: int = 0) -> np.ndarray:
    """`[N, F, H, W, 3]` -> one `[F, rows*H + gaps, cols*W + gaps, 3]` video, row-major, black gaps/empty cells."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected videos [N, F, H, W, 3], got shape {videos.shape}")
    n, f, h, w, c = videos.shape
    cols = int(cols) if cols else int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.zeros((f, rows * h + (rows - 1) * padding, cols * w + (cols - 1) * padding, c), videos.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = r * (h + padding), q * (w + padding)
        out[:, y : y + h, x : x + w] = videos[i]
    return out


def write_grid(path: PathLike, videos, fps: float = 8.0, cols: int | None = None, padding: int = 0) -> None:
    """Tiles N uint8 videos `[N, F, H, W, 3]` into one animation (GIF, or MP4 when `path` ends in .mp4)."""
    grid = tile_videos(videos, cols, padding)
    if os.fspath(path).lower().endswith(".mp4"):
        write_mp4(path, grid, fps)
    else:
        write_gif(path, grid, fps)


def write_video(path: PathLike, frames, fps: float = 8.0) -> None:
    """Dispatch on the extension: .gif, .mp4, or a folder of PNGs for anything else."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".gif":
        write_gif(path, frames, fps)
    elif ext == ".mp4":
        write_mp4(path, frames, fps)
    else:
        write_pngs(path, frames)


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def local_video(path: PathLike):
    """A local file name for reading `path`: itself, or a temporary copy of a bucket object (a
    `VideoReadError` then names `path`, not the copy). Read a remote video several times inside one block."""
    path = os.fspath(path)
    if not fs.is_remote(path):
        yield path
        return
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(fs.local_file(path))
        except OSError as e:  # missing, no access, network
            raise VideoReadError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
        try:
            yield local
        except VideoReadError as e:
            raise VideoReadError(str(e).replace(local, path)) from e


def _open(path: PathLike):
    import av

    try:
        container = av.open(os.fspath(path))
    except Exception as e:  # av.error.* (not found, invalid data, ...)
        raise VideoReadError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


def count_frames(path: PathLike, decode: bool = False) -> int:
    """The number of frames: the container's count when it has one (mp4), else by demuxing.

    `decode=True` counts frames that actually decode (slower, exact for damaged files).
    """
    if fs.is_remote(path):
        with local_video(path) as local:
            return count_frames(local, decode)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if decode:
            return sum(1 for _ in container.decode(stream))
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except VideoReadError:
        raise
    except Exception as e:
        raise VideoReadError(f"{path}: cannot count frames ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def read_video(path: PathLike, indices: Iterable[int] | None = None) -> np.ndarray:
    """Decodes frames to uint8 `[F, H, W, 3]` (RGB); with `indices`, only those frames, in the order given.

    Decoding is sequential and stops after the largest index asked for, so memory holds only
    the frames kept. Raises `VideoReadError` when the file is unreadable or shorter than asked.
    """
    if fs.is_remote(path):
        with local_video(path) as local:
            return read_video(local, indices)
    wanted: Sequence[int] | None = None if indices is None else [int(i) for i in indices]
    if wanted is not None and (not wanted or min(wanted) < 0):
        raise ValueError(f"indices must be non-negative and non-empty, got {wanted}")
    need = None if wanted is None else set(wanted)
    last = None if wanted is None else max(wanted)
    kept: dict[int, np.ndarray] = {}
    frames: list[np.ndarray] = []
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if need is None:
                frames.append(frame.to_ndarray(format="rgb24"))
                continue
            if i in need:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    except Exception as e:
        raise VideoReadError(f"{path}: decoding failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if wanted is None:
        if not frames:
            raise VideoReadError(f"{path}: no frames decoded")
        return np.stack(frames)
    missing = sorted(need - kept.keys())
    if missing:
        raise VideoReadError(f"{path}: has fewer frames than needed (frame {missing[0]} missing)")
    return np.stack([kept[i] for i in wanted])


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with fs.local_file(path) as local:
        return np.asarray(Image.open(local).convert("RGB"))


def read_frames(path: PathLike, num_frames: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """The first `num_frames` frames of a GIF / MP4 (or a folder of PNG/JPG frames, in name order) as
    uint8 `[F, H, W, 3]`, resized to `size` = (height, width) with Lanczos (as diffusers' image
    processor resizes PIL frames). Fewer frames than asked, or an unreadable file, is a `VideoReadError`."""
    from PIL import Image

    path = os.fspath(path)
    if fs.isdir(path):
        names = sorted(n for n in fs.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg")))
        if len(names) < num_frames:
            raise VideoReadError(f"{path}: {len(names)} image frames, fewer than the {num_frames} needed")
        try:
            frames = [_read_rgb(os.path.join(path, n)) for n in names[:num_frames]]
        except OSError as e:
            raise VideoReadError(f"{path}: cannot read a frame ({e})") from e
        if len({f.shape for f in frames}) != 1:
            raise VideoReadError(f"{path}: frames of different sizes")
        video = np.stack(frames)
    else:
        if not fs.isfile(path):
            raise VideoReadError(f"{path}: no such file or folder")
        video = read_video(path)
        if len(video) < num_frames:
            raise VideoReadError(f"{path}: {len(video)} frames, fewer than the {num_frames} needed")
        video = video[:num_frames]
    if size is not None and video.shape[1:3] != tuple(size):
        h, w = size
        video = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.LANCZOS)) for f in video])
    return video


def read_image(path: PathLike, size: tuple[int, int] | None = None, fit: str = "stretch") -> np.ndarray:
    """One PNG / JPG (or a GIF's first frame) as uint8 `[H, W, 3]`, resized to `size` = (height, width):
    `fit="stretch"` with Lanczos, as diffusers' control image processor resizes a PIL image; `fit="crop"`
    centre-cropped to the size's aspect ratio first, then bilinear, as the original AnimateDiff prepares
    SparseCtrl keyframes (`crop_to_aspect`). Unreadable: `VideoReadError`."""
    from PIL import Image

    path = os.fspath(path)
    if not fs.isfile(path):
        raise VideoReadError(f"{path}: no such image file")
    try:
        with fs.local_file(path) as local, Image.open(local) as im:
            im = im.convert("RGB")
            if size is not None and fit == "crop":
                im = crop_to_aspect(im, *size).resize((size[1], size[0]), Image.BILINEAR)
            elif size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.LANCZOS)
            return np.asarray(im)
    except OSError as e:
        raise VideoReadError(f"{path}: cannot read the image ({' '.join(str(e).split())})") from e


def crop_to_aspect(im, height: int, width: int):
    """The centred crop of PIL image `im` with the aspect ratio of `height` x `width`, its full width or
    height kept: what the original's `RandomResizedCrop((H, W), scale=(1, 1), ratio=(W/H, W/H))` takes
    (torchvision's centre-crop fallback; an image already of that ratio is kept whole)."""
    ratio, w, h = width / height, im.width, im.height
    if w / h < ratio:
        h = int(round(w / ratio))
    elif w / h > ratio:
        w = int(round(h * ratio))
    top, left = (im.height - h) // 2, (im.width - w) // 2
    return im.crop((left, top, left + w, top + h))
