"""The SD1.5 VAE (diffusers' `AutoencoderKL`) in Flax, channels-last `(N, H, W, C)`.

Submodule names mirror diffusers' state-dict keys (`encoder/down_blocks_0/resnets_0/conv1`,
`encoder/mid_block/attentions_0/to_q`, `quant_conv`, ...), so
`torch_to_flax(vae.state_dict(), target)` converts a diffusers VAE without a key table.

Video helpers (`encode_video`, `decode_video`) fold frames into the batch (the VAE is a
per-image model) and run in chunks of frames so memory stays bounded for long videos.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax import parallel
from animatediff_jax.models import attention
from animatediff_jax.models.layers import Dtype, GroupNorm, conv, dense

_EPS = 1e-6  # every norm in diffusers' VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKL` hyper-parameters (SD1.5 defaults); one down/up block per entry of `block_out_channels`.
    `scaling_factor` (latents = encoder mean x factor) is per model, read from `vae/config.json`."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents = posterior * this (SDXL's VAE: 0.13025; from its config.json)
    force_upcast: bool = True  # decode in float32 under a float16 compute dtype (SDXL pipelines read it)

    @classmethod
    def sd15(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """SDXL's VAE: SD1.5's architecture, retrained, whose latents have another scale."""
        return cls(scaling_factor=0.13025)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(8, 16), norm_num_groups=4)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers `vae/config.json` dict (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(**kw)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKL` config (for references, export and LDM conversion)."""
        n = len(self.block_out_channels)
        return dict(
            dataclasses.asdict(self),
            block_out_channels=list(self.block_out_channels),
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
        )

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD1.5)."""
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` without a time embedding: norm-SiLU-conv twice plus a skip."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, _EPS, name="norm1", **kw)(x))
        h = conv(self.out_channels, "conv1", **kw)(h)
        h = nn.silu(GroupNorm(self.groups, _EPS, name="norm2", **kw)(h))
        h = conv(self.out_channels, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", kernel=1, **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all channels, residual.

    diffusers builds it with `heads = channels // attention_head_dim = 1`, `bias=True`
    and `rescale_output_factor=1`, and flattens `H*W` into the token axis.
    """

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, _EPS, name="group_norm", **kw)(x).reshape(n, hgt * wid, 1, c)
        q, k, v = (dense(c, name, **kw)(h) for name in ("to_q", "to_k", "to_v"))
        o = attention.dot_product_attention(q, k, v).reshape(n, hgt * wid, c)
        return x + dense(c, "to_out_0", **kw)(o).reshape(x.shape)


