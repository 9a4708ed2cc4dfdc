"""IP-Adapter files (h94/IP-Adapter `models/`, SD1.5) -> `models.ip_adapter` config and params.

A `.bin` is `{"image_proj": {...}, "ip_adapter": {...}}` (read with `torch.load(weights_only=True)`),
a `.safetensors` the same weights with `image_proj.` / `ip_adapter.` prefixes. `ip_adapter.{1, 3, ...,
31}.to_k_ip.weight` / `.to_v_ip.weight` are the key / value projections of the UNet's 16 spatial
cross-attentions in the order of diffusers' attention processors (`models.unet.cross_attentions`: down,
up, mid; diffusers' `_convert_ip_adapter_attn_to_diffusers` counts them `1, 3, 5, ...`). `image_proj` is
one of (the kind is read from its keys, the sizes from its shapes):

- base / light: `proj` `[4 x 768, 1024]`, `norm` -> "base".
- plus / plus-face (the Resampler): `latents` `[1, 16, 768]`, `proj_in` `[768, 1280]`,
  `layers.{i}.0.{norm1, norm2, to_q, to_kv, to_out}`, `layers.{i}.1.{0, 1, 3}`, `proj_out`, `norm_out` -> "plus".
- full-face: `proj.{0, 2, 3}` (Linear, GELU, Linear, LayerNorm) -> "full".

Keys are renamed to diffusers' module names as diffusers' `_convert_ip_adapter_image_proj_to_diffusers`
does (the Resampler's fused `to_kv` split in two); a file that does not fit is reported in its own key
names. FaceID files (they need InsightFace face embeddings) and SDXL files are refused with one line.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    FileNames,
    Params,
    StateDict,
    load_weights,
    torch_to_flax,
)
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.ip_adapter import IPAdapterConfig
from animatediff_jax.models.shapes import ip_adapter_shapes

PROJ, LAYERS = "image_proj.", "ip_adapter."

# released Resampler name -> diffusers' (one block `layers.{i}`); `to_kv` is split into to_k / to_v.
_RESAMPLER = [
    (r"layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
    (r"layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
    (r"layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
    (r"layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
]
_RESAMPLER_BACK = [
    (r"layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"layers\.(\d+)\.attn\.to_[kv]\.", r"layers.\1.0.to_kv."),
    (r"layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
]
_FULL = [(r"^proj\.0\.", "ff.net.0.proj."), (r"^proj\.2\.", "ff.net.2."), (r"^proj\.3\.", "norm.")]
_FULL_BACK = [(r"^ff\.net\.0\.proj\.", "proj.0."), (r"^ff\.net\.2\.", "proj.2."), (r"^norm\.", "proj.3.")]
_BASE = [(r"^proj\.", "image_embeds.")]
_BASE_BACK = [(r"^image_embeds\.", "proj.")]
_RULES = {"base": (_BASE, _BASE_BACK), "plus": (_RESAMPLER, _RESAMPLER_BACK), "full": (_FULL, _FULL_BACK)}


def _apply(rules: list[tuple[str, str]], key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(np.shape(sd[key]))


def read_ip_adapter(path: str | os.PathLike) -> StateDict:
    """An IP-Adapter file's tensors with dotted keys (`image_proj.*`, `ip_adapter.*`): a `.safetensors` as it
    is, a `.bin`'s nested `{"image_proj": {...}, "ip_adapter": {...}}` flattened (`torch_io.load_weights`)."""
    obj = load_weights(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{os.fspath(path)}: expected a dict of weights, found {type(obj).__name__}")
    out: StateDict = {}

    def gather(x: Any, key: str) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                gather(v, f"{key}.{k}" if key else str(k))
        elif isinstance(x, np.ndarray):
            out[key] = x

    gather(obj, "")
    return out


def adapter_config(sd: Mapping[str, Any], what: str = "IP-Adapter file") -> IPAdapterConfig:
    """The image projection's kind and sizes, read from a (flattened) IP-Adapter state dict's keys and shapes."""
    proj = {k[len(PROJ):]: v for k, v in sd.items() if k.startswith(PROJ)}
    if not proj or not any(k.startswith(LAYERS) for k in sd):
        few = ", ".join(sorted(sd)[:4])
        raise CheckpointError(f"{what}: not an IP-Adapter file (no image_proj.* and ip_adapter.* weights; it has "
                              f"{few}{' ...' if len(sd) > 4 else ''})")
    if any(k.startswith("perceiver_resampler.") for k in proj) or ("norm.weight" in proj and "proj.0.weight" in proj):
        raise CheckpointError(f"{what}: an IP-Adapter FaceID file: not supported (it needs InsightFace face "
                              "embeddings); use ip-adapter_sd15, _light, -plus, -plus-face or -full-face")
    try:
        if "proj.weight" in proj and "norm.weight" in proj:
            cross = _shape(proj, "norm.weight")[0]
            out, embed = _shape(proj, "proj.weight")
            return IPAdapterConfig("base", image_embed_dim=embed, cross_attention_dim=cross, num_tokens=out // cross)
        if "proj.3.weight" in proj:
            embed = _shape(proj, "proj.0.weight")[1]
            return IPAdapterConfig("full", image_embed_dim=embed, cross_attention_dim=_shape(proj, "proj.3.weight")[0],
                                   num_tokens=0)
        if "latents" in proj:
            _, queries, hidden = _shape(proj, "latents")
            depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
            inner = _shape(proj, "layers.0.0.to_q.weight")[0]
            return IPAdapterConfig("plus", image_embed_dim=_shape(proj, "proj_in.weight")[1],
                                   cross_attention_dim=_shape(proj, "proj_out.weight")[0], num_tokens=queries,
                                   hidden_dims=hidden, heads=max(1, inner // 64), dim_head=64, depth=depth,
                                   ffn_ratio=max(1, _shape(proj, "layers.0.1.1.weight")[0] // hidden))
    except (KeyError, ValueError) as e:  # a key the kind needs is missing, or a tensor of another rank
        raise CheckpointError(f"{what}: an incomplete IP-Adapter image projection ({type(e).__name__}: {e})") from None
    few = ", ".join(sorted(proj)[:4])
    raise CheckpointError(f"{what}: unknown IP-Adapter image projection (image_proj keys {few} ...): expected the "
                          "base / light, plus / plus-face or full-face layout")


def convert_ip_adapter(sd: Mapping[str, Any], unet: UNetConfig, *, what: str = "IP-Adapter file"
                       ) -> tuple[IPAdapterConfig, Params]:
    """A (flattened) released IP-Adapter state dict -> `(config, params)` for `unet`: `params["image_proj"]`
    (`models.ip_adapter.image_projection(config)`'s) and `params["layers"]` (per cross-attention of `unet`,
    `{to_k_ip, to_v_ip}`, for `models.ip_adapter.with_ip_layers`). Strict: a missing, unexpected or
    misshapen key is a `CheckpointError` naming it as the file does."""
    config = adapter_config(sd, what)
    if config.cross_attention_dim != unet.cross_attention_dim:
        raise CheckpointError(f"{what}: an IP-Adapter for cross-attention width {config.cross_attention_dim} "
                              f"(SDXL's is 2048); this UNet's is {unet.cross_attention_dim} (SD1.5: 768)")
    forward, back = _RULES[config.kind]
    renamed, origin = {}, {}
    for key, value in sd.items():
        if not key.startswith(PROJ):
            renamed[key] = value
            continue
        new = PROJ + _apply(forward, key[len(PROJ):])
        if config.kind == "plus" and re.fullmatch(r"layers\.\d+\.0\.to_kv\.weight", key[len(PROJ):]):
            value = np.asarray(value)
            if value.ndim != 2 or value.shape[0] % 2:
                raise CheckpointError(f"{what}: {key} {tuple(value.shape)}: expected [2 x inner, dim] (keys; values)")
            half = value.shape[0] // 2
            stem = PROJ + re.sub(r"\.0\.to_kv\.weight$", ".attn.", key[len(PROJ):])
            for name, part in (("to_k", value[:half]), ("to_v", value[half:])):
                renamed[f"{stem}{name}.weight"], origin[f"{stem}{name}.weight"] = part, key
            continue
        renamed[new] = value
        if new != key:
            origin[new] = key

    def missing_name(converted: str) -> str:
        return PROJ + _apply(back, converted[len(PROJ):]) if converted.startswith(PROJ) else converted

    shapes = ip_adapter_shapes(config, unet)
    target = {"image_proj": shapes["image_proj"],
              **{f"ip_adapter_{2 * k + 1}": layer for k, layer in enumerate(shapes["layers"])}}
    file_shapes = {v: _shape(sd, v) for v in set(origin.values())}
    flat = torch_to_flax(renamed, target, what=what, names=FileNames(origin, missing_name, file_shapes))
    layers = [flat[f"ip_adapter_{2 * k + 1}"] for k in range(len(shapes["layers"]))]
    return config, {"image_proj": flat["image_proj"], "layers": layers}


def load_ip_adapter(path: str | os.PathLike, unet: UNetConfig) -> tuple[IPAdapterConfig, Params]:
    """An IP-Adapter file (`.bin` / `.safetensors`) for `unet` -> `(config, params)` (float32)."""
    path = os.fspath(path)
    sd = read_ip_adapter(path)
    return convert_ip_adapter(sd, unet, what=f"{path} (IP-Adapter)")

