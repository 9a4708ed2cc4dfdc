"""Context windows: videos longer than the motion module's position table, denoised in
overlapping frame windows whose predictions are averaged where they overlap
(AnimateDiff-Evolved's "uniform" / "looped_uniform"), or (scope "motion", diffusers' FreeNoise) one
UNet pass with only the motion modules' attentions windowed; FreeNoise's initial noise.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.models.layers import TemporalWindows, frame_weights
from animatediff_jax.sampling.options import NOISE_TYPES, Windows

Frames = tuple[tuple[int, ...], ...]


def context_windows(num_frames: int, length: int, overlap: int = 4, looped: bool = False) -> Frames:
    """Overlapping windows of `length` frames covering `0..num_frames-1`, starting every
    `length - overlap` frames: the last one flush with the end (AnimateDiff-Evolved's "uniform"), or
    with `looped` wrapping around it ("looped_uniform": the last frames see the first, for seamless
    loops). One window of all frames when `length >= num_frames`.
    """
    if length < 1 or not 0 <= overlap < length:
        raise ValueError(f"context windows need length >= 1 and 0 <= overlap < length, got {length}, {overlap}")
    if length >= num_frames:
        return (tuple(range(num_frames)),)
    stride = length - overlap
    if looped:
        return tuple(tuple((s + j) % num_frames for j in range(length)) for s in range(0, num_frames, stride))
    starts = list(range(0, num_frames - length + 1, stride))
    if starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return tuple(tuple(range(s, s + length)) for s in starts)


def window_weights(length: int, weighting: str = "flat") -> tuple[float, ...]:
    """How much each position of a window counts where windows overlap (diffusers' FreeNoise
    `_get_frame_weights`, `layers.frame_weights`): flat 1s; pyramid [1, 2, .., 2, 1]; delayed_reverse_sawtooth
    [0.01, .., mid, .., 1]."""
    return frame_weights(length, weighting)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Windows of frame indices and the weight of each position in a window (static: part of the compile)."""

    frames: Frames
    weights: tuple[float, ...]


def window_plan(num_frames: int, spec: Windows) -> WindowPlan | None:
    """The windows of `spec` over `num_frames`, or None when one window holds every frame (the plain path)."""
    frames = context_windows(num_frames, spec.length, spec.overlap, looped=spec.looped)
    if len(frames) == 1:
        return None
    return WindowPlan(frames, window_weights(len(frames[0]), spec.weighting))


def motion_windows(num_frames: int, spec: Windows) -> TemporalWindows | None:
    """`spec`'s windows for the motion modules (scope "motion", diffusers' FreeNoise): `context_windows`'
    frames; off the stride grid, the last (flush with the end) adds only the frames past the window before
    it, as `FreeNoiseTransformerBlock`'s; None when one window holds every frame."""
    frames = context_windows(num_frames, spec.length, spec.overlap, looped=spec.looped)
    if len(frames) == 1:
        return None
    end = list(range(0, num_frames - spec.length + 1, spec.length - spec.overlap))[-1] + spec.length
    return TemporalWindows(frames, spec.weighting, 0 if spec.looped else num_frames - end)


def windowed(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, windows: Frames | WindowPlan
             ) -> jax.Array:
    """`fn(frames, their indices)` (-> per-frame prediction) on each window of `x`'s frame axis,
    overlaps averaged (weighted by position in the window with a `WindowPlan`).

    Windows run one after another (`lax.map`), so memory is one window's worth of activations.
    """
    plan = windows if isinstance(windows, WindowPlan) else WindowPlan(windows, (1.0,) * len(windows[0]))
    idx = np.asarray(plan.frames, np.int32)  # [W, L], static
    w, length = idx.shape
    pos = np.broadcast_to(np.asarray(plan.weights, np.float64), idx.shape)
    counts = np.bincount(idx.reshape(-1), weights=pos.reshape(-1), minlength=x.shape[1])
    if (counts == 0).any():
        raise ValueError(f"context windows leave frames {np.flatnonzero(counts == 0).tolist()} uncovered")
    preds = jax.lax.map(lambda ix: fn(jnp.take(x, ix, axis=1), ix), jnp.asarray(idx))  # [W, B, L, ...]
    preds = preds * jnp.asarray(pos, preds.dtype).reshape((w, 1, length) + (1,) * (preds.ndim - 3))
    preds = jnp.moveaxis(preds, 0, 1).reshape((x.shape[0], w * length) + preds.shape[3:])
    total = jnp.zeros(preds.shape[:1] + x.shape[1:2] + preds.shape[2:], preds.dtype)
    total = total.at[:, idx.reshape(-1)].add(preds)
    return total / jnp.asarray(counts, preds.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def free_noise_perms(key: jax.Array) -> Callable[[int], np.ndarray]:
    """The permutations `free_noise` shuffles a video's noise with, drawn in turn from its key."""
    counter = itertools.count(1)
    return lambda n: np.asarray(jax.random.permutation(jax.random.fold_in(key, 0x4E4F4953 + next(counter)), n))


def free_noise(noise: np.ndarray, length: int, stride: int, noise_type: str, perms: Callable[[int], np.ndarray]
               ) -> np.ndarray:
    """FreeNoise's initial noise over `[N, F, ...]` (diffusers' `_prepare_latents_free_noise`):
    "repeat_context" repeats the first `length` frames; "shuffle_context" fills each later stretch of
    `stride` frames with a permutation (`perms(n)`) of the frames a window earlier; "random" keeps it."""
    f = noise.shape[1]
    if noise_type == "random":
        return noise
    if noise_type == "repeat_context":
        return np.concatenate([noise[:, :length]] * -(-f // length), axis=1)[:, :f]
    if noise_type != "shuffle_context":
        raise ValueError(f"context_windows.noise={noise_type!r}: expected one of {', '.join(NOISE_TYPES)}")
    out = np.array(noise)
    for i in range(length, f, stride):
        lo = max(0, i - length)
        n = min(f, lo + stride) - lo
        if n == 0:
            break
        src = np.arange(lo, lo + n)[perms(n)]
        k = min(f, i + n) - i
        out[:, i:i + k] = out[:, src[:k]]
    return out
