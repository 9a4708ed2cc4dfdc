"""Training: each stage learns a synthetic task, frozen weights stay bit-identical, and the loss
and optimizer match the PyTorch reference (diffusers' DDPM schedule, torch AdamW + grad clipping).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax.traverse_util import flatten_dict, unflatten_dict

from animatediff_jax import parallel
from animatediff_jax.lora import lora_layers
from animatediff_jax.models.shapes import is_motion_path
from animatediff_jax.schedulers import add_noise, make_alphas_cumprod
from animatediff_jax.training import base_config, build_trainer, load_models, stages
from animatediff_jax.training.config import tiny_overrides
from animatediff_jax.training.step import LossConfig, OptimConfig, diffusion_loss, make_optimizer

B = 4


def tiny_config(stage: str, lr: float = 1e-3):
    c = tiny_overrides(base_config())
    c.stage = stage
    c.model.vae = False  # batches hold cached latents and contexts
    c.model.text_encoder = False
    c.optim.learning_rate = lr
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    return c


def learnable_batch(frames: int) -> dict:
    """Gaussian blobs (per clip and frame a different position) with fixed random captions."""
    yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    lat = np.zeros((B, frames, 8, 8, 4), np.float32)
    for b in range(B):
        for f in range(frames):
            blob = np.exp(-((xx - (2 + b + f) % 8) ** 2 + (yy - 3) ** 2) / 4.0)
            lat[b, f] = blob[..., None] * np.array([1.0, -1.0, 0.5, 0.8], np.float32)
    ctx = np.random.default_rng(1).standard_normal((B, 8, 32)).astype(np.float32)
    return {"latents": lat, "context": ctx}


def fixed_key_loss(trainer, batch, n: int = 4) -> float:
    """The step's loss at the current params under fixed keys (runs the compiled step on copies)."""
    out = []
    for i in range(n):
        state = jax.tree.map(jnp.copy, trainer.state)
        state = state.replace(rng=jax.random.key_data(jax.random.key(1000 + i)))
        _, m = trainer.step_fn(batch)(state, trainer.frozen, batch)
        out.append(float(m["loss"]))
    return float(np.mean(out))


def host(tree):
    return jax.tree.map(np.asarray, parallel.fetch(tree))


@pytest.fixture(scope="module", params=["domain_adapter", "motion_module", "motion_lora"])
def trained(request):
    """A tiny trainer of one stage, its initial params on the host, and its loss before / after 30 steps."""
    name = request.param
    config = tiny_config(name, lr=1e-3 if name == "motion_module" else 3e-3)
    models = load_models(config)
    if name == "motion_lora":
        # Fresh motion modules end in a zero proj_out (no gradient reaches their attention):
        # stand in for trained ones.
        rng = np.random.default_rng(0)
        flat = flatten_dict(models.unet)
        for k in flat:
            if is_motion_path(k) and k[-2:] == ("proj_out", "kernel"):
                flat[k] = 0.1 * rng.standard_normal(flat[k].shape).astype(np.float32)
        models.unet = unflatten_dict(flat)
    base = jax.tree.map(np.array, models.unet)
    trainer = build_trainer(config, models)
    init_trainable = host(trainer.state.params)
    batch = trainer.put_batch(learnable_batch(1 if trainer.stage.single_frame else 4))
    before = fixed_key_loss(trainer, batch)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(30)]
    after = fixed_key_loss(trainer, batch)
    return dict(name=name, trainer=trainer, base=base, init_trainable=init_trainable, before=before, after=after,
                losses=losses)


def test_loss_goes_down(trained):
    before, after = trained["before"], trained["after"]
    print(f"{trained['name']}: fixed-key loss {before:.4f} -> {after:.4f} ({after / before:.3f})")
    assert np.isfinite(trained["losses"]).all()
    assert after < 0.92 * before, f"{trained['name']}: loss {before:.4f} -> {after:.4f}"


