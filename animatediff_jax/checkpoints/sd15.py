"""Stable Diffusion 1.5 weights -> params: diffusers folders and single-file LDM checkpoints.

A personalised model (CivitAI / DreamBooth) usually comes as one LDM file (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`); its key renaming is diffusers' own
(`diffusers.loaders.single_file_utils`), reused here, so only the layout change is ours.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

from animatediff_jax.checkpoints.family import LDM_UNET_PREFIX, base_family, sdxl_evidence
from animatediff_jax.checkpoints.motion import split_position_tables
from animatediff_jax.checkpoints.params_io import PARAMS_FILE, config_from_dict, load_params, save_params
from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    FileNames,
    Params,
    StateDict,
    check_tree,
    find_weights_file,
    load_state_dict,
    torch_to_flax,
)
from animatediff_jax.io import fs
from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.config import UNetConfig, sd15_unet
from animatediff_jax.models.shapes import clip_shapes, unet_shapes, vae_shapes
from animatediff_jax.models.vae import VAEConfig

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


def _read_config(path: str, parse: Callable[[dict], Any]) -> Any:
    """A component's `config.json`, parsed; any problem is a `CheckpointError` naming the file."""
    try:
        with fs.open(path) as f:
            return parse(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is this a diffusers Stable Diffusion folder?)") from None
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, unsupported or incomplete config
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from e


# The VAE mid-block attention as diffusers named it before 0.14 (and as SD1.5's `vae/` files still
# hold it); diffusers renames these on load (`ModelMixin._fix_state_dict_keys_on_load`).
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTENTION_KEY = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$"
)


def convert_vae(state_dict: Mapping[str, Any], config: VAEConfig, *, what: str = "diffusers VAE",
                names: FileNames | None = None) -> Params:
    """A diffusers `AutoencoderKL` state dict -> our params, in either attention naming diffusers reads.

    Old names (`query`/`key`/`value`/`proj_attn`) are renamed to the current ones; a state dict
    that holds both namings (a half-converted file) is an error naming the keys of each, since
    diffusers would silently keep one of two different weights. With `names` (how the file names
    the keys of `state_dict`), errors name every key as the file does.
    """
    old, new = [], []
    for k in state_dict:
        m = _VAE_ATTENTION_KEY.match(k)
        if m:
            (old if m.group(2) in _OLD_VAE_ATTENTION else new).append(k)
    if old and new:
        raise CheckpointError(
            f"{what}: mixes the old VAE attention names (query/key/value/proj_attn: {', '.join(sorted(old)[:4])}"
            f"{', ...' if len(old) > 4 else ''}) with the new ones (to_q/to_k/to_v/to_out.0: "
            f"{', '.join(sorted(new)[:4])}{', ...' if len(new) > 4 else ''})"
        )
    sd, renamed = dict(state_dict), {}
    for k in old:
        m = _VAE_ATTENTION_KEY.match(k)
        new_key = f"{m.group(1)}.{_OLD_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
        sd[new_key] = sd.pop(k)
        renamed[new_key] = k
    if old:
        names = (names or FileNames()).after(renamed, _old_vae_name)
    return torch_to_flax(sd, vae_shapes(config), what=what, names=names)


_NEW_VAE_ATTENTION = {new: old for old, new in _OLD_VAE_ATTENTION.items()}


def _old_vae_name(key: str) -> str:
    """A VAE key in the current attention naming -> the old one (`to_q` -> `query`)."""
    m = _VAE_ATTENTION_KEY.match(key)
    if m and m.group(2) in _NEW_VAE_ATTENTION:
        return f"{m.group(1)}.{_NEW_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
    return key


