"""The CLIP text encoder of Stable Diffusion 1.5 (OpenAI CLIP ViT-L/14's text tower).

Submodules are named after transformers' `CLIPTextModel` as stored in SD1.5's
`text_encoder/model.safetensors` (`text_model.encoder.layers.0.self_attn.q_proj.weight`
becomes `text_model/encoder/layers_0/self_attn/q_proj/kernel`), so `convert_clip_text` is
the generic `torch_to_flax` plus two small normalisations of the key set.

Prompt embeddings follow diffusers' `StableDiffusionPipeline.encode_prompt`:
the last layer's output through `final_layer_norm`, or with `clip_skip=k` the output of
layer `num_layers - k` (`hidden_states[-(k + 1)]`) through the same `final_layer_norm`.

CLIP's own text embeddings (for metrics): `CLIPTextWithProjection` pools the end-of-text token
(`pool_eos`, transformers' rule) and applies `text_projection`; `text_embeddings` normalises them.
The encoder layers here are shared with the vision tower (`clip_vision.py`, `causal=False`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.models import attention
from animatediff_jax.models.layers import dense

Dtype = Any
Params = dict[str, Any]



@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    eps: float = 1e-5

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        """SD1.5's text encoder (CLIP ViT-L/14 text tower)."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        """A few-layer model for tests; keeps 77 positions so real-length token ids fit."""
        return cls(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a `text_encoder/config.json` dict (transformers' `CLIPTextConfig` fields)."""
        act = cfg.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"only quick_gelu CLIP text encoders (SD1.x) are supported, config has {act!r}")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            max_positions=int(cfg.get("max_position_embeddings", 77)),
            eps=float(cfg.get("layer_norm_eps", 1e-5)),
        )

    def transformers_kwargs(self) -> dict[str, Any]:
        """The matching transformers `CLIPTextConfig(**kwargs)` (for references in tests)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            layer_norm_eps=self.eps,
            hidden_act="quick_gelu",
        )


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's sigmoid approximation of GELU, `x * sigmoid(1.702 x)` (not `jax.nn.gelu`)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' `hidden_act` names of the CLIP towers we run (OpenAI CLIP: quick_gelu; OpenCLIP: gelu).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPAttention(nn.Module):
    """Self-attention with biased `q/k/v/out_proj`, scale `1/sqrt(head_dim)` on the logits;
    causal for the text tower, full for the vision tower (`causal=False`)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, d // self.num_heads))
        q = split(dense(d, "q_proj", **kw)(x))
        k = split(dense(d, "k_proj", **kw)(x))
        v = split(dense(d, "v_proj", **kw)(x))
        o = attention.dot_product_attention(q, k, v, is_causal=self.causal)
        return dense(d, "out_proj", **kw)(o.reshape(x.shape))


class CLIPMLP(nn.Module):
    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act: str = "quick_gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.act](dense(self.intermediate_size, "fc1", **kw)(x))
        return dense(x.shape[-1], "fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.

    Shared by both towers: `config` is a `CLIPTextConfig` or a `clip_vision.CLIPVisionConfig`
    (`num_heads`, `intermediate_size`, `eps`, and `hidden_act` when it has one)."""

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=c.eps, name=name, **kw)
        act = getattr(c, "hidden_act", "quick_gelu")
        x = x + CLIPAttention(c.num_heads, name="self_attn", causal=self.causal, **kw)(ln("layer_norm1")(x))
        return x + CLIPMLP(c.intermediate_size, name="mlp", act=act, **kw)(ln("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        pos = nn.Embed(c.max_positions, c.hidden_size, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[-1])
        )
        return tok + pos


class _Encoder(nn.Module):
    """transformers' `CLIPEncoder`: only a list of layers (`encoder/layers_i`), run the first `num_layers`."""

    config: Any  # CLIPTextConfig or CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, h: jax.Array, num_layers: int) -> jax.Array:
        for i in range(num_layers):
            h = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.causal, name=f"layers_{i}")(h)
        return h


