"""Toy base model (the stand-in for a personalised SD1.5): the whole tiny pixel-space UNet on
single clean frames of the toy world. Run with `python -m animatediff_jax.toy.base --config
configs/toy/base.py[:ROOT]` (ROOT defaults to runs/toy; `animatediff-jax demo` runs it for you)."""

from animatediff_jax.toy.recipe import DEFAULT_ROOT, paths, toy_overrides
from animatediff_jax.training.config import base_config


def get_config(root: str = DEFAULT_ROOT):
    c = toy_overrides(base_config(), root or DEFAULT_ROOT, "images")
    c.stage = "toy_base"
    c.workdir = paths(root or DEFAULT_ROOT)["base"]
    c.model.pretrained = ""
    c.train.num_frames = 1
    c.train.batch_size = 32
    c.train.steps = 500
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    return c
