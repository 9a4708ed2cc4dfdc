"""Toy stage 1: domain-adapter LoRA (spatial attention) on the toy base model, single frames of
the watermarked toy videos. `animatediff-jax train --config configs/toy/stage1_domain_adapter.py[:ROOT]`."""

from animatediff_jax.toy.recipe import DEFAULT_ROOT, paths, toy_overrides
from animatediff_jax.training.config import base_config


def get_config(root: str = DEFAULT_ROOT):
    c = toy_overrides(base_config(), root or DEFAULT_ROOT, "videos")
    c.stage = "domain_adapter"
    c.workdir = paths(root or DEFAULT_ROOT)["stage1"]
    c.train.num_frames = 1
    c.train.batch_size = 32
    c.train.steps = 150
    c.optim.learning_rate = 5e-3
    return c
