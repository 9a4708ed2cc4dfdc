"""The params tree of every model as `ShapeDtypeStruct`s (`jax.eval_shape`: nothing is allocated),
and which part of a UNet's tree is its motion modules."""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.controlnet import ControlNet, ControlNetConfig
from animatediff_jax.models.unet import AddedCond, UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig

Params = dict[str, Any]


def unet_shapes(config: UNetConfig) -> Params:
    """`UNet3D(config)`'s params tree (with motion modules when `config.motion` is set)."""
    return jax.tree.map(lambda s: s, _unet_shapes(config))  # a fresh tree: the cached one stays intact


def unet_example_inputs(config: UNetConfig) -> tuple[tuple, dict]:
    """`(args, kwargs)` `UNet3D(config).init` accepts (2 frames of 8x8 latents, one token; SDXL's added
    conditioning): enough to trace its params."""
    args = (jnp.zeros((1, 2, 8, 8, config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, config.cross_attention_dim)))
    if config.addition_embed_type is None:
        return args, {}
    return args, {"added_cond": AddedCond(jnp.zeros((1, config.text_embeds_dim)), jnp.zeros((1, 6)))}


@functools.lru_cache(maxsize=8)
def _unet_shapes(config: UNetConfig) -> Params:  # tracing SD1.5's UNet takes seconds; loaders ask often
    args, kwargs = unet_example_inputs(config)
    return jax.eval_shape(functools.partial(UNet3D(config).init, **kwargs), jax.random.key(0), *args)["params"]


def controlnet_shapes(config: ControlNetConfig) -> Params:
    """`ControlNet(config)`'s params tree (SparseCtrl's motion modules included)."""
    return jax.tree.map(lambda s: s, _controlnet_shapes(config))


@functools.lru_cache(maxsize=8)
def _controlnet_shapes(config: ControlNetConfig) -> Params:
    h = 8
    x = jnp.zeros((1, 2, h, h, config.unet.in_channels))
    side = h * config.condition_downscale
    cond = jnp.zeros((1, 2, side, side, config.conditioning_channels))
    ctx = jnp.zeros((1, 1, config.unet.cross_attention_dim))
    mask = jnp.ones((1, 2)) if config.concat_conditioning_mask else None
    return jax.eval_shape(ControlNet(config).init, jax.random.key(0), x, jnp.zeros((1,)), ctx, cond, mask)["params"]


def vae_shapes(config: VAEConfig) -> Params:
    x = jnp.zeros((1, 16, 16, config.in_channels))
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def clip_shapes(config: CLIPTextConfig) -> Params:
    ids = jnp.zeros((1, config.max_positions), jnp.int32)
    return jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), ids)["params"]


_MOTION_MODULE = re.compile(r"motion_modules_\d+")


def is_motion_path(path: tuple[str, ...]) -> bool:
    """Whether a UNet params path lies inside a motion module (`.../motion_modules_J/...`, down, mid
    and up blocks): the one definition (training stages, checkpoints, benchmarks)."""
    return any(_MOTION_MODULE.fullmatch(p) for p in path)


def motion_subtree(params: Mapping[str, Any]) -> Params:
    """The `motion_modules_*` subtrees of a UNet params tree (a partial tree)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_motion_path(p)})


def motion_shapes(config: UNetConfig) -> Params:
    """The motion-module part of `unet_shapes(config)`."""
    if config.motion is None:
        raise ValueError("the UNet config has no motion modules (config.motion is None)")
    return motion_subtree(unet_shapes(config))


# ----------------------------------------------------------------------------- CLIP towers, safety checker

from animatediff_jax.models.clip_text import CLIPTextWithProjection, SDXLTextEncoder  # noqa: E402
from animatediff_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionWithProjection  # noqa: E402
from animatediff_jax.models.safety import SafetyChecker  # noqa: E402


def _pixels(config: CLIPVisionConfig) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)


@functools.lru_cache(maxsize=8)
def _clip_vision_shapes(config: CLIPVisionConfig) -> Params:
    return jax.eval_shape(CLIPVisionWithProjection(config).init, jax.random.key(0), _pixels(config))["params"]


def clip_vision_shapes(config: CLIPVisionConfig) -> Params:
    """`CLIPVisionWithProjection(config)`'s tree: `vision_model/...`, `visual_projection/kernel`."""
    return jax.tree.map(lambda s: s, _clip_vision_shapes(config))


def sdxl_text_shapes(config: CLIPTextConfig) -> Params:
    """`SDXLTextEncoder(config)`'s tree: `clip_shapes(config)`, plus `text_projection/kernel` when
    `config.projection_dim` is set (`text_encoder_2`)."""
    ids = jnp.zeros((1, config.max_positions), jnp.int32)
    return jax.eval_shape(SDXLTextEncoder(config).init, jax.random.key(0), ids)["params"]


def clip_text_projection_shapes(config: CLIPTextConfig, projection_dim: int) -> Params:
    """`CLIPTextWithProjection`'s tree: `clip_shapes(config)` plus `text_projection/kernel`."""
    ids = jnp.zeros((1, config.max_positions), jnp.int32)
    model = CLIPTextWithProjection(config, projection_dim=int(projection_dim))
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


@functools.lru_cache(maxsize=4)
def _safety_checker_shapes(config: CLIPVisionConfig) -> Params:
    return jax.eval_shape(SafetyChecker(config).init, jax.random.key(0), _pixels(config))["params"]


def safety_checker_shapes(config: CLIPVisionConfig) -> Params:
    """`SafetyChecker(config)`'s tree (vision tower, projection, concept embeddings and thresholds)."""
    return jax.tree.map(lambda s: s, _safety_checker_shapes(config))


# ----------------------------------------------------------------------------- IP-Adapter

from animatediff_jax.models.ip_adapter import (  # noqa: E402
    IPAdapterConfig,
    image_projection,
    layer_shapes,
    projection_input_shape,
)


def ip_adapter_shapes(config: IPAdapterConfig, unet: UNetConfig) -> Params:
    """An IP-Adapter's tree for `unet`: `image_proj` (its projection's params) and `layers` (per spatial
    cross-attention, `models.unet.cross_attentions` order, `{to_k_ip, to_v_ip}`)."""
    x = jax.ShapeDtypeStruct((1,) + projection_input_shape(config), jnp.float32)
    proj = jax.eval_shape(image_projection(config).init, jax.random.key(0), x)["params"]
    return {"image_proj": proj, "layers": layer_shapes(config, unet)}
