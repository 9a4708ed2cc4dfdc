"""Videos and prompts -> CLIP embeddings -> the metrics of `evaluation.metrics`, with what they were
measured with (CLIP model, preprocessing, prompt set) so that numbers are only compared like for like.

    clip = load_clip(folder, require=("vision", "text"))
    result = evaluate_videos(clip, videos, prompts, references)   # a JSON-able dict
    print(format_table(result))

Frames are embedded video by video (one compile per frame shape), the metrics batched over the
videos of one frame count (`metrics.per_video`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from animatediff_jax.evaluation import metrics as M
from animatediff_jax.io import fs

Prompt = str | Mapping[int, str]


# ----------------------------------------------------------------------------- the CLIP model


def model_name(clip) -> str:
    """The CLIP folder's model name: its config's `_name_or_path` (what `save_pretrained` recorded,
    e.g. `openai/clip-vit-large-patch14`), else the folder's name."""
    try:
        with fs.open(os.path.join(clip.path, "config.json")) as f:
            name = json.load(f).get("_name_or_path") or ""
    except (OSError, ValueError, TypeError, AttributeError):
        name = ""
    return str(name) or os.path.basename(os.path.normpath(clip.path or "")) or "unknown"


def architecture(vision) -> str:
    """`ViT-L/14 @224` for the released towers, else the tower's sizes."""
    sizes = {(1024, 24): "L", (768, 12): "B", (1280, 32): "H"}
    letter = sizes.get((vision.hidden_size, vision.num_layers))
    if letter:
        return f"ViT-{letter}/{vision.patch_size} @{vision.image_size}"
    return (f"ViT (width {vision.hidden_size}, {vision.num_layers} layers, patch {vision.patch_size}) "
            f"@{vision.image_size}")


def clip_info(clip) -> dict[str, Any]:
    """What the numbers were measured with: path, model name, architecture, preprocessing."""
    return {"path": fs.abspath(clip.path) if clip.path else None, "name": model_name(clip),
            "architecture": architecture(clip.vision_config),
            "preprocessing": dataclasses.asdict(clip.processor) if clip.processor else None}


def frame_embeddings(clip, frames: np.ndarray, chunk: int = 16) -> np.ndarray:
    """uint8 frames `[F, H, W, 3]` -> normalised CLIP image embeddings `[F, D]` (in chunks of `chunk`
    frames, the last padded, so a video of any length compiles one shape)."""
    from animatediff_jax.models.clip_vision import image_embeddings

    model = clip.vision_model()  # equal modules hash equal: one compile per shape
    frames = np.asarray(frames)
    size = min(chunk, len(frames))
    out = []
    for start in range(0, len(frames), size):
        part = frames[start:start + size]
        pad = size - len(part)
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
        e = np.asarray(image_embeddings(model, clip.params["vision"], part, clip.processor))
        out.append(e[:size - pad])
    return np.concatenate(out)


def tokenizer(clip):
    """The CLIP folder's tokenizer (`text.Tokenizer`); a folder without tokenizer files is a one-line error."""
    from animatediff_jax.text import Tokenizer

    if clip.tokenizer_path is None:
        raise ValueError(f"{clip.path}: no tokenizer files (vocab.json + merges.txt or tokenizer.json) in the CLIP "
                         "folder: text alignment needs the model's own tokenizer")
    return Tokenizer(clip.tokenizer_path, max_length=clip.text_config.max_positions)


def text_embeddings(clip, texts: Sequence[str], tok=None) -> np.ndarray:
    """Normalised CLIP text embeddings `[len(texts), D]` of distinct texts."""
    from animatediff_jax.models.clip_text import text_embeddings as embed

    if not texts:
        return np.zeros((0, clip.text_projection_dim or 0), np.float32)
    ids = (tok or tokenizer(clip))(list(texts))
    return np.asarray(embed(clip.text_model(), clip.params["text"], ids))


