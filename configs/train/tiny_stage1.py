"""Tiny stage 1 on CPU: domain-adapter LoRA on a random tiny SD1.5, synthetic frames, 200 steps."""

from animatediff_jax.training.config import base_config, tiny_overrides


def get_config():
    c = tiny_overrides(base_config())
    c.stage = "domain_adapter"
    c.workdir = "runs/tiny_stage1"
    c.train.num_frames = 1
    return c
