"""Trained or converted adapters as our params files ("bundles"), and loaders that take any format.

A bundle is a `params_io` file (safetensors, JSON meta in the header; loading needs no torch).
Training writes one per stage (`params_io.save_params(path, tree, meta)`), `animatediff-jax
convert motion|lora` writes them from PyTorch files, and the sampler, training and
`animatediff-jax export` read them. The convention:

* motion file: tree `{"unet": <the motion_modules_* subtrees only>}`,
  meta `{"kind": "motion_module", "unet_config": asdict(UNetConfig)}` (the inflated UNet's
  config: the motion layout and the GroupNorm semantics the module was trained with);
* LoRA file: tree `{"unet": <LoRA tree>}` (+ `"text_encoder": <LoRA tree>`), meta
  `{"kind": "motion_lora" | "domain_adapter" | "lora", "unet_config": ...}` (+ `"text_config"`).
  A LoRA tree holds `{"down", "up"[, "alpha"]}` at each adapted layer (see `animatediff_jax.lora`);
  a MotionLoRA adapts motion-module layers only, a domain adapter spatial layers only.

Other meta entries (training's `stage`, `step`, `rank`, `scale`) are kept and ignored, except
that `kind: "lora"` with `stage: "motion_lora" | "domain_adapter"` reads as that kind.

`load_any_motion` / `load_any_lora` take a bundle or any PyTorch file the readers in
`motion` / `lora_formats` know, so every consumer accepts every format. When a file holds
something other than what was asked for, the error says what is missing and what it holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from animatediff_jax.checkpoints import params_io
from animatediff_jax.checkpoints.lora_formats import LoraFile, load_domain_adapter, load_lora, load_motion_lora
from animatediff_jax.checkpoints.motion import (
    check_motion_params,
    detect_motion_version,
    is_motion_path,
    load_motion_module,
    motion_subtree,
)
from animatediff_jax.checkpoints.torch_io import CheckpointError, Params, flatten, load_state_dict
from animatediff_jax.lora import LoraTree, kernel_paths, lora_layers, lora_rank
from animatediff_jax.models.config import MotionVersion, UNetConfig, inflate, sd15_unet

MOTION_MODULE = "motion_module"
LORA_KINDS = ("motion_lora", "domain_adapter", "lora")
KIND_NAMES = {
    MOTION_MODULE: "motion module",
    "motion_lora": "MotionLoRA",
    "domain_adapter": "domain adapter",
    "lora": "LoRA",
}


@dataclasses.dataclass
class LoraBundle:
    """A LoRA with what it was made for: `unet` (and optional `text_encoder`) trees, kind, configs."""

    unet: LoraTree
    kind: str
    unet_config: UNetConfig
    text_encoder: LoraTree | None = None
    text_config: Any = None  # CLIPTextConfig


# ------------------------------------------------------------------ files


def params_file(path: str | os.PathLike) -> str | None:
    """The params file `path` names (a converted folder names its `params.safetensors`), or None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, params_io.PARAMS_FILE)
    if not (os.path.isfile(path) and path.lower().endswith(".safetensors")):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            marker = (f.metadata() or {}).get("format")
    except Exception:  # unreadable: let the PyTorch readers report it
        return None
    return path if marker == params_io.FORMAT else None


def _kind(meta: Mapping[str, Any]) -> str | None:
    kind = meta.get("kind")
    if kind == "lora" and meta.get("stage") in ("motion_lora", "domain_adapter"):
        return meta["stage"]
    if kind is None and "vae_config" in meta:
        return "sd15"
    return kind


def _unet_config(meta: Mapping[str, Any], path: str) -> UNetConfig:
    if "unet_config" not in meta:
        raise CheckpointError(f"{path}: the params file has no unet_config in its metadata")
    return params_io.config_from_dict(UNetConfig, meta["unet_config"])


