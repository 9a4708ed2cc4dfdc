"""CLIP's vision tower (ViT) and its projection, as transformers' `CLIPVisionModel(WithProjection)`.

Names follow transformers 5's modules, so `checkpoints/clip.py` is the generic `torch_to_flax`:
`CLIPVision` holds `embeddings/{class_embedding, patch_embedding, position_embedding}`,
`pre_layrnorm` (transformers' spelling), `encoder/layers_i` (the text tower's layers, without the
causal mask) and `post_layernorm`; `CLIPVisionWithProjection` is `vision_model/...` plus
`visual_projection/kernel` (no bias), the keys of a `CLIPVisionModelWithProjection` or of the
vision half of a `CLIPModel`.

Pixel values are channels last, `[B, image_size, image_size, 3]` (transformers' `pixel_values`
transposed), as `image_preprocess.preprocess` makes them.
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
from animatediff_jax.models.clip_text import ACTIVATIONS, _Encoder, l2_normalize
from animatediff_jax.models.image_preprocess import ImageProcessing, preprocess
from animatediff_jax.models.layers import dense

Dtype = Any
Params = dict[str, Any]

# transformers' CLIPVisionConfig defaults (fields a config.json may leave out).
_HF_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (one of {sorted(ACTIVATIONS)})")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_l14(cls) -> "CLIPVisionConfig":
        """OpenAI CLIP ViT-L/14 at 224 (`openai/clip-vit-large-patch14`; SD1.5's safety checker)."""
        return cls()

    @classmethod
    def vit_b32(cls) -> "CLIPVisionConfig":
        return cls(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=32, projection_dim=512)

    @classmethod
    def vit_b16(cls) -> "CLIPVisionConfig":
        return cls(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=16, projection_dim=512)

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        """Tests: 2 layers, 32x32 images in 8x8 patches (17 tokens)."""
        return cls(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8, projection_dim=16)

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a `CLIPVisionConfig` dict, or a `CLIPConfig` dict (`CLIPModel`, SD1.5's safety checker),
        whose `vision_config` (updated by a legacy `vision_config_dict`) is the tower and whose
        top-level `projection_dim` is the projection's (a `CLIPModel` ignores the sub-config's)."""
        if cfg.get("model_type") == "clip" or "vision_config" in cfg or "vision_config_dict" in cfg:
            v = {**(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
            v["projection_dim"] = cfg.get("projection_dim", 512)
        else:
            v = dict(cfg)
        v = {**_HF_DEFAULTS, **{k: x for k, x in v.items() if x is not None}}
        if int(v["num_channels"]) != 3:
            raise ValueError(f"only 3-channel CLIP vision towers are supported, config has {v['num_channels']}")
        return cls(
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]),
            image_size=int(v["image_size"]),
            patch_size=int(v["patch_size"]),
            projection_dim=int(v["projection_dim"]),
            eps=float(v["layer_norm_eps"]),
            hidden_act=str(v["hidden_act"]),
        )

    def transformers_kwargs(self) -> dict[str, Any]:
        """The matching transformers `CLIPVisionConfig(**kwargs)` (for references in tests)."""
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.projection_dim,
            layer_norm_eps=self.eps,
            hidden_act=self.hidden_act,
        )


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (stride = kernel = patch, no bias), a learned class token first, learned positions."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding", **kw)(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        pos = nn.Embed(c.num_positions, c.hidden_size, name="position_embedding", **kw)(jnp.arange(c.num_positions))
        return x + pos


class CLIPVision(nn.Module):
    """transformers' `CLIPVisionModel`: `pixels [B, S, S, 3] -> (last_hidden_state [B, 1 + P, D], pooled [B, D])`,
    `pooled = post_layernorm(last_hidden_state[:, 0])` (the class token)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # models.attention implementation (257 tokens at ViT-L/14: "auto" is XLA)

    @nn.compact
    def __call__(self, pixels: jax.Array, num_layers: int | None = None) -> tuple[jax.Array, jax.Array]:
        """`num_layers`: run only the first that many encoder layers (None: all): the hidden state
        transformers returns as `hidden_states[num_layers]`."""
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        want = (c.image_size, c.image_size, 3)
        if np.ndim(pixels) != 4 or tuple(np.shape(pixels)[1:]) != want:
            raise ValueError(f"pixel values must be [batch, {c.image_size}, {c.image_size}, 3] (channels last), "
                             f"got shape {tuple(np.shape(pixels))}")
        ln = lambda name: nn.LayerNorm(epsilon=c.eps, name=name, **kw)
        with attention.using(self.attention):
            h = CLIPVisionEmbeddings(c, name="embeddings", **kw)(jnp.asarray(pixels))
            h = ln("pre_layrnorm")(h)
            h = _Encoder(c, causal=False, name="encoder", **kw)(h, c.num_layers if num_layers is None else num_layers)
        return h, ln("post_layernorm")(h[:, 0])


class CLIPVisionWithProjection(nn.Module):
    """transformers' `CLIPVisionModelWithProjection` (and `CLIPModel.get_image_features`):
    `pixels -> image_embeds [B, projection_dim]` (not normalised); with `hidden_state=-k`, transformers'
    `hidden_states[-k]` `[B, 1 + P, hidden]` instead (-2: the penultimate layer's output, before any
    final norm: what IP-Adapter plus reads)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixels: jax.Array, hidden_state: int | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tower = CLIPVision(self.config, attention=self.attention, name="vision_model", **kw)
        if hidden_state is not None:  # hidden_states = (embeddings, layer 1, ..., layer L)
            n = self.config.num_layers + 1 + hidden_state if hidden_state < 0 else hidden_state
            if not 0 <= n <= self.config.num_layers:
                raise ValueError(f"hidden_state {hidden_state}: the tower has {self.config.num_layers} layers")
            return tower(pixels, n)[0]
        _, pooled = tower(pixels)
        return dense(self.config.projection_dim, "visual_projection", use_bias=False, **kw)(pooled)


@functools.partial(jax.jit, static_argnames=("model", "processing", "normalize"))
def _image_embeddings(model: CLIPVisionWithProjection, params: Params, images: jax.Array,
                      processing: ImageProcessing, normalize: bool) -> jax.Array:
    e = model.apply({"params": params}, preprocess(images, processing))
    return l2_normalize(e) if normalize else e


def image_embeddings(
    model: CLIPVisionWithProjection,
    params: Params,
    images: Any,
    processing: ImageProcessing | None = None,
    *,
    normalize: bool = True,
) -> jax.Array:
    """Frames `[N, H, W, 3]` (uint8, or float in [0, 1]) -> CLIP image embeddings `[N, projection_dim]`
    float32, L2-normalised unless `normalize=False`: `CLIPImageProcessor` then `get_image_features`.

    `processing` is the model folder's (`load_clip(...).processor`); None is CLIP's default at the
    config's `image_size`. One compile per input shape.
    """
    processing = processing or ImageProcessing.for_image_size(model.config.image_size)
    size = model.config.image_size
    if processing.do_center_crop and tuple(processing.crop_size) != (size, size):
        raise ValueError(f"the processor crops to {processing.crop_size}, the model takes {model.config.image_size}²")
    return _image_embeddings(model, params, jnp.asarray(images), processing, normalize)
