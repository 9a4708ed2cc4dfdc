"""Random LoRAs and tiny models in every file format users have, in seconds, without torch.

Their weights come from `animatediff_jax.models.init.random_params`, their tokenizer from
`animatediff_jax.parity.write_tiny_tokenizer` (library code: training, the toy world and the `parity`
command use them); tests take the tokenizer writer from here too."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from animatediff_jax.models.init import random_params
from animatediff_jax.parity import write_tiny_tokenizer  # noqa: F401  (tests import it from here)

Params = dict[str, Any]


def random_lora(params: Params, targets: Callable[[tuple[str, ...]], bool], rank: int, seed: int) -> Params:
    """A LoRA on the kernels `targets` selects, both factors random (so merging changes the weights)."""
    from animatediff_jax.lora import kernel_paths

    rng = np.random.default_rng(seed)
    flat = {}
    for path, kernel in kernel_paths(params):
        if not targets(path):
            continue
        shape = tuple(kernel.shape)
        flat[path + ("down",)] = (rng.standard_normal(shape[:-1] + (rank,)) / np.sqrt(math.prod(shape[:-1]))).astype(np.float32)
        flat[path + ("up",)] = (0.5 * rng.standard_normal((rank, shape[-1])) / np.sqrt(rank)).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


TINY_FILES = dict(
    base_model="sd15",
    motion_module="mm_tiny_v2.safetensors",
    motion_lora_zoom_in="v2_lora_TinyZoomIn.safetensors",
    motion_lora_pan_left="v2_lora_TinyPanLeft.safetensors",
    adapter_lora_path="tiny_adapter.safetensors",
    lora_model_path="tiny_personal_lora.safetensors",
    controlnet="tiny_controlnet.safetensors",
    sparsectrl_rgb="tiny_sparsectrl_rgb.safetensors",
    keyframe="tiny_keyframe.png",
)


def write_tiny_models(folder: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Writes tiny random models in the formats users have, once (kept if already there):

    - `sd15/`: a converted SD1.5-like model (2-level UNet, 2-level VAE, 3-layer CLIP, tokenizer);
    - `mm_tiny_v2.safetensors`: a v2-layout motion module in the original AnimateDiff naming;
    - two MotionLoRAs and a domain adapter in the original naming;
    - `tiny_personal_lora.safetensors`: a kohya LoRA on spatial attention and the text encoder;
    - `tiny_controlnet.safetensors`, `tiny_sparsectrl_rgb.safetensors`: a ControlNet and an RGB SparseCtrl
      for that UNet (diffusers naming, single files), and `tiny_keyframe.png` (32x32) to condition on.

    Returns `{name: path}` (names as `TINY_FILES`). No torch needed; a second or so.
    """
    from animatediff_jax.checkpoints.lora_formats import save_lora_kohya, save_lora_original
    from animatediff_jax.checkpoints.motion import save_motion_module_original
    from animatediff_jax.checkpoints.sd15 import SD15, save_converted
    from animatediff_jax.lora import domain_adapter_targets, motion_lora_targets
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.shapes import clip_shapes, motion_shapes, unet_shapes, vae_shapes
    from animatediff_jax.models.vae import VAEConfig

    folder = os.fspath(folder)
    paths = {k: os.path.join(folder, v) for k, v in TINY_FILES.items()}
    done = os.path.join(folder, "DONE")
    if os.path.isfile(done):
        return paths
    os.makedirs(folder, exist_ok=True)
    text_cfg, vae_cfg = CLIPTextConfig.tiny(), VAEConfig.tiny()
    spatial = tiny_unet(None, cross_attention_dim=text_cfg.hidden_size)
    inflated = tiny_unet("v2", cross_attention_dim=text_cfg.hidden_size)
    params = {
        "unet": random_params(unet_shapes(spatial), seed),
        "vae": random_params(vae_shapes(vae_cfg), seed + 1),
        "text_encoder": random_params(clip_shapes(text_cfg), seed + 2),
    }
    tok = os.path.join(folder, "tokenizer_src")
    write_tiny_tokenizer(tok)
    save_converted(paths["base_model"], SD15(spatial, vae_cfg, text_cfg, params, tok))
    shutil.rmtree(tok)  # copied into sd15/tokenizer
    motion = random_params(motion_shapes(inflated), seed + 3)
    save_motion_module_original(paths["motion_module"], motion, inflated)

    full = random_params(unet_shapes(inflated), seed + 4)  # shapes only matter for the LoRAs
    save_lora_original(paths["motion_lora_zoom_in"], random_lora(full, motion_lora_targets, 2, seed + 5))
    save_lora_original(paths["motion_lora_pan_left"], random_lora(full, motion_lora_targets, 2, seed + 6))
    save_lora_original(paths["adapter_lora_path"], random_lora(full, domain_adapter_targets, 2, seed + 7))
    text_lora = random_lora(params["text_encoder"], lambda p: "self_attn" in p and p[-1].endswith("_proj"), 2, seed + 8)
    save_lora_kohya(paths["lora_model_path"], random_lora(full, domain_adapter_targets, 2, seed + 9), text_lora)
    from PIL import Image

    from animatediff_jax.checkpoints.lora_formats import sd15_conv1x1
    from animatediff_jax.checkpoints.torch_io import flax_to_torch, save_state_dict
    from animatediff_jax.models.controlnet import tiny_controlnet
    from animatediff_jax.models.shapes import controlnet_shapes

    for name, kind, s in (("controlnet", False, 10), ("sparsectrl_rgb", "rgb", 11)):
        cfg = tiny_controlnet(kind, cross_attention_dim=text_cfg.hidden_size)
        save_state_dict(paths[name], flax_to_torch(random_params(controlnet_shapes(cfg), seed + s), conv1x1=sd15_conv1x1))
    rng = np.random.default_rng(seed + 12)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths["keyframe"])
    with open(done, "w") as f:
        f.write("tiny random models for configs/sample/tiny.py\n")
    return paths


