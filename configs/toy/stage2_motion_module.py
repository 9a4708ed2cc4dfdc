"""Toy stage 2: v2 motion modules from scratch on 8-frame toy clips (left/right/up/down), base
frozen with stage 1's domain adapter merged. `animatediff-jax train --config
configs/toy/stage2_motion_module.py[:ROOT]` (after stage 1)."""

from animatediff_jax.toy.recipe import DEFAULT_ROOT, paths, toy_overrides
from animatediff_jax.training.config import base_config


def get_config(root: str = DEFAULT_ROOT):
    p = paths(root or DEFAULT_ROOT)
    c = toy_overrides(base_config(), root or DEFAULT_ROOT, "videos")
    c.stage = "motion_module"
    c.workdir = p["stage2"]
    c.model.domain_adapter = p["domain_adapter"]
    c.train.batch_size = 4
    c.train.steps = 2000
    c.optim.learning_rate = 2e-3
    return c
