"""The two entry points every command reads adapters with: `load_motion` and `load_lora`.

Each takes our params files (`params_io`: converted, trained or exported here) and every PyTorch
format the readers know (`motion`: original AnimateDiff, diffusers, MotionAdapter folders;
`lora_formats`: original, diffusers/PEFT, kohya), and checks what it read against the model it is
for: the layout (`fit`), the kind, every key and shape. A file that holds something other than what
was asked for is an error saying what it holds (`describe`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from animatediff_jax.checkpoints import lora_formats, motion, params_io
from animatediff_jax.checkpoints.params_io import KIND_NAMES, LORA_KINDS, MOTION_MODULE, file_kind, params_file
from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    Misfit,
    ModelSizeError,
    Params,
    check_tree,
    load_state_dict,
    size_difference,
)
from animatediff_jax.io import fs
from animatediff_jax.lora import LoraTree, kernel_paths, lora_layers, lora_rank
from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.config import MotionConfig, MotionVersion, UNetConfig, sd15_unet, sdxl_unet
from animatediff_jax.models.shapes import clip_shapes, motion_shapes, motion_subtree, sdxl_text_shapes, unet_shapes

MOTION_FIELDS = frozenset(f.name for f in dataclasses.fields(MotionConfig))


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA with what it was made for: `unet` (and optional `text_encoder`) trees of
    `{"down", "up"[, "alpha"]}` layers, its kind, the configs it fits, the file format it came in."""

    unet: LoraTree
    kind: str  # "motion_lora" | "domain_adapter" | "lora"
    unet_config: UNetConfig
    text_encoder: LoraTree | None = None
    text_config: CLIPTextConfig | None = None
    source: str = "animatediff-jax"  # or the PyTorch naming: "original AnimateDiff" | "diffusers" | "kohya"
    scale: float = 1.0  # the scale training applied it at (recorded in training's exports)
    text_encoder_2: LoraTree | None = None  # SDXL's second text encoder (kohya `lora_te2_`)
    text_config_2: CLIPTextConfig | None = None


# ------------------------------------------------------------------ what a file holds


