"""Control models in the sampler: ControlNets (one condition image per frame) and SparseCtrl (a few
keyframes steer the whole video; one RGB keyframe at frame 0 is image-to-video).

Their residuals join the UNet's inside the same `lax.scan` step (diffusers'
`AnimateDiffControlNetPipeline` / `AnimateDiffSparseControlNetPipeline`, guess mode off): the control
model sees the same CFG batch as the UNet (both halves, the same condition), its residuals are scaled
by `scale` while the step is inside `[start, end]` of the run (diffusers' `control_guidance_start/end`),
and several controls add up (diffusers' `MultiControlNetModel`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.errors import FieldError
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.controlnet import ControlNet
from animatediff_jax.sampling.options import Control

Params = dict[str, Any]


class ControlSpec(NamedTuple):
    """The static part of a control in the compiled loop (hashable: part of the compile key)."""

    model: ControlNet
    start: float
    end: float
    latent: bool  # condition = VAE latents of the keyframes (SparseCtrl RGB), encoded inside the call
    indices: tuple[int, ...] | None  # SparseCtrl: frames holding a condition


def check_base(controls: Sequence[Control], unet_config: UNetConfig, window_length: int) -> None:
    """Every control against the UNet it steers (its own settings are `Control.check`'s): a control model
    for another base, or SparseCtrl motion modules shorter than the video (or its window)."""
    for c in controls:
        if c.config is None or c.params is None:
            raise FieldError(c.name, ": its model is not loaded (a Control needs the model's config and params)")
        cfg, u = c.config, unet_config
        if cfg.unet.cross_attention_dim != u.cross_attention_dim or cfg.unet.block_out_channels != u.block_out_channels:
            raise FieldError(c.name, f": a control model for another base (cross-attention {cfg.unet.cross_attention_dim}, "
                             f"channels {list(cfg.unet.block_out_channels)}; the UNet has {u.cross_attention_dim}, "
                             f"{list(u.block_out_channels)})")
        if cfg.sparse and window_length > cfg.unet.motion.max_positions:
            raise FieldError(c.name, f": its motion modules hold {cfg.unet.motion.max_positions} frames, the video "
                             f"(or window) has {window_length}")


def _pixels01(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def control_inputs(c: Control, num_frames: int, dtype: Any = jnp.float32,
                   attention: str = "auto") -> tuple[ControlSpec, dict[str, np.ndarray]]:
    """The static spec and the per-video arrays (no batch axis yet) of a checked control (its scale
    and params travel apart: replicated, and traced, so another scale is not another compile).

    ControlNet: `cond` = its frames in [0, 1]. SparseCtrl scribble: `cond` = the keyframes in [0, 1]
    at their frames, zeros elsewhere, `mask` 1 at those frames. SparseCtrl RGB: `keyframes` in [-1, 1]
    (VAE-encoded inside the compiled call, as diffusers' `prepare_image`) and `mask`.
    """
    x = _pixels01(c.images)
    arrays: dict[str, np.ndarray] = {}
    indices = None
    if c.config.sparse:
        indices = tuple(int(i) % num_frames for i in c.frame_indices)  # (-1: the last frame)
        mask = np.zeros((num_frames,), np.float32)
        mask[list(indices)] = 1.0
        arrays["mask"] = mask
        if c.config.latent_condition:
            arrays["keyframes"] = 2.0 * x - 1.0
        else:
            cond = np.zeros((num_frames,) + x.shape[1:], np.float32)
            cond[list(indices)] = x
            arrays["cond"] = cond
    else:
        arrays["cond"] = x
    spec = ControlSpec(ControlNet(c.config, dtype=dtype, attention=attention), float(c.start), float(c.end),
                       c.config.sparse and c.config.latent_condition, indices)
    return spec, arrays


def latent_conditions(specs: Sequence[ControlSpec], arrays: Sequence[dict], encode, num_frames: int) -> list[dict]:
    """RGB SparseCtrl keyframes -> their VAE latents placed at their frames (`cond` `[B, F, h, w, 4]`);
    `encode(pixels [B, K, H, W, 3], salt) -> latents` is the caller's VAE. Other controls pass through."""
    out = []
    for j, (spec, arr) in enumerate(zip(specs, arrays)):
        if spec.latent:
            z = encode(arr["keyframes"], j)
            cond = jnp.zeros((z.shape[0], num_frames) + z.shape[2:], z.dtype).at[:, jnp.asarray(spec.indices)].set(z)
            arr = {k: v for k, v in arr.items() if k != "keyframes"} | {"cond": cond}
        out.append(arr)
    return out


def control_residuals(specs: Sequence[ControlSpec], params: Sequence[Params], scales: jax.Array,
                      arrays: Sequence[dict], step: jax.Array, steps: int, x: jax.Array, t: jax.Array, context: jax.Array,
                      frames: jax.Array | None, pairs: bool) -> tuple[tuple[jax.Array, ...] | None, jax.Array | None]:
    """The summed (down, mid) residuals of every control for the UNet input `x` `[B', F', h, w, C]`.

    `step` of `steps` (counted from the run's first step) sets each control's on/off
    (`start <= step / steps` and `(step + 1) / steps <= end`, diffusers' `controlnet_keep`). `frames`:
    the window's frame indices (None: all). `scales` `[controls]`. `pairs`: `x` is the CFG batch (each video twice, its
    unconditional copy first), so each condition is repeated per pair.
    """
    down, mid = None, None
    for j, (spec, p, arr) in enumerate(zip(specs, params, arrays)):
        keep = 1.0 - jnp.logical_or(step / steps < spec.start, (step + 1) / steps > spec.end).astype(jnp.float32)
        cond, mask = arr["cond"], arr.get("mask")
        if frames is not None:
            cond = jnp.take(cond, frames, axis=1)
            mask = None if mask is None else jnp.take(mask, frames, axis=1)
        if pairs:
            cond = jnp.repeat(cond, 2, axis=0)
            mask = None if mask is None else jnp.repeat(mask, 2, axis=0)
        d, m = spec.model.apply({"params": p}, x, t, context, cond, mask, scales[j] * keep)
        down = d if down is None else tuple(a + b for a, b in zip(down, d))
        mid = m if mid is None else mid + m
    return down, mid