def frame_texts(prompt: Prompt, num_frames: int) -> list[str]:
    """The text each frame is scored against: the prompt, or for a travelling prompt `{frame: text}`
    the keyframe in effect (the last one at or before the frame)."""
    if isinstance(prompt, str):
        return [prompt] * num_frames
    keys = sorted((int(k), v) for k, v in prompt.items())
    return [next((t for k, t in reversed(keys) if k <= f), keys[0][1]) for f in range(num_frames)]


def prompt_text(prompt: Prompt | None) -> str | None:
    """A prompt as one line (a travelling one as `0: text | 8: text`)."""
    if prompt is None or isinstance(prompt, str):
        return prompt
    return " | ".join(f"{int(k)}: {v}" for k, v in sorted(prompt.items(), key=lambda kv: int(kv[0])))


class TextEmbedder:
    """Per-frame text embeddings of prompts, each distinct text embedded once (cached across calls,
    so a training run's fixed prompt set is tokenised and embedded once)."""

    def __init__(self, clip):
        self.clip, self.tok, self.cache = clip, tokenizer(clip), {}

    def __call__(self, prompt: Prompt, num_frames: int) -> np.ndarray:
        texts = frame_texts(prompt, num_frames)
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for t, e in zip(new, text_embeddings(self.clip, new, self.tok)):
            self.cache[t] = e
        if len(set(texts)) == 1:
            return self.cache[texts[0]]
        return np.stack([self.cache[t] for t in texts])


# ----------------------------------------------------------------------------- safety


def check_videos(safety, videos: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[bool], list[int]]:
    """SD's safety checker on every frame of every video (`checkpoints.clip.load_safety_checker`'s
    weights): `(videos, flags, flagged frame counts)`, a video with any flagged frame replaced by a
    black one (diffusers blacks out flagged images; a video is shown or not as a whole)."""
    from animatediff_jax.models.safety import check_images

    out, flags, counts = [], [], []
    for v in videos:
        v = np.asarray(v)
        _, f = check_images(safety.params, v, config=safety.config, processing=safety.processor)
        n = int(np.asarray(f).sum())
        out.append(np.zeros_like(v) if n else v)
        flags.append(bool(n))
        counts.append(n)
    return out, flags, counts


# ----------------------------------------------------------------------------- evaluate


