"""Control models in the sampler: ControlNets (one condition image per frame) and SparseCtrl (a few
keyframes steer the whole video; one RGB keyframe at frame 0 is image-to-video).

Their residuals join the UNet's inside the same `lax.scan` step (diffusers'
`AnimateDiffControlNetPipeline` / `AnimateDiffSparseControlNetPipeline`, guess mode off): the control
model sees the same CFG batch as the UNet (both halves, the same condition), its residuals are scaled
by `scale` while the step is inside `[start, end]` of the run (diffusers' `control_guidance_start/end`),
and several controls add up (diffusers' `MultiControlNetModel`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.controlnet import ControlNet, ControlNetConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Control:
    """One control model and its condition.

    `images` uint8 (or float in [0, 1]) `[K, H, W, 3]` at the video's size: for a ControlNet one per
    frame (K = frames); for SparseCtrl the keyframes, `frame_indices[k]` the frame of image k (negative:
    from the end, as the original's `controlnet_image_indexs: [0, -1]`; a scribble
    encoder takes them as pixels, an RGB one as VAE latents). `scale` multiplies its residuals while
    the step's fraction of the run lies in `[start, end]`.
    """

    config: ControlNetConfig
    params: Params
    images: np.ndarray
    frame_indices: tuple[int, ...] | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = "control"  # what errors call it ("controlnet[0]", "sparsectrl")


class ControlSpec(NamedTuple):
    """The static part of a control in the compiled loop (hashable: part of the compile key)."""

    model: ControlNet
    start: float
    end: float
    latent: bool  # condition = VAE latents of the keyframes (SparseCtrl RGB), encoded inside the call
    indices: tuple[int, ...] | None  # SparseCtrl: frames holding a condition


def check_controls(controls: Sequence[Control], num_frames: int, height: int, width: int,
                   unet_config: UNetConfig, windows_length: int | None = None) -> None:
    """Every control checked against the video and the UNet, each failure a one-line `ValueError`
    naming the control: a wrong count of control frames, keyframe indices outside the video, images of
    another size, a control model for another base, a scale or a start/end out of range."""
    for c in controls:
        if not isinstance(c, Control):
            raise ValueError(f"controls: expected Control objects, got {type(c).__name__}")
        cfg, u = c.config, unet_config
        if cfg.unet.cross_attention_dim != u.cross_attention_dim or cfg.unet.block_out_channels != u.block_out_channels:
            raise ValueError(
                f"{c.name}: a control model for another base (cross-attention {cfg.unet.cross_attention_dim}, "
                f"channels {list(cfg.unet.block_out_channels)}; the UNet has {u.cross_attention_dim}, "
                f"{list(u.block_out_channels)})")
        shape = tuple(np.shape(c.images))
        if len(shape) != 4 or shape[1:] != (height, width, 3):
            raise ValueError(f"{c.name}: images must be [K, {height}, {width}, 3] (the video's size), got {shape}")
        if cfg.sparse:
            idx = list(c.frame_indices or ())
            if len(idx) != shape[0]:
                raise ValueError(f"{c.name}: {shape[0]} keyframe image(s) but {len(idx)} frame_indices: give one index "
                                 "per image")
            bad = [i for i in idx if not isinstance(i, (int, np.integer)) or not -num_frames <= i < num_frames]
            if bad:
                raise ValueError(f"{c.name}: frame_indices {bad} outside the video (frames 0..{num_frames - 1}, "
                                 "or negative from the end)")
            if len({int(i) % num_frames for i in idx}) != len(idx):
                raise ValueError(f"{c.name}: frame_indices {idx} repeat a frame")
            limit = cfg.unet.motion.max_positions
            if (windows_length or num_frames) > limit:
                raise ValueError(f"{c.name}: its motion modules hold {limit} frames, the video (or window) has "
                                 f"{windows_length or num_frames}")
        else:
            if c.frame_indices is not None:
                raise ValueError(f"{c.name}: frame_indices are for SparseCtrl; a ControlNet takes one image per frame")
            if shape[0] != num_frames:
                raise ValueError(f"{c.name}: {shape[0]} control frame(s) for a video of {num_frames} frames "
                                 "(give one per frame)")
        if not (isinstance(c.scale, (int, float)) and math.isfinite(c.scale)):
            raise ValueError(f"{c.name}: scale={c.scale!r}: expected a number")
        if not (0.0 <= c.start < c.end <= 1.0):
            raise ValueError(f"{c.name}: start={c.start}, end={c.end}: expected 0 <= start < end <= 1")


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


def read_conditions(c: dict) -> list[tuple[str, dict, np.ndarray]]:
    """The condition images of a validated sample config's `controlnet` entries and `sparsectrl`, read
    (and resized to W x H) before any weights load: `(name, entry, uint8 [K, H, W, 3])` each. An image
    or video that cannot be read, or a wrong count of control frames, is a one-line `ConfigError`."""
    from animatediff_jax.io.video import VideoReadError, read_frames, read_image
    from animatediff_jax.sampling.config import ConfigError

    entries = [(f"controlnet[{i}]", e) for i, e in enumerate(c["controlnet"])]
    if c["sparsectrl"]:
        entries.append(("sparsectrl", c["sparsectrl"]))
    size, out = (c["H"], c["W"]), []
    for name, e in entries:
        try:
            if e.get("video"):
                images = read_frames(e["video"], c["L"], size)
            else:
                paths = [e["images"]] if isinstance(e["images"], str) else list(e["images"])
                if name != "sparsectrl" and len(paths) != c["L"]:
                    raise ConfigError(f"{name}.images: {len(paths)} control frame(s) for L={c['L']} frames "
                                      "(one per frame, or a video)")
                images = np.stack([read_image(p, size) for p in paths])
        except (VideoReadError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{name}: {err}") from None
        out.append((name, e, images))
    return out


def load_controls(conditions: Sequence[tuple[str, dict, np.ndarray]], unet_config: UNetConfig,
                  dtype: Any = jnp.float32) -> list[Control]:
    """`Control`s from `read_conditions`' output: each model loaded (`checkpoints.controlnet`), checked to
    be for this base and of the kind its config entry says, its params cast to `dtype`."""
    from animatediff_jax.checkpoints.controlnet import load_controlnet
    from animatediff_jax.checkpoints.torch_io import CheckpointError
    from animatediff_jax.sampling.config import ConfigError

    controls = []
    for name, e, images in conditions:
        try:
            config, params = load_controlnet(e["path"], base=unet_config)
        except (CheckpointError, ValueError, OSError) as err:
            raise ConfigError(f"{name}.path: {' '.join(str(err).split())}") from err
        if config.sparse != (name == "sparsectrl"):
            what = "a SparseCtrl model" if config.sparse else "a ControlNet"
            raise ConfigError(f"{name}.path: {e['path']} is {what}; put it under "
                              f"{'sparsectrl' if config.sparse else 'controlnet'}")
        if jnp.dtype(dtype) != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        idx = tuple(e.get("frame_indices", ())) if config.sparse else None
        controls.append(Control(config, params, images, idx, float(e.get("scale", 1.0)), float(e.get("start", 0.0)),
                                float(e.get("end", 1.0)), name))
    return controls
