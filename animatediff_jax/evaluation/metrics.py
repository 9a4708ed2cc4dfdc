"""The paper's CLIP metrics as pure functions over L2-normalised CLIP embeddings.

Per video, with frame embeddings `e_1..e_F` (image tower), the prompt's text embedding `t_f` (one
per frame: a travelling prompt gives each frame its keyframe's text) and a reference image `r`:

- text alignment: `mean_f cos(e_f, t_f)`; `clip_score` is `mean_f 100 * max(cos(e_f, t_f), 0)`
  (the CLIPScore convention of torchmetrics / T2I papers, per frame, then averaged);
- domain similarity: `mean_f cos(e_f, r)`, `r` being the personalised T2I model's own image for the
  same prompt and seed (how far the animation drifted from the model's domain);
- motion smoothness: `mean_f cos(e_f, e_{f+1})` over consecutive frames;
- frame consistency: the mean of `cos(e_i, e_j)` over all pairs `i < j`.

Cosines are dot products (the inputs are normalised). A metric that does not apply (no prompt, no
reference, a single frame) is NaN here and `None` in the JSON. `aggregate` gives mean ± std (the
population std, ddof 0) over videos.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TEXT = ("text_alignment", "clip_score")
DOMAIN = ("domain_similarity",)
TEMPORAL = ("smoothness", "consistency")
NAMES = TEXT + DOMAIN + TEMPORAL


def text_alignment(frames: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(mean cos, mean 100 * max(cos, 0))` of frames `[F, D]` against texts `[F, D]` (or one `[D]`)."""
    cos = jnp.sum(frames * jnp.broadcast_to(text, frames.shape), axis=-1)
    return jnp.mean(cos), jnp.mean(100.0 * jnp.maximum(cos, 0.0))


def domain_similarity(frames: jax.Array, reference: jax.Array) -> jax.Array:
    """Mean cos of frames `[F, D]` with a reference image embedding `[D]`."""
    return jnp.mean(frames @ reference)


def smoothness(frames: jax.Array) -> jax.Array:
    """Mean cos of consecutive frames `[F, D]` (NaN for one frame)."""
    if frames.shape[0] < 2:
        return jnp.float32(jnp.nan)
    return jnp.mean(jnp.sum(frames[1:] * frames[:-1], axis=-1))


def consistency(frames: jax.Array) -> jax.Array:
    """Mean cos over all frame pairs `i < j` of `[F, D]` (NaN for one frame)."""
    n = frames.shape[0]
    if n < 2:
        return jnp.float32(jnp.nan)
    gram = frames @ frames.T
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    return jnp.sum(jnp.where(upper, gram, 0.0)) / (n * (n - 1) / 2)


def video_metrics(frames: jax.Array, text: jax.Array | None = None, reference: jax.Array | None = None) -> dict:
    """Every metric of one video (`frames [F, D]`, `text [F, D] | [D] | None`, `reference [D] | None`),
    as scalars; those without their input are NaN."""
    frames = frames.astype(jnp.float32)
    nan = jnp.float32(jnp.nan)
    ta, cs = text_alignment(frames, text.astype(jnp.float32)) if text is not None else (nan, nan)
    return dict(
        text_alignment=ta,
        clip_score=cs,
        domain_similarity=domain_similarity(frames, reference.astype(jnp.float32)) if reference is not None else nan,
        smoothness=smoothness(frames),
        consistency=consistency(frames),
    )


# Videos of one frame count, batched: `[N, F, D]` frames, `[N, F, D]` texts, `[N, D]` references.
batch_metrics = jax.jit(jax.vmap(video_metrics))


def _number(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def per_video(frames: Sequence[jax.Array], texts: Sequence[jax.Array | None] | None = None,
              references: Sequence[jax.Array | None] | None = None) -> list[dict[str, float | None]]:
    """`video_metrics` of each video as plain floats (`None` where NaN). Videos of the same frame
    count with the same inputs present run as one batch (one compile per group's shape)."""
    n = len(frames)
    texts = list(texts) if texts is not None else [None] * n
    references = list(references) if references is not None else [None] * n
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        key = (tuple(frames[i].shape), None if texts[i] is None else tuple(np.shape(texts[i])), references[i] is None)
        groups.setdefault(key, []).append(i)
    out: list[dict] = [{} for _ in range(n)]
    for (shape, text_shape, no_ref), idx in groups.items():
        f = jnp.stack([jnp.asarray(frames[i]) for i in idx])
        t = None if text_shape is None else jnp.stack(
            [jnp.broadcast_to(jnp.asarray(texts[i]), shape) for i in idx])
        r = None if no_ref else jnp.stack([jnp.asarray(references[i]) for i in idx])
        m = jax.device_get(batch_metrics(f, t, r))
        for j, i in enumerate(idx):
            out[i] = {k: _number(m[k][j]) for k in NAMES}
    return out


def aggregate(rows: Sequence[Mapping[str, float | None]], names: Sequence[str] = NAMES) -> dict[str, dict]:
    """`{name: {"mean", "std", "n"}}` over the videos where the metric applies (mean/std None when none does)."""
    out = {}
    for k in names:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], np.float64)
        out[k] = {"mean": float(vals.mean()) if len(vals) else None,
                  "std": float(vals.std()) if len(vals) else None, "n": int(len(vals))}
    return out
