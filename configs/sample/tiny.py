"""Tiny random models, every loading path, a few seconds on a CPU: check an install or a change.

    python -m animatediff_jax.testing.tiny runs/tiny_models     # once: writes the tiny models
    animatediff-jax sample --config configs/sample/tiny.py

The models (`animatediff_jax.testing.tiny.write_tiny_models`): a converted 2-level "SD1.5", a
v2-layout motion module in the original AnimateDiff naming, two MotionLoRAs, a domain adapter, a
kohya LoRA with text-encoder layers; `--config configs/sample/tiny.py:OTHER_DIR` reads them from
OTHER_DIR. The run merges them all and samples 2 videos of 8 frames at 32x32 (DDIM, 4 steps,
float32) into `samples/tiny-<time>/`: `sample/0-a-cat-and-the-dog.gif`, `.mp4`, `sample.gif`,
`config.yaml`, `timings.json`. The weights are random, so the videos are coloured noise.
"""

import os

from animatediff_jax.sampling.config import base_config
from animatediff_jax.testing.tiny import TINY_FILES


def get_config(models: str = "runs/tiny_models"):
    paths = {name: os.path.join(models, file) for name, file in TINY_FILES.items()}
    c = base_config()
    c.base_model = paths["base_model"]
    c.motion_module = paths["motion_module"]
    c.motion_module_lora_configs = (
        {"path": paths["motion_lora_zoom_in"], "alpha": 1.0},
        {"path": paths["motion_lora_pan_left"], "alpha": 0.5},
    )
    c.adapter_lora_path = paths["adapter_lora_path"]
    c.adapter_lora_scale = 0.8
    c.lora_model_path = paths["lora_model_path"]
    c.lora_alpha = 0.7
    c.seed = (10788741199826055526, 6520604954829636163)  # 64-bit seeds, as in the original configs
    c.steps = 4
    c.guidance_scale = 7.5
    c.prompt = ("a cat and the dog", "the dog, 4k")
    c.n_prompt = ("bad quality",)
    c.W, c.H, c.L = 32, 32, 8
    c.dtype = "float32"
    c.output.dir = "samples/tiny-{time}"
    c.output.formats = ("gif", "mp4")
    return c
