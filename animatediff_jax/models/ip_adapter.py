"""IP-Adapter (SD1.5): an image prompt beside the text, through decoupled cross-attention.

An image encoder (CLIP ViT-H/14, `models.clip_vision`) gives either the image embedding (`image_embeds`:
the base and light adapters) or the penultimate layer's hidden states (the plus, plus-face and full-face
adapters); the adapter's image projection turns that into a few context tokens; every spatial
cross-attention of the UNet attends to them with its own key/value projections (`to_k_ip` / `to_v_ip`,
`layers.Attention`'s `images`) and adds `scale` times that output to the text attention's.

The projections are diffusers' modules, with their names (`checkpoints/ip_adapter.py` renames the released
files' keys as diffusers' `_convert_ip_adapter_image_proj_to_diffusers` does):

- "base" (`ImageProjection`): `image_embeds` Linear to `num_tokens x cross_attention_dim`, `norm`.
- "plus" (`IPAdapterPlusImageProjection`, the Resampler): learned `latents` queries attend to the
  encoder's hidden states (`proj_in`) in `depth` blocks (`ln0`, `ln1`, `attn`, `ff`), `proj_out`, `norm_out`.
- "full" (`IPAdapterFullImageProjection`, full-face): a GELU MLP (`ff`) and `norm` on every hidden state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.layers import Attention, Dtype, FeedForward, dense
from animatediff_jax.models.unet import cross_attentions

Params = dict[str, Any]
Kind = Literal["base", "plus", "full"]
KINDS = ("base", "plus", "full")


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig:
    """One IP-Adapter's image projection. `image_embed_dim`: what it reads from the encoder (its projection
    dim for "base", its hidden size for "plus" / "full"); `num_tokens`: image tokens per image ("full": 0, as
    many as the encoder gives: 257 at ViT-H/14 224²). The Resampler ("plus") has `hidden_dims` wide latents, `depth`
    blocks of `heads` x `dim_head` attention and a `ffn_ratio` x feed-forward."""

    kind: Kind = "base"
    image_embed_dim: int = 1024
    cross_attention_dim: int = 768
    num_tokens: int = 4
    hidden_dims: int = 768
    heads: int = 12
    dim_head: int = 64
    depth: int = 4
    ffn_ratio: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"IP-Adapter kind {self.kind!r}: expected one of {', '.join(KINDS)}")

    @property
    def hidden_states(self) -> bool:
        """Reads the encoder's penultimate hidden states (else its projected image embedding)."""
        return self.kind != "base"

    @classmethod
    def sd15(cls, kind: str = "base", **overrides: Any) -> "IPAdapterConfig":
        """h94/IP-Adapter's SD1.5 files: base / light (4 tokens), plus / plus-face (Resampler, 16 tokens),
        full-face (the encoder's 257 tokens), all on the ViT-H/14 image encoder (projection 1024, hidden 1280)."""
        layouts = {"base": dict(image_embed_dim=1024, num_tokens=4),
                   "plus": dict(image_embed_dim=1280, num_tokens=16, hidden_dims=768, heads=12),
                   "full": dict(image_embed_dim=1280, num_tokens=0)}
        if kind not in layouts:
            raise ValueError(f"IP-Adapter kind {kind!r}: expected one of {', '.join(KINDS)}")
        return cls(kind=kind, **{**layouts[kind], **overrides})

    def replace(self, **kw: Any) -> "IPAdapterConfig":
        return dataclasses.replace(self, **kw)


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)  # torch's default eps


class ImageProjection(nn.Module):
    """"base": `image_embeds [N, D] -> [N, num_tokens, cross_attention_dim]` (diffusers' `ImageProjection`)."""

    config: IPAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(c.num_tokens * c.cross_attention_dim, "image_embeds", **kw)(x.astype(self.dtype))
        return _layer_norm("norm", **kw)(h.reshape(x.shape[0], c.num_tokens, c.cross_attention_dim))


class IPAdapterFullImageProjection(nn.Module):
    """"full": hidden states `[N, S, D] -> [N, S, cross_attention_dim]` (an MLP and a LayerNorm)."""

    config: IPAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ff = FeedForward(activation="gelu", inner=c.image_embed_dim, out=c.cross_attention_dim, name="ff", **kw)
        h = ff(x.astype(self.dtype))
        return _layer_norm("norm", **kw)(h)