class CLIPTextTransformer(nn.Module):
    """`embeddings -> encoder.layers[:num_layers - clip_skip] -> final_layer_norm`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids)
        h = _Encoder(c, name="encoder", **kw)(h, c.num_layers - clip_skip)
        return nn.LayerNorm(epsilon=c.eps, name="final_layer_norm", **kw)(h)


def _check_ids(input_ids: Any, c: CLIPTextConfig) -> None:
    if np.ndim(input_ids) != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {np.shape(input_ids)}")
    length = np.shape(input_ids)[-1]
    if length > c.max_positions:
        raise ValueError(f"{length} tokens exceed the {c.max_positions} positions of the text encoder")


class CLIPTextModel(nn.Module):
    """SD1.5's text encoder: `input_ids (B, T) -> prompt embeddings (B, T, hidden_size)`.

    `clip_skip` is diffusers' (`StableDiffusionPipeline.encode_prompt`): 0 (or None) is the
    normal last hidden state; k > 0 takes the output of layer `num_layers - k`, i.e.
    `hidden_states[-(k + 1)]`, and applies `final_layer_norm` to it. So diffusers' k=1 is
    the penultimate layer, which A1111-style UIs call "CLIP skip 2". Only the causal mask is
    applied, as in SD1.5 (its config has no `use_attention_mask`), so padding tokens do
    not change the embeddings of the tokens before them. `clip_skip` is a Python int
    (static under `jit`); initialise with the default so every layer gets parameters.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # models.attention implementation (77 tokens: "auto" is XLA)

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int | None = 0) -> jax.Array:
        c = self.config
        clip_skip = 0 if clip_skip is None else int(clip_skip)
        if not 0 <= clip_skip <= c.num_layers:
            raise ValueError(f"clip_skip must be in [0, {c.num_layers}], got {clip_skip}")
        _check_ids(input_ids, c)
        with attention.using(self.attention):
            return CLIPTextTransformer(c, self.dtype, self.param_dtype, name="text_model")(
                jnp.asarray(input_ids, jnp.int32), clip_skip
            )


# ----------------------------------------------------------------------------- CLIP's text embeddings


def pool_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """transformers' `CLIPTextModel` pooler: `(B, T, D) -> (B, D)` at the first `eos_token_id` of each
    row, or, for configs with the legacy `eos_token_id == 2` (before transformers PR #24773, e.g.
    SD1.5's and OpenAI's released configs), at the largest id of the row (CLIP's end-of-text token is
    the last of the vocabulary). A row without the eos id pools position 0, as transformers does."""
    ids = jnp.asarray(input_ids, jnp.int32)
    if int(eos_token_id) == 2:
        pos = jnp.argmax(ids, axis=-1)
    else:
        pos = jnp.argmax((ids == int(eos_token_id)).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]


class CLIPTextWithProjection(nn.Module):
    """transformers' `CLIPTextModelWithProjection` (and `CLIPModel.get_text_features`):
    `input_ids (B, T) -> text_embeds (B, projection_dim)`, not normalised.

    Params are `CLIPTextModel`'s tree plus `text_projection/kernel` (no bias), so the same
    `text_model` subtree serves both. `eos_token_id` is the text config's (see `pool_eos`).
    """

    config: CLIPTextConfig
    projection_dim: int = 768
    eos_token_id: int = 49407  # transformers 5's default; released OpenAI/SD configs say 2 (legacy rule)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        _check_ids(input_ids, self.config)
        ids = jnp.asarray(input_ids, jnp.int32)
        with attention.using(self.attention):
            h = CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(ids)
        pooled = pool_eos(h, ids, self.eos_token_id)
        return dense(self.projection_dim, "text_projection", use_bias=False,
                     dtype=self.dtype, param_dtype=self.param_dtype)(pooled)


def l2_normalize(x: jax.Array) -> jax.Array:
    """`x / |x|` over the last axis, in float32 (CLIP's embeddings before cosine similarities)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("model", "normalize"))
def _text_embeddings(model: CLIPTextWithProjection, params: Params, input_ids: jax.Array, normalize: bool):
    e = model.apply({"params": params}, input_ids)
    return l2_normalize(e) if normalize else e


def text_embeddings(
    model: CLIPTextWithProjection, params: Params, input_ids: Any, *, normalize: bool = True
) -> jax.Array:
    """CLIP text embeddings `(B, projection_dim)` float32, L2-normalised unless `normalize=False`.

    `input_ids` from `animatediff_jax.text.Tokenizer(folder)(prompts)` (padded to 77; the causal mask
    and EOS pooling make padding irrelevant, so this equals transformers with `padding=True`).
    """
    _check_ids(input_ids, model.config)
    return _text_embeddings(model, params, jnp.asarray(input_ids, jnp.int32), normalize)
