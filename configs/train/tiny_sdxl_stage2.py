"""Tiny SDXL stage 2 on CPU: SDXL-beta-layout motion modules on a random tiny SDXL base (three levels,
two text towers, added conditioning), synthetic moving squares, toy tokenizers, fp32.

    animatediff-jax train --config configs/train/tiny_sdxl_stage2.py

A converted tiny SDXL folder (`testing.tiny.write_tiny_sdxl`) works as the base too:
`--config.model.pretrained=DIR`.
"""

from animatediff_jax.training.config import base_config, tiny_overrides


def get_config():
    c = tiny_overrides(base_config())
    c.stage = "motion_module"
    c.workdir = "runs/tiny_sdxl_stage2"
    c.model.size = "tiny_sdxl"
    c.model.motion_version = "sdxl_beta"
    c.train.num_frames = 4
    c.train.resolution = 16  # tiny VAE halves it, the 3-level UNet needs multiples of 8 (16: 8x8 latents)
    c.log.sample_prompts = ()  # (validation samples are not wired for SDXL yet)
    return c
