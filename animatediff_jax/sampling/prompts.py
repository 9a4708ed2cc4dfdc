"""Text to embeddings: CLIP on the prompts and negative prompts, and prompt travel (a text per
frame, interpolated between keyframes, each unique text encoded once)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.sampling.compiled import PROGRAMS, Programs
from animatediff_jax.sampling.options import Prompt, keyframes


def encode_text(pipe: Any, prompts: Sequence[str], negative_prompts: Sequence[str] | None, clip_skip: int = 0,
                programs: Programs = PROGRAMS) -> tuple[jax.Array, jax.Array | None, float]:
    """(cond, uncond or None, compile seconds): CLIP embeddings `[N, 77, D]` of an `AnimationPipeline`.

    `clip_skip` applies to the prompts only; negatives use the last layer, as diffusers'
    `encode_prompt` does.
    """
    if pipe.tokenizer is None:
        raise ValueError("the pipeline has no tokenizer: pass one to AnimationPipeline / from_sd15")
    model = pipe.text_encoder
    params = pipe.params["text_encoder"]
    ids = jnp.asarray(pipe.tokenizer(list(prompts)))
    neg = None if negative_prompts is None else jnp.asarray(pipe.tokenizer(list(negative_prompts)))

    def fn(params, ids, neg):
        cond = model.apply({"params": params}, ids, clip_skip)
        uncond = None if neg is None else model.apply({"params": params}, neg, 0)
        return cond, uncond

    compiled, compile_s = programs.compiled("text", fn, (model, clip_skip), (params, ids, neg))
    cond, uncond = compiled(params, ids, neg)
    return cond, uncond, compile_s


def _travel(keys: list[tuple[int, str]], num_frames: int, row: Mapping[str, int]) -> tuple[np.ndarray, ...]:
    """Per frame: the two embeddings (rows of the unique texts) it lies between, and where (0..1).
    As diffusers' FreeNoise: keyframe k to k+1 inclusive, the last keyframe held to the last frame."""
    frames, texts = [f for f, _ in keys], [t for _, t in keys]
    if frames[-1] != num_frames - 1:
        frames, texts = frames + [num_frames - 1], texts + [texts[-1]]
    i = np.full(num_frames, row[texts[0]], np.int32)
    j, t = i.copy(), np.zeros(num_frames, np.float32)
    for a in range(len(frames) - 1):
        start, end = frames[a], frames[a + 1]
        for f in range(start, end + 1):
            i[f], j[f], t[f] = row[texts[a]], row[texts[a + 1]], (f - start) / (end - start)
    return i, j, t


def interpolate(emb: jax.Array, i: jax.Array, j: jax.Array, t: jax.Array, method: str = "linear") -> jax.Array:
    """`emb[i]` to `emb[j]` at `t` (`[F]` each) for embeddings `emb` `[K, L, D]` -> `[F, L, D]`.

    "linear": `(1 - t) a + t b` (diffusers' FreeNoise `_lerp`); "slerp": along the great circle
    between each token's two vectors (linear where they are parallel)."""
    a, b = emb[i].astype(jnp.float32), emb[j].astype(jnp.float32)
    tt = t.astype(jnp.float32)[:, None, None]
    if method == "linear":
        return (1 - tt) * a + tt * b
    if method != "slerp":
        raise ValueError(f"prompt interpolation {method!r}: expected linear or slerp")
    norm = jnp.linalg.norm(a, axis=-1, keepdims=True) * jnp.linalg.norm(b, axis=-1, keepdims=True)
    cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True) / jnp.maximum(norm, 1e-12), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sin(theta)
    parallel = sin < 1e-4
    safe = jnp.where(parallel, 1.0, sin)
    wa = jnp.where(parallel, 1 - tt, jnp.sin((1 - tt) * theta) / safe)
    wb = jnp.where(parallel, tt, jnp.sin(tt * theta) / safe)
    return wa * a + wb * b


def encode_prompts(pipe: Any, prompts: Sequence[Prompt], negative_prompts: Sequence[Prompt] | None, num_frames: int,
                   clip_skip: int = 0, interpolation: str = "linear", programs: Programs = PROGRAMS
                   ) -> tuple[jax.Array, jax.Array | None, float]:
    """`encode_text` for prompts that may travel: `[N, 77, D]` embeddings when every prompt is one
    string, else `[N, F, 77, D]`, each frame's text interpolated between its keyframes (each unique
    text encoded once). When only one side travels, both come back per frame."""
    texts = list(prompts) + list(negative_prompts or [])
    if all(isinstance(p, str) for p in texts):
        return encode_text(pipe, list(prompts), None if negative_prompts is None else list(negative_prompts),
                           clip_skip, programs)
    pos = [keyframes(p, num_frames, f"prompts[{b}]") for b, p in enumerate(prompts)]
    neg = None if negative_prompts is None else [
        keyframes(p, num_frames, f"negative_prompts[{b}]") for b, p in enumerate(negative_prompts)]
    unique_pos = list(dict.fromkeys(t for k in pos for _, t in k))
    unique_neg = None if neg is None else list(dict.fromkeys(t for k in neg for _, t in k))
    cond_u, uncond_u, compile_s = encode_text(pipe, unique_pos, unique_neg, clip_skip, programs)

    def per_frame(emb, keys, texts):
        row = {t: r for r, t in enumerate(texts)}
        return jnp.stack([interpolate(emb, *map(jnp.asarray, _travel(k, num_frames, row)), interpolation)
                          for k in keys])

    cond = per_frame(cond_u, pos, unique_pos).astype(cond_u.dtype)
    uncond = None if neg is None else per_frame(uncond_u, neg, unique_neg).astype(uncond_u.dtype)
    return cond, uncond, compile_s
