"""Text to embeddings: CLIP on the prompts and negative prompts, and prompt travel (a text per
frame, interpolated between keyframes, each unique text encoded once).

Prompts are read in `prompt_syntax` ("a1111": AUTOMATIC1111's web UI, `text.Tokenizer.chunks`; "plain":
diffusers'). Every text of a call is cut into the same number K of 77-token chunks (the shorter ones
padded with empty chunks, the encoding of ""), each chunk encoded on its own, the chunks joined along the
sequence: embeddings `[N, K * 77, D]` (the UNet's cross-attention takes any length). With weights, each
token's output is multiplied by its weight and each chunk of each text rescaled to its unweighted mean
(the web UI's "Original" emphasis, `sd_hijack_clip` / `sd_emphasis`: `z * w * (mean(z) / mean(z * w))`,
the mean over the chunk's 77 x D values). A text without weights or BREAK, of at most 75 tokens, gives
diffusers' `encode_prompt` embeddings exactly (one chunk, no weights: the same program as "plain").

SDXL (`encode_sdxl`): both text encoders through `text.encode_prompts_sdxl` (diffusers'
`StableDiffusionXLPipeline.encode_prompt`), plus the added conditioning the UNet takes per video (the
pooled embeddings and the size ids); prompts are read plainly (a prompt the web UI would read otherwise
is refused). SDXL prompt travel (`travel_sdxl`) interpolates the pooled embeddings per frame as it does
the hidden states.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.errors import FieldError
from animatediff_jax.models.unet import AddedCond
from animatediff_jax.sampling.compiled import PROGRAMS, Programs
from animatediff_jax.sampling.options import Prompt, keyframes


def tokenize(tokenizer: Any, texts: Sequence[str], syntax: str = "a1111") -> tuple[np.ndarray, np.ndarray | None]:
    """`(ids, weights)` `[len(texts), K, 77]` of `texts` read in `syntax`, K the most chunks any text needs
    (the others padded with empty chunks); `weights` None when every one is 1. A tokenizer that is not a
    `text.Tokenizer` (a toy one: a callable giving `[B, 77]` ids) reads every text plainly."""
    if not hasattr(tokenizer, "chunks"):
        return np.asarray(tokenizer(list(texts)))[:, None], None
    chunks = [tokenizer.chunks(t, syntax) for t in texts]
    k = max(ids.shape[0] for ids, _ in chunks)
    if k > 1:
        empty_ids, empty_w = tokenizer.chunks("", "plain")
        chunks = [(np.concatenate([ids] + [empty_ids] * (k - ids.shape[0])),
                   np.concatenate([w] + [empty_w] * (k - w.shape[0]))) for ids, w in chunks]
    ids = np.stack([c[0] for c in chunks]).astype(np.int32)
    weights = np.stack([c[1] for c in chunks]).astype(np.float32)
    return ids, None if (weights == 1.0).all() else weights


def embed(model: Any, params: Any, ids: jax.Array, weights: jax.Array | None, clip_skip: int) -> jax.Array:
    """`[N, K * 77, D]` embeddings of chunked `ids` `[N, K, 77]` (inside a jitted program), each chunk
    weighted and rescaled to its unweighted mean when `weights` `[N, K, 77]` are given."""
    n, k, length = ids.shape
    z = model.apply({"params": params}, ids.reshape(n * k, length), clip_skip)
    if weights is not None:
        z32 = z.astype(jnp.float32).reshape(n, k, length, -1)
        mean = z32.mean(axis=(2, 3), keepdims=True)
        z32 = z32 * weights[..., None]
        z = (z32 * (mean / z32.mean(axis=(2, 3), keepdims=True))).astype(z.dtype)
    return z.reshape(n, k * length, -1)


def encode_text(pipe: Any, prompts: Sequence[str], negative_prompts: Sequence[str] | None, clip_skip: int = 0,
                programs: Programs = PROGRAMS, syntax: str = "a1111") -> tuple[jax.Array, jax.Array | None, float]:
    """(cond, uncond or None, compile seconds): CLIP embeddings `[N, K * 77, D]` of an `AnimationPipeline`,
    prompts and negatives read in `syntax` and chunked alike (see the module docstring).

    `clip_skip` applies to the prompts only; negatives use the last layer, as diffusers'
    `encode_prompt` does.
    """
    if pipe.tokenizer is None:
        raise ValueError("the pipeline has no tokenizer: pass one to AnimationPipeline / from_base")
    model = pipe.text_encoder
    params = pipe.params["text_encoder"]
    n = len(prompts)
    ids, weights = tokenize(pipe.tokenizer, list(prompts) + list(negative_prompts or []), syntax)
    pos, neg = jnp.asarray(ids[:n]), None if negative_prompts is None else jnp.asarray(ids[n:])
    weighted = lambda w: None if w is None or (w == 1.0).all() else jnp.asarray(w)  # noqa: E731
    w_pos = weighted(None if weights is None else weights[:n])
    w_neg = weighted(None if weights is None or negative_prompts is None else weights[n:])

    def fn(params, ids, neg, w_pos, w_neg):
        cond = embed(model, params, ids, w_pos, clip_skip)
        uncond = None if neg is None else embed(model, params, neg, w_neg, 0)
        return cond, uncond

    compiled, compile_s = programs.compiled("text", fn, (model, clip_skip), (params, pos, neg, w_pos, w_neg))
    cond, uncond = compiled(params, pos, neg, w_pos, w_neg)
    return cond, uncond, compile_s


def travel_rows(keys: list[tuple[int, str]], num_frames: int, row: Mapping[str, int]) -> tuple[np.ndarray, ...]:
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
    """`emb[i]` to `emb[j]` at `t` (`[F]` each) for embeddings `emb` `[K, ..., D]` (hidden states `[K, L, D]`,
    SDXL's pooled `[K, P]`) -> `[F, ..., D]`.

    "linear": `(1 - t) a + t b` (diffusers' FreeNoise `_lerp`); "slerp": along the great circle
    between each token's (each pooled) two vectors (linear where they are parallel)."""
    a, b = emb[i].astype(jnp.float32), emb[j].astype(jnp.float32)
    tt = t.astype(jnp.float32).reshape(t.shape + (1,) * (a.ndim - 1))
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


def travel(emb: jax.Array, keys: Sequence[list[tuple[int, str]]], texts: Sequence[str], num_frames: int,
           method: str = "linear") -> jax.Array:
    """`[N, F, ...]`: each video's frames interpolated (`interpolate`) between its keyframes `keys[n]`, from
    `emb` `[K, ...]` the embeddings of the unique `texts` in order."""
    row = {t: r for r, t in enumerate(texts)}
    return jnp.stack([interpolate(emb, *map(jnp.asarray, travel_rows(k, num_frames, row)), method)
                      for k in keys]).astype(emb.dtype)


def encode_prompts(pipe: Any, prompts: Sequence[Prompt], negative_prompts: Sequence[Prompt] | None, num_frames: int,
                   clip_skip: int = 0, interpolation: str = "linear", programs: Programs = PROGRAMS,
                   syntax: str = "a1111") -> tuple[jax.Array, jax.Array | None, float]:
    """`encode_text` for prompts that may travel: `[N, K * 77, D]` embeddings when every prompt is one
    string, else `[N, F, K * 77, D]`, each frame's text interpolated between its keyframes (each unique
    text encoded once; every text of the call in K chunks). When only one side travels, both come back
    per frame."""
    texts = list(prompts) + list(negative_prompts or [])
    if all(isinstance(p, str) for p in texts):
        return encode_text(pipe, list(prompts), None if negative_prompts is None else list(negative_prompts),
                           clip_skip, programs, syntax)
    pos = [keyframes(p, num_frames, f"prompts[{b}]") for b, p in enumerate(prompts)]
    neg = None if negative_prompts is None else [
        keyframes(p, num_frames, f"negative_prompts[{b}]") for b, p in enumerate(negative_prompts)]
    unique_pos = list(dict.fromkeys(t for k in pos for _, t in k))
    unique_neg = None if neg is None else list(dict.fromkeys(t for k in neg for _, t in k))
    cond_u, uncond_u, compile_s = encode_text(pipe, unique_pos, unique_neg, clip_skip, programs, syntax)
    cond = travel(cond_u, pos, unique_pos, num_frames, interpolation)
    uncond = None if neg is None else travel(uncond_u, neg, unique_neg, num_frames, interpolation)
    return cond, uncond, compile_s


def check_plain(tokenizer: Any, texts: Sequence[str]) -> None:
    """SDXL reads prompts as diffusers does: a text the web UI syntax would read otherwise (weights, BREAK,
    escapes, over 75 tokens) is refused rather than silently read plainly."""
    if not hasattr(tokenizer, "chunks"):
        return
    for text in texts:
        ids, weights = tokenizer.chunks(text, "a1111")
        if ids.shape[0] != 1 or (weights != 1.0).any() or not np.array_equal(ids, tokenizer(text)):
            raise FieldError("prompt_syntax", f"='a1111': {text[:40]!r} has weights, BREAK, escapes or over 75 "
                             "tokens, which SDXL sampling does not read yet; use prompt_syntax='plain'")


def encode_sdxl(pipe: Any, prompts: Sequence[Prompt], negative_prompts: Sequence[Prompt] | None,
                time_ids: np.ndarray, guided: bool, clip_skip: int = 0, syntax: str = "a1111", num_frames: int = 1,
                interpolation: str = "linear") -> tuple[jax.Array, jax.Array | None, tuple[AddedCond, AddedCond | None]]:
    """`(cond, uncond or None, (added, added_uncond or None))` of an SDXL pipeline: both encoders' hidden
    states side by side `[N, 77, D1 + D2]`, and per video the pooled embeddings with `time_ids` `[6]`
    (both halves the same ids, as diffusers without negative sizes). Under guidance, `negative_prompts`
    None gives zeros when the pipeline's `force_zeros_for_empty_prompt` (else ""). `clip_skip` 0 is
    diffusers' None (the penultimate layer).

    Prompt travel (a `{frame: text}` prompt or negative): `travel_sdxl`, everything per frame."""
    from animatediff_jax.text import encode_prompts_sdxl

    if not all(isinstance(p, str) for p in list(prompts) + list(negative_prompts or [])):
        return travel_sdxl(pipe, prompts, negative_prompts, time_ids, guided, clip_skip, syntax, num_frames,
                           interpolation)
    if pipe.tokenizer is None or pipe.tokenizer_2 is None:
        raise ValueError("an SDXL pipeline needs both tokenizers (tokenizer, tokenizer_2)")
    if syntax == "a1111":
        for tok in (pipe.tokenizer, pipe.tokenizer_2):
            check_plain(tok, list(prompts) + list(negative_prompts or []))
    out = encode_prompts_sdxl(pipe.text_encoders, (pipe.params["text_encoder"], pipe.params["text_encoder_2"]),
                              (pipe.tokenizer, pipe.tokenizer_2), list(prompts),
                              None if negative_prompts is None else list(negative_prompts), clip_skip=clip_skip,
                              force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)
    ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (len(prompts), 6))
    added = AddedCond(out.pooled_prompt_embeds, ids)
    if not guided:
        return out.prompt_embeds, None, (added, None)
    return out.prompt_embeds, out.negative_prompt_embeds, (added, AddedCond(out.negative_pooled_prompt_embeds, ids))


def travel_sdxl(pipe: Any, prompts: Sequence[Prompt], negative_prompts: Sequence[Prompt] | None,
                time_ids: np.ndarray, guided: bool, clip_skip: int, syntax: str, num_frames: int,
                interpolation: str) -> tuple[jax.Array, jax.Array | None, tuple[AddedCond, AddedCond | None]]:
    """`encode_sdxl` for prompts that travel, as AnimateDiff-Evolved's SDXL prompt scheduling: each unique
    keyframe text encoded once by both encoders, then every frame gets its hidden states AND its pooled
    embedding interpolated between its keyframes' alike (`travel`: the same rows and weights), so the
    added conditioning follows the text: `[N, F, 77, D1 + D2]` and `AddedCond(text_embeds [N, F, P],
    time_ids [N, 6])` (the sizes stay per video). Both sides come back per frame (a side that does not
    travel: its text held on every frame; no negative under `force_zeros_for_empty_prompt`: zeros).
    Negatives are encoded as diffusers encodes them (the penultimate layer whatever `clip_skip`)."""

    def per_frame(texts: Sequence[Prompt], skip: int, what: str) -> tuple[jax.Array, jax.Array]:
        keys = [keyframes(p, num_frames, f"{what}[{b}]") for b, p in enumerate(texts)]
        unique = list(dict.fromkeys(t for k in keys for _, t in k))
        hidden, _, (added, _) = encode_sdxl(pipe, unique, None, time_ids, False, skip, syntax)
        return (travel(hidden, keys, unique, num_frames, interpolation),
                travel(added.text_embeds, keys, unique, num_frames, interpolation))

    ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (len(prompts), 6))
    cond, pooled = per_frame(prompts, clip_skip, "prompts")
    if not guided:
        return cond, None, (AddedCond(pooled, ids), None)
    if negative_prompts is None and pipe.force_zeros_for_empty_prompt:
        uncond, neg_pooled = jnp.zeros_like(cond), jnp.zeros_like(pooled)
    else:
        uncond, neg_pooled = per_frame(negative_prompts or [""] * len(prompts), 0, "negative_prompts")
    return cond, uncond, (AddedCond(pooled, ids), AddedCond(neg_pooled, ids))
