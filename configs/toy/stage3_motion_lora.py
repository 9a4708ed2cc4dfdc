"""Toy stage 3: a zoom-in MotionLoRA (temporal attention) from 8 reference clips, on stage 2's
frozen motion modules and stage 1's adapter. `animatediff-jax train --config
configs/toy/stage3_motion_lora.py[:ROOT]` (after stage 2)."""

from animatediff_jax.toy.recipe import DEFAULT_ROOT, paths, toy_overrides
from animatediff_jax.training.config import base_config


def get_config(root: str = DEFAULT_ROOT):
    p = paths(root or DEFAULT_ROOT)
    c = toy_overrides(base_config(), root or DEFAULT_ROOT, "zoom")
    c.stage = "motion_lora"
    c.workdir = p["stage3"]
    c.model.motion_module = p["motion_module"]
    c.model.domain_adapter = p["domain_adapter"]
    c.train.batch_size = 4
    c.train.steps = 200
    c.optim.learning_rate = 5e-3
    return c