def load_diffusers_folder(folder: str | os.PathLike, components=("unet", "vae", "text_encoder")) -> SD15:
    """A diffusers SD folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`), as published or saved.

    Weights in safetensors or `.bin`, full precision or only the `fp16` variant; the VAE in
    either attention naming, the text encoder with or without `text_model.` and `position_ids`
    (every naming `from_pretrained` reads for SD1.5).
    """
    folder = os.fspath(folder)
    if not fs.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    sub = functools.partial(os.path.join, folder)
    unet_cfg = _read_config(sub("unet", "config.json"), UNetConfig.from_diffusers)
    if unet_cfg.family != "sd15":
        raise CheckpointError(f"{folder} is an SDXL folder ({sub('unet', 'config.json')}: addition_embed_type "
                              "'text_time'): load it with an SDXL config (checkpoints.sdxl.load_sdxl), not SD1.5's")
    vae_cfg = _read_config(sub("vae", "config.json"), VAEConfig.from_diffusers)
    text_cfg = _read_config(sub("text_encoder", "config.json"), CLIPTextConfig.from_transformers)
    params = {}
    weights = {name: find_weights_file(sub(name)) for name in components}  # error messages name the file
    if "unet" in components:
        params["unet"] = convert_unet_state_dict(
            load_state_dict(weights["unet"]), unet_cfg, what=f"{weights['unet']} (diffusers UNet)", names=FileNames()
        )
    if "vae" in components:
        params["vae"] = convert_vae(load_state_dict(weights["vae"]), vae_cfg, what=f"{weights['vae']} (diffusers VAE)",
                                    names=FileNames())
    if "text_encoder" in components:
        params["text_encoder"] = convert_clip_text(
            load_state_dict(weights["text_encoder"]), clip_shapes(text_cfg),
            what=f"{weights['text_encoder']} (transformers CLIPTextModel)", names=FileNames(),
        )
    tok = sub("tokenizer")
    return SD15(unet_cfg, vae_cfg, text_cfg, params, tok if fs.isdir(tok) else None)


def is_ldm_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(LDM_UNET_PREFIX) for k in state_dict)


_LDM_PARTS = (("unet", LDM_UNET_PREFIX), ("vae", LDM_VAE_PREFIX), ("text_encoder", LDM_CLIP_PREFIX))


def _torchable(v: np.ndarray) -> np.ndarray:
    """torch.from_numpy rejects ml_dtypes' bfloat16 (what safetensors.numpy returns for bf16 files)."""
    v = np.ascontiguousarray(v)
    return v.astype(np.float32) if v.dtype.kind == "V" or v.dtype.name == "bfloat16" else v


def _ldm_to_diffusers_traced(
    state_dict: Mapping[str, Any], unet_config: UNetConfig, vae_config: VAEConfig, what: str,
    parts: Sequence[str] = ("unet", "vae", "text_encoder"),
) -> tuple[dict[str, StateDict], dict[str, FileNames]]:
    """`ldm_to_diffusers`, plus how the file names each part's keys (`names[part]`: each converted
    key's LDM name and shape in the file). Only `parts` are converted: SDXL's text encoders sit
    elsewhere in its files and are read by `checkpoints.sdxl`.

    diffusers' converters only rename keys and drop the trailing 1x1 of conv-shaped attention
    weights, so each output tensor shares memory with exactly one input tensor: that is how
    the file's own names are recovered for error messages. A shape change other than that
    squeeze would be diffusers silently reshaping a wrong-sized weight, and is an error here.
    """
    import torch
    from diffusers.loaders import single_file_utils as sfu

    # diffusers' converters index and reshape torch tensors.
    ckpt = {k: torch.from_numpy(_torchable(v)) for k, v in state_dict.items()}
    by_address = {}
    for k, t in ckpt.items():
        if t.numel():
            by_address.setdefault(t.data_ptr(), k)
    converters = {
        "unet": lambda: sfu.convert_ldm_unet_checkpoint(ckpt, unet_config.to_diffusers()),
        "vae": lambda: sfu.convert_ldm_vae_checkpoint(ckpt, vae_config.to_diffusers()),
        "text_encoder": lambda: sfu.convert_ldm_clip_checkpoint(ckpt),
    }
    out, origins = {}, {}
    for name, prefix in _LDM_PARTS:
        if name not in parts or not any(k.startswith(prefix) for k in ckpt):
            continue
        try:
            converted = converters[name]()
        except KeyError as e:  # diffusers looks some keys up unconditionally (e.g. an upsampler's bias)
            raise CheckpointError(f"{what}: {name} key {prefix}{e.args[0]} is missing") from None
        except Exception as e:
            raise CheckpointError(f"{what}: diffusers cannot convert its {name} ({type(e).__name__}: {e})") from e
        origin, bad = {}, []
        for k, t in converted.items():
            src = by_address.get(t.data_ptr()) if t.numel() else None
            if src is None:
                continue
            origin[k] = src
            shape, src_shape = tuple(t.shape), tuple(ckpt[src].shape)
            if src_shape not in (shape, shape + (1,), shape + (1, 1)):
                bad.append(f"{src} {src_shape} (read as {k} {shape})")
        if bad:
            raise CheckpointError(f"{what}: wrongly shaped {name} weights: {', '.join(sorted(bad))}")
        out[name] = {k: v.numpy() for k, v in converted.items()}
        origins[name] = FileNames(origin, shapes={src: tuple(ckpt[src].shape) for src in origin.values()})
    return out, origins