def write_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> str:
    """Writes a converted tiny SDXL base (`checkpoints.sdxl.save_converted_sdxl`: `params.safetensors`
    + `tokenizer/`, `tokenizer_2/`) with random weights, once (kept if already there): the shapes of
    `model.size="tiny_sdxl"` (`training.models`), for a training config's `model.pretrained`. Returns
    the folder."""
    from animatediff_jax.checkpoints.sdxl import SDXL, save_converted_sdxl
    from animatediff_jax.models.shapes import sdxl_text_shapes, unet_shapes, vae_shapes
    from animatediff_jax.training.models import _size_configs

    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "DONE")):
        return folder
    unet, vae, text, text_2 = _size_configs("tiny_sdxl")
    params = {"unet": random_params(unet_shapes(unet), seed), "vae": random_params(vae_shapes(vae), seed + 1),
              "text_encoder": random_params(sdxl_text_shapes(text), seed + 2),
              "text_encoder_2": random_params(sdxl_text_shapes(text_2), seed + 3)}
    toks = os.path.join(folder + "_tok")
    write_tiny_tokenizer(os.path.join(toks, "tokenizer"))
    write_tiny_tokenizer(os.path.join(toks, "tokenizer_2"), pad_token="!")  # (SDXL's second pads with "!")
    save_converted_sdxl(folder, SDXL(unet, vae, text, text_2, params, tokenizer_path=os.path.join(toks, "tokenizer"),
                                     tokenizer_2_path=os.path.join(toks, "tokenizer_2")))
    shutil.rmtree(toks)  # copied into the folder
    with open(os.path.join(folder, "DONE"), "w") as f:
        f.write("tiny random SDXL base for configs/train/tiny_sdxl_stage2.py\n")
    return folder


if __name__ == "__main__":  # python -m animatediff_jax.testing.tiny FOLDER
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m animatediff_jax.testing.tiny FOLDER  (writes the tiny models configs/sample/tiny.py reads)")
    print("\n".join(f"{name}: {path}" for name, path in write_tiny_models(sys.argv[1]).items()))
