"""What a sample run writes: per-video GIF / MP4 / PNG files named after their prompts, the grid,
the resolved `config.yaml` (replayable), and the timing line."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from animatediff_jax.errors import ConfigError
from animatediff_jax.io import fs
from animatediff_jax.sampling.config import to_yaml


def slug(prompt: str | Mapping[int, str], words: int = 10, limit: int = 80) -> str:
    """A file-name piece from a prompt (a travelling one: its first keyframe's): its first words joined
    by '-' (as the original names files), keeping only letters, digits, '-', '_' and '.' (no commas,
    quotes, slashes or other characters a shell would need escaped), repeated '-' collapsed, never
    starting with '.' or '-': "the dog, 4k" -> "the-dog-4k"."""
    if isinstance(prompt, Mapping):
        prompt = prompt[min(prompt)]
    s = "-".join(prompt.split()[:words])
    s = re.sub(r"[^\w.-]+", "", s)  # (\w: letters and digits of any script, and '_')
    s = re.sub(r"-{2,}", "-", s).strip("-.")[:limit].rstrip("-")
    return s or "prompt"


def write_outputs(folder: str, frames: np.ndarray, prompts: Sequence[str], config: Mapping) -> list[str]:
    """Per-video GIF/MP4/PNG files, the grid, the resolved config; returns the paths written."""
    from animatediff_jax.io.video import write_gif, write_grid, write_mp4, write_pngs

    out = config["output"]
    fps = float(out["fps"])
    files = []
    for i, (video, prompt) in enumerate(zip(frames, prompts)):
        stem = os.path.join(folder, "sample", f"{i}-{slug(prompt)}")
        if "gif" in out["formats"]:
            write_gif(stem + ".gif", video, fps)
            files.append(stem + ".gif")
        if "mp4" in out["formats"]:
            write_mp4(stem + ".mp4", video, fps)
            files.append(stem + ".mp4")
        if "png" in out["formats"]:
            files += write_pngs(stem, video)
    if out["grid"]:
        cols = min(4, len(frames))
        for ext in ("gif", "mp4"):
            if ext in out["formats"] or (ext == "gif" and "mp4" not in out["formats"]):
                write_grid(os.path.join(folder, f"sample.{ext}"), frames, fps, cols=cols)
                files.append(os.path.join(folder, f"sample.{ext}"))
    path = os.path.join(folder, "config.yaml")
    with fs.open(path, "w") as f:
        f.write(to_yaml(config))
    files.append(path)
    return files


def timing_summary(t: Mapping[str, float], n: int) -> str:
    """One line: load, compile (per stage) apart from run (per stage, per video), write."""
    c_img = f", image {t['compile_image_s']:.1f}" if "compile_image_s" in t else ""  # (IP-Adapters)
    r_img = f", image {t['image_s']:.2f}" if "image_s" in t else ""
    return (
        f"timing: load {t['load_s']:.1f}s | compile {t['compile_s']:.1f}s (text {t['compile_text_s']:.1f}{c_img}, "
        f"denoise {t['compile_denoise_s']:.1f}, decode {t['compile_decode_s']:.1f}) | run {t['run_s']:.2f}s "
        f"(text {t['text_s']:.2f}{r_img}, denoise {t['denoise_s']:.2f}, decode {t['decode_s']:.2f}) = "
        f"{t['run_s'] / n:.2f} s/video | write {t['write_s']:.1f}s"
    )


def output_folder(folder: str) -> str:
    """The folder this run writes, checked before anything loads: never a file, never an unwritable
    place, and never an existing non-empty folder (old videos beside a new config.yaml): then the first
    free `<folder>-2`, `-3`, ... is used, and said. A bucket folder (gs://...) is checked by writing
    and removing a probe object."""
    if fs.is_remote(folder):
        return _bucket_output_folder(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"output.dir={folder!r}: is a file, not a folder")
    chosen, i = folder, 1
    while os.path.isdir(chosen) and os.listdir(chosen):
        i += 1
        chosen = f"{folder.rstrip(os.sep)}-{i}"
    if chosen != folder:
        print(f"output.dir {folder} is not empty: writing {chosen} instead", file=sys.stderr, flush=True)
    parent = os.path.abspath(chosen)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir={folder!r}: cannot be created ({parent} is not a writable folder)")
    return chosen


def _bucket_output_folder(folder: str) -> str:
    import uuid

    folder = folder.rstrip("/")
    if fs.isfile(folder):
        raise ConfigError(f"output.dir={folder!r}: is a file, not a folder")
    chosen, i = folder, 1
    while fs.isdir(chosen) and fs.listdir(chosen):
        i += 1
        chosen = f"{folder}-{i}"
    if chosen != folder:
        print(f"output.dir {folder} is not empty: writing {chosen} instead", file=sys.stderr, flush=True)
    probe = f"{chosen}/.write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.write_bytes(probe, b"")
        fs.remove(probe)
    except Exception as e:  # no credentials, no such bucket, no permission
        raise ConfigError(f"output.dir={folder!r}: cannot be written ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    return chosen