class MidBlock(nn.Module):
    """`resnets_0 -> attentions_0 -> resnets_1` at constant width."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, name="resnets_0", **kw)(x)
        x = AttentionBlock(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock(c, self.groups, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after a zero pad of one row/column at the bottom/right only.

    That is diffusers' `Downsample2D(padding=0)`: `F.pad(x, (0, 1, 0, 1))` then an unpadded
    conv, not torch's usual symmetric padding.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(
            x.shape[-1],
            (3, 3),
            strides=(2, 2),
            padding=((0, 1), (0, 1)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (as `F.interpolate(scale_factor=2, mode="nearest")`) then a 3x3 conv."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{i}", **kw)(x)
        if self.add_downsample:
            x = Downsample(name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{i}", **kw)(x)
        if self.add_upsample:
            x = Upsample(name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image `(N, H, W, in)` -> raw moments `(N, H/8, W/8, 2 * latent)` (before `quant_conv`)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(chans[0], "conv_in", **kw)(x.astype(self.dtype))
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            x = DownEncoderBlock(c, cfg.layers_per_block, g, not last, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(g, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(g, _EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent `(N, h, w, latent)` (after `post_quant_conv`) -> image `(N, 8h, 8w, out)`."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = conv(chans[0], "conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(g, name="mid_block", **kw)(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            x = UpDecoderBlock(c, cfg.layers_per_block + 1, g, not last, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(g, _EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL VAE: `encode` gives the posterior's moments, `decode` maps latents back to images.

    Latents here are *unscaled* (as diffusers' `encode`/`decode`); `encode_video` and
    `decode_video` apply `scaling_factor`. `__call__` (encode then decode the mean) exists so
    `init` creates every parameter.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # models.attention implementation of the mid-block attention

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lat = self.config.latent_channels
        self.encoder = Encoder(self.config, **kw)
        self.decoder = Decoder(self.config, **kw)
        self.quant_conv = conv(2 * lat, "quant_conv", kernel=1, **kw)
        self.post_quant_conv = conv(lat, "post_quant_conv", kernel=1, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images in [-1, 1] -> float32 `(mean, logvar)`, logvar clamped to [-30, 20] as diffusers does."""
        with attention.using(self.attention):
            moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents -> images (roughly [-1, 1], not clipped)."""
        with attention.using(self.attention):
            return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


# ------------------------------------------------------------------------- video helpers


def _over_frames(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None) -> jax.Array:
    """`fn` (`[B, c, ...] -> [B, c, ...]`) over videos `x` `[B, F, ...]`, `chunk` frames of every
    video at a time (all at once when None).

    Whole chunks go through `lax.map` (one compiled body; only `B * chunk` frames' activations
    live at a time); a remainder shorter than `chunk` is one extra call. The batch axis stays
    whole, so a batch-sharded input stays sharded. Under context parallelism (a video's frames split
    over `s` devices) each device's run of frames is chunked on its own, so no frame moves: the runs
    become rows `(s, B)`, device-major (rows merged from a sharded minor axis could not stay in place).
    """
    b, f = x.shape[:2]
    s = parallel.context_devices()
    if s == 1 or f % s:
        return _chunks(fn, x, chunk)
    rest = x.shape[2:]
    rows = x.reshape((b, s, f // s) + rest).swapaxes(0, 1).reshape((s * b, f // s) + rest)
    y = _chunks(fn, rows, chunk)
    return y.reshape((s, b, f // s) + y.shape[2:]).swapaxes(0, 1).reshape((b, f) + y.shape[2:])


def _chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None) -> jax.Array:
    b, f = x.shape[:2]
    if chunk is None or chunk >= f:
        return fn(x)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    full = (f // chunk) * chunk
    head = x[:, :full].reshape((b, f // chunk, chunk) + x.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(fn, head).swapaxes(0, 1)
    out = out.reshape((b, full) + out.shape[3:])
    return jnp.concatenate([out, fn(x[:, full:])], axis=1) if full < f else out


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def encode_moments(
    model: AutoencoderKL, params: Any, frames: jax.Array, chunk: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Frames `[B, F, H, W, C]` in [-1, 1] -> the posterior's *unscaled* `(mean, logvar)`, each
    `[B, F, h, w, latent]` (what the latent cache stores), `chunk` frames of each video at a time."""

    def moments(x: jax.Array) -> jax.Array:
        b, c = x.shape[:2]
        mean, logvar = model.apply({"params": params}, x.reshape((b * c,) + x.shape[2:]), method=AutoencoderKL.encode)
        out = jnp.concatenate([mean, logvar], axis=-1)
        return out.reshape((b, c) + out.shape[1:])

    return tuple(jnp.split(_over_frames(moments, frames, chunk), 2, axis=-1))


def sample_latents(model: AutoencoderKL, mean: jax.Array, logvar: jax.Array, keys: jax.Array | None) -> jax.Array:
    """Scaled latents from posterior moments `[B, F, h, w, C]`: the mean, or with `keys` (one per
    video) a posterior sample, each video's noise drawn from its own key (so a clip's latents do not
    depend on the batch it is in or on how the batch is sharded)."""
    z = mean
    if keys is not None:
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        z = mean + jnp.exp(0.5 * logvar) * eps
    return z * model.config.scaling_factor


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def encode_video(
    model: AutoencoderKL, params: Any, frames: jax.Array, keys: jax.Array | None = None, chunk: int | None = None
) -> jax.Array:
    """Frames `[B, F, H, W, C]` in [-1, 1] -> latents `[B, F, h, w, latent]` times `scaling_factor`:
    the posterior mean, or with `keys` (`[B]` keys) a sample (`sample_latents`)."""
    return sample_latents(model, *encode_moments(model, params, frames, chunk), keys)


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def decode_video(model: AutoencoderKL, params: Any, latents: jax.Array, chunk: int | None = 4) -> jax.Array:
    """Scaled latents `[B, F, h, w, latent]` -> float32 frames `[B, F, H, W, C]`, `chunk` frames of
    each video at a time. The model's raw range (about [-1, 1]), unclipped, as diffusers'."""

    def dec(z: jax.Array) -> jax.Array:
        b, c = z.shape[:2]
        out = model.apply({"params": params}, z.reshape((b * c,) + z.shape[2:]), method=AutoencoderKL.decode)
        return out.astype(jnp.float32).reshape((b, c) + out.shape[1:])

    return _over_frames(dec, latents.astype(jnp.float32) / model.config.scaling_factor, chunk)
