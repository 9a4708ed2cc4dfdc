"""Stage 2 on an SDXL base (tiny): the base is found by its files, the step trains the motion modules
only, and its loss is diffusers' `UNetMotionModel` (SDXL) loss given the same draws and conditioning.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax.traverse_util import flatten_dict

from animatediff_jax import parallel
from animatediff_jax.errors import ConfigError
from animatediff_jax.models.shapes import is_motion_path
from animatediff_jax.testing.tiny import write_tiny_sdxl
from animatediff_jax.training import build_trainer, load_models, stages
from animatediff_jax.training.config import validate_config
from animatediff_jax.training.inputs import make_data, next_batch
from animatediff_jax.training.step import StepSpec, make_loss_fn, sdxl_time_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sdxl_config(**model):
    path = os.path.join(ROOT, "configs", "train", "tiny_sdxl_stage2.py")
    spec = importlib.util.spec_from_file_location("tiny_sdxl_stage2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    for k, v in model.items():
        c.model[k] = v
    return c


def host(tree):
    return jax.tree.map(np.asarray, parallel.fetch(tree))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl")


def test_stage2_on_a_converted_sdxl_folder(tiny_base):
    """From a converted SDXL folder: SDXL detected (both towers, `[b, 2, 77]` ids from the pipeline),
    a few steps from pixels with finite losses, the motion modules change, every frozen weight (UNet,
    VAE, both text encoders) stays bit-identical, and the fixed-key loss goes down."""
    config = tiny_sdxl_config(pretrained=str(tiny_base))
    config.data.tokenizer = ""  # the folder's two tokenizers
    config.optim.learning_rate = 3e-3
    checked = validate_config(config)
    models = load_models(checked.config, checked.stage)
    assert models.family == "sdxl" and models.unet_config.motion.version == "sdxl_beta"
    assert not models.unet_config.motion.norm_per_frame  # the beta's own norms (across frames)
    assert models.text_encoder_2 is not None and models.tokenizer_2_path
    base = flatten_dict(host(models.unet))
    trainer = build_trainer(checked, models)
    frozen_before = host(trainer.frozen)
    assert set(frozen_before) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    batch = next_batch(iter(make_data(config, trainer)), config)
    assert batch["input_ids"].shape == (4, 2, 77)
    # the second tokenizer pads with "!", the first with its end token: the rows differ
    assert not np.array_equal(batch["input_ids"][:, 0], batch["input_ids"][:, 1])
    batch = trainer.put_batch(batch)

    def fixed_key_loss():
        out = []
        for i in range(3):
            state = jax.tree.map(jnp.copy, trainer.state).replace(rng=jax.random.key_data(jax.random.key(100 + i)))
            out.append(float(trainer.step_fn(batch)(state, trainer.frozen, batch)[1]["loss"]))
        return float(np.mean(out))

    before = fixed_key_loss()
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(20)]
    after = fixed_key_loss()
    print(f"tiny SDXL stage 2: fixed-key loss {before:.4f} -> {after:.4f}; steps {losses[0]:.4f} ... {losses[-1]:.4f}")
    assert np.isfinite(losses).all()
    assert after < before
    full = flatten_dict(host(trainer.full_params()))
    trained = set(flatten_dict(host(trainer.state.params)))
    assert trained and all(is_motion_path(k) for k in trained)
    assert set(full) == set(base)
    assert any(not np.array_equal(full[k], base[k]) for k in trained)
    for k, v in full.items():
        if k not in trained:
            assert np.array_equal(v, base[k]), "/".join(k)
    frozen_after = flatten_dict(host(trainer.frozen))
    assert all(np.array_equal(v, frozen_after[k]) for k, v in flatten_dict(frozen_before).items())


def test_loss_matches_diffusers_unet_motion_model():
    """The step's loss (fp32) == diffusers' SDXL `UNetMotionModel` on the same noisy latents (DDPM
    noising), timesteps, text context, pooled text and time ids, MSE to the noise; same weights."""
    import torch
    from diffusers import DDPMScheduler
    from torch_refs import torch_motion_unet

    from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
    from animatediff_jax.models.unet import UNet3D

    config = tiny_sdxl_config(vae=False, random_init="fast")
    models = load_models(config)
    # diffusers' UNetMotionModel norms its motion modules in the UNet's groups (`resnet_groups`), not the
    # adapter's `motion_norm_num_groups`: the same at real size (32), not in the tiny base (8 vs 32).
    cfg = models.unet_config
    cfg = cfg.replace(motion=cfg.motion.replace(norm_num_groups=cfg.norm_num_groups))
    tm = torch_motion_unet(cfg, seed=7)  # random weights everywhere (motion proj_out too)
    params = convert_unet_state_dict(tm.state_dict(), cfg)
    stage = stages.get_stage("motion_module")
    trainable, frozen_unet = stages.partition(params, is_motion_path)
    frozen = {"unet": frozen_unet, "text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2}
    text, text_2 = models.text_modules()
    spec = StepSpec(stage, UNet3D(cfg), text=text, text_2=text_2)

    b, f = 2, 4
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((b, f, 8, 8, 4)).astype(np.float32)
    ids = rng.integers(0, 998, (b, 2, 77)).astype(np.int32)
    time_ids = np.array([[512, 512, 0, 0, 512, 512], [768, 1344, 16, 48, 512, 896]], np.float32)
    batch = {"latents": jnp.asarray(latents), "input_ids": jnp.asarray(ids), "time_ids": jnp.asarray(time_ids)}
    key, rows = jax.random.key(3), jnp.arange(b, dtype=jnp.int32)
    loss = float(jax.jit(make_loss_fn(spec))(trainable, frozen, batch, key, rows))

    # The step's draws: per clip fold_in(key, row) -> (posterior, noise, timestep) keys.
    keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(key, r), 3))(rows)
    noise = np.asarray(jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(keys[:, 1]))
    t = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000))(keys[:, 2]))
    hidden, _ = text.apply({"params": models.text_encoder}, ids[:, 0])
    hidden_2, pooled = text_2.apply({"params": models.text_encoder_2}, ids[:, 1])
    context = np.concatenate([np.asarray(hidden), np.asarray(hidden_2)], -1)

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))
    tt = torch.from_numpy(t.copy()).long()
    noisy = sched.add_noise(to_torch(latents), to_torch(noise), tt)
    with torch.no_grad():
        pred = tm(noisy, tt, torch.from_numpy(context).repeat_interleave(f, 0),
                  added_cond_kwargs={"text_embeds": torch.from_numpy(np.asarray(pooled)),
                                     "time_ids": torch.from_numpy(time_ids)}).sample
    ref = float(torch.nn.functional.mse_loss(pred, to_torch(noise)))
    print(f"SDXL stage-2 loss: ours {loss:.7f}, diffusers {ref:.7f} (t = {t.tolist()})")
    assert_close(loss, ref, 1e-5, 1e-6, "SDXL stage-2 loss vs diffusers UNetMotionModel")
    # the added conditioning reaches the loss (so the comparison covers it)
    other = dict(batch, time_ids=jnp.asarray(time_ids[::-1].copy()))
    assert abs(float(jax.jit(make_loss_fn(spec))(trainable, frozen, other, key, rows)) - loss) > 1e-6


def test_real_size_program_from_the_config_alone():
    """`configs/train/sdxl_stage2_motion_module.py` on a host without the base: SDXL's shapes (by
    `model.size`), both text encoders frozen in bf16, the SDXL beta's 237 M motion params trained in
    fp32, pixels and both tokenizers' ids in the batch."""
    from animatediff_jax.training import abstract_models, batch_shapes, make_program
    from animatediff_jax.training.program import program_fields

    path = os.path.join(ROOT, "configs", "train", "sdxl_stage2_motion_module.py")
    spec = importlib.util.spec_from_file_location("sdxl_stage2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.pretrained = "/nonexistent/sdxl"
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    validate_config(c, files=False)
    models = abstract_models(c)
    assert models.family == "sdxl" and models.unet_config.motion.version == "sdxl_beta"
    program = make_program(c, models, parallel.make_mesh({"data": 1, "fsdp": 1}))
    assert set(program.frozen) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(program.frozen))
    assert 236e6 < stages.count_params(program.trainable) < 237e6
    batch = batch_shapes(c, program, models)
    assert batch["video"].shape == (1, 16, 512, 512, 3) and batch["input_ids"].shape == (1, 2, 77)
    assert program_fields(c)["model"]["motion_norm_per_frame"] is False  # the beta's own, resolved


def test_time_ids_of_the_clip_size():
    assert np.array_equal(sdxl_time_ids(512, 768, 2), [[512, 768, 0, 0, 512, 768]] * 2)


def test_config_errors_are_one_line(tmp_path):
    """An SD1.5 motion layout on an SDXL base (and the reverse), or cached latents for SDXL: one line."""
    with pytest.raises(ConfigError, match=r"model.motion_version='v2' is a layout for SD1.5 .* base .* is SDXL"):
        validate_config(tiny_sdxl_config(motion_version="v2"))
    c = tiny_sdxl_config(size="tiny")
    with pytest.raises(ConfigError, match=r"'sdxl_beta' is a layout for SDXL .* is SD1.5: use one of \(v1, v2, v3\)"):
        validate_config(c)
    c = tiny_sdxl_config()
    c.data.source = "cache"
    with pytest.raises(ConfigError, match="data.source='cache' is for SD1.5 bases"):
        validate_config(c, files=False)
    c = tiny_sdxl_config(motion_version="hotshot_xl")
    assert validate_config(c).stage.name == "motion_module"
    assert load_models(c).unet_config.motion.norm_per_frame  # HotshotXL's own: per frame


def test_sdxl_compiles_for_a_v5e(monkeypatch, capsys):
    """The tiny SDXL stage-2 step (pixels and both towers' ids in, bf16) compiles for one abstract v5e
    chip from the config alone, and fits."""
    pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu")
    from animatediff_jax import compile as compile_cmd

    monkeypatch.chdir(ROOT)
    argv = ["train", "--config", "configs/train/tiny_sdxl_stage2.py", "--topology", "v5e-1", "--quick",
            "--config.parallel.compute_dtype=bfloat16", "--config.train.batch_size=2"]
    with jax.default_matmul_precision("default"):
        assert compile_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert "motion_module train step" in out and "fits" in out, out
