"""Control models (ControlNet, SparseCtrl) from PyTorch files -> `(ControlNetConfig, params)`.

Formats read (`load_controlnet`):

- a diffusers `ControlNetModel` / `SparseControlNetModel` folder (`config.json` + weights, safetensors or
  `.bin`, full precision or only the fp16 variant);
- a ControlNet 1.0/1.1 single file (`control_v11p_sd15_canny.pth`, `.safetensors`): LDM names
  (`input_blocks`, `zero_convs`, `input_hint_block`, `middle_block_out`), with or without the
  `control_model.` prefix, renamed by diffusers' own `convert_controlnet_checkpoint` (as `sd15` reuses
  diffusers for LDM UNets); the config is read off the shapes. Of a file that also holds SD1.5 itself
  (ControlNet 1.0's `control_sd15_*.pth`) only the `control_model.*` keys are read;
- the original SparseCtrl files (`v3_sd15_sparsectrl_{rgb,scribble}.ckpt`): diffusers-style spatial
  names plus motion modules in the original AnimateDiff naming (renamed by `checkpoints.motion`, whose
  `pos_encoder.pe` tables are checked and dropped), possibly under the original's `{"controlnet": ...}`
  wrapper, a `state_dict` wrapper or a `controlnet.` key prefix. RGB (latent condition, one conv:
  `controlnet_cond_embedding.weight` `[320, 5, 3, 3]`) and scribble (pixel condition net) are told
  apart by their keys. Any diffusers-named control model file without a config is read the same way.

Heads and GroupNorm groups are not in the shapes: they come from `base` when given, else SD1.5's
(8, 32). A control model whose channels or text width do not fit `base` is refused in one line.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from animatediff_jax.checkpoints.motion import (
    diffusers_to_original_key,
    original_to_diffusers_key,
    split_position_tables,
)
from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    FileNames,
    Params,
    StateDict,
    check_finite,
    find_weights_file,
    load_state_dict,
    torch_to_flax,
)
from animatediff_jax.io import fs
from animatediff_jax.models.config import MotionConfig, UNetConfig
from animatediff_jax.models.controlnet import ControlNetConfig
from animatediff_jax.models.shapes import controlnet_shapes

LDM_CONTROL_PREFIX = "control_model."
_LDM_MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.", "input_blocks.")
_PICKLES = (".ckpt", ".bin", ".pt", ".pth")
_SPARSE_PREFIX = "controlnet."  # (some SparseCtrl files prefix every key)


def _describe(sd: Mapping[str, Any], n: int = 4) -> str:
    keys = sorted(sd)
    return f"{len(keys)} keys, e.g. {', '.join(keys[:n])}" if keys else "no tensors"


def check_for_base(config: ControlNetConfig, base: UNetConfig, what: str = "control model") -> None:
    """A one-line `CheckpointError` unless `config`'s residuals and text width fit a UNet of `base`."""
    u, diffs = config.unet, []
    for name in ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim"):
        mine, theirs = getattr(u, name), getattr(base, name)
        if tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(theirs)):
            diffs.append(f"{name} {mine} (base: {theirs})")
    if diffs:
        raise CheckpointError(f"{what}: a control model for another base: {'; '.join(diffs)}")


# --------------------------------------------------------------------------- conversion


def _rename_original_motion(sd: Mapping[str, Any], what: str) -> tuple[StateDict, dict[str, str]]:
    """Motion-module keys in the original AnimateDiff naming -> diffusers' (others unchanged), and
    each renamed key's name in `sd`."""
    out: StateDict = {}
    origin: dict[str, str] = {}
    for k, v in sd.items():
        name = original_to_diffusers_key(k) if "motion_modules" in k.split(".") else k
        if name in out:
            raise CheckpointError(f"{what}: {k} and another key both read as {name} (mixed namings)")
        out[name] = v
        if name != k:
            origin[name] = k
    return out, origin


