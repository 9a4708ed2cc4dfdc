"""What `animatediff-jax evaluate` reads: videos (GIF / MP4 / folders of PNG frames, ours or any
tool's), their prompts and reference images. Every problem is a `ConfigError` (a `ValueError`) of one line
naming the file.

Videos: each argument is a video file, a folder of frames (images only), or a folder of videos (its
video files and frame subfolders; a `sample` run's folder means its `sample/` subfolder). One video
written in several formats (`0-x.gif`, `0-x.mp4`, `0-x/0000.png`: `output.formats`) counts once,
read from the lossless PNG frames first, then the GIF, then the MP4. Order: file names in natural
order (`2-...` before `10-...`).

Prompts, in this order: a prompts file (one per line, in the videos' order); the `config.yaml` that
`sample` wrote in the videos' folder or the one above it (its resolved prompts, matched by the `<i>-`
of our file names `sample/<i>-<prompt>.gif`); the file names themselves when they look like ours
(`<i>-<first-words-of-the-prompt>`: the slug's first 10 words, so a long prompt is cut short); none.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from animatediff_jax.errors import ConfigError

VIDEO_EXTS = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
_PREFERENCE = ("frames", ".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")  # lossless first
_INDEXED = re.compile(r"^(\d+)-(.+)$")


@dataclasses.dataclass(frozen=True)
class VideoSource:
    name: str  # the stem (`0-a-cat`), what the table calls it
    path: str
    kind: str  # "frames" (a folder of images) or the file's extension


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _images(folder: str) -> list[str]:
    return sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)
                   and os.path.isfile(os.path.join(folder, n))), key=natural_key)


def _sample_folder(folder: str) -> str:
    """A `sample` run's output folder (`config.yaml` + `sample/`) -> its `sample/`; else the folder."""
    inner = os.path.join(folder, "sample")
    if os.path.isfile(os.path.join(folder, "config.yaml")) and os.path.isdir(inner):
        return inner
    return folder


def _folder_videos(folder: str) -> list[VideoSource]:
    found: dict[str, list[VideoSource]] = {}
    for n in os.listdir(folder):
        p = os.path.join(folder, n)
        stem, ext = os.path.splitext(n)
        if os.path.isdir(p) and _images(p):
            found.setdefault(n, []).append(VideoSource(n, p, "frames"))
        elif os.path.isfile(p) and ext.lower() in VIDEO_EXTS:
            found.setdefault(stem, []).append(VideoSource(stem, p, ext.lower()))
    return [min(v, key=lambda s: _PREFERENCE.index(s.kind)) for _, v in sorted(found.items(), key=lambda kv: natural_key(kv[0]))]


def find_videos(paths: Sequence[str]) -> tuple[list[VideoSource], str | None]:
    """The videos the arguments name, and the one folder they all come from (None when several)."""
    out: list[VideoSource] = []
    folders = set()
    for path in paths:
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in VIDEO_EXTS:
                raise ConfigError(f"{path}: not a video file (expected {', '.join(VIDEO_EXTS)}, or a folder of frames)")
            out.append(VideoSource(os.path.splitext(os.path.basename(path))[0], path, ext))
            folders.add(os.path.dirname(os.path.abspath(path)))
        elif os.path.isdir(path):
            folder = _sample_folder(path)
            videos = _folder_videos(folder)
            if not videos and _images(folder):  # the folder is one video's frames
                videos = [VideoSource(os.path.basename(os.path.normpath(folder)), folder, "frames")]
                folders.add(os.path.dirname(os.path.abspath(folder)))
            else:
                folders.add(os.path.abspath(folder))
            if not videos:
                raise ConfigError(f"{path}: no videos (GIF / MP4 files or folders of PNG frames) in this folder")
            out += videos
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if not out:
        raise ConfigError("--videos: no videos given")
    return out, (folders.pop() if len(folders) == 1 else None)


# ----------------------------------------------------------------------------- reading


def _read_frames_folder(folder: str) -> np.ndarray:
    from PIL import Image

    frames, first = [], None
    for n in _images(folder):
        p = os.path.join(folder, n)
        try:
            with Image.open(p) as im:
                f = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the frame ({' '.join(str(e).split())})") from None
        if first is None:
            first = (n, f.shape)
        elif f.shape != first[1]:
            raise ConfigError(f"{folder}: frames of different sizes ({first[0]} is {first[1][1]}x{first[1][0]}, "
                             f"{n} is {f.shape[1]}x{f.shape[0]}): one video's frames must have one size")
        frames.append(f)
    if not frames:
        raise ConfigError(f"{folder}: no image frames")
    return np.stack(frames)


