"""Stable Diffusion 1.5 weights -> params: diffusers folders and single-file LDM checkpoints.

A personalised model (CivitAI / DreamBooth) usually comes as one LDM file (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`); its key renaming is diffusers' own
(`diffusers.loaders.single_file_utils`), reused here, so only the layout change is ours.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.checkpoints.torch_io import CheckpointError, Params, StateDict, load_component, load_state_dict
from animatediff_jax.checkpoints.motion import convert_unet_state_dict
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, convert_clip_text
from animatediff_jax.models.config import UNetConfig, sd15_unet
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."


@dataclasses.dataclass
class SD15:
    """The three SD1.5 models' configs and params (`params[name]` for "unet", "vae", "text_encoder")."""

    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    params: dict[str, Params]
    tokenizer_path: str | None = None


def vae_shapes(config: VAEConfig) -> Params:
    x = jnp.zeros((1, 16, 16, config.in_channels))
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def clip_shapes(config: CLIPTextConfig) -> Params:
    ids = jnp.zeros((1, config.max_positions), jnp.int32)
    return jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), ids)["params"]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is this a diffusers Stable Diffusion folder?)") from None


def load_diffusers_folder(folder: str | os.PathLike, components=("unet", "vae", "text_encoder")) -> SD15:
    """A diffusers SD folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`), safetensors or .bin."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    unet_cfg = UNetConfig.from_diffusers(_read_json(os.path.join(folder, "unet", "config.json")))
    vae_cfg = VAEConfig.from_diffusers(_read_json(os.path.join(folder, "vae", "config.json")))
    text_cfg = CLIPTextConfig.from_transformers(_read_json(os.path.join(folder, "text_encoder", "config.json")))
    params = {}
    if "unet" in components:
        params["unet"] = convert_unet_state_dict(
            load_component(os.path.join(folder, "unet")), unet_cfg, what=f"{folder}/unet (diffusers UNet)"
        )
    if "vae" in components:
        params["vae"] = _convert(load_component(os.path.join(folder, "vae")), vae_shapes(vae_cfg), f"{folder}/vae")
    if "text_encoder" in components:
        params["text_encoder"] = convert_clip_text(
            load_component(os.path.join(folder, "text_encoder")), clip_shapes(text_cfg),
            what=f"{folder}/text_encoder (transformers CLIPTextModel)",
        )
    tok = os.path.join(folder, "tokenizer")
    return SD15(unet_cfg, vae_cfg, text_cfg, params, tok if os.path.isdir(tok) else None)


def _convert(sd: Mapping[str, np.ndarray], target: Params, what: str) -> Params:
    from animatediff_jax.checkpoints.torch_io import torch_to_flax

    return torch_to_flax(sd, target, what=what)


def is_ldm_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(LDM_UNET_PREFIX) for k in state_dict)


def ldm_to_diffusers(state_dict: Mapping[str, Any], unet_config: UNetConfig, vae_config: VAEConfig) -> dict[str, StateDict]:
    """Splits an LDM single-file state dict into diffusers-named unet / vae / text_encoder state dicts."""
    import torch
    from diffusers.loaders import single_file_utils as sfu

    # diffusers' converters index and reshape torch tensors.
    ckpt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    out = {}
    if any(k.startswith(LDM_UNET_PREFIX) for k in ckpt):
        out["unet"] = sfu.convert_ldm_unet_checkpoint(ckpt, unet_config.to_diffusers())
    if any(k.startswith(LDM_VAE_PREFIX) for k in ckpt):
        out["vae"] = sfu.convert_ldm_vae_checkpoint(ckpt, vae_config.to_diffusers())
    if any(k.startswith(LDM_CLIP_PREFIX) for k in ckpt):
        out["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ckpt)
    return {name: {k: v.numpy() for k, v in sd.items()} for name, sd in out.items()}


def load_single_file(
    path: str | os.PathLike,
    *,
    base: SD15 | None = None,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: CLIPTextConfig | None = None,
) -> SD15:
    """A single-file LDM checkpoint (`.safetensors`/`.ckpt`), e.g. a CivitAI DreamBooth model.

    Components the file lacks (many personalised files hold only the UNet, or UNet + text
    encoder) come from `base`, as in the original AnimateDiff's `dreambooth_path` over an SD1.5
    folder; without a base they are an error.
    """
    path = os.fspath(path)
    sd = load_state_dict(path)
    if not is_ldm_checkpoint(sd):
        raise CheckpointError(
            f"{path}: not a single-file LDM Stable Diffusion checkpoint (no '{LDM_UNET_PREFIX}*' keys; "
            f"found e.g. {sorted(sd)[:3]})"
        )
    unet_cfg = unet_config or (base.unet_config if base else sd15_unet())
    vae_cfg = vae_config or (base.vae_config if base else VAEConfig.sd15())
    text_cfg = text_config or (base.text_config if base else CLIPTextConfig.sd15())
    parts = ldm_to_diffusers(sd, unet_cfg, vae_cfg)
    what = f"{path} (LDM single file)"
    params: dict[str, Params] = {}
    params["unet"] = convert_unet_state_dict(parts["unet"], unet_cfg, what=f"{what}: UNet")
    if "vae" in parts:
        params["vae"] = _convert(parts["vae"], vae_shapes(vae_cfg), f"{what}: VAE")
    if "text_encoder" in parts:
        params["text_encoder"] = convert_clip_text(parts["text_encoder"], clip_shapes(text_cfg), what=f"{what}: text encoder")
    for name in ("vae", "text_encoder"):
        if name not in params:
            if base is None or name not in base.params:
                raise CheckpointError(f"{what}: has no {name} weights and no base SD1.5 model was given for them")
            params[name] = base.params[name]
    return SD15(unet_cfg, vae_cfg, text_cfg, params, base.tokenizer_path if base else None)


def load_sd15(path: str | os.PathLike, *, base: SD15 | None = None, **configs) -> SD15:
    """A diffusers folder or a single-file LDM checkpoint, whichever `path` is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_diffusers_folder(path)
    return load_single_file(path, base=base, **configs)
