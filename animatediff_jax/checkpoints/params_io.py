"""Our params files: one safetensors file of the flattened Flax tree, configs in its metadata.

Loading needs neither torch nor the original files, so conversion runs once and every later
run (sampling, training) starts from here. What a file holds is its `kind`:

* converted SD1.5 (`sd15.save_converted`): `folder/params.safetensors` with trees `unet`, `vae`,
  `text_encoder` and meta `unet_config`, `vae_config`, `text_config` (no `kind`);
* motion module (`save_motion`): tree `{"unet": <the motion_modules_* subtrees only>}`, meta
  `{"kind": "motion_module", "unet_config": <the inflated UNet's config>}`: the motion layout and
  the GroupNorm semantics the module was trained with;
* LoRA (`save_lora`): tree `{"unet": <LoRA tree>}` (+ `"text_encoder"`), meta `{"kind":
  "motion_lora" | "domain_adapter" | "lora", "unet_config": ...}` (+ `"text_config"`). A LoRA tree
  holds `{"down", "up"[, "alpha"]}` at each adapted layer (`animatediff_jax.lora`); a MotionLoRA
  adapts motion-module layers only, a domain adapter spatial layers only.

Training's stage exports are these files (its `stage`, `step`, `rank`, `scale` meta entries are kept
and ignored, except that `kind: "lora"` with `stage: "motion_lora" | "domain_adapter"` reads as that
kind). `checkpoints.load` reads them and every PyTorch format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from animatediff_jax.checkpoints.torch_io import CheckpointError, Params, safetensors_metadata
from animatediff_jax.io import fs

SEP = "/"
FORMAT = "animatediff-jax/params/v1"
PARAMS_FILE = "params.safetensors"  # inside a converted SD1.5 folder
MOTION_MODULE = "motion_module"
LORA_KINDS = ("motion_lora", "domain_adapter", "lora")
KIND_NAMES = {
    "sd15": "converted SD1.5 model",
    MOTION_MODULE: "motion module",
    "motion_lora": "MotionLoRA",
    "domain_adapter": "domain adapter",
    "lora": "LoRA",
}


def _to_numpy(x: Any) -> np.ndarray:
    import ml_dtypes

    a = np.asarray(x)
    # safetensors.numpy has no bfloat16: store bf16 as fp32 and record nothing (params reload fp32).
    return a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a


def save_params(path: str | os.PathLike, tree: Mapping[str, Params], meta: Mapping[str, Any] | None = None) -> None:
    """Writes `tree` (e.g. `{"unet": ..., "vae": ..., "text_encoder": ...}`) atomically to `path`.

    `meta` values must be JSON-serialisable (dataclass configs are converted with `asdict`).
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    flat = {SEP.join(k): np.asarray(_to_numpy(v), order="C") for k, v in flatten_dict(tree).items()}  # keeps 0-d
    bad = [k for k in flat if "." in k]
    if bad:
        raise ValueError(f"param names must not contain '.': {bad[:3]}")
    md = {"format": FORMAT}
    for k, v in (meta or {}).items():
        md[k] = json.dumps(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
    from animatediff_jax.io.fs import atomic_file

    with atomic_file(path) as tmp:
        save_file(flat, tmp, metadata=md)


def load_params(path: str | os.PathLike) -> tuple[Params, dict[str, Any]]:
    """Reads a file written by `save_params`: `(tree, meta)` with meta values JSON-decoded."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not fs.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with fs.local_file(path) as local, safe_open(local, framework="numpy") as f:
            md = dict(f.metadata() or {})
            flat = {tuple(k.split(SEP)): f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: {e})") from e
    if md.pop("format", None) != FORMAT:
        raise CheckpointError(
            f"{path}: not an animatediff-jax params file (no '{FORMAT}' marker); "
            "convert PyTorch files with `animatediff-jax convert` first"
        )
    from animatediff_jax.checkpoints.torch_io import check_finite

    check_finite(flat, path)
    return unflatten_dict(flat), {k: json.loads(v) for k, v in md.items()}


def config_from_dict(cls: type, d: Mapping[str, Any]):
    """Rebuilds a frozen dataclass config (nested dataclass fields too) from its `asdict` form."""
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise CheckpointError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    kw = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            sub = [t for t in (typing.get_args(hints[k]) or (hints[k],)) if dataclasses.is_dataclass(t)]
            v = config_from_dict(sub[0], v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)



def params_file(path: str | os.PathLike) -> str | None:
    """The params file `path` names (a converted folder names its `params.safetensors`), or None."""
    path = os.fspath(path)
    if fs.isdir(path):
        path = os.path.join(path, PARAMS_FILE)
    if not (path.lower().endswith(".safetensors") and fs.isfile(path)):
        return None
    try:
        marker = safetensors_metadata(path).get("format")
    except Exception:  # unreadable: let the PyTorch readers report it
        return None
    return path if marker == FORMAT else None


def file_kind(meta: Mapping[str, Any]) -> str | None:
    """The kind a params file's meta records (`KIND_NAMES`' keys), or None."""
    kind = meta.get("kind")
    if kind == "lora" and meta.get("stage") in ("motion_lora", "domain_adapter"):
        return meta["stage"]
    if kind is None and "vae_config" in meta:
        return "sd15"
    return kind


def save_motion(path: str | os.PathLike, motion_params: Mapping[str, Any], unet_config: Any,
                meta: Mapping | None = None) -> None:
    """Writes a motion file, checked against `unet_config`'s motion layout; `meta` adds entries."""
    from animatediff_jax.checkpoints.torch_io import check_tree
    from animatediff_jax.models.shapes import motion_shapes

    if unet_config.motion is None:
        raise ValueError("save_motion: unet_config has no motion layout (config.motion is None)")
    check_tree("motion params to save", flatten_dict(motion_params), flatten_dict(motion_shapes(unet_config)),
               noun="it")
    save_params(path, {"unet": motion_params}, {**(meta or {}), "kind": MOTION_MODULE, "unet_config": unet_config})


def check_lora_kind(unet: Params, kind: str, what: str, text_encoder: Params | None = None) -> None:
    """A MotionLoRA adapts motion modules only; a domain adapter spatial layers only; neither the text encoder."""
    from animatediff_jax.lora import lora_layers
    from animatediff_jax.models.shapes import is_motion_path

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


def save_lora(path: str | os.PathLike, lora_tree: Params, kind: str, unet_config: Any,
              text_lora: Params | None = None, *, text_config: Any = None, meta: Mapping | None = None) -> None:
    """Writes a LoRA file of `kind` ("motion_lora", "domain_adapter" or "lora")."""
    check_lora_kind(lora_tree, kind, "LoRA to save", text_lora)
    tree = {"unet": lora_tree}
    md: dict[str, Any] = {**(meta or {}), "kind": kind, "unet_config": unet_config}
    if text_lora:
        tree["text_encoder"] = text_lora
        if text_config is not None:
            md["text_config"] = text_config
    save_params(path, tree, md)