def read_video(source: VideoSource) -> np.ndarray:
    """uint8 `[F, H, W, 3]`; an unreadable file or mixed frame sizes is a one-line `ConfigError`."""
    from animatediff_jax.io.video import VideoReadError
    from animatediff_jax.io.video import read_video as decode

    if source.kind == "frames":
        return _read_frames_folder(source.path)
    try:
        return decode(source.path)
    except VideoReadError as e:
        raise ConfigError(" ".join(str(e).split())) from None


def read_reference(source: VideoSource) -> np.ndarray:
    """A reference image: a video's (or frame folder's) first frame, uint8 `[H, W, 3]`."""
    from animatediff_jax.io.video import VideoReadError, read_image
    from animatediff_jax.io.video import read_video as decode

    try:
        if source.kind == "frames":
            return read_image(os.path.join(source.path, _images(source.path)[0]))
        if source.kind in IMAGE_EXTS:
            return read_image(source.path)
        return decode(source.path, [0])[0]
    except VideoReadError as e:
        raise ConfigError(" ".join(str(e).split())) from None


def find_references(path: str, videos: Sequence[VideoSource]) -> list[VideoSource]:
    """The reference image of each video from `--reference PATH` (a folder of images, videos or a
    `sample` run: first frames), matched by name when every video has one of its name, else in order."""
    if not os.path.isdir(path):
        raise ConfigError(f"--reference {path}: no such folder")
    folder = _sample_folder(path)
    refs = {}
    for n in os.listdir(folder):
        stem, ext = os.path.splitext(n)
        if os.path.isfile(os.path.join(folder, n)) and ext.lower() in IMAGE_EXTS:
            refs.setdefault(stem, VideoSource(stem, os.path.join(folder, n), ext.lower()))
    for v in _folder_videos(folder):
        refs.setdefault(v.name, v)
    if all(v.name in refs for v in videos):
        return [refs[v.name] for v in videos]
    ordered = [refs[k] for k in sorted(refs, key=natural_key)]
    if len(ordered) != len(videos):
        raise ConfigError(f"--reference {path}: {len(ordered)} reference images for {len(videos)} videos "
                         "(give one per video, named as the videos or in the same order)")
    return ordered


# ----------------------------------------------------------------------------- prompts


def read_prompts_file(path: str, n: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise ConfigError(f"--prompts {path}: cannot be read ({e.strerror or e})") from None
    prompts = [line for line in lines if line]
    if len(prompts) != n:
        raise ConfigError(f"--prompts {path}: {len(prompts)} prompts for {n} videos (one per line, in the videos' "
                         "order)")
    return prompts


def _config_prompts(path: str) -> list:
    """A `sample` run's resolved prompts from its `config.yaml` (travelling prompts as `{frame: text}`)."""
    import yaml

    from animatediff_jax.sampling.assemble import video_prompts

    try:
        with open(path) as f:
            c = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(e).split())})") from None
    if not isinstance(c, Mapping) or not (c.get("prompt") or c.get("prompt_map")):
        raise ConfigError(f"{path}: not a sample run's config (no prompt or prompt_map)")
    defaults = dict(prompt=[], prompt_map={}, head_prompt="", tail_prompt="", seed=[0])
    return video_prompts({**defaults, **c})


def find_config(folder: str | None) -> str | None:
    """`config.yaml` in the videos' folder or the one above it (a `sample` run's)."""
    if folder is None:
        return None
    for d in (folder, os.path.dirname(folder)):
        p = os.path.join(d, "config.yaml")
        if os.path.isfile(p):
            return p
    return None


def resolve_prompts(videos: Sequence[VideoSource], folder: str | None, prompts_file: str | None):
    """`(prompts or None, where they came from)`: see the module's docstring for the order."""
    if prompts_file:
        return read_prompts_file(prompts_file, len(videos)), f"{prompts_file}"
    config = find_config(folder)
    if config is not None:
        saved = _config_prompts(config)
        out = []
        for v in videos:
            m = _INDEXED.match(v.name)
            if m is None or int(m.group(1)) >= len(saved):
                raise ConfigError(f"{v.path}: not one of the {len(saved)} videos of {config} (expected <i>-<prompt> "
                                 "names, i < the number of prompts): give --prompts FILE")
            out.append(saved[int(m.group(1))])
        return out, config
    matches = [_INDEXED.match(v.name) for v in videos]
    if all(matches):
        return [" ".join(m.group(2).split("-")) for m in matches], "file names (<i>-<prompt>; long prompts cut short)"
    return None, None
