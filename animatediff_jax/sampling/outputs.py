"""What a sample run writes: per-video GIF / MP4 / PNG files named after their prompts, the grid,
the resolved `config.yaml` (replayable), and the timing line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from animatediff_jax.io import fs
from animatediff_jax.sampling.config import to_yaml


def slug(prompt: str | Mapping[int, str], words: int = 10, limit: int = 80) -> str:
    """A file-name piece from a prompt (a travelling one: its first keyframe's): its first words joined
    by '-' (as the original names files)."""
    if isinstance(prompt, Mapping):
        prompt = prompt[min(prompt)]
    s = "-".join(prompt.replace("/", "").split()[:words])
    s = re.sub(r"[^\w,.+-]", "", s)[:limit]
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
    return (
        f"timing: load {t['load_s']:.1f}s | compile {t['compile_s']:.1f}s (text {t['compile_text_s']:.1f}, "
        f"denoise {t['compile_denoise_s']:.1f}, decode {t['compile_decode_s']:.1f}) | run {t['run_s']:.2f}s "
        f"(text {t['text_s']:.2f}, denoise {t['denoise_s']:.2f}, decode {t['decode_s']:.2f}) = "
        f"{t['run_s'] / n:.2f} s/video | write {t['write_s']:.1f}s"
    )