def evaluate_videos(
    clip,
    videos: Sequence[np.ndarray],
    prompts: Sequence[Prompt] | None = None,
    references: Sequence[np.ndarray] | None = None,
    safety=None,
    *,
    names: Sequence[str] | None = None,
    text: TextEmbedder | None = None,
) -> dict[str, Any]:
    """The CLIP metrics of uint8 videos `[F, H, W, 3]` (any sizes, any lengths).

    `prompts`: one per video (text alignment; None skips it); `references`: one uint8 image
    `[H, W, 3]` per video (domain similarity; None skips it); `safety`: SD safety checker weights
    (flags recorded per video, the metrics measured on the videos as given). `names`: how the videos
    are called in the result (default `video <i>`). Returns a JSON-able dict: `clip` (path, name,
    architecture, preprocessing), `prompts`, `metrics` (`{name: {mean, std, n}}`), `videos` (one row
    each: name, prompt, frames, every metric, `None` where it does not apply) and `skipped`.
    """
    n = len(videos)
    if n == 0:
        raise ValueError("no videos to evaluate")
    for what, given in (("prompts", prompts), ("references", references), ("names", names)):
        if given is not None and len(given) != n:
            raise ValueError(f"{len(given)} {what} for {n} videos: give one per video")
    videos = [np.asarray(v) for v in videos]
    for i, v in enumerate(videos):
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 or len(v) == 0:
            raise ValueError(f"{(names or [f'video {i}'] * n)[i]}: expected uint8 frames [F, H, W, 3], "
                             f"got {v.dtype} {v.shape}")
    names = list(names) if names is not None else [f"video {i}" for i in range(n)]
    skipped = []
    if prompts is not None and clip.text_config is None:
        raise ValueError(f"{clip.path}: a {clip.kind} folder has no text tower: text alignment needs a CLIPModel")
    frames = [frame_embeddings(clip, v) for v in videos]
    texts = None
    if prompts is not None:
        text = text or TextEmbedder(clip)
        texts = [text(p, len(v)) for p, v in zip(prompts, videos)]
    else:
        skipped.append("text_alignment, clip_score: no prompts")
    refs = None
    if references is not None:
        refs = []
        for name, r in zip(names, references):
            r = np.asarray(r)
            if r.ndim != 3 or r.shape[-1] != 3 or r.dtype != np.uint8:
                raise ValueError(f"reference of {name}: expected a uint8 image [H, W, 3], got {r.dtype} {r.shape}")
            refs.append(frame_embeddings(clip, r[None])[0])
    else:
        skipped.append("domain_similarity: no reference images")
    if all(len(v) < 2 for v in videos):
        skipped.append("smoothness, consistency: single-frame videos")
    rows = M.per_video(frames, texts, refs)
    out_rows = []
    for i, row in enumerate(rows):
        out_rows.append({"name": names[i], "prompt": prompt_text(prompts[i]) if prompts is not None else None,
                         "frames": int(len(videos[i])), **row})
    result = {
        "clip": clip_info(clip),
        "prompts": [prompt_text(p) for p in prompts] if prompts is not None else None,
        "metrics": M.aggregate(rows),
        "videos": out_rows,
        "skipped": skipped,
    }
    if safety is not None:
        _, flags, counts = check_videos(safety, videos)
        for row, f, c in zip(out_rows, flags, counts):
            row["nsfw"], row["nsfw_frames"] = f, c
        result["safety_checker"] = fs.abspath(safety.path) if safety.path else None
        result["nsfw_flags"] = flags
    return result


# ----------------------------------------------------------------------------- reporting

_COLUMNS = (("text_alignment", "text"), ("clip_score", "clip_score"), ("domain_similarity", "domain"),
            ("smoothness", "smooth"), ("consistency", "consist"))


def _cell(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v * scale:.4f}" if scale == 1.0 else f"{v:.2f}"


def format_table(result: Mapping[str, Any], width: int = 40) -> str:
    """Per video and mean ± std: one column per metric that applies to some video."""
    cols = [(k, h) for k, h in _COLUMNS if result["metrics"][k]["n"]]
    label = f"mean ± std ({len(result['videos'])} videos)"
    width = max(width, len(label) + 2)
    safety = "nsfw_flags" in result
    head = f"{'video':<{width}}" + "".join(f"{h:>16}" for _, h in cols) + ("    nsfw" if safety else "")
    lines = [head]
    for row in result["videos"]:
        name = row["name"] if len(row["name"]) <= width - 1 else row["name"][:width - 4] + "..."
        cells = "".join(f"{_cell(row[k], 100.0 if k == 'clip_score' else 1.0):>16}" for k, _ in cols)
        lines.append(f"{name:<{width}}{cells}" + (f"{'yes' if row['nsfw'] else 'no':>8}" if safety else ""))
    agg = result["metrics"]
    cells = []
    for k, _ in cols:
        m, s = agg[k]["mean"], agg[k]["std"]
        cells.append(f"{(f'{m:.2f}±{s:.2f}' if k == 'clip_score' else f'{m:.4f}±{s:.4f}'):>16}")
    lines.append(f"{label:<{width}}" + "".join(cells))
    clip = result["clip"]
    lines.append(f"CLIP: {clip['name']} ({clip['architecture']})")
    lines += [f"skipped {s}" for s in result.get("skipped", [])]
    return "\n".join(lines)


def write_json(path: str, result: Mapping[str, Any]) -> None:
    """The result as strict JSON (atomically: a failed write leaves an older file as it was)."""
    from animatediff_jax.io.fs import atomic_file

    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
