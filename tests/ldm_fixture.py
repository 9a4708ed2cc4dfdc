"""Writes diffusers-named SD1.5 state dicts in the original LDM / CompVis single-file layout.

An inverse of diffusers' `single_file_utils` converters, written independently from the
CompVis module tree (`openaimodel.UNetModel`, `autoencoder.Encoder/Decoder`), so that loading
its output back through diffusers' forward mapping is a real test of `load_single_file`.
The layout is derived from the configs, not from the keys present, and every input key must
land somewhere: a key this module does not know is an error, not a silent drop.

Values are passed through untouched (numpy arrays or torch tensors, meta tensors included),
except the VAE mid-block attention projections, which LDM stores as 1x1 convs.
"""

from __future__ import annotations

from typing import Any, Mapping

from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."

# Sub-module renames inside a block: diffusers name -> LDM name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_CONV_ATTENTION = ("q", "k", "v", "proj_out")


def unet_module_map(cfg: UNetConfig) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers module prefix -> (LDM module prefix, sub-module renames) for an SD-style UNet
    (SD1.5's or SDXL's: levels without attention, deeper transformers and the added embedding).

    LDM numbers the UNet as flat sequential lists: `input_blocks[0]` is conv_in, then per
    level `layers_per_block` x [resnet, (transformer)] and a downsampler (but the last level);
    `output_blocks` has `layers_per_block + 1` entries per level (deepest first), each
    [resnet, (transformer), (upsampler)], the upsampler on the last entry of every level but
    the shallowest.
    """
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    m: dict[str, tuple[str, Mapping[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    if cfg.addition_embed_type == "text_time":  # SDXL: `label_emb` is a Sequential(Sequential(Linear, SiLU, Linear))
        m["add_embedding.linear_1"] = ("label_emb.0.0", {})
        m["add_embedding.linear_2"] = ("label_emb.0.2", {})
    idx = 1
    for level in range(n):
        for j in range(lpb):
            m[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{idx}.0", _UNET_RESNET)
            if cfg.cross_attn_blocks[level]:
                m[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{idx}.1", {})
            idx += 1
        if level < n - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", {})
            idx += 1
    idx = 0
    up_attn = tuple(reversed(cfg.cross_attn_blocks))
    for level in range(n):
        for j in range(lpb + 1):
            m[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{idx}.0", _UNET_RESNET)
            if up_attn[level]:
                m[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{idx}.1", {})
            if j == lpb and level < n - 1:
                slot = 2 if up_attn[level] else 1
                m[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{idx}.{slot}.conv", {})
            idx += 1
    return m


def vae_module_map(cfg: VAEConfig) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers module prefix -> (LDM module prefix, renames) for the KL autoencoder.

    LDM's decoder indexes its `up` list by resolution (`up[0]` is the full-resolution level)
    and runs it backwards; diffusers' `up_blocks[0]` is the deepest level.
    """
    n = len(cfg.block_out_channels)
    m: dict[str, tuple[str, Mapping[str, str]]] = {
        "quant_conv": ("quant_conv", {}),
        "post_quant_conv": ("post_quant_conv", {}),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        m[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
    for level in range(n):
        for j in range(cfg.layers_per_block):
            m[f"encoder.down_blocks.{level}.resnets.{j}"] = (f"encoder.down.{level}.block.{j}", _VAE_RESNET)
        if level < n - 1:
            m[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", {})
        ldm = n - 1 - level
        for j in range(cfg.layers_per_block + 1):
            m[f"decoder.up_blocks.{level}.resnets.{j}"] = (f"decoder.up.{ldm}.block.{j}", _VAE_RESNET)
        if level < n - 1:
            m[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm}.upsample.conv", {})
    return m


def _rename(key: str, modules: Mapping[str, tuple[str, Mapping[str, str]]], what: str) -> str:
    """The LDM name of one diffusers key: its longest mapped module prefix, then a sub-module rename."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            ldm, renames = modules[prefix]
            rest = ".".join(parts[cut:])
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{ldm}.{rest}"
    raise KeyError(f"{what}: no LDM location for {key!r}")


def _as_conv1x1(v: Any) -> Any:
    return v[:, :, None, None] if v.ndim == 2 else v


def diffusers_to_ldm(
    unet_sd: Mapping[str, Any] | None,
    vae_sd: Mapping[str, Any] | None,
    clip_sd: Mapping[str, Any] | None,
    unet_cfg: UNetConfig,
    vae_cfg: VAEConfig,
) -> dict[str, Any]:
    """One LDM single-file state dict from diffusers-named UNet / VAE / transformers CLIP state dicts.

    Any of the three may be None (a UNet-only personalised file, say). The CLIP keys may come
    with or without transformers' `text_model.` prefix; LDM files always have it.
    """
    out: dict[str, Any] = {}
    if unet_sd is not None:
        modules = unet_module_map(unet_cfg)
        for k, v in unet_sd.items():
            out[UNET + _rename(k, modules, "UNet")] = v
    if vae_sd is not None:
        modules = vae_module_map(vae_cfg)
        for k, v in vae_sd.items():
            name = _rename(k, modules, "VAE")
            if ".mid.attn_1." in name and name.rsplit(".", 2)[-2] in _VAE_CONV_ATTENTION and name.endswith(".weight"):
                v = _as_conv1x1(v)
            out[VAE + name] = v
    if clip_sd is not None:
        for k, v in clip_sd.items():
            out[CLIP + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out
