"""Converted params on disk: one safetensors file of the flattened Flax tree, configs in its metadata.

Loading needs neither torch nor the original files, so conversion runs once and every later
run (sampling, training) starts from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping

import numpy as np

from animatediff_jax.checkpoints.torch_io import CheckpointError, Params, flatten, unflatten

SEP = "/"
FORMAT = "animatediff-jax/params/v1"


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
    flat = {SEP.join(k): np.asarray(_to_numpy(v), order="C") for k, v in flatten(tree).items()}  # keeps 0-d
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
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
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
    return unflatten(flat), {k: json.loads(v) for k, v in md.items()}


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


PARAMS_FILE = "params.safetensors"


def save_converted(folder: str | os.PathLike, model) -> None:
    """Writes an `sd15.SD15` as `folder/params.safetensors` (+ `folder/tokenizer/` when known)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    meta = {"unet_config": model.unet_config, "vae_config": model.vae_config, "text_config": model.text_config}
    save_params(os.path.join(folder, PARAMS_FILE), model.params, meta)
    if model.tokenizer_path:
        import shutil

        shutil.copytree(model.tokenizer_path, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)


def load_converted(folder: str | os.PathLike):
    """Reads a folder written by `save_converted` (no torch needed) as an `sd15.SD15`."""
    from animatediff_jax.checkpoints.sd15 import SD15
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import UNetConfig
    from animatediff_jax.models.vae import VAEConfig

    folder = os.fspath(folder)
    params, meta = load_params(os.path.join(folder, PARAMS_FILE))
    missing = [k for k in ("unet_config", "vae_config", "text_config") if k not in meta]
    if missing:
        raise CheckpointError(f"{folder}/{PARAMS_FILE}: lacks {missing}: not a converted SD1.5 model")
    from animatediff_jax.checkpoints.sd15 import clip_shapes, vae_shapes
    from animatediff_jax.checkpoints.torch_io import check_tree
    from animatediff_jax.models.unet import param_shapes

    tok = os.path.join(folder, "tokenizer")
    model = SD15(
        config_from_dict(UNetConfig, meta["unet_config"]),
        config_from_dict(VAEConfig, meta["vae_config"]),
        config_from_dict(CLIPTextConfig, meta["text_config"]),
        params,
        tok if os.path.isdir(tok) else None,
    )
    # The params against the configs the file names (a damaged base is reported here, by name,
    # not later as a misfit of whatever is merged into it).
    shapes = {"unet": param_shapes(model.unet_config), "vae": vae_shapes(model.vae_config),
              "text_encoder": clip_shapes(model.text_config)}
    for name, want in shapes.items():
        check_tree(f"{folder}/{PARAMS_FILE} ({name})", flatten(params.get(name, {})), flatten(want))
    return model