def ldm_to_diffusers(
    state_dict: Mapping[str, Any], unet_config: UNetConfig, vae_config: VAEConfig
) -> dict[str, StateDict]:
    """Splits an LDM single-file state dict into diffusers-named unet / vae / text_encoder state dicts."""
    return _ldm_to_diffusers_traced(state_dict, unet_config, vae_config, "LDM checkpoint")[0]


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

    evidence = sdxl_evidence(sd)
    if evidence:
        raise CheckpointError(f"{path} is an SDXL checkpoint ({evidence} ...): load it with an SDXL config "
                              "(checkpoints.sdxl.load_sdxl), not SD1.5's")
    unet_cfg = unet_config or (base.unet_config if base else sd15_unet())
    vae_cfg = vae_config or (base.vae_config if base else VAEConfig.sd15())
    text_cfg = text_config or (base.text_config if base else CLIPTextConfig.sd15())
    what = f"{path} (LDM single file)"
    parts, origins = _ldm_to_diffusers_traced(sd, unet_cfg, vae_cfg, what)
    converters = {
        "unet": lambda part, names: convert_unet_state_dict(part, unet_cfg, what=f"{what}: UNet", names=names),
        "vae": lambda part, names: convert_vae(part, vae_cfg, what=f"{what}: VAE", names=names),
        "text_encoder": lambda part, names: convert_clip_text(part, clip_shapes(text_cfg), what=f"{what}: text encoder",
                                                              names=names),
    }
    params: dict[str, Params] = {}
    for name, part in parts.items():
        params[name] = converters[name](part, origins[name])  # (errors name the file's LDM keys)
    for name in ("vae", "text_encoder"):
        if name not in params:
            if base is None or name not in base.params:
                raise CheckpointError(f"{what}: has no {name} weights and no base SD1.5 model was given for them")
            params[name] = base.params[name]
    return SD15(unet_cfg, vae_cfg, text_cfg, params, base.tokenizer_path if base else None)


def load_sd15(path: str | os.PathLike, *, base: SD15 | None = None, **configs) -> SD15:
    """A converted folder (`animatediff-jax convert sd15`), a diffusers folder or an LDM single file."""
    path = os.fspath(path)
    if fs.isfile(os.path.join(path, PARAMS_FILE)):
        return load_converted(path)
    if fs.isdir(path):
        return load_diffusers_folder(path)
    return load_single_file(path, base=base, **configs)


_CLIP_TEXT_PREFIX = "text_model."


def convert_clip_text(
    state_dict: Mapping[str, np.ndarray], target: Params, *, what: str = "CLIP text encoder",
    names: FileNames | None = None,
) -> Params:
    """Maps a transformers `CLIPTextModel` state dict onto our params (shaped like `target`).

    Two normalisations, nothing else: `*.position_ids` buffers (saved by older transformers)
    are dropped once checked to be `arange(max_positions)`, which is what the model computes,
    and a state dict without the `text_model.` prefix (transformers 5 keeps it only on disk)
    gets it added. Any other difference raises `CheckpointError` (naming the keys as the file does,
    with `names`: how it names the keys of `state_dict`).
    """
    positions = np.shape(target["text_model"]["embeddings"]["position_embedding"]["embedding"])[0]
    for k, v in state_dict.items():
        if k.endswith("embeddings.position_ids") and not np.array_equal(
            np.reshape(v, -1), np.arange(positions)
        ):
            raise CheckpointError(
                f"{what}: {k} {tuple(np.shape(v))} is not arange({positions}), the positions the model uses"
            )
    sd = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
    if sd and not any(k.startswith(_CLIP_TEXT_PREFIX) for k in sd):
        names = (names or FileNames()).after({_CLIP_TEXT_PREFIX + k: k for k in sd},
                                             lambda k: k.removeprefix(_CLIP_TEXT_PREFIX))
        sd = {_CLIP_TEXT_PREFIX + k: v for k, v in sd.items()}
    return torch_to_flax(sd, target, what=what, names=names)