class _ResamplerBlock(nn.Module):
    """diffusers' `IPAdapterPlusImageProjectionBlock`: the latents attend to [image features; latents]."""

    config: IPAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = latents
        feats = _layer_norm("ln0", **kw)(x)
        latents = _layer_norm("ln1", **kw)(latents)
        kv = jnp.concatenate([feats, latents], axis=-2)
        latents = Attention(c.heads, c.dim_head, out_bias=False, name="attn", **kw)(latents, kv) + residual
        h = _layer_norm("ff_0", **kw)(latents)
        h = FeedForward(activation="gelu", inner=c.hidden_dims * c.ffn_ratio, out=c.hidden_dims, use_bias=False,
                        name="ff_1", **kw)(h)
        return h + latents


class IPAdapterPlusImageProjection(nn.Module):
    """"plus" (the Resampler): hidden states `[N, S, D] -> [N, num_tokens, cross_attention_dim]`."""

    config: IPAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latents = self.param("latents", nn.initializers.normal(c.hidden_dims ** -0.5),
                             (1, c.num_tokens, c.hidden_dims), self.param_dtype)
        latents = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape[1:])
        x = dense(c.hidden_dims, "proj_in", **kw)(x.astype(self.dtype))
        for i in range(c.depth):
            latents = _ResamplerBlock(c, name=f"layers_{i}", **kw)(x, latents)
        latents = dense(c.cross_attention_dim, "proj_out", **kw)(latents)
        return _layer_norm("norm_out", **kw)(latents)


_PROJECTIONS = {"base": ImageProjection, "plus": IPAdapterPlusImageProjection, "full": IPAdapterFullImageProjection}


def image_projection(config: IPAdapterConfig, dtype: Dtype = jnp.float32) -> nn.Module:
    """The image projection module of `config.kind` (its params: an adapter's `params["image_proj"]`)."""
    return _PROJECTIONS[config.kind](config, dtype=dtype)


def projection_input_shape(config: IPAdapterConfig, encoder_tokens: int = 257) -> tuple[int, ...]:
    """One image's input to the projection: `(image_embed_dim,)`, or `(encoder_tokens, image_embed_dim)`
    for hidden states."""
    if config.hidden_states:
        return (encoder_tokens, config.image_embed_dim)
    return (config.image_embed_dim,)


def layer_shapes(config: IPAdapterConfig, unet: UNetConfig) -> list[Params]:
    """Per cross-attention of `unet` (`cross_attentions` order) the adapter's `to_k_ip` / `to_v_ip` kernels
    `[cross_attention_dim, channels of that block]`, as `ShapeDtypeStruct`s."""
    n = len(unet.block_out_channels)
    out = []
    for block, _, _ in cross_attentions(unet):
        level = n - 1 if block == "mid_block" else int(block.rsplit("_", 1)[1])
        if block.startswith("up_blocks"):
            level = n - 1 - level
        kernel = jax.ShapeDtypeStruct((config.cross_attention_dim, unet.block_out_channels[level]), jnp.float32)
        out.append({"to_k_ip": {"kernel": kernel}, "to_v_ip": {"kernel": kernel}})
    return out


def with_ip_layers(unet_params: Params, adapters: Sequence[Sequence[Params]], unet: UNetConfig) -> Params:
    """`unet_params` with each adapter j's `to_k_ip` / `to_v_ip` (`layers[k]` for cross-attention k in
    `cross_attentions` order) as `attn2/to_k_ip_{j}`, `attn2/to_v_ip_{j}`: the tree `UNet3D` reads with an
    `image_context` of those adapters. A new tree (the input is not changed); no copy of any array."""
    paths = cross_attentions(unet)
    out = dict(unet_params)
    for k, path in enumerate(paths):
        node = out
        for name in path:  # copy the dicts along the path, share everything else
            node[name] = dict(node[name])
            node = node[name]
        attn2 = dict(node["attn2"])
        for j, layers in enumerate(adapters):
            if len(layers) != len(paths):
                raise ValueError(f"IP-Adapter {j}: {len(layers)} cross-attention weights for a UNet with {len(paths)}")
            attn2[f"to_k_ip_{j}"] = layers[k]["to_k_ip"]
            attn2[f"to_v_ip_{j}"] = layers[k]["to_v_ip"]
        node["attn2"] = attn2
    return out