def test_frozen_params_bit_identical(trained):
    trainer, base, stage = trained["trainer"], trained["base"], trained["trainer"].stage
    trainable = host(trainer.state.params)
    full = flatten_dict(host(trainer.full_params()))
    base_flat = flatten_dict(base)
    assert set(full) == set(base_flat)
    if stage.kind == "lora":
        changed = {path + ("kernel",) for path in lora_layers(trainable)}
        assert changed and all(stage.targets(k[:-1]) for k in changed)
        # The frozen tree itself is the base, untouched.
        assert all(np.array_equal(a, base_flat[k]) for k, a in flatten_dict(host(trainer.frozen["unet"])).items())
    else:
        changed = set(flatten_dict(trainable))
        assert changed and all(is_motion_path(k) for k in changed)
    n_same = 0
    for k, v in full.items():
        if k in changed:
            assert not np.array_equal(v, base_flat[k]), f"{'/'.join(k)} did not train"
        else:
            assert v.dtype == base_flat[k].dtype and np.array_equal(v, base_flat[k]), f"{'/'.join(k)} changed"
            n_same += 1
    assert n_same > 0
    # The optimizer holds two moments of the trainable params only (plus scalar counts).
    n_train = stages.count_params(trainable)
    opt_sizes = sum(int(x.size) for x in jax.tree.leaves(trainer.state.opt_state))
    assert 2 * n_train <= opt_sizes <= 2 * n_train + 8
    assert n_train < stages.count_params(base) / 2


def test_bf16_compute_fp32_params(trained):
    """bf16 activations and bf16 frozen weights (with dot-saving remat): the loss at the initial
    params is within bf16 accuracy of the fp32 one, and the trainable params stay float32."""
    if trained["name"] != "domain_adapter":
        pytest.skip("one stage is enough (each variant compiles the UNet again)")
    config = tiny_config("domain_adapter", lr=3e-3)
    config.parallel.compute_dtype = "bfloat16"
    config.parallel.frozen_dtype = "bfloat16"
    config.parallel.remat = "dots_saveable"
    trainer = build_trainer(config)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(trainer.frozen))
    batch = trainer.put_batch(learnable_batch(1))
    loss = fixed_key_loss(trainer, batch)
    print(f"fixed-key loss: bf16 {loss:.5f} vs fp32 {trained['before']:.5f}")
    assert abs(loss - trained["before"]) < 0.02 * trained["before"]
    m = trainer.train_step(batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim)


def test_loss_matches_diffusers_ddpm():
    """Noising, epsilon / v targets and min-SNR weights as diffusers' DDPMScheduler and training scripts."""
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    pred = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 517, 999])
    acp = make_alphas_cumprod()
    tt = torch.from_numpy(t)
    ref_noisy = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    assert_close(add_noise(jnp.asarray(acp), x0, noise, t), ref_noisy, 1e-6, 1e-6, "add_noise")
    ref_v = sched.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    ac = sched.alphas_cumprod[tt].numpy()
    snr = ac / (1 - ac)  # diffusers' compute_snr
    for ptype, target in (("epsilon", noise), ("v_prediction", ref_v)):
        mse = ((pred - target) ** 2).reshape(3, -1).mean(1)
        for gamma in (0.0, 5.0):
            if gamma:
                w = np.minimum(snr, gamma) / (snr if ptype == "epsilon" else snr + 1)
            else:
                w = np.ones(3)
            ours = diffusion_loss(jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t),
                                  jnp.asarray(acp), LossConfig(prediction_type=ptype, min_snr_gamma=gamma))
            assert_close(ours, (w * mse).mean(), 1e-5, 1e-7, f"{ptype} gamma={gamma}")


