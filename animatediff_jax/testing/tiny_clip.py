"""Tiny CLIP folders for tests, without torch: a transformers `CLIPModel` folder (with the tiny
tokenizer) and an SD `safety_checker/` folder whose thresholds flag every image, or none.

The weights are random (`models.init.random_params`) in transformers' own key names (the inverse
of `checkpoints.clip`'s mapping), the `config.json` files the fields transformers writes; the
loaders' fidelity to real transformers / diffusers folders is `tests/test_clip_vision.py` and
`tests/test_safety.py`'s business (they build theirs with `save_pretrained`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from animatediff_jax.models.init import random_params
from animatediff_jax.parity import write_tiny_tokenizer


def _vision_dict(vision) -> dict:
    return {**vision.transformers_kwargs(), "model_type": "clip_vision_model", "num_channels": 3}


def write_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny `CLIPModel` folder (`config.json`, `model.safetensors`, tokenizer files): ViT with
    32x32 inputs in 8x8 patches, a 2-layer text tower, projections to 16. Returns the folder."""
    from animatediff_jax.checkpoints.torch_io import flax_to_torch, save_state_dict
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.clip_vision import CLIPVisionConfig
    from animatediff_jax.models.shapes import clip_text_projection_shapes, clip_vision_shapes

    folder = os.fspath(folder)
    vocab = write_tiny_tokenizer(folder)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    vision = CLIPVisionConfig.tiny()
    proj = vision.projection_dim
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    params = {**random_params(clip_vision_shapes(vision), seed),
              **random_params(clip_text_projection_shapes(text, proj), seed + 1)}
    sd = flax_to_torch(params)
    sd["logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
    save_state_dict(os.path.join(folder, "model.safetensors"), sd)
    config = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": proj,
        "logit_scale_init_value": 2.6592, "_name_or_path": "tiny-clip",
        "text_config": {**text.transformers_kwargs(), "model_type": "clip_text_model", "projection_dim": proj,
                        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos},
        "vision_config": _vision_dict(vision),
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def write_tiny_safety_checker(folder: str | os.PathLike, *, flag_everything: bool, seed: int = 0) -> str:
    """A tiny `StableDiffusionSafetyChecker` folder (what SD1.5's `safety_checker/` holds, transformers-5
    key names). `flag_everything`: every concept threshold -1 (every cosine is above it: every image
    flagged); otherwise 2 (none ever is). Returns the folder."""
    from animatediff_jax.checkpoints.torch_io import flax_to_torch, save_state_dict
    from animatediff_jax.models.clip_vision import CLIPVisionConfig
    from animatediff_jax.models.shapes import safety_checker_shapes

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vision = CLIPVisionConfig.tiny()
    params = random_params(safety_checker_shapes(vision), seed)
    towers = flax_to_torch({k: params[k] for k in ("vision_model", "visual_projection")})
    threshold = np.float32(-1.0 if flag_everything else 2.0)
    sd = {**towers, **{k: np.asarray(params[k], np.float32) for k in ("concept_embeds", "special_care_embeds")}}
    sd["concept_embeds_weights"] = np.full(params["concept_embeds_weights"].shape, threshold, np.float32)
    sd["special_care_embeds_weights"] = np.full(params["special_care_embeds_weights"].shape, 2.0, np.float32)
    save_state_dict(os.path.join(folder, "model.safetensors"), sd)
    config = {
        "architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip", "projection_dim": vision.projection_dim,
        "text_config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "model_type": "clip_text_model"},
        "vision_config": _vision_dict(vision),
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder
