"""The training package's parts keep one definition per concept: the config is validated once per
run (at the entry), the stages' trainer and the toy base model read the loss and optimizer through
one builder, "is this a motion-module path" is `models.shapes.is_motion_path` everywhere, dtypes
are the names of `animatediff_jax.dtypes`, and a validation hook never mutates a sampling pipeline.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

from animatediff_jax.errors import ConfigError, FieldError
from animatediff_jax.models.shapes import is_motion_path
from animatediff_jax.train import parse_config
from animatediff_jax.training import base_config, stages
from animatediff_jax.training import config as config_lib
from animatediff_jax.training.config import tiny_overrides, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_calls(monkeypatch, module, name: str) -> list:
    """Wraps `module.name` wherever a loaded `animatediff_jax` module holds it (an imported name
    included); returns the list of calls' arguments, filled as they happen."""
    original = getattr(module, name)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("animatediff_jax") and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, counted)
    return calls


def tiny_stage2(workdir, *extra):
    """A tiny stage-2 run of 1 step (online VAE and text encoder, synthetic clips), as test_resume's."""
    config, _ = parse_config(["--config", os.path.join(ROOT, "configs", "train", "tiny_stage2.py"),
                              f"--config.workdir={workdir}", "--config.train.steps=1", "--config.checkpoint.every=1",
                              "--config.log.every=1", "--config.model.domain_adapter=", "--config.train.num_frames=2",
                              "--config.train.batch_size=2", *extra])
    return config


# ----------------------------------------------------------------------------- the config, once


def test_a_train_run_validates_its_config_once(tmp_path, monkeypatch):
    from animatediff_jax.training import loop

    counts = {name: count_calls(monkeypatch, config_lib, name)
              for name in ("validate_config", "check_config", "check_stage", "check_batch")}
    metrics = loop.train(tiny_stage2(tmp_path / "w"))
    assert np.isfinite(metrics["loss"]) and (tmp_path / "w" / "motion_module.safetensors").exists()
    # (the batch against the mesh: where the step's program is laid out, training/program.py)
    assert {name: len(calls) for name, calls in counts.items()} == {
        "validate_config": 1, "check_config": 1, "check_stage": 1, "check_batch": 1}


def test_a_validated_config_is_not_checked_again(monkeypatch):
    from animatediff_jax.training import build_trainer
    from animatediff_jax.training.config import Validated

    c = tiny_overrides(base_config())
    c.stage = "3"
    c.model.vae = c.model.text_encoder = False
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    checked = validate_config(c)
    assert isinstance(checked, Validated) and checked.config is c and checked.stage is stages.STAGES["motion_lora"]
    checks = count_calls(monkeypatch, config_lib, "check_config")
    load = count_calls(monkeypatch, sys.modules["animatediff_jax.training.models"], "load_models")
    trainer = build_trainer(checked)
    assert trainer.stage.name == "motion_lora" and not checks
    assert load and load[0][1] is checked.stage  # the models load for the stage validated at the entry
    build_trainer(c)  # a bare config is checked where it enters
    assert len(checks) == 1


def test_dtypes_are_the_one_vocabulary():
    from animatediff_jax.training import models

    c = tiny_overrides(base_config())
    c.parallel.compute_dtype, c.parallel.frozen_dtype = "bf16", "FP32"
    validate_config(c)
    c.parallel.frozen_dtype = "fp8"
    with pytest.raises(FieldError, match=r"^parallel\.frozen_dtype='fp8': expected one of float32, fp32") as e:
        validate_config(c)
    assert isinstance(e.value, ConfigError) and e.value.field == "parallel.frozen_dtype"
    assert not hasattr(config_lib, "_DTYPE_NAMES") and not hasattr(models, "_DTYPES") and not hasattr(models, "_dtype")


# ----------------------------------------------------------------------------- one loss / optimizer builder


def _load_config(path: str, *args):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(*args)


def test_the_toy_base_model_builds_its_loss_and_optimizer_with_the_trainers_builder(tmp_path, monkeypatch):
    from animatediff_jax.toy.base import train_base
    from animatediff_jax.training import step

    class Reached(Exception):
        pass

    seen, real = [], step.loss_and_optim

    def builder(config):
        seen.append(real(config))
        raise Reached  # (before any data is read)

    monkeypatch.setattr(step, "loss_and_optim", builder)
    config = _load_config("configs/toy/base.py", str(tmp_path))
    with pytest.raises(Reached):
        train_base(config)
    loss, optim = seen[0]
    assert (loss.prediction_type, optim.learning_rate, optim.warmup_steps) == (
        config.loss.prediction_type, config.optim.learning_rate, config.optim.warmup_steps)


def test_the_trainers_loss_and_optimizer_are_the_builders():
    from animatediff_jax import parallel
    from animatediff_jax.training import abstract_models, make_program
    from animatediff_jax.training.step import LossConfig, OptimConfig, loss_and_optim

    c = tiny_overrides(base_config())
    c.stage = "motion_module"
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    c.loss.prediction_type, c.loss.min_snr_gamma, c.loss.beta_schedule = "v_prediction", 5.0, "scaled_linear"
    c.optim.learning_rate, c.optim.b2, c.optim.grad_clip, c.optim.warmup_steps = 3e-4, 0.99, 0.5, 7
    loss, optim = loss_and_optim(c)
    assert loss != LossConfig() and optim != OptimConfig()  # not the defaults: the config's fields are read
    program = make_program(c, abstract_models(c), parallel.make_mesh({"data": 1, "fsdp": 1}))
    assert program.spec.loss == loss and program.optim == optim


# ----------------------------------------------------------------------------- one motion-path predicate


def test_the_motion_module_predicate_is_the_one_of_models_shapes():
    from animatediff_jax.training import models

    assert stages.STAGES["motion_module"].targets is is_motion_path
    assert stages.is_motion_module is is_motion_path and models.is_motion_path is is_motion_path
    assert is_motion_path(("up_blocks_1", "motion_modules_2", "proj_out", "kernel"))
    assert not is_motion_path(("up_blocks_1", "motion_modules", "x")) and not is_motion_path(("attentions_0",))
    # (bench/memory_bench.py splits with it too: tests/test_memory_bench.py)


# ----------------------------------------------------------------------------- the validation hook


def test_the_validation_hook_samples_a_new_pipeline_value_each_time(tmp_path, monkeypatch):
    import animatediff_jax.sampling as sampling
    from animatediff_jax.training import build_trainer
    from animatediff_jax.training.hooks import make_sample_hook

    config = tiny_stage2(tmp_path / "w", "--config.log.validate_every=1")
    trainer = build_trainer(config)
    calls = []

    def generate(pipe, prompts, negative_prompts, seeds, **keywords):
        calls.append((pipe, pipe.params["unet"], list(prompts), list(seeds), keywords))
        return types.SimpleNamespace(frames=[np.zeros((2, 16, 16, 3), np.uint8)] * len(prompts),
                                     timings={"run_s": 0.5, "compile_s": 0.25})

    monkeypatch.setattr(sampling, "generate", generate)
    hook = make_sample_hook(config, trainer)
    assert hook(1, trainer) == {"sample_s": 0.5, "sample_compile_s": 0.25}
    assert hook(2, trainer) == {"sample_s": 0.5, "sample_compile_s": 0.25}
    (p1, unet1, prompts, seeds, kw), (p2, unet2, *_) = calls
    assert p1 is not p2 and p1.params is not p2.params  # a new value per validation ...
    assert p1.params["unet"] is unet1 and p2.params["unet"] is unet2  # ... and neither changed after its call
    assert p1.params["vae"] is p2.params["vae"] is trainer.models.vae  # the frozen models are shared, not copied
    assert prompts == list(config.log.sample_prompts) and seeds == [42, 43]
    assert kw["num_frames"] == 2 and kw["steps"] == config.log.sample_steps
    assert sorted(os.listdir(tmp_path / "w" / "samples")) == [f"step_000000{s}_{i}.gif" for s in (1, 2) for i in (0, 1)]
