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
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig

Params = dict[str, Any]


def unet_shapes(config: UNetConfig) -> Params:
    """`UNet3D(config)`'s params tree (with motion modules when `config.motion` is set)."""
    return jax.tree.map(lambda s: s, _unet_shapes(config))  # a fresh tree: the cached one stays intact


@functools.lru_cache(maxsize=8)
def _unet_shapes(config: UNetConfig) -> Params:  # tracing SD1.5's UNet takes seconds; loaders ask often
    x = jnp.zeros((1, 2, 8, 8, config.in_channels))
    ctx = jnp.zeros((1, 1, config.cross_attention_dim))
    return jax.eval_shape(UNet3D(config).init, jax.random.key(0), x, jnp.zeros((1,)), ctx)["params"]


def vae_shapes(config: VAEConfig) -> Params:
    x = jnp.zeros((1, 16, 16, config.in_channels))
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def clip_shapes(config: CLIPTextConfig) -> Params:
    ids = jnp.zeros((1, config.max_positions), jnp.int32)
    return jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), ids)["params"]


def is_motion_path(path: tuple[str, ...]) -> bool:
    """Whether a UNet params path lies inside a motion module (`.../motion_modules_J/...`)."""
    return any(re.fullmatch(r"motion_modules_\d+", p) for p in path)


def motion_subtree(params: Mapping[str, Any]) -> Params:
    """The `motion_modules_*` subtrees of a UNet params tree (a partial tree)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_motion_path(p)})


def motion_shapes(config: UNetConfig) -> Params:
    """The motion-module part of `unet_shapes(config)`."""
    if config.motion is None:
        raise ValueError("the UNet config has no motion modules (config.motion is None)")
    return motion_subtree(unet_shapes(config))