def _version(config: UNetConfig) -> str:
    mm = config.motion
    return "v2" if mm.mid_block else ("v1" if mm.max_positions == 24 else "v3")


def _describe_bundle(tree: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    kind = _kind(meta)
    if kind == "sd15":
        return f"a converted SD1.5 model ({', '.join(sorted(tree))})"
    unet = tree.get("unet", {})
    if kind == MOTION_MODULE:
        n = len(flatten(unet))
        try:
            layout = f"{_version(params_io.config_from_dict(UNetConfig, meta['unet_config']))} layout, "
        except (KeyError, TypeError, CheckpointError):
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
    motion = [k for k in keys if "motion_modules" in k]
    if lora:
        inside = [k for k in lora if "motion_modules" in k]
        text = any(k.startswith(("text_encoder.", "lora_te_")) for k in lora)
        naming = _naming(lora)
        if inside and len(inside) == len(lora):
            return "motion_lora", f"a MotionLoRA ({naming} naming, {len(lora)} tensors)"
        if not inside and not text:
            return "spatial_lora", f"a spatial LoRA (a domain adapter or an image LoRA; {naming} naming, {len(lora)} tensors)"
        return "lora", f"a LoRA ({naming} naming, {len(lora)} tensors{', text encoder included' if text else ''})"
    if motion:
        naming = "original AnimateDiff" if any("temporal_transformer" in k for k in motion) else "diffusers"
        try:
            version = f", {detect_motion_version(sd)} layout"
        except CheckpointError:
            version = ""
        whole = " inside a whole UNet" if len(motion) < len(keys) else ""
        return "motion_module", f"a motion module ({naming} naming{version}, {len(motion)} tensors){whole}"
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
        kind = _kind(meta) or "unknown"
        return kind, "an animatediff-jax params file holding " + _describe_bundle(tree, meta)
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return "sd15", "a diffusers pipeline folder"
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    cls = json.load(f).get("_class_name", "unknown model")
            except (OSError, ValueError):
                cls = "unreadable config"
            return ("motion_module" if cls == "MotionAdapter" else "unknown"), f"a diffusers {cls} folder"
        return "unknown", "a folder with no config.json"
    try:
        return describe_state_dict(load_state_dict(path))
    except CheckpointError as e:
        return "unreadable", str(e)


def missing_part(path: str | os.PathLike, part: str, holds: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: no {part} in it: it holds {holds}")


# ------------------------------------------------------------------ motion bundles


def save_motion_bundle(
    path: str | os.PathLike, motion_params: Mapping[str, Any], unet_config: UNetConfig, meta: Mapping | None = None
) -> None:
    """Writes a motion file (checked against `unet_config`'s motion layout); `meta` adds entries."""
    if unet_config.motion is None:
        raise ValueError("save_motion_bundle: unet_config has no motion layout (config.motion is None)")
    check_motion_params(motion_params, unet_config, "motion params to save")
    params_io.save_params(
        path, {"unet": motion_params}, {**(meta or {}), "kind": MOTION_MODULE, "unet_config": unet_config}
    )


def load_motion_bundle(path: str | os.PathLike) -> tuple[Params, UNetConfig]:
    """`(motion params, UNet config)` of a motion file.

    A converted SD1.5 params file whose UNet has motion modules gives those; any other
    kind is an error naming what the file holds.
    """
    path = os.fspath(path)
    tree, meta = params_io.load_params(path)
    kind = _kind(meta)
    unet = tree.get("unet")
    if kind == "sd15" and unet is not None:
        config = _unet_config(meta, path)
        if config.motion is not None:
            motion = motion_subtree(unet)
            check_motion_params(motion, config, f"{path} (motion modules of a converted model)")
            return motion, config
    if kind != MOTION_MODULE or unet is None:
        raise missing_part(path, "motion module", _describe_bundle(tree, meta))
    config = _unet_config(meta, path)
    if config.motion is None:
        raise CheckpointError(f"{path}: a motion file whose unet_config has no motion layout")
    check_motion_params(unet, config, f"{path} (animatediff-jax motion module)")
    return unet, config


def _fit_base(config: UNetConfig, base: UNetConfig | None, what: str) -> UNetConfig:
    """A bundle's config checked against a base UNet config: same blocks, and the same motion
    layout if the base has one. Returns the base with the bundle's motion layout."""
    if base is None:
        return config
    fields = ("block_out_channels", "layers_per_block")
    diffs = [f"{n} {getattr(config, n)} (base: {getattr(base, n)})" for n in fields if getattr(config, n) != getattr(base, n)]
    if base.motion is not None:
        names = ("mid_block", "max_positions", "heads", "num_layers", "norm_num_groups")
        diffs += [
            f"motion {n} {getattr(config.motion, n)} (base: {getattr(base.motion, n)})"
            for n in names
            if getattr(config.motion, n) != getattr(base.motion, n)
        ]
    if diffs:
        raise CheckpointError(f"{what}: a {_version(config)} motion module that does not fit the base UNet: {'; '.join(diffs)}")
    if base.motion is not None:
        return base
    return base.replace(motion=config.motion, spatial_norm_per_frame=config.spatial_norm_per_frame)


def load_any_motion(path: str | os.PathLike, base_config: UNetConfig | None = None) -> tuple[Params, UNetConfig]:
    """Motion params and UNet config from a motion bundle or any file `motion.load_motion_module` reads.

    `base_config` as in `load_motion_module`: the base UNet (default SD1.5); a bundle's own
    config must fit it (same blocks; the same motion layout if the base has one).
    """
    p = params_file(path)
    if p is not None:
        params, config = load_motion_bundle(p)
        return params, _fit_base(config, base_config, p)
    try:
        return load_motion_module(path, base_config)
    except CheckpointError:
        kind, holds = describe(path)
        if kind not in ("motion_module", "unreadable"):
            raise missing_part(path, "motion module", holds) from None
        raise


# ------------------------------------------------------------------ LoRA bundles


def check_lora_kind(unet: LoraTree, kind: str, what: str, text_encoder: LoraTree | None = None) -> None:
    """A MotionLoRA adapts motion modules only; a domain adapter spatial layers only; neither the text encoder."""
    if kind not in LORA_KINDS:
        raise ValueError(f"unknown LoRA kind {kind!r}: expected one of {LORA_KINDS}")
    layers = lora_layers(unet)
    if kind == "motion_lora":
        bad = ["/".join(p) for p in layers if not is_motion_path(p)]
    elif kind == "domain_adapter":
        bad = ["/".join(p) for p in layers if is_motion_path(p)]
    else:
        bad = []
    if text_encoder and kind != "lora":
        bad.append("text_encoder (LoRA layers on the text encoder)")
    if bad:
        where = "outside the motion modules" if kind == "motion_lora" else "inside motion modules / text encoder"
        raise CheckpointError(f"{what}: not a {KIND_NAMES[kind]}: it adapts layers {where}: {', '.join(sorted(bad)[:4])}")
    if not layers and not text_encoder:
        raise CheckpointError(f"{what}: no LoRA layers")


def save_lora_bundle(
    path: str | os.PathLike,
    lora_tree: LoraTree,
    kind: str,
    unet_config: UNetConfig,
    text_lora: LoraTree | None = None,
    *,
    text_config: Any = None,
    meta: Mapping | None = None,
) -> None:
    """Writes a LoRA file of `kind` ("motion_lora", "domain_adapter" or "lora")."""
    check_lora_kind(lora_tree, kind, "LoRA to save", text_lora)
    tree = {"unet": lora_tree}
    md: dict[str, Any] = {**(meta or {}), "kind": kind, "unet_config": unet_config}
    if text_lora:
        tree["text_encoder"] = text_lora
        if text_config is not None:
            md["text_config"] = text_config
    params_io.save_params(path, tree, md)


def _scalar_alphas(tree: Any) -> Any:
    """`alpha` back to a 0-d array: params files store scalars with shape (1,) (`np.ascontiguousarray`)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: _scalar_alphas(v) for k, v in tree.items()}
    if "down" in out and "up" in out and "alpha" in out:
        out["alpha"] = np.asarray(out["alpha"]).reshape(())
    return out


def _lora_bundle(path: str, kind: str | None) -> LoraBundle:
    """A LoRA file; with `kind`, one usable as that kind (else an error naming what the file holds)."""
    tree, meta = params_io.load_params(path)
    found = _kind(meta)
    wanted = KIND_NAMES[kind] if kind else "LoRA"
    if found not in LORA_KINDS or "unet" not in tree or (kind and not _accepts(kind, found)):
        raise missing_part(path, wanted, _describe_bundle(tree, meta))
    unet, text = _scalar_alphas(tree["unet"]), _scalar_alphas(tree.get("text_encoder")) or None
    try:
        check_lora_kind(unet, kind or found, f"{path} (animatediff-jax {KIND_NAMES[found]})", text)
    except ValueError as e:  # not a tree of {down, up} pairs (a tensor missing, an unknown entry)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} (animatediff-jax {KIND_NAMES[found]}): {e}") from None
    text_config = None
    if text is not None and "text_config" in meta:
        from animatediff_jax.models.clip_text import CLIPTextConfig

        text_config = params_io.config_from_dict(CLIPTextConfig, meta["text_config"])
    kind = found if kind in (None, "lora") else kind
    return LoraBundle(unet, kind, _unet_config(meta, path), text, text_config)


def _accepts(requested: str, found: str) -> bool:
    """A generic "lora" file may serve as a MotionLoRA or domain adapter if its layers fit (checked)."""
    return requested == found or requested == "lora" or found == "lora"


def read_lora_bundle(path: str | os.PathLike) -> LoraBundle:
    """A LoRA file with everything it holds (its kind checked against its layers)."""
    return _lora_bundle(os.fspath(path), None)


def load_lora_bundle(path: str | os.PathLike) -> tuple[LoraTree, str, UNetConfig]:
    """`(UNet LoRA tree, kind, UNet config)` of a LoRA file (see `read_lora_bundle` for text-encoder layers)."""
    b = read_lora_bundle(path)
    return b.unet, b.kind, b.unet_config


def _check_fits(tree: LoraTree, target: Mapping[str, Any] | None, what: str) -> None:
    if target is None:
        return
    kernels = {p: tuple(k.shape) for p, k in kernel_paths(target)}
    bad = []
    for p, layer in lora_layers(tree).items():
        delta = tuple(np.shape(layer["down"])[:-1]) + (np.shape(layer["up"])[-1],)
        if np.shape(layer["down"])[-1] != np.shape(layer["up"])[0]:
            bad.append(f"{'/'.join(p)} rank of down {np.shape(layer['down'])} vs up {np.shape(layer['up'])}")
        elif p not in kernels:
            bad.append(f"{'/'.join(p)} (no such layer)")
        elif delta != kernels[p]:
            bad.append(f"{'/'.join(p)} delta {delta} vs kernel {kernels[p]}")
    if bad:
        raise CheckpointError(f"{what} does not fit the model: {', '.join(sorted(bad)[:4])} ({len(bad)} layers)")


_PART_KINDS = {
    "motion_lora": ("motion_lora",),
    "domain_adapter": ("spatial_lora",),
    "lora": ("motion_lora", "spatial_lora", "lora"),
}


def load_any_lora_file(
    path: str | os.PathLike,
    kind: str,
    unet_target: Mapping[str, Any] | None,
    text_target: Mapping[str, Any] | None = None,
) -> LoraFile:
    """A LoRA of `kind` from a LoRA bundle or any PyTorch LoRA file, as `LoraFile(unet, text_encoder, format)`.

    `unet_target` / `text_target`: the models' params (or shapes) every layer must fit. A file
    of another kind (a domain adapter asked for as a MotionLoRA) is an error naming both.
    """
    if kind not in LORA_KINDS:
        raise ValueError(f"unknown LoRA kind {kind!r}: expected one of {LORA_KINDS}")
    path = os.fspath(path)
    p = params_file(path)
    if p is not None:
        b = _lora_bundle(p, kind)
        what = f"{p} (animatediff-jax {KIND_NAMES[b.kind]})"
        _check_fits(b.unet, unet_target, what)
        if b.text_encoder:
            if text_target is None:
                raise CheckpointError(f"{what}: has text-encoder layers but no text-encoder model was given")
            _check_fits(b.text_encoder, text_target, what)
        return LoraFile(b.unet, b.text_encoder or {}, "animatediff-jax")
    try:
        if kind == "motion_lora":
            return LoraFile(load_motion_lora(path, unet_target), {}, "PyTorch")
        if kind == "domain_adapter":
            return LoraFile(load_domain_adapter(path, unet_target), {}, "PyTorch")
        return load_lora(path, unet_target, text_target)
    except CheckpointError:
        found, holds = describe(path)
        if found not in _PART_KINDS[kind] and found != "unreadable":
            raise missing_part(path, KIND_NAMES[kind], holds) from None
        raise


def load_any_lora(path: str | os.PathLike, kind: str, unet_target: Mapping[str, Any] | None) -> LoraTree:
    """The UNet LoRA tree of `kind` from a bundle or any PyTorch LoRA file (see `load_any_lora_file`)."""
    return load_any_lora_file(path, kind, unet_target).unet


def lora_config(
    path: str | os.PathLike, kind: str, base: UNetConfig | None = None, motion_version: MotionVersion | None = None
) -> UNetConfig:
    """The UNet config a PyTorch LoRA file of `kind` is made for: `base` (default SD1.5), inflated
    for a MotionLoRA when it has no motion layout: `motion_version`, else v2 if the file adapts
    the mid-block motion module (as the released MotionLoRAs do), else v3."""
    base = sd15_unet() if base is None else base
    if kind != "motion_lora" or base.motion is not None:
        return base
    if motion_version is None:
        keys = load_state_dict(path)
        motion_version = "v2" if any("mid_block" in k and "motion_modules" in k for k in keys) else "v3"
    return inflate(base, motion_version, heads=base.attention_heads, norm_num_groups=base.norm_num_groups)


def read_lora(
    path: str | os.PathLike,
    kind: str,
    base: UNetConfig | None = None,
    text_config: Any = None,
    motion_version: MotionVersion | None = None,
) -> LoraBundle:
    """A LoRA of `kind` with its configs, from a bundle or a PyTorch file (then made for `base`;
    a `text_config` lets a "lora" file carry text-encoder layers)."""
    from animatediff_jax.models.unet import param_shapes

    p = params_file(path)
    if p is not None:  # every layer's pair checked against the config the file names
        b = _lora_bundle(p, kind)
        what = f"{p} (animatediff-jax {KIND_NAMES[b.kind]})"
        _check_fits(b.unet, param_shapes(b.unet_config), what)
        if b.text_encoder and b.text_config is not None:
            from animatediff_jax.checkpoints.sd15 import clip_shapes

            _check_fits(b.text_encoder, clip_shapes(b.text_config), what)
        return b
    config = lora_config(path, kind, base, motion_version)
    text_target = None
    if kind == "lora" and text_config is not None:
        from animatediff_jax.checkpoints.sd15 import clip_shapes

        text_target = clip_shapes(text_config)
    lf = load_any_lora_file(path, kind, param_shapes(config), text_target)
    text = lf.text_encoder or None
    return LoraBundle(lf.unet, kind, config, text, text_config if text else None)