def test_optimizer_matches_torch_adamw():
    """clip_by_global_norm(1.0) + AdamW(1e-4, (0.9, 0.999), eps 1e-8, wd 1e-2) == torch's recipe."""
    import torch

    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    grads = [{k: (3.0 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    tx, _ = make_optimizer(OptimConfig())
    p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    for g in grads:
        u, s = tx.update(jax.tree.map(jnp.asarray, g), s, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        for k, v in tp.items():
            v.grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
    for k in params:
        assert_close(p[k], tp[k].detach().numpy(), 1e-6, 1e-7, k)
        assert not np.allclose(p[k], params[k])


def test_stage_wiring(tmp_path):
    """Stage 2 freezes the base with the domain adapter merged at its scale and trains exactly the
    motion modules; stage 3 freezes those motion modules (read from stage 2's export) and trains a
    LoRA on their attention only; stage 1 has no motion modules and adapts spatial attention only."""
    from animatediff_jax import lora
    from animatediff_jax.training.checkpointing import export_trainable

    c1 = tiny_config("domain_adapter")
    m1 = load_models(c1)
    assert m1.unet_config.motion is None and not any(is_motion_path(k) for k in flatten_dict(m1.unet))
    adapter = lora.init_lora(m1.unet, lora.domain_adapter_targets, 2, jax.random.key(0))
    adapter = jax.tree.map(lambda x: np.asarray(x) + 0.01, adapter)  # non-zero `up`
    # (the meta `Trainer.export_meta` writes: the stage, its kind, the UNet config)
    export_trainable(tmp_path / "adapter.safetensors", adapter,
                     {"stage": "domain_adapter", "kind": "domain_adapter", "unet_config": m1.unet_config})

    c2 = tiny_config("motion_module")
    c2.model.domain_adapter = str(tmp_path / "adapter.safetensors")
    c2.model.domain_adapter_scale = 0.7
    m2 = load_models(c2)
    assert m2.unet_config.motion is not None and set(m2.attached) == {"domain_adapter"}
    trainable, frozen = stages.init_stage(stages.get_stage("motion_module"), m2.unet, jax.random.key(0),
                                          attached=m2.attached)
    expected = flatten_dict(lora.merge(stages.partition(m2.unet, is_motion_path)[1], adapter, 0.7))
    got = flatten_dict(frozen)
    assert set(got) == set(expected)
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(expected[k])) for k in got)
    base = flatten_dict(m1.unet)
    n_adapted = sum(not np.array_equal(np.asarray(got[k]), base[k]) for k in got)
    assert n_adapted == len(lora.lora_layers(adapter)) > 0
    assert set(flatten_dict(trainable)) == {k for k in flatten_dict(m2.unet) if is_motion_path(k)}
    motion = jax.tree.map(lambda x: np.asarray(x) + 0.5, trainable)  # "trained" motion modules
    export_trainable(tmp_path / "motion.safetensors", motion,
                     {"stage": "motion_module", "kind": "motion_module", "unet_config": m2.unet_config})

    c3 = tiny_config("motion_lora")
    c3.model.motion_module = str(tmp_path / "motion.safetensors")
    m3 = load_models(c3)
    trainable3, frozen3 = stages.init_stage(stages.get_stage("motion_lora"), m3.unet, jax.random.key(0), lora_rank=2)
    f3, fm = flatten_dict(frozen3), flatten_dict(motion)
    assert all(np.array_equal(f3[k], fm[k]) for k in fm)
    layers = lora.lora_layers(trainable3)
    assert layers and all(is_motion_path(p) and p[-2] in ("attn1", "attn2") for p in layers)
    assert all(float(np.abs(v["up"]).max()) == 0 for v in layers.values())  # starts as the identity


def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged():
    trainer = build_trainer(tiny_config("motion_module"))
    good = learnable_batch(2)
    bad = dict(good, latents=np.where(np.arange(8)[None, None, :, None, None] == 3, np.nan, good["latents"]))
    trainer.train_step(trainer.put_batch(good))  # nonzero Adam moments
    before = host(trainer.state)
    m = host(trainer.train_step(trainer.put_batch(bad)))
    after = host(trainer.state)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(m["loss"])
    for x, y in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(x, y)
    assert int(after.step) == int(before.step) + 1  # the step (and the data position) still advance
    assert not np.array_equal(before.rng, after.rng)
    m = host(trainer.train_step(trainer.put_batch(good)))
    assert int(m["nonfinite"]) == 0 and np.isfinite(m["loss"])


def test_a_saved_step_is_loaded_instead_of_compiled(tmp_path, capsys):
    """`compile train --save DIR` writes the step's executable; `train` with `executables=DIR` loads it
    in place of its own compile, and one built for another program is refused with the reason.
    (Running it is a TPU's: XLA:CPU executables do not survive serialization in jax 0.10 -- their
    fused functions are "NOT_FOUND" once loaded -- so here the loaded step is checked, not run.)"""
    from animatediff_jax import executables

    config = tiny_config("motion_module")
    trainer = build_trainer(config)
    batch = trainer.put_batch(learnable_batch(4))
    program = trainer.program
    compiled = program.step(batch).lower(trainer.state, trainer.frozen, batch).compile()
    meta = {**executables.target(list(trainer.mesh.devices.flat)), "fingerprint": program.fingerprint,
            "batch": sorted(batch)}
    executables.save(str(tmp_path), program.executable_name, compiled, meta)

    config.executables = str(tmp_path)
    step = build_trainer(config).step_fn(batch)
    assert isinstance(step, jax.stages.Compiled) and "loaded the compiled step" in capsys.readouterr().out
    assert step.in_tree == compiled.in_tree and step.out_tree == compiled.out_tree

    config.parallel.remat = "full"  # another program: compiled afresh, and said why
    step = build_trainer(config).step_fn(batch)
    out = capsys.readouterr().out
    assert isinstance(step, parallel.OnMesh) and "compiling the step" in out and "fingerprint" in out
