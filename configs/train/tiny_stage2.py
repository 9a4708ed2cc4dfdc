"""Tiny stage 2 on CPU: motion modules on the tiny random base (+ tiny stage 1's adapter if it exists)."""

import os

from animatediff_jax.training.config import base_config, tiny_overrides


def get_config():
    c = tiny_overrides(base_config())
    c.stage = "motion_module"
    c.workdir = "runs/tiny_stage2"
    c.train.num_frames = 4
    adapter = "runs/tiny_stage1/domain_adapter.safetensors"
    c.model.domain_adapter = adapter if os.path.exists(adapter) else ""
    return c
