"""Building blocks shared by the UNet, the motion modules and the VAE.

Module and attribute names follow diffusers (`to_q`, `to_out_0`, `ff/net_0/proj`, ...) so that
`checkpoints.torch_io.torch_to_flax` converts weights without a per-model key table.
Every module takes `dtype` (compute) and `param_dtype` (storage) separately.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.models import attention

Dtype = Any


class GroupNorm(nn.Module):
    """GroupNorm over channels-last input, statistics over every axis but the first.

    Callers choose what one "sample" is by the leading axis: `(B*F, H, W, C)` normalises each
    frame on its own, `(B, F, H, W, C)` normalises across all frames of a video. Statistics
    are computed in float32 whatever the compute dtype: in two passes (mean, then the mean square
    deviation: PyTorch's numerics) for float32 compute, in one pass (mean and mean square read
    together, `E[x²] - E[x]²`) for half-precision compute, where the float32 rounding of the
    difference stays far below the output's own bf16/fp16 rounding. One pass reads each activation
    once less: compiled for a v5e chip, 2.6% fewer bytes per bf16 sampler run and 20% fewer per VAE
    decode (BENCHMARKS.md).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        g = xf.reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        if jnp.dtype(self.dtype).itemsize < 4:
            var = jnp.maximum(jnp.square(g).mean(axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
        else:
            var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = g.reshape(x.shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def group_norm_frames(norm: GroupNorm, x: jax.Array, per_frame: bool) -> jax.Array:
    """Applies `norm` to a video `(B, F, H, W, C)` per frame or across frames."""
    b, f = x.shape[:2]
    if per_frame:
        return norm(x.reshape((b * f,) + x.shape[2:])).reshape(x.shape)
    return norm(x)


def dense(features: int, name: str, *, use_bias: bool = True, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, name: str, *, kernel: int = 3, stride: int = 1, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    """A conv with torch's symmetric padding (`padding=kernel // 2`)."""
    p = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (`to_q/k/v`, `to_out_0`).

    Self-attention when `context` is None. The kernel is `models.attention`'s choice for this
    shape (the model's `attention` field, "auto" by default: see that module's table).

    `images` (IP-Adapter's decoupled cross-attention, diffusers' `IPAdapterAttnProcessor2_0`): per
    adapter j a set of image tokens `[N, T_j, D]`, projected by its own `to_k_ip_{j}` / `to_v_ip_{j}`
    (no bias); the same queries attend to them and `scales[j]` times that output is added to the text
    attention's, before `to_out_0`. None: plain attention (no such params, the same program).
    """

    heads: int
    dim_head: int
    out_features: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, images: tuple[jax.Array, ...] | None = None,
                 scales: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.dim_head
        kw = dict(use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        ctx = x if context is None else context
        q = dense(inner, "to_q", **kw)(x)
        k = dense(inner, "to_k", **kw)(ctx)
        v = dense(inner, "to_v", **kw)(ctx)
        split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.dim_head))
        o = attention.dot_product_attention(split(q), split(k), split(v))
        for j, tokens in enumerate(images or ()):
            ip = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
            k_ip = dense(inner, f"to_k_ip_{j}", **ip)(tokens)
            v_ip = dense(inner, f"to_v_ip_{j}", **ip)(tokens)
            o_ip = attention.dot_product_attention(split(q), split(k_ip), split(v_ip))
            o = o + scales[j].astype(o.dtype) * o_ip
        o = o.reshape(o.shape[:-2] + (inner,))
        return dense(self.out_features or x.shape[-1], "to_out_0", use_bias=self.out_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype)(o)


class GELUProjection(nn.Module):
    """diffusers' `GEGLU` (`gated`: `proj` to twice `dim_out`, the second half through exact GELU gates
    the first) and `GELU` (`proj`, then exact GELU): the activation modules of `FeedForward`."""

    dim_out: int
    gated: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.dim_out * (2 if self.gated else 1)
        h = dense(width, "proj", use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        if not self.gated:
            return jax.nn.gelu(h, approximate=False)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' `FeedForward`: `net_0` (the activation with its `proj`), `net_2` (the output Dense).
    GEGLU (the UNet's) by default, width `mult * dim`; `inner` / `out` / `activation="gelu"` /
    `use_bias` for IP-Adapter's projections."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "geglu"
    inner: int | None = None
    out: int | None = None
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        if self.activation not in ("geglu", "gelu"):
            raise ValueError(f"FeedForward activation {self.activation!r}: expected 'geglu' or 'gelu'")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        h = GELUProjection(self.inner or dim * self.mult, self.activation == "geglu", name="net_0", **kw)(x)
        return dense(self.out or dim, "net_2", **kw)(h)


def sinusoidal_table(length: int, dim: int) -> jax.Array:
    """AnimateDiff's position table `[length, dim]`: sin on even channels, cos on odd ones."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    div = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * (-math.log(10000.0) / dim))
    table = jnp.zeros((length, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * div))
    return table.at[:, 1::2].set(jnp.cos(pos * div))


def stretch_table(table: jax.Array, length: int) -> jax.Array:
    """`table` `[n, dim]` resampled to `[length, dim]` along its rows, linearly between row centres
    (torch's `F.interpolate(..., mode="bilinear", align_corners=False)` on `[1, 1, n, dim]`, which is
    AnimateDiff-Evolved's PE stretch)."""
    n = table.shape[0]
    src = jnp.maximum((jnp.arange(length, dtype=jnp.float32) + 0.5) * (n / length) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n - 1)
    i1 = jnp.minimum(i0 + 1, n - 1)
    w = (src - i0)[:, None]
    return table[i0] * (1.0 - w) + table[i1] * w


def position_table(max_positions: int, dim: int, stretch: tuple[int, int] | None = None) -> jax.Array:
    """The motion module's position table: `sinusoidal_table(max_positions)`, or with `stretch = (n, m)`
    its first n rows stretched over m (AnimateDiff-Evolved's "sweetspot stretch"; its "PE stretch" by k
    is `(max_positions, max_positions + k)`): a module trained on n frames spread over m."""
    table = sinusoidal_table(max_positions, dim)
    if stretch:
        n, m = stretch
        if not 1 <= n <= max_positions or m < 1:
            raise ValueError(f"position stretch {tuple(stretch)}: expected (n, m) with 1 <= n <= {max_positions} "
                             "(the table) and m >= 1")
        table = stretch_table(table[:n], m)
    return table


def frame_weights(length: int, weighting: str = "flat") -> tuple[float, ...]:
    """How much each position of a window counts where windows overlap (diffusers' FreeNoise
    `_get_frame_weights`): flat 1s; pyramid [1, 2, .., 2, 1]; delayed_reverse_sawtooth [0.01, .., mid, .., 1]."""
    if weighting == "flat":
        return (1.0,) * length
    mid = length // 2 if length % 2 == 0 else (length + 1) // 2
    if weighting == "pyramid":
        up = list(range(1, mid + 1)) if length % 2 == 0 else list(range(1, mid))
        return tuple(float(w) for w in (up + up[::-1] if length % 2 == 0 else up + [mid] + up[::-1]))
    if weighting == "delayed_reverse_sawtooth":
        head = [0.01] * (mid - 1) + [mid] if length % 2 == 0 else [0.01] * mid
        return tuple(float(w) for w in head + list(range(mid, 0, -1)))
    raise ValueError(f"context_windows.weighting={weighting!r}: expected one of flat, pyramid, "
                     "delayed_reverse_sawtooth")


@dataclasses.dataclass(frozen=True)
class TemporalWindows:
    """Windows of frames for the temporal transformer blocks (diffusers' FreeNoise, static: part of the compile).

    `frames`: each window's frame indices (all of one length L); `weighting`: `frame_weights` of a
    window's positions. `tail > 0`: the last window is diffusers' flush-to-end one (the frame count off
    the stride grid) and adds only its last `tail` frames, each counted with the weight of its position
    `L - tail` (what `FreeNoiseTransformerBlock` does, that quirk included).
    """

    frames: tuple[tuple[int, ...], ...]
    weighting: str = "flat"
    tail: int = 0

    def plan(self, num_frames: int) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
        """Per window `(frames, positions, weights)` of what it adds, and each frame's float32 total weight."""
        length = len(self.frames[0])
        if any(len(w) != length for w in self.frames) or not 0 <= self.tail <= length:
            raise ValueError(f"temporal windows {self.frames} (tail {self.tail}): expected windows of one length")
        w = np.asarray(frame_weights(length, self.weighting), np.float32)
        counts = np.zeros(num_frames, np.float32)
        out = []
        for k, win in enumerate(self.frames):
            idx = np.asarray(win, np.int32)
            if idx.min() < 0 or idx.max() >= num_frames:
                raise ValueError(f"temporal window {win} outside the {num_frames} frames")
            pos = np.arange(length)
            cw = w
            if self.tail and k == len(self.frames) - 1:
                pos = pos[length - self.tail:]
                cw = np.full(self.tail, w[length - self.tail], np.float32)
            np.add.at(counts, idx[pos], cw)
            out.append((idx, pos, w[pos]))
        return out, counts


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: attn1 (self), attn2 (cross, or self when `double_self`), GEGLU FF.

    `max_positions > 0` adds a sinusoidal position table to the normed input of both
    attentions: that is the motion module's temporal block (attention runs along axis -2,
    the frame axis). `position_stretch`: see `position_table`. `second_attention=False` drops
    attn2 and its norm (SparseCtrl's temporal blocks: one self-attention, then the FF).
    `windows` (`TemporalWindows`, axis -2 the frames): diffusers' `FreeNoiseTransformerBlock`: norm1/attn1
    and norm2/attn2 run per window (positions 0.. within it), the windows' outputs are averaged with their
    positions' weights (frames no window adds keep the sum, 0), then norm3/ff on all frames.
    """

    heads: int
    dim_head: int
    double_self: bool = False
    max_positions: int = 0
    position_stretch: tuple[int, int] | None = None
    second_attention: bool = True
    windows: TemporalWindows | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, images: tuple[jax.Array, ...] | None = None,
                 image_scales: jax.Array | None = None) -> jax.Array:
        """`images` / `image_scales`: IP-Adapter image tokens for attn2 (`Attention`'s `images`, `scales`)."""
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.max_positions:
            length = x.shape[-2] if self.windows is None else len(self.windows.frames[0])
            table = position_table(self.max_positions, x.shape[-1], self.position_stretch)
            if length > table.shape[0]:
                raise ValueError(f"{length} frames exceed the motion module's position table ({table.shape[0]})")
            pe = table[:length].astype(self.dtype)
            add_pe = lambda h: h + pe
        else:
            add_pe = lambda h: h
        norm1, attn1 = ln("norm1"), attn("attn1")
        norm2, attn2 = (ln("norm2"), attn("attn2")) if self.second_attention else (None, None)

        def attentions(x):
            x = attn1(add_pe(norm1(x))) + x
            if attn2 is not None:
                x = attn2(add_pe(norm2(x)), None if self.double_self else context, images, image_scales) + x
            return x

        if self.windows is None:
            x = attentions(x)
        else:  # diffusers' FreeNoiseTransformerBlock: the attentions per window, weighted average, then the FF
            plan, counts = self.windows.plan(x.shape[-2])
            total = jnp.zeros_like(x)
            for idx, pos, w in plan:
                h = attentions(jnp.take(x, jnp.asarray(idx), axis=-2))
                h = jnp.take(h, jnp.asarray(pos), axis=-2) * jnp.asarray(w, x.dtype)[:, None]
                total = total.at[..., jnp.asarray(idx[pos]), :].add(h)
            n = jnp.asarray(counts, jnp.float32)[:, None]
            x = jnp.where(n > 0, total / jnp.where(n > 0, n, 1.0), total).astype(x.dtype)
        return FeedForward(4, self.dtype, self.param_dtype, name="ff")(ln("norm3")(x)) + x


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> jax.Array:
    """diffusers' sinusoidal timestep features `[len(t), dim]` (computed in float32)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    """`linear_1 -> SiLU -> linear_2`, as diffusers' `TimestepEmbedding`."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.dim, "linear_1", dtype=self.dtype, param_dtype=self.param_dtype)(x.astype(self.dtype))
        return dense(self.dim, "linear_2", dtype=self.dtype, param_dtype=self.param_dtype)(nn.silu(x))
