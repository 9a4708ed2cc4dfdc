"""Tiny stage 3 on CPU: MotionLoRA on tiny stage 2's motion modules (run tiny_stage2 first)."""

from animatediff_jax.training.config import base_config, tiny_overrides


def get_config():
    c = tiny_overrides(base_config())
    c.stage = "motion_lora"
    c.workdir = "runs/tiny_stage3"
    c.train.num_frames = 4
    c.train.steps = 100
    c.model.motion_module = "runs/tiny_stage2/motion_module.safetensors"
    c.data.synthetic_clips = 4  # "a handful of reference clips"
    return c