def _describe_params(tree: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    kind = file_kind(meta)
    if kind == "sd15":
        return f"a converted SD1.5 model ({', '.join(sorted(tree))})"
    unet = tree.get("unet", {})
    if kind == MOTION_MODULE:
        n = len(traverse_util.flatten_dict(unet))
        try:
            layout = f"{params_io.config_from_dict(UNetConfig, meta['unet_config']).motion.version} layout, "
        except (KeyError, TypeError, AttributeError, CheckpointError):
            layout = ""
        return f"a motion module ({layout}{n} tensors)"
    if kind in LORA_KINDS:
        layers = lora_layers(unet)
        ranks = sorted({lora_rank(v) for v in layers.values()})
        text = f", and {len(lora_layers(tree['text_encoder']))} text-encoder layers" if tree.get("text_encoder") else ""
        return f"a {KIND_NAMES[kind]} ({len(layers)} UNet layers, rank {'/'.join(map(str, ranks))}{text})"
    return f"an animatediff-jax params file of kind {kind!r} (entries {', '.join(sorted(tree))})"


def _naming(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.")) or ".lora_A." in k for k in keys):
        return "diffusers"
    if any("temporal_transformer" in k for k in keys) or any(".processor." in k for k in keys):
        return "original AnimateDiff"
    return "diffusers"


def describe_state_dict(sd: Mapping[str, Any]) -> tuple[str, str]:
    """`(kind, words)` for a PyTorch state dict: what a user would call it."""
    keys = sorted(sd)
    if not keys:
        return "empty", "no tensors"
    lora = [k for k in keys if "lora" in k]
    mm = [k for k in keys if "motion_modules" in k or motion.HOTSHOT_MODULES in k]
    if lora:
        inside = [k for k in lora if "motion_modules" in k]
        n_text = sum(k.startswith(("text_encoder.", "lora_te_", "lora_te1_", "lora_te2_")) for k in lora)
        text = n_text > 0
        naming = _naming(lora)
        if inside and len(inside) == len(lora):
            return "motion_lora", f"a MotionLoRA ({naming} naming, {len(lora)} tensors)"
        if not inside and not text:
            return "spatial_lora", f"a spatial LoRA (a domain adapter or an image LoRA; {naming} naming, {len(lora)} tensors)"
        spatial = len(inside) + n_text < len(lora)
        parts = [w for w, has in (("motion modules", inside), ("spatial layers", spatial), ("the text encoder", text))
                 if has]
        return "lora", f"a LoRA on {' and '.join(parts)} ({naming} naming, {len(lora)} tensors)"
    if mm:
        naming = ("original AnimateDiff" if any("temporal_transformer" in k for k in mm) else
                  motion.HOTSHOT if motion.motion_origin(mm) == "hotshot_xl" else "diffusers")
        try:
            version = f", {motion.detect_motion_version(sd)} layout"
        except CheckpointError:
            version = ""
        whole = " inside a whole UNet" if len(mm) < len(keys) else ""
        return "motion_module", f"a motion module ({naming} naming{version}, {len(mm)} tensors){whole}"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd15", "an SD1.5 single-file (LDM) checkpoint"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "unet", f"a UNet without motion modules ({len(keys)} tensors)"
    return "unknown", f"{len(keys)} tensors, e.g. {', '.join(keys[:3])}"


def describe(path: str | os.PathLike) -> tuple[str, str]:
    """`(kind, words)`: what a file or folder holds, for error messages (kinds as in `describe_state_dict`)."""
    path = os.fspath(path)
    p = params_file(path)
    if p is not None:
        tree, meta = params_io.load_params(p)
        return file_kind(meta) or "unknown", "an animatediff-jax params file holding " + _describe_params(tree, meta)
    if fs.isdir(path):
        if fs.isfile(os.path.join(path, "model_index.json")):
            return "sd15", "a diffusers pipeline folder"
        cfg = os.path.join(path, "config.json")
        if fs.isfile(cfg):
            try:
                with fs.open(cfg) as f:
                    cls = json.load(f).get("_class_name", "unknown model")
            except (OSError, ValueError):
                cls = "unreadable config"
            return ("motion_module" if cls == "MotionAdapter" else "unknown"), f"a diffusers {cls} folder"
        return "unknown", "a folder with no config.json"
    try:
        return describe_state_dict(load_state_dict(path))
    except CheckpointError as e:
        return "unreadable", str(e)


def _not_a(path: str | os.PathLike, part: str, holds: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: no {part} in it: it holds {holds}")


# ------------------------------------------------------------------ motion modules


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def _norms(per_frame: bool) -> str:
    return "per frame (the original's)" if per_frame else "across frames (diffusers')"


def fit(found: UNetConfig, base: UNetConfig, what: str, recorded: frozenset[str] = MOTION_FIELDS,
        noun: str = "motion module") -> UNetConfig:
    """The UNet a motion module (or a MotionLoRA: `noun`) runs in: `base` with the module's layout.
    `found` is the module's config, of whose motion fields the file records `recorded` (the others
    came from `base`).

    The blocks must be the base's (else a `ModelSizeError`: made for another model size), and every
    recorded layout field (mid-block module, table length, heads, depth, groups) the base's motion
    layout when it has one: else an error naming each difference. The GroupNorm semantics
    (`norm_per_frame`) a file records are how its weights were trained, so the file wins over the
    base's, and a note says so.
    """
    if found.motion is not None and found.motion.family != base.family:
        raise _other_family(what, found.motion, found.block_out_channels, base, noun)
    if found.motion is not None and base.motion is not None and found.motion.origin != base.motion.origin:
        raise _other_origin(what, found.motion, found.block_out_channels, base.motion, noun)
    diffs = [f"{n} {getattr(found, n)} (base: {getattr(base, n)})"
             for n in ("block_out_channels", "layers_per_block") if getattr(found, n) != getattr(base, n)]
    if diffs:
        raise ModelSizeError(f"{what}: a {found.motion.version} {noun} for another model size: {'; '.join(diffs)}")
    if base.motion is not None:
        diffs += [f"motion {n} {getattr(found.motion, n)} (base: {getattr(base.motion, n)})"
                  for n in sorted(recorded - {"norm_per_frame"})
                  if getattr(found.motion, n) != getattr(base.motion, n)]
    if diffs:
        raise CheckpointError(f"{what}: a {found.motion.version} {noun} that does not fit the base UNet: "
                              f"{'; '.join(diffs)}")
    if base.motion is not None and "norm_per_frame" in recorded and found.motion.norm_per_frame != base.motion.norm_per_frame:
        _note(f"{what}: its motion modules were trained with GroupNorm {_norms(found.motion.norm_per_frame)}; "
              f"running them so, not {_norms(base.motion.norm_per_frame)} as configured")
    return base.replace(motion=found.motion, spatial_norm_per_frame=found.spatial_norm_per_frame)


def _other_family(what: str, found: MotionConfig, channels: tuple[int, ...] | None, base: UNetConfig,
                  noun: str = "motion module") -> ModelSizeError:
    """One line naming both sides: an SD1.5 motion module on an SDXL base, or the reverse."""
    expects = f" expecting {motion.HOTSHOT} motion modules" if base.motion and base.motion.origin == "hotshot_xl" else ""
    return ModelSizeError(f"{what}: the {noun} is {motion.describe_motion(found, channels)} "
                          f"but the base is {base.describe()}{expects}")


def _other_origin(what: str, found: MotionConfig, channels: tuple[int, ...] | None, expected: MotionConfig,
                  noun: str = "motion module") -> CheckpointError:
    """One line naming both sides: HotshotXL's temporal layers where AnimateDiff's are expected, or the
    reverse (same base, same shapes, but trained in differently normalised UNets)."""
    return CheckpointError(f"{what}: the {noun} is {motion.describe_motion(found, channels)} but the base expects "
                           f"{motion.describe_motion(expected, None)} motion modules")


def _motion_defaults(base: UNetConfig) -> MotionConfig:
    """The motion layout fields a PyTorch file does not record: the base's motion layout, else its
    family's convention (SD1.5: the spatial heads and groups; SDXL: the beta's 8 heads, across-frame norms)."""
    if base.motion is not None:
        return base.motion
    if base.family == "sdxl":
        return MotionConfig.for_version("sdxl_beta", norm_num_groups=base.norm_num_groups)
    return MotionConfig(heads=base.level_heads(0), norm_num_groups=base.norm_num_groups)


def _motion_params_file(path: str) -> tuple[Params, UNetConfig]:
    tree, meta = params_io.load_params(path)
    kind, unet = file_kind(meta), tree.get("unet")
    if kind not in (MOTION_MODULE, "sd15") or unet is None or "unet_config" not in meta:
        raise _not_a(path, "motion module", _describe_params(tree, meta))
    config = params_io.config_from_dict(UNetConfig, meta["unet_config"])
    if config.motion is None:
        raise _not_a(path, "motion module", _describe_params(tree, meta) + " without motion modules")
    if kind == "sd15":  # a converted model with motion modules: take those
        unet, what = motion_subtree(unet), f"{path} (motion modules of a converted model)"
    else:
        what = f"{path} (animatediff-jax motion module)"
    check_tree(what, traverse_util.flatten_dict(unet), traverse_util.flatten_dict(motion_shapes(config)))
    return unet, config


def load_motion(
    path: str | os.PathLike, base: UNetConfig | None = None, *, ignore_spatial: bool = False
) -> tuple[Params, UNetConfig]:
    """`(motion params, UNet config)` of a motion module for the base UNet `base` (default: the
    config our files record; for PyTorch files SD1.5, or SDXL for an AnimateDiff-SDXL module).

    Our motion files record their whole layout and GroupNorm semantics; PyTorch files record the
    mid-block module and the table length, MotionAdapter folders the rest of the layout too; what a
    file does not record comes from `base.motion`, or without one from its family's convention (SD1.5:
    the spatial layers' heads and groups, per-frame norms; SDXL: the beta's). A module made for the other
    family (SD1.5 vs SDXL, told by its levels) is one line naming both. Then `fit`. The params hold only the
    `motion_modules_*` subtrees (`checkpoints.motion.merge_motion` inserts them into a UNet).
    `ignore_spatial` takes the motion modules out of a whole-UNet checkpoint.
    """
    path = os.fspath(path)
    p = params_file(path)
    if p is not None:
        params, found = _motion_params_file(p)
        return params, found if base is None else fit(found, base, p)
    try:
        mf = motion.read_motion_file(path, ignore_spatial=ignore_spatial)
    except CheckpointError:
        kind, holds = describe(path)
        if kind not in ("motion_module", "unreadable"):
            raise _not_a(path, "motion module", holds) from None
        raise
    if base is None:  # the released base of the file's family
        base = sdxl_unet() if mf.motion.family == "sdxl" else sd15_unet()
    if mf.motion.family != base.family:
        channels = mf.blocks[0] if mf.blocks else (motion.motion_blocks(mf.state_dict) or (None,))[0]
        raise _other_family(mf.what, mf.motion, channels, base)
    if mf.blocks is not None and mf.blocks != (tuple(base.block_out_channels), base.layers_per_block):
        raise _other_size(mf.what, mf.blocks, base)
    defaults = _motion_defaults(base)
    layout = mf.motion.replace(**{n: getattr(defaults, n) for n in MOTION_FIELDS - mf.recorded
                                  if n not in ("mid_block", "max_positions")})
    if "max_positions" not in mf.recorded and base.motion is not None:
        layout = layout.replace(max_positions=base.motion.max_positions)
    config = fit(base.with_motion(layout), base, mf.what, mf.recorded)
    try:
        return motion.motion_params(mf, config), config
    except ModelSizeError:
        raise
    except CheckpointError:  # blocks of other layer counts fit no better than other channels
        blocks = motion.motion_blocks(mf.state_dict)
        if blocks is not None and blocks != (tuple(base.block_out_channels), base.layers_per_block):
            raise _other_size(mf.what, blocks, base) from None
        raise


def _other_size(what: str, blocks: tuple[tuple[int, ...], int], base: UNetConfig) -> ModelSizeError:
    channels, layers = blocks
    return ModelSizeError(f"{what}: a motion module for another model size: blocks {channels} with {layers} "
                          f"layers each, the base UNet's {tuple(base.block_out_channels)} with {base.layers_per_block}")


# ------------------------------------------------------------------ LoRAs


def _scalar_alphas(tree: Any) -> Any:
    """`alpha` back to a 0-d array: params files store scalars with shape (1,) (`np.ascontiguousarray`)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: _scalar_alphas(v) for k, v in tree.items()}
    if "down" in out and "up" in out and "alpha" in out:
        out["alpha"] = np.asarray(out["alpha"]).reshape(())
    return out


def _check_fits(tree: LoraTree, target: Mapping[str, Any], what: str) -> None:
    """Every layer of a params-file LoRA (our naming and layout) on a kernel of `target`, in shape."""
    kernels = {p: tuple(k.shape) for p, k in kernel_paths(target)}
    bad, misfits = [], []
    layers = lora_layers(tree)
    for p, layer in layers.items():
        delta = tuple(np.shape(layer["down"])[:-1]) + (np.shape(layer["up"])[-1],)
        if np.shape(layer["down"])[-1] != np.shape(layer["up"])[0]:
            bad.append(f"{'/'.join(p)} rank of down {np.shape(layer['down'])} vs up {np.shape(layer['up'])}")
        elif p not in kernels:
            bad.append(f"{'/'.join(p)} (no such layer)")
        elif delta != kernels[p]:
            misfits.append(Misfit("/".join(p), delta, kernels[p], "delta"))
            bad.append(f"{'/'.join(p)} delta {delta} vs kernel {kernels[p]}")
    size = size_difference(misfits, len(layers))
    if size is not None:
        raise ModelSizeError(f"{what} does not fit the model: shape mismatches in {len(misfits)} of {len(layers)} "
                             f"layers: this file is for another model size (e.g. {size})")
    if bad:
        raise CheckpointError(f"{what} does not fit the model: {', '.join(sorted(bad)[:4])} ({len(bad)} layers)")


def _accepts(requested: str, found: str) -> bool:
    """A generic "lora" file may serve as a MotionLoRA or domain adapter if its layers fit (checked)."""
    return requested == found or requested == "lora" or found == "lora"


def _lora_params_file(path: str, kind: str) -> Lora:
    tree, meta = params_io.load_params(path)
    found = file_kind(meta)
    if found not in LORA_KINDS or "unet" not in tree or not _accepts(kind, found):
        raise _not_a(path, KIND_NAMES[kind], _describe_params(tree, meta))
    unet, text = _scalar_alphas(tree["unet"]), _scalar_alphas(tree.get("text_encoder")) or None
    what = f"{path} (animatediff-jax {KIND_NAMES[found]})"
    try:
        params_io.check_lora_kind(unet, found if kind == "lora" else kind, what, text)
    except CheckpointError:
        raise
    except ValueError as e:  # not a tree of {down, up} pairs (a tensor missing, an unknown entry)
        raise CheckpointError(f"{what}: {e}") from None
    if "unet_config" not in meta:
        raise CheckpointError(f"{path}: the params file has no unet_config in its metadata")
    text_config = None
    if text is not None and "text_config" in meta:
        text_config = params_io.config_from_dict(CLIPTextConfig, meta["text_config"])
    return Lora(unet, found if kind == "lora" else kind, params_io.config_from_dict(UNetConfig, meta["unet_config"]),
                text, text_config, scale=float(meta.get("scale", 1.0)))


def _made_for(path: str, kind: str, base: UNetConfig, motion_version: MotionVersion | None) -> UNetConfig:
    """The UNet a PyTorch LoRA file of `kind` is for: `base`, inflated for a MotionLoRA when it has
    no motion layout: `motion_version`, else v2 if the file adapts the mid-block motion module (as
    the released MotionLoRAs do), else v3."""
    if kind != "motion_lora" or base.motion is not None:
        return base
    if motion_version is None:
        keys = load_state_dict(path)
        motion_version = "v2" if any("mid_block" in k and "motion_modules" in k for k in keys) else "v3"
    if base.family == "sdxl":
        return base.with_motion(_motion_defaults(base))
    return base.with_motion(MotionConfig.for_version(motion_version, heads=base.attention_heads,
                                                     norm_num_groups=base.norm_num_groups))


_DESCRIBED_AS = {  # what `describe` may call a file that is a LoRA of this kind
    "motion_lora": ("motion_lora",),
    "domain_adapter": ("spatial_lora",),
    "lora": ("motion_lora", "spatial_lora", "lora"),
}


def load_lora(
    path: str | os.PathLike,
    kind: str,
    *,
    base: UNetConfig | None = None,
    text_config: CLIPTextConfig | None = None,
    motion_version: MotionVersion | None = None,
    text_config_2: CLIPTextConfig | None = None,
) -> Lora:
    """A LoRA of `kind` ("motion_lora", "domain_adapter" or "lora") for the UNet `base` (default: the
    config our files record, SD1.5 for PyTorch files; for a MotionLoRA in a PyTorch file a base
    without motion layout is inflated as the file says, or as `motion_version`) and, for a "lora",
    the text encoder `text_config` (default: the file's, SD1.5's with `base` None; text-encoder
    layers are refused without one); `text_config_2` is SDXL's second text encoder (its `lora_te2_` layers).

    Every layer must land on a kernel of those models with fitting shapes, and the layers must be
    of the kind (a MotionLoRA inside motion modules only, a domain adapter outside them); a file of
    another kind is an error naming what it holds.
    """
    if kind not in LORA_KINDS:
        raise ValueError(f"unknown LoRA kind {kind!r}: expected one of {LORA_KINDS}")
    path = os.fspath(path)
    p = params_file(path)
    if p is not None:
        lora = _lora_params_file(p, kind)
        what = f"{p} (animatediff-jax {KIND_NAMES[lora.kind]})"
        if base is None:
            target = lora.unet_config
        elif base.motion is None and lora.unet_config.motion is not None and lora.kind != "domain_adapter":
            target = fit(lora.unet_config, base, what, noun=KIND_NAMES[lora.kind])  # the layout it was made for
        else:
            target = base
        _check_fits(lora.unet, unet_shapes(target), what)
        if lora.text_encoder:
            if text_config is None and lora.text_config is None:
                raise CheckpointError(f"{what}: has text-encoder layers but no text-encoder model was given")
            _check_fits(lora.text_encoder, clip_shapes(text_config or lora.text_config), what)
        return dataclasses.replace(lora, unet_config=target, text_config=text_config or lora.text_config)
    if base is None:
        base, text_config = sd15_unet(), text_config or CLIPTextConfig.sd15()
    config = _made_for(path, kind, base, motion_version)
    text_target = clip_shapes(text_config) if kind == "lora" and text_config is not None else None
    text2_target = sdxl_text_shapes(text_config_2) if kind == "lora" and text_config_2 is not None else None
    try:
        unet, text, text2, naming = lora_formats.read_lora_file(path, unet_shapes(config), text_target, text2_target)
        params_io.check_lora_kind(unet, kind, f"{path} ({naming} LoRA)", text)
    except CheckpointError:
        found, holds = describe(path)
        if found not in _DESCRIBED_AS[kind] and found != "unreadable":
            raise _not_a(path, KIND_NAMES[kind], holds) from None
        raise
    return Lora(unet, kind, config, text or None, text_config if text else None, naming,
                text_encoder_2=text2 or None, text_config_2=text_config_2 if text2 else None)