def convert_unet_state_dict(state_dict: Mapping, config: UNetConfig, *, what: str = "UNet checkpoint",
                            names: FileNames | None = None) -> Params:
    """A whole diffusers-named UNet (`UNet2DConditionModel` or `UNetMotionModel`) state dict -> params
    (errors name the keys as the file does, with `names`: how it names the keys of `state_dict`)."""
    sd = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    sd, length = split_position_tables(sd)
    if length is not None and config.motion is not None and length != config.motion.max_positions:
        raise CheckpointError(
            f"{what}: position tables of length {length}, "
            f"but the config's motion layout has {config.motion.max_positions}"
        )
    return torch_to_flax(sd, unet_shapes(config), what=what, names=names)


def save_converted(folder: str | os.PathLike, model: SD15) -> None:
    """Writes an `sd15.SD15` as `folder/params.safetensors` (+ `folder/tokenizer/` when known)."""
    folder = os.fspath(folder)
    fs.makedirs(folder, exist_ok=True)
    meta = {"unet_config": model.unet_config, "vae_config": model.vae_config, "text_config": model.text_config}
    save_params(os.path.join(folder, PARAMS_FILE), model.params, meta)
    if model.tokenizer_path:
        fs.copytree(model.tokenizer_path, os.path.join(folder, "tokenizer"))


def load_converted(folder: str | os.PathLike) -> SD15:
    """Reads a folder written by `save_converted` (no torch needed) as an `SD15`."""
    folder = os.fspath(folder)
    params, meta = load_params(os.path.join(folder, PARAMS_FILE))
    if "text_config_2" in meta:
        raise CheckpointError(f"{folder}/{PARAMS_FILE} is a converted SDXL model (text_config_2): load it with an "
                              "SDXL config (checkpoints.sdxl.load_sdxl), not SD1.5's")
    missing = [k for k in ("unet_config", "vae_config", "text_config") if k not in meta]
    if missing:
        raise CheckpointError(f"{folder}/{PARAMS_FILE}: lacks {missing}: not a converted SD1.5 model")
    tok = os.path.join(folder, "tokenizer")
    model = SD15(
        config_from_dict(UNetConfig, meta["unet_config"]),
        config_from_dict(VAEConfig, meta["vae_config"]),
        config_from_dict(CLIPTextConfig, meta["text_config"]),
        params,
        tok if fs.isdir(tok) else None,
    )
    # The params against the configs the file names (a damaged base is reported here, by name,
    # not later as a misfit of whatever is merged into it).
    shapes = {"unet": unet_shapes(model.unet_config), "vae": vae_shapes(model.vae_config),
              "text_encoder": clip_shapes(model.text_config)}
    for name, want in shapes.items():
        check_tree(f"{folder}/{PARAMS_FILE} ({name})", traverse_util.flatten_dict(params.get(name, {})),
                   traverse_util.flatten_dict(want))
    return model


def sd15_size_multiple(path: str) -> int:
    """`models.config.size_multiple` of the SD1.5 model at `path`, read from its configs without loading
    weights (a converted or diffusers folder; SD1.5's or SDXL's for a single file, by its key names). A folder
    whose configs cannot be read is a `CheckpointError` naming the file."""
    from animatediff_jax.checkpoints import params_io
    from animatediff_jax.checkpoints.torch_io import CheckpointError, safetensors_metadata
    from animatediff_jax.io import fs
    from animatediff_jax.models.config import size_multiple

    blocks, vae_blocks = 4, 4
    if not fs.isdir(path) and base_family(path) == "sdxl":
        return size_multiple(3, vae_blocks)
    source = converted = os.path.join(path, params_io.PARAMS_FILE)
    try:
        if fs.isfile(converted):
            meta = safetensors_metadata(converted)
            blocks = len(json.loads(meta["unet_config"])["block_out_channels"])
            vae_blocks = len(json.loads(meta["vae_config"])["block_out_channels"])
        elif fs.isdir(path):
            for name in ("unet", "vae"):
                source = os.path.join(path, name, "config.json")
                with fs.open(source) as f:
                    n = len(json.load(f)["block_out_channels"])
                blocks, vae_blocks = (n, vae_blocks) if name == "unet" else (blocks, n)
    except FileNotFoundError:
        raise CheckpointError(f"{source}: missing (not a converted or diffusers SD1.5 folder)") from None
    except Exception as e:  # truncated / not safetensors / bad JSON / no such field
        raise CheckpointError(f"{source}: cannot be read ({type(e).__name__}: {e})") from None
    return size_multiple(blocks, vae_blocks)
