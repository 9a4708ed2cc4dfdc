"""Motion modules: PyTorch files (original AnimateDiff and diffusers) <-> params.

Our motion-module params are named after diffusers' `UNetMotionModel` / `MotionAdapter`
(`down_blocks_0/motion_modules_1/transformer_blocks_0/attn1/to_q/kernel`). The original
AnimateDiff checkpoints (`mm_sd_v15.ckpt`, `mm_sd_v15_v2.ckpt`, `v3_sd15_mm.ckpt`) name the
same weights differently; the renaming is a handful of segment rules (`original_to_diffusers_key`,
checked against diffusers' own `convert_animatediff_checkpoint_to_diffusers` in the tests):

    ...motion_modules.J.temporal_transformer.X        -> ...motion_modules.J.X
    transformer_blocks.K.attention_blocks.{0,1}        -> transformer_blocks.K.attn{1,2}
    transformer_blocks.K.norms.{0,1} / .ff_norm        -> transformer_blocks.K.norm{1,2} / .norm3
    attention_blocks.{0,1}.pos_encoder.pe [1, L, C]     -> (dropped: the fixed sinusoidal table,
                                                          checked, its length L says the version)

AnimateDiff-SDXL (`mm_sdxl_v10_beta.ckpt`, diffusers' sdxl-beta `MotionAdapter`) uses the same naming
with motion modules at SDXL's 3 levels and none in the mid block: its shapes say so (`motion_family`).

Hotshot-XL (`hsxl_temporal_layers.safetensors`, or the temporal layers inside its `unet/` UNet3D) holds
the same block as the original AnimateDiff under another module name (hotshot_xl/models/unet_blocks.py
`self.temporal_attentions`, transformer_temporal.py `TransformerTemporal` with no `temporal_transformer`
wrapper, `PositionalEncoding.positional_encoding`); its names say which it is (`motion_origin`):

    ...temporal_attentions.J.X                          -> ...motion_modules.J.X   (X: the rules above)
    attention_blocks.{0,1}.pos_encoder.positional_encoding [1, 24, C] -> (dropped, checked, as `pe`)

A motion module is held as a *partial* params tree with only the `motion_modules_*` subtrees;
`merge_motion` inserts it into a base (SD1.5 / SDXL) UNet's params. LoRA files live in `lora_formats`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    FileNames,
    Params,
    StateDict,
    check_tree,
    find_weights_file,
    flax_to_torch,
    load_state_dict,
    save_state_dict,
    torch_to_flax,
)
from animatediff_jax.io import fs
from animatediff_jax.models.config import Family, MotionConfig, MotionVersion, UNetConfig
from animatediff_jax.models.layers import sinusoidal_table
from animatediff_jax.models.shapes import is_motion_path, motion_shapes, unet_shapes

PE_SUFFIXES = (".pos_embed.pe", ".pos_encoder.pe", ".pos_encoder.positional_encoding")
# Hotshot-XL's name for the lists of motion modules (diffusers' and the original AnimateDiff's: `motion_modules`).
HOTSHOT_MODULES = "temporal_attentions"
HOTSHOT = "HotshotXL"  # the naming's name in messages


def _sinusoid(length: int, dim: int) -> np.ndarray:
    return np.asarray(sinusoidal_table(length, dim), np.float32)


def position_table(length: int, dim: int) -> np.ndarray:
    """The `[length, dim]` sinusoidal table as PyTorch computes it (the original's `PositionalEncoding`,
    diffusers' `SinusoidalPositionalEmbedding`), so written `pe` buffers match theirs bit for bit.

    XLA's and torch's exp/sin/cos differ by an ulp here and there (up to ~2e-6); without torch
    the table is computed with ours (`layers.sinusoidal_table`).
    """
    try:
        import torch
    except ImportError:
        return _sinusoid(length, dim)
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe.numpy()


def _pe_tolerance(v: np.ndarray) -> float:
    """A table stored in half precision carries its rounding error: allow it, nothing more."""
    import ml_dtypes

    if np.array_equal(v, v.astype(ml_dtypes.bfloat16).astype(np.float32)):  # bf16 values are fp16 ones too
        return 8e-3
    if np.array_equal(v, v.astype(np.float16).astype(np.float32)):
        return 1e-3  # fp16: half an ulp near 1 is 2.4e-4; torch and we may round to neighbours
    return 1e-4


def split_position_tables(state_dict: Mapping[str, np.ndarray]) -> tuple[StateDict, int | None]:
    """Removes the (deterministic) sinusoidal `pe` buffers, checking they hold the standard table.

    Returns the remaining state dict and the table length (24 for v1, 32 for v2/v3), or None.
    Tables stored in fp16/bf16 are compared with their rounding error allowed.
    """
    rest, lengths = {}, set()
    for k, v in state_dict.items():
        if not k.endswith(PE_SUFFIXES):
            rest[k] = v
            continue
        v = np.asarray(v, np.float32).reshape(v.shape[-2], v.shape[-1])
        expected = _sinusoid(*v.shape)
        if not np.allclose(v, expected, rtol=0, atol=_pe_tolerance(v)):
            raise CheckpointError(f"{k}: position table is not the sinusoidal table AnimateDiff uses")
        lengths.add(v.shape[0])
    if len(lengths) > 1:
        raise CheckpointError(f"position tables of different lengths in one checkpoint: {sorted(lengths)}")
    return rest, (lengths.pop() if lengths else None)


# ------------------------------------------------------------------ key renaming

_TO_DIFFUSERS = {
    ("attention_blocks", "0"): "attn1",
    ("attention_blocks", "1"): "attn2",
    ("norms", "0"): "norm1",
    ("norms", "1"): "norm2",
}
_TO_ORIGINAL = {v: k for k, v in _TO_DIFFUSERS.items()}


def original_to_diffusers_key(key: str) -> str:
    """An original AnimateDiff motion-module key (or module name) -> diffusers' name for it.

    Works on dot segments, so only whole names are renamed; keys outside motion modules and
    keys already in diffusers naming pass through unchanged.
    """
    parts, out, i = key.split("."), [], 0
    while i < len(parts):
        pair = tuple(parts[i : i + 2])
        if parts[i] == "temporal_transformer":
            i += 1
        elif pair in _TO_DIFFUSERS:
            out.append(_TO_DIFFUSERS[pair])
            i += 2
        else:
            out.append("norm3" if parts[i] == "ff_norm" else parts[i])
            i += 1
    return ".".join(out)


def diffusers_to_original_key(key: str) -> str:
    """Inverse of `original_to_diffusers_key` for motion-module keys (others pass unchanged)."""
    parts = key.split(".")
    if "motion_modules" not in parts:
        return key
    j = parts.index("motion_modules") + 2
    out = parts[:j] + ["temporal_transformer"]
    for p in parts[j:]:
        if p in _TO_ORIGINAL:
            out.extend(_TO_ORIGINAL[p])
        else:
            out.append("ff_norm" if p == "norm3" else p)
    return ".".join(out)


def hotshot_to_diffusers_key(key: str) -> str:
    """A Hotshot-XL temporal-layer key (`down_blocks.I.temporal_attentions.J.X`, X in the original
    AnimateDiff's inner naming) -> diffusers' name for it; other keys pass unchanged."""
    parts = key.split(".")
    if HOTSHOT_MODULES not in parts:
        return key
    return original_to_diffusers_key(".".join("motion_modules" if p == HOTSHOT_MODULES else p for p in parts))


def diffusers_to_hotshot_key(key: str) -> str:
    """Inverse of `hotshot_to_diffusers_key` for motion-module keys (others pass unchanged)."""
    parts = diffusers_to_original_key(key).split(".")
    if "motion_modules" not in parts:
        return key
    return ".".join(HOTSHOT_MODULES if p == "motion_modules" else p for p in parts if p != "temporal_transformer")


def _is_motion_key(key: str) -> bool:
    parts = key.split(".")
    return "motion_modules" in parts or HOTSHOT_MODULES in parts


def motion_origin(keys) -> str:
    """"hotshot_xl" when motion keys are named as Hotshot-XL's (`temporal_attentions`), else "animatediff"."""
    return "hotshot_xl" if any(HOTSHOT_MODULES in k.split(".") for k in keys) else "animatediff"


# ------------------------------------------------------------------ versions / configs


def _describe(sd: Mapping[str, Any], n: int = 4) -> str:
    keys = sorted(sd)
    return f"{len(keys)} keys, e.g. {', '.join(keys[:n])}" if keys else "no tensors"


def _pe_length(state_dict: Mapping[str, Any]) -> int | None:
    lengths = {tuple(np.shape(v))[-2] for k, v in state_dict.items() if k.endswith(PE_SUFFIXES)}
    if len(lengths) > 1:
        raise CheckpointError(f"position tables of different lengths in one checkpoint: {sorted(lengths)}")
    return lengths.pop() if lengths else None


_DOWN_MOTION = re.compile(r"down_blocks\.(\d+)\.(?:motion_modules|temporal_attentions)\.")


def motion_family(state_dict: Mapping[str, Any]) -> Family:
    """The base model a motion module's keys (either naming) were made for: `"sdxl"` when they sit in
    exactly 3 down levels (SDXL's 320/640/1280) and not in the mid block, else `"sd15"` (SD1.5's 4
    levels; our tiny test UNets' 2)."""
    levels = {int(m[1]) for k in state_dict if (m := _DOWN_MOTION.match(k))}
    mid = any(k.startswith("mid_block.motion_modules.") for k in state_dict)
    return "sdxl" if levels == {0, 1, 2} and not mid else "sd15"


def detect_motion_version(state_dict: Mapping[str, Any], what: str = "state dict") -> MotionVersion:
    """`"hotshot_xl"` for Hotshot-XL's names (`motion_origin`); `"v2"` if there is a mid-block motion module;
    `"sdxl_beta"` for SDXL's 3 levels (`motion_family`); else `"v1"` for 24-frame position tables; else `"v3"`."""
    motion = [k for k in state_dict if _is_motion_key(k)]
    if not motion:
        raise CheckpointError(f"{what}: not a motion module (no `motion_modules` keys; found {_describe(state_dict)})")
    if motion_origin(motion) == "hotshot_xl":
        return "hotshot_xl"
    if any(k.startswith("mid_block.motion_modules.") for k in motion):
        return "v2"
    if motion_family(motion) == "sdxl":
        return "sdxl_beta"
    return "v1" if _pe_length(state_dict) == 24 else "v3"


def describe_motion(motion: MotionConfig, channels: tuple[int, ...] | None) -> str:
    """E.g. "AnimateDiff-SDXL (3 levels, 320/640/1280)", "HotshotXL (3 levels, ...)", "AnimateDiff SD1.5 v2
    (4 levels, ..., mid-block module)": what a motion module is, in messages (`channels`: its down levels')."""
    where = f"{len(channels)} levels, {'/'.join(map(str, channels))}" if channels else ""
    if motion.mid_block:
        where += ", mid-block module" if where else "mid-block module"
    if motion.origin == "hotshot_xl":
        name = HOTSHOT
    else:
        name = "AnimateDiff-SDXL" if motion.family == "sdxl" else f"AnimateDiff SD1.5 {motion.version}"
    return f"{name} ({where})" if where else name


def _motion_state_dict(
    sd: Mapping[str, np.ndarray], what: str, ignore_spatial: bool
) -> tuple[StateDict, str, FileNames]:
    """The motion-module keys of a file in diffusers naming (pe tables kept), the naming found, and
    how the file names them (for errors in its words)."""
    motion = {k: v for k, v in sd.items() if _is_motion_key(k)}
    if not motion:
        raise CheckpointError(f"{what}: not a motion module (no `motion_modules` keys; found {_describe(sd)})")
    lora = [k for k in motion if "lora" in k]
    if lora:
        raise CheckpointError(
            f"{what}: this is a MotionLoRA, not a motion module ({_describe(dict.fromkeys(lora))}); "
            "give it as a MotionLoRA (motion_module_lora_configs / model.init_lora)"
        )
    other = [k for k in sd if k not in motion]
    if other and not ignore_spatial:
        raise CheckpointError(
            f"{what}: holds {len(other)} keys besides the motion modules (e.g. {', '.join(sorted(other)[:4])}); "
            "pass ignore_spatial=True to take only the motion modules of a whole-UNet checkpoint"
        )
    hotshot = motion_origin(motion) == "hotshot_xl"
    original = any("temporal_transformer" in k.split(".") for k in motion)
    if hotshot:
        naming, to_ours, to_theirs = HOTSHOT, hotshot_to_diffusers_key, diffusers_to_hotshot_key
    elif original:
        naming, to_ours, to_theirs = "original AnimateDiff", original_to_diffusers_key, diffusers_to_original_key
    else:
        return motion, "diffusers", FileNames()
    origin = {to_ours(k): k for k in motion}
    if len(origin) != len(motion) or (hotshot and any("motion_modules" in k.split(".") for k in motion)):
        raise CheckpointError(f"{what}: mixes {naming} and other motion-module names")
    renamed = {name: motion[k] for name, k in origin.items()}
    return renamed, naming, FileNames(origin, to_theirs)


def motion_blocks(state_dict: Mapping[str, Any]) -> tuple[tuple[int, ...], int] | None:
    """`(channels per down block, motion modules per down block)` of diffusers-named motion keys, read
    off their `proj_in` weights (None where the keys do not say)."""
    rx = re.compile(r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.proj_in\.weight$")
    found = {(int(m[1]), int(m[2])): np.shape(v)[0] for k, v in state_dict.items() if (m := rx.match(k))}
    levels = sorted({i for i, _ in found})
    if not levels or levels != list(range(len(levels))):
        return None
    layers = len({j for i, j in found if i == 0})
    return tuple(int(found[(i, 0)]) for i in levels if (i, 0) in found), layers


@dataclasses.dataclass(frozen=True)
class MotionFile:
    """What a PyTorch motion-module file says: its tensors in diffusers naming (position tables
    checked and removed), the layout it records (`recorded` names the `MotionConfig` fields it
    holds; the others are the detected release's defaults), the UNet blocks a MotionAdapter folder
    names, and a description for messages. `checkpoints.load.load_motion` fits it to a base UNet."""

    state_dict: StateDict
    motion: MotionConfig
    recorded: frozenset[str]
    blocks: tuple[tuple[int, ...], int] | None
    what: str
    names: FileNames = dataclasses.field(default_factory=FileNames)  # the file's own key names


def read_motion_file(path: str | os.PathLike, *, ignore_spatial: bool = False) -> MotionFile:
    """An original AnimateDiff `.ckpt`/`.safetensors` (optionally in a `state_dict` wrapper), a
    Hotshot-XL temporal-layers file (or its whole `unet/` UNet3D with `ignore_spatial`), a
    diffusers-named weight file or a diffusers `MotionAdapter` folder (its `config.json` read).

    A file's version is detected (`detect_motion_version`): it records whose modules they are (its
    naming: HotshotXL or AnimateDiff), the mid-block module, the family (SD1.5 or SDXL: its levels)
    and, through its `pe` tables, the position-table length. No format records the GroupNorm semantics
    (`norm_per_frame`): for SD1.5 they mean the original's per-frame norms; the SDXL beta's are across
    frames, HotshotXL's per frame (their layouts), recorded as such.
    """
    path = os.fspath(path)
    if fs.isdir(path):
        return _read_motion_adapter(path)
    sd = load_state_dict(path)
    motion, naming, names = _motion_state_dict(sd, path, ignore_spatial)
    version = "hotshot_xl" if naming == HOTSHOT else detect_motion_version(motion, path)
    length = _pe_length(motion)
    rest, _ = split_position_tables(motion)
    recorded = {"mid_block", "family", "origin"} | ({"max_positions"} if length is not None else set())
    layout = MotionConfig.for_version(version, **({"max_positions": length} if length else {}))
    if layout.family == "sdxl":
        recorded.add("norm_per_frame")
    return MotionFile(rest, layout, frozenset(recorded), None, f"{path} ({naming} motion module, {version})", names)


def motion_params(mf: MotionFile, config: UNetConfig) -> Params:
    """The file's tensors as motion params of `config` (every key and shape checked)."""
    return torch_to_flax(mf.state_dict, motion_shapes(config), what=mf.what, names=mf.names)


def _adapter_motion_config(cfg: Mapping[str, Any], what: str) -> tuple[MotionConfig, tuple, int]:
    def uniform(name: str, default):
        v = cfg.get(name, default)
        if isinstance(v, (list, tuple)):
            flat = {x for item in v for x in (item if isinstance(item, (list, tuple)) else [item])}
            if len(flat) != 1:
                raise CheckpointError(f"{what}: per-block {name}={v} is not supported")
            v = flat.pop()
        return int(v)

    if cfg.get("conv_in_channels"):
        raise CheckpointError(f"{what}: MotionAdapters with their own conv_in (conv_in_channels) are not supported")
    if uniform("motion_mid_block_layers_per_block", 1) != 1:
        raise CheckpointError(f"{what}: only one mid-block motion module is supported")
    layers = uniform("motion_transformer_layers_per_block", 1)
    if cfg.get("use_motion_mid_block", True) and uniform("motion_transformer_layers_per_mid_block", 1) != layers:
        raise CheckpointError(f"{what}: mid-block motion module depth differs from the others")
    channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    mid = bool(cfg.get("use_motion_mid_block", True))
    sdxl = len(channels) == 3 and not mid  # AnimateDiff-SDXL (`motion_family`): its norms span the frames
    mm = MotionConfig(
        heads=uniform("motion_num_attention_heads", 8),
        num_layers=layers,
        max_positions=int(cfg.get("motion_max_seq_length", 32)),
        mid_block=mid,
        norm_num_groups=int(cfg.get("motion_norm_num_groups", 32)),
        **({"family": "sdxl", "norm_per_frame": False} if sdxl else {}),
    )
    return mm, channels, uniform("motion_layers_per_block", 2)


def _read_motion_adapter(folder: str) -> MotionFile:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with fs.open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers MotionAdapter folder)") from None
    cls = cfg.get("_class_name", "MotionAdapter")
    if cls != "MotionAdapter":
        raise CheckpointError(f"{folder}: config.json describes a {cls}, not a MotionAdapter")
    mm, channels, layers = _adapter_motion_config(cfg, folder)
    weights = find_weights_file(folder)
    motion, _, names = _motion_state_dict(load_state_dict(weights), weights, ignore_spatial=False)
    rest, _ = split_position_tables(motion)
    recorded = frozenset(f.name for f in dataclasses.fields(MotionConfig)) - (
        {"norm_per_frame"} if mm.family == "sd15" else set())
    return MotionFile(rest, mm, recorded, (channels, layers), f"{weights} (diffusers MotionAdapter, {mm.version})",
                      names)


# ------------------------------------------------------------------ merging


def merge_motion(unet_params: Mapping[str, Any], motion_params: Mapping[str, Any], config: UNetConfig) -> Params:
    """A base UNet's params with the motion modules inserted (replacing any it had).

    The result must have exactly `unet_shapes(config)`'s structure and shapes: a motion
    module made for other channels, a missing/extra mid-block module or spatial weights
    that do not fit are reported by name.
    """
    expected = flatten_dict(unet_shapes(config))
    motion = flatten_dict(motion_params)
    stray = ["/".join(p) for p in motion if not is_motion_path(p)]
    if stray:
        raise CheckpointError(f"motion params hold non-motion entries: {', '.join(sorted(stray)[:5])}")
    wrong = []
    for p, v in motion.items():
        if p[-2:] == ("norm", "scale") and p in expected and tuple(np.shape(v)) != tuple(expected[p].shape):
            wrong.append(f"{'/'.join(p[:-2])} has {np.shape(v)[0]} channels, the base UNet {expected[p].shape[0]}")
    if wrong:
        raise CheckpointError(
            "motion module made for a different base model: "
            + "; ".join(sorted(wrong)[:4])
            + f" ({len(wrong)} modules)"
        )
    merged = {p: v for p, v in flatten_dict(unet_params).items() if not is_motion_path(p)}
    merged.update(motion)
    check_tree("UNet params with motion modules", merged, expected, noun="the motion module")
    return unflatten_dict(merged)


# ------------------------------------------------------------------ writing


def check_motion_params(motion_params: Mapping[str, Any], config: UNetConfig, what: str) -> None:
    """Raises a `CheckpointError` naming the keys where `motion_params` does not fit `config`'s motion modules."""
    check_tree(what, flatten_dict(motion_params), flatten_dict(motion_shapes(config)), noun="it")


def _checked_motion_state_dict(motion_params: Mapping[str, Any], config: UNetConfig, dtype) -> StateDict:
    """Diffusers-named motion state dict (no pe tables) after checking the params fit `config`."""
    check_motion_params(motion_params, config, "motion params to save")
    return flax_to_torch(motion_params, dtype=dtype)


def _blocks_with_pe(sd: Mapping[str, np.ndarray]) -> dict[str, int]:
    """`{"...motion_modules.J.transformer_blocks.K": channels}` for every temporal block."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.*\.motion_modules\.\d+\.transformer_blocks\.\d+)\.norm1\.weight$", k)
        if m:
            out[m.group(1)] = int(np.shape(v)[0])
    return out


def motion_state_dict(
    motion_params: Mapping[str, Any], config: UNetConfig, layout: str = "original", dtype: Any = np.float32
) -> StateDict:
    """Motion params as a PyTorch state dict: `layout="original"` (AnimateDiff's naming, two
    `pos_encoder.pe` per temporal block), `"hotshot_xl"` (Hotshot-XL's `hsxl_temporal_layers` naming,
    two `pos_encoder.positional_encoding`) or `"diffusers"` (MotionAdapter's, one `pos_embed.pe`)."""
    if layout not in _EXPORT_NAMES:
        raise ValueError(f"unknown motion-module layout {layout!r}: expected one of {sorted(_EXPORT_NAMES)}")
    hotshot = config.motion is not None and config.motion.origin == "hotshot_xl"
    if hotshot and layout != "hotshot_xl":  # (read back, the file would be taken for AnimateDiff's)
        raise ValueError(f"HotshotXL motion modules are written in HotshotXL's naming (layout 'hotshot_xl'), "
                         f"not {layout!r}")
    if layout == "hotshot_xl" and not hotshot:
        raise ValueError(f"layout 'hotshot_xl' is for HotshotXL motion modules, not {config.motion and config.motion.version}")
    sd = _checked_motion_state_dict(motion_params, config, dtype)
    rename, table = _EXPORT_NAMES[layout]
    tables: StateDict = {}
    for block, channels in _blocks_with_pe(sd).items():
        pe = position_table(config.motion.max_positions, channels)[None].astype(dtype)
        if layout == "diffusers":
            tables[f"{block}.{table}"] = pe
        else:
            for i in (0, 1):
                tables[f"{rename(block)}.attention_blocks.{i}.{table}"] = pe
    return {**{rename(k): v for k, v in sd.items()}, **tables}


# layout -> (our key -> its key, the name of its position tables)
_EXPORT_NAMES = {
    "diffusers": (lambda k: k, "pos_embed.pe"),
    "original": (diffusers_to_original_key, "pos_encoder.pe"),
    "hotshot_xl": (diffusers_to_hotshot_key, "pos_encoder.positional_encoding"),
}


def save_motion_module_original(
    path: str | os.PathLike, motion_params: Mapping[str, Any], config: UNetConfig, dtype: Any = np.float32
) -> None:
    """Writes motion params as an original AnimateDiff motion module (`mm_sd_v15*.ckpt` naming).

    `.ckpt` is written with `torch.save` (a plain state dict, as the released files),
    `.safetensors` without torch. Each temporal attention gets its `pos_encoder.pe` table
    `[1, config.motion.max_positions, C]`, as the original model holds them.
    """
    save_state_dict(path, motion_state_dict(motion_params, config, "original", dtype))


def save_motion_module_hotshot(
    path: str | os.PathLike, motion_params: Mapping[str, Any], config: UNetConfig, dtype: Any = np.float32
) -> None:
    """Writes HotshotXL motion params as Hotshot-XL's `hsxl_temporal_layers.safetensors` (its key set:
    `down_blocks.I.temporal_attentions.J.*`, `up_blocks.I.temporal_attentions.J.*`, position tables included)."""
    save_state_dict(path, motion_state_dict(motion_params, config, "hotshot_xl", dtype))


def motion_adapter_kwargs(config: UNetConfig) -> dict:
    """`MotionAdapter(**kwargs)` for our motion layout (what its `config.json` holds)."""
    mm = config.motion
    return {
        "block_out_channels": list(config.block_out_channels),
        "motion_layers_per_block": config.layers_per_block,
        "motion_transformer_layers_per_block": mm.num_layers,
        "motion_mid_block_layers_per_block": 1,
        "motion_transformer_layers_per_mid_block": mm.num_layers,
        "motion_num_attention_heads": mm.heads,
        "motion_norm_num_groups": mm.norm_num_groups,
        "motion_max_seq_length": mm.max_positions,
        "use_motion_mid_block": mm.mid_block,
        "conv_in_channels": None,
    }


def motion_adapter_config(config: UNetConfig) -> dict:
    """diffusers' `MotionAdapter` `config.json` for our motion layout."""
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = "0.42.0"
    return {"_class_name": "MotionAdapter", "_diffusers_version": version, **motion_adapter_kwargs(config)}


def save_motion_adapter(
    folder: str | os.PathLike, motion_params: Mapping[str, Any], config: UNetConfig, dtype: Any = np.float32
) -> None:
    """Writes a diffusers `MotionAdapter` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

    The key set is exactly `MotionAdapter(**config).state_dict()`'s, `pos_embed.pe` buffers
    included, so `MotionAdapter.from_pretrained(folder)` reports nothing missing or unexpected.
    The folder is written whole or not at all (`io.fs.atomic_folder`).
    """
    from animatediff_jax.io.fs import atomic_folder

    sd = motion_state_dict(motion_params, config, "diffusers", dtype)
    with atomic_folder(folder) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(motion_adapter_config(config), f, indent=2)
        save_state_dict(os.path.join(tmp, "diffusion_pytorch_model.safetensors"), sd)


def motion_version_of(path: str) -> str:
    """A motion module's layout guessed from its released file name, for when the file is not here
    (`compile`): `mm_sd_v15_v2.ckpt` v2, `v3_sd15_mm.ckpt` v3, `mm_sd_v14.ckpt` / `mm_sd_v15.ckpt` v1,
    `mm_sdxl_v10_beta.ckpt` sdxl_beta, `hsxl_temporal_layers.safetensors` hotshot_xl; v2 (Lightning,
    AnimateLCM) when the name says nothing."""
    name = os.path.basename(path.rstrip("/")).lower()
    if "hsxl" in name or "hotshot" in name:
        return "hotshot_xl"
    if "sdxl" in name:
        return "sdxl_beta"
    found = re.findall(r"(?<![a-z0-9])v([123])(?!\d)|_v([123])(?!\d)", name)
    if found:
        return "v" + [a or b for a, b in found][-1]
    return "v1" if re.search(r"v1[45]", name) else "v2"
