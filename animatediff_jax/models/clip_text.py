"""The CLIP text encoders of Stable Diffusion 1.5 (OpenAI CLIP ViT-L/14's text tower) and SDXL
(the same ViT-L tower plus OpenCLIP ViT-bigG/14's, with its `text_projection`).

Submodules are named after transformers' `CLIPTextModel` as stored in SD1.5's
`text_encoder/model.safetensors` (`text_model.encoder.layers.0.self_attn.q_proj.weight`
becomes `text_model/encoder/layers_0/self_attn/q_proj/kernel`), so `convert_clip_text` is
the generic `torch_to_flax` plus two small normalisations of the key set.

Prompt embeddings follow diffusers' `StableDiffusionPipeline.encode_prompt`:
the last layer's output through `final_layer_norm`, or with `clip_skip=k` the output of
layer `num_layers - k` (`hidden_states[-(k + 1)]`) through the same `final_layer_norm`.

SDXL's prompt embeddings follow `StableDiffusionXLPipeline.encode_prompt`: `SDXLTextEncoder` gives
one tower's `hidden_states[-(clip_skip + 2)]` WITHOUT `final_layer_norm`, and, for a tower with a
projection (`config.projection_dim`), the projected pooled output (`text_embeds`).

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
    """A CLIP text tower. `hidden_act` is transformers' name of the MLP activation ("quick_gelu" for
    OpenAI CLIP, "gelu" — exact, erf-based — for OpenCLIP's bigG). `projection_dim`: the width of the
    `text_projection` of a tower used with one (SDXL's second encoder, a `CLIPTextModelWithProjection`);
    None for a tower used without (SD1.5's and SDXL's first text encoder)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (one of {sorted(ACTIVATIONS)})")

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        """SD1.5's text encoder (CLIP ViT-L/14 text tower); SDXL's first text encoder is the same."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)

    @classmethod
    def sdxl_g(cls) -> "CLIPTextConfig":
        """SDXL's second text encoder (`text_encoder_2/`): OpenCLIP ViT-bigG/14's text tower, with projection."""
        return cls(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                   hidden_act="gelu", projection_dim=1280)

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        """A few-layer model for tests; keeps 77 positions so real-length token ids fit."""
        return cls(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any], *, projection: bool = False) -> "CLIPTextConfig":
        """From a `text_encoder/config.json` dict (transformers' `CLIPTextConfig` fields). With `projection`
        (a `CLIPTextModelWithProjection`, e.g. SDXL's `text_encoder_2/`) `projection_dim` is read too
        (transformers' default 512 when absent); without, it is None whatever the file says."""
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            max_positions=int(cfg.get("max_position_embeddings", 77)),
            eps=float(cfg.get("layer_norm_eps", 1e-5)),
            hidden_act=str(cfg.get("hidden_act", "quick_gelu")),
            projection_dim=int(cfg.get("projection_dim", 512)) if projection else None,
        )

    def transformers_kwargs(self) -> dict[str, Any]:
        """The matching transformers `CLIPTextConfig(**kwargs)` (for references in tests);
        `projection_dim` only for a tower with a projection."""
        kw = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            layer_norm_eps=self.eps,
            hidden_act=self.hidden_act,
        )
        if self.projection_dim is not None:
            kw["projection_dim"] = self.projection_dim
        return kw


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
    """transformers' `CLIPEncoder`: only a list of layers (`encoder/layers_i`), run layers `start`
    to `num_layers - 1` (a second call with `start` continues where the first stopped)."""

    config: Any  # CLIPTextConfig or CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, h: jax.Array, num_layers: int, start: int = 0) -> jax.Array:
        for i in range(start, num_layers):
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


# ----------------------------------------------------------------------------- SDXL's text encoders


class _TextTransformerTaps(nn.Module):
    """`CLIPTextTransformer`'s modules (same names, so the same params), run for SDXL: returns the hidden
    state after the first `keep` layers (no `final_layer_norm`) and, when `final`, the last layer's output
    through `final_layer_norm` (else None: the remaining layers are not run)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, keep: int, final: bool) -> tuple[jax.Array, jax.Array | None]:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        encoder = _Encoder(c, name="encoder", **kw)
        hidden = encoder(CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids), keep)
        if not final:
            return hidden, None
        last = encoder(hidden, c.num_layers, start=keep)
        return hidden, nn.LayerNorm(epsilon=c.eps, name="final_layer_norm", **kw)(last)


class SDXLTextEncoder(nn.Module):
    """One of SDXL's two text encoders, as `StableDiffusionXLPipeline.encode_prompt` reads it:
    `input_ids (B, T) -> (hidden (B, T, hidden_size), text_embeds (B, projection_dim) or None)`.

    `hidden` is `hidden_states[-(clip_skip + 2)]` of transformers' model (`clip_skip` None or 0: the
    penultimate layer's output), WITHOUT `final_layer_norm`; `clip_skip` may be 0 to `num_layers - 1`
    (the last is the embeddings). `text_embeds` is the pooled output of the LAST layer whatever
    `clip_skip` is (`final_layer_norm`, the `eos_token_id` position by `pool_eos`, `text_projection`)
    for a tower with `config.projection_dim` (SDXL's `text_encoder_2`, a `CLIPTextModelWithProjection`);
    None for one without (`text_encoder`, a `CLIPTextModel`, whose layers after `hidden` are not run).

    Params are those of `CLIPTextModel(config)` (`text_model/...`), plus `text_projection/kernel` (no
    bias) with a projection: transformers' names, so `checkpoints.sdxl` converts either file.
    `eos_token_id` is the tower's config's (SDXL's released `text_encoder_2` says 2: the legacy rule).
    """

    config: CLIPTextConfig
    eos_token_id: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int | None = None) -> tuple[jax.Array, jax.Array | None]:
        c = self.config
        clip_skip = 0 if clip_skip is None else int(clip_skip)
        if not 0 <= clip_skip < c.num_layers:
            raise ValueError(f"clip_skip must be in [0, {c.num_layers - 1}] for SDXL, got {clip_skip}")
        _check_ids(input_ids, c)
        ids = jnp.asarray(input_ids, jnp.int32)
        project = c.projection_dim is not None
        with attention.using(self.attention):
            hidden, last = _TextTransformerTaps(c, self.dtype, self.param_dtype, name="text_model")(
                ids, c.num_layers - 1 - clip_skip, final=project or self.is_initializing()
            )
        if not project:
            return hidden, None
        embeds = dense(c.projection_dim, "text_projection", use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype)(pool_eos(last, ids, self.eos_token_id))
        return hidden, embeds


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