def convert_controlnet_state_dict(
    state_dict: Mapping[str, Any], config: ControlNetConfig, *, what: str = "control model",
    names: FileNames | None = None,
) -> Params:
    """A diffusers-named `ControlNetModel` / `SparseControlNetModel` state dict -> params of `config`.

    Motion modules may be in either naming (diffusers' or the original's); position tables are
    checked (the sinusoidal table, `config`'s length) and dropped. Every key and shape is checked;
    errors name the keys as the file does (`names`: how it names the keys of `state_dict`).
    """
    sd = {k: np.asarray(v.detach().float().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    sd, origin = _rename_original_motion(sd, what)
    names = (names or FileNames()).after(origin, diffusers_to_original_key if origin else None)
    sd, length = split_position_tables(sd)
    if length is not None and config.sparse and length != config.unet.motion.max_positions:
        raise CheckpointError(
            f"{what}: position tables of length {length}, the config's motion modules have {config.unet.motion.max_positions}"
        )
    return torch_to_flax(sd, controlnet_shapes(config), what=what, names=names)


def _indices(sd: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def infer_config(sd: Mapping[str, Any], base: UNetConfig | None = None, what: str = "control model") -> ControlNetConfig:
    """The `ControlNetConfig` of a diffusers-named control model state dict, read off its keys and shapes.

    What shapes cannot say (attention heads, GroupNorm groups, eps; motion heads) comes from `base`
    (else SD1.5's and AnimateDiff's: 8 heads, 32 groups); a SparseCtrl file (motion modules) is read
    as released: mask channel concatenated, zero sample, no mid-block motion module.
    """
    shape = lambda k: tuple(np.shape(sd[k]))
    try:
        levels = _indices(sd, r"down_blocks\.(\d+)\.resnets\.")
        if not levels or levels != list(range(len(levels))):
            raise CheckpointError(f"{what}: no down blocks found ({_describe(sd)})")
        chans = tuple(shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in levels)
        layers = len(_indices(sd, r"down_blocks\.0\.resnets\.(\d+)\."))
        attn = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in levels)
        mid = "mid_block.attentions.0"
        cross = shape(f"{mid}.transformer_blocks.0.attn2.to_k.weight")[1]
        depth = len(_indices(sd, re.escape(mid) + r"\.transformer_blocks\.(\d+)\."))
        linear = len(shape(f"{mid}.proj_in.weight")) == 2
        in_ch = shape("conv_in.weight")[1]
        ref = base or UNetConfig()
        unet = UNetConfig(
            in_channels=in_ch, out_channels=in_ch, block_out_channels=chans, cross_attn_blocks=attn,
            layers_per_block=layers, cross_attention_dim=cross, attention_heads=ref.attention_heads,
            transformer_layers=depth, norm_num_groups=ref.norm_num_groups, norm_eps=ref.norm_eps,
            use_linear_projection=linear,
        )
        simplified = "controlnet_cond_embedding.weight" in sd
        if simplified:
            cond_in, embed = shape("controlnet_cond_embedding.weight")[1], (16, 32, 96, 256)
        else:
            cond_in = shape("controlnet_cond_embedding.conv_in.weight")[1]
            blocks = _indices(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
            embed = (shape("controlnet_cond_embedding.conv_in.weight")[0],) + tuple(
                shape(f"controlnet_cond_embedding.blocks.{i}.weight")[0] for i in blocks if i % 2 == 1
            )
    except KeyError as e:
        raise CheckpointError(f"{what}: key {e.args[0]} is missing (cannot read the model's layout)") from None
    motion_keys = [k for k in sd if "motion_modules" in k.split(".")]
    if not motion_keys:
        if simplified:
            raise CheckpointError(f"{what}: a simplified condition embedding without motion modules is not a known model")
        return ControlNetConfig(unet=unet, conditioning_channels=cond_in, conditioning_embedding_out_channels=embed)
    if any(k.startswith("mid_block.motion_modules.") for k in motion_keys):
        raise CheckpointError(f"{what}: SparseCtrl with a mid-block motion module is not supported")
    temporal = len(_indices(sd, r"down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\."))
    lengths = {np.shape(v)[-2] for k, v in sd.items() if k.endswith(".pe")}
    heads = base.motion.heads if base is not None and base.motion is not None else 8  # SparseCtrl's (and v3's): 8
    motion = MotionConfig(heads=heads, num_layers=max(temporal, 1), max_positions=lengths.pop() if len(lengths) == 1 else 32,
                          mid_block=False, norm_num_groups=unet.norm_num_groups, self_attentions=1)
    return ControlNetConfig(
        unet=unet.with_motion(motion), conditioning_channels=cond_in - 1, conditioning_embedding_out_channels=embed,
        concat_conditioning_mask=True, simplified_condition_embedding=simplified, zero_sample=True,
    )


def _ldm_to_diffusers(sd: Mapping[str, Any], what: str) -> tuple[StateDict, dict[str, str]]:
    """A ControlNet 1.x LDM state dict -> (diffusers-named state dict, each key's name in the file).

    The renaming is diffusers' `convert_controlnet_checkpoint`, which only moves values between
    names (so provenance is tracked by identity); keys it leaves unused are kept under their own
    names, so that the strict conversion reports them as unexpected.
    """
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    # With the prefix, other keys are the other models of the file (ControlNet 1.0's `control_sd15_*.pth`
    # hold all of SD1.5 too): only `control_model.*` is the control model.
    prefixed = any(k.startswith(LDM_CONTROL_PREFIX) for k in sd)
    if prefixed:
        sd = {k: v for k, v in sd.items() if k.startswith(LDM_CONTROL_PREFIX)}
    own = {k[len(LDM_CONTROL_PREFIX):] if prefixed else k: k for k in sd}
    ldm = {short: sd[full] for short, full in own.items()}
    ops = _indices(ldm, r"input_blocks\.(\d+)\.0\.op\.weight$")
    blocks = _indices(ldm, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise CheckpointError(f"{what}: no input_blocks (not a ControlNet: {_describe(sd)})")
    layers = ops[0] - 1 if ops else len(blocks) - 1
    try:
        # Prefixed, so that diffusers strips the prefix rather than guessing from `time_embed.0.weight`.
        prefixed_ldm = {LDM_CONTROL_PREFIX + k: v for k, v in ldm.items()}
        converted = convert_controlnet_checkpoint(prefixed_ldm, {"layers_per_block": layers})
    except Exception as e:
        raise CheckpointError(f"{what}: diffusers cannot convert it ({type(e).__name__}: {e})") from e
    by_id = {id(v): own[k] for k, v in ldm.items()}
    out, origin, seen = {}, {}, set()
    for k, v in converted.items():
        # None: diffusers looks some names up with .get (missing in the file). A tensor read a second
        # time: diffusers counts hint-net convs by their indices, so a stray `input_hint_block.N`
        # shifts its count and re-reads the last conv under another name; each tensor is read once.
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        out[k] = v
        if id(v) in by_id:
            origin[k] = by_id[id(v)]
    used = set(origin.values())
    for k in sd:
        if k not in used:
            out.setdefault(k, sd[k])  # unused by the renaming: reported as unexpected
    return out, origin


# --------------------------------------------------------------------------- files


def _read_file(path: str) -> StateDict:
    """A weight file's tensors, unwrapping the original SparseCtrl `{"controlnet": ...}` dict (a
    `state_dict` wrapper is unwrapped by `load_state_dict`)."""
    sd = load_state_dict(path)
    if not sd and path.lower().endswith(_PICKLES):  # every tensor one level down
        import torch

        with fs.local_file(path) as local:
            obj = torch.load(local, map_location="cpu", weights_only=True)
        inner = obj.get("controlnet") if isinstance(obj, Mapping) else None
        if isinstance(inner, Mapping):
            sd = {k: v.detach().float().numpy() if hasattr(v, "detach") else v for k, v in inner.items()
                  if hasattr(v, "detach")}
            check_finite(sd, path)
    return sd


def _load_folder(folder: str, base: UNetConfig | None) -> tuple[ControlNetConfig, Params]:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with fs.open(cfg_path) as f:
            raw = json.load(f)
        config = ControlNetConfig.from_diffusers(raw)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers ControlNetModel folder)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {type(e).__name__}: {e}") from e
    what = f"{folder} (diffusers {raw.get('_class_name', 'ControlNetModel')})"
    if base is not None:
        check_for_base(config, base, what)
    weights = find_weights_file(folder)
    what = f"{weights} (diffusers {raw.get('_class_name', 'ControlNetModel')})"
    return config, convert_controlnet_state_dict(load_state_dict(weights), config, what=what, names=FileNames())


def controlnet_from_state_dict(
    sd: Mapping[str, Any], base: UNetConfig | None = None, *, what: str = "control model"
) -> tuple[ControlNetConfig, Params]:
    """A single file's state dict (no config) -> `(config, params)`: ControlNet 1.x in LDM naming (with or
    without `control_model.`), SparseCtrl in the original naming (with or without a `controlnet.`
    prefix), or any diffusers-named control model. Errors name the keys as `sd` does."""
    names = FileNames()
    if sd and all(k.startswith(_SPARSE_PREFIX) for k in sd):
        sd = {k[len(_SPARSE_PREFIX):]: v for k, v in sd.items()}
        names = FileNames({k: _SPARSE_PREFIX + k for k in sd}, lambda k: _SPARSE_PREFIX + k)
    stripped = {k[len(LDM_CONTROL_PREFIX):] if k.startswith(LDM_CONTROL_PREFIX) else k for k in sd}
    if any(k.startswith(_LDM_MARKERS) for k in stripped):
        what = f"{what} (ControlNet LDM single file)"
        converted, origin = _ldm_to_diffusers(sd, what)
        config = infer_config(converted, base, what)
        if base is not None:
            check_for_base(config, base, what)
        return config, torch_to_flax(converted, controlnet_shapes(config), what=what, names=names.after(origin))
    if "controlnet_cond_embedding.weight" in sd or "controlnet_cond_embedding.conv_in.weight" in sd:
        sparse = any("motion_modules" in k.split(".") for k in sd)
        what = f"{what} ({'SparseCtrl' if sparse else 'diffusers-named ControlNet'} single file)"
        config = infer_config(_rename_original_motion(sd, what)[0], base, what)
        if base is not None:
            check_for_base(config, base, what)
        return config, convert_controlnet_state_dict(sd, config, what=what, names=names)
    raise CheckpointError(f"{what}: not a ControlNet or SparseCtrl checkpoint ({_describe(sd)})")


def load_controlnet(path: str | os.PathLike, base: UNetConfig | None = None) -> tuple[ControlNetConfig, Params]:
    """A control model from a diffusers folder, a ControlNet 1.x single file or an original SparseCtrl file.

    `base`: the UNet it will steer; when given, a control model made for other channels or another text
    width is refused in one line, and the heads / GroupNorm groups of a single file come from it.
    """
    path = os.fspath(path)
    if fs.isdir(path):
        return _load_folder(path, base)
    if not fs.isfile(path):
        raise CheckpointError(f"{path}: no such file or folder")
    return controlnet_from_state_dict(_read_file(path), base, what=path)
