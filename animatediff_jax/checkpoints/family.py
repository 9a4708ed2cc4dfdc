"""Which base family, SD1.5 or SDXL, a model's files hold: read from names and headers, no weight loaded.

The one place both loaders (`checkpoints.sd15`, `checkpoints.sdxl`) and the commands ask, so neither
loader imports the other for it.
"""

from __future__ import annotations

import os
from typing import Iterable

from animatediff_jax.checkpoints.params_io import PARAMS_FILE
from animatediff_jax.checkpoints.torch_io import safetensors_keys, safetensors_metadata
from animatediff_jax.io import fs

LDM_UNET_PREFIX = "model.diffusion_model."  # a single file's UNet (LDM / SGM)
SGM_CLIP_G_PREFIX = "conditioner.embedders.1.model."  # SDXL's bigG text tower, in OpenCLIP naming
# What tells an SDXL single file from an SD1.5 one, most telling first: the bigG tower, the UNet's
# added (text_time) embedding (also in UNet-only files), any of SGM's conditioner embedders.
_SDXL_MARKERS = (SGM_CLIP_G_PREFIX, LDM_UNET_PREFIX + "label_emb.", "conditioner.embedders.")


def sdxl_evidence(keys: Iterable[str]) -> str | None:
    """The first key (by `_SDXL_MARKERS`) that shows a state dict is an SDXL (SGM) checkpoint, or None."""
    keys = sorted(keys)
    for marker in _SDXL_MARKERS:
        hit = next((k for k in keys if k.startswith(marker)), None)
        if hit:
            return hit
    return None


def is_sdxl_checkpoint(keys: Iterable[str]) -> bool:
    """Whether a single-file state dict (its keys) is SDXL's: bigG, the UNet's `label_emb` or `conditioner.*`."""
    return sdxl_evidence(keys) is not None


def base_family(path: str | os.PathLike) -> str:
    """"sdxl" or "sd15": the base a converted folder (its `text_config_2`), a diffusers folder (its
    `text_encoder_2/`) or a `.safetensors` single file (its key names) holds, read without loading weights.
    A `.ckpt` says so only once loaded: "sd15" here, and `load_sd15` names an SDXL one in one line."""
    path = os.fspath(path)
    converted = os.path.join(path, PARAMS_FILE)
    if fs.isfile(converted):
        return "sdxl" if "text_config_2" in safetensors_metadata(converted) else "sd15"
    if fs.isdir(path):
        return "sdxl" if fs.isdir(os.path.join(path, "text_encoder_2")) else "sd15"
    if path.lower().endswith(".safetensors") and fs.isfile(path):
        return "sdxl" if is_sdxl_checkpoint(safetensors_keys(path)) else "sd15"
    return "sd15"
