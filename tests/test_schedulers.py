"""Each sampler, run for a whole loop inside one jitted `lax.scan`, against the diffusers scheduler
of the same config, step by step; plus the training forward process against DDPMScheduler."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

from animatediff_jax import schedulers as S
from conftest import assert_close

REFERENCE = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "pndm": diffusers.PNDMScheduler,
    "lcm": diffusers.LCMScheduler,
}
V, LIN, TRAIL, SCALED = (
    dict(prediction_type="v_prediction"),
    dict(timestep_spacing="linspace"),
    dict(timestep_spacing="trailing"),
    dict(beta_schedule="scaled_linear"),
)
CASES = [
    ("ddim", 25, {}),
    ("ddim", 7, {**TRAIL, **V, **SCALED}),
    ("ddim", 7, {**LIN, "clip_sample": True, "set_alpha_to_one": True}),
    ("ddim", 25, {"eta": 1.0}),
    ("ddim", 7, {"eta": 0.5, **LIN, **V}),
    ("euler", 25, {}),
    ("euler", 7, {**LIN, **V}),
    ("euler", 7, {**TRAIL, **SCALED, "use_karras_sigmas": True}),
    ("euler_ancestral", 25, {}),
    ("euler_ancestral", 7, {**TRAIL, **V}),
    ("dpmpp_2m", 25, {}),
    ("dpmpp_2m", 7, {"use_karras_sigmas": True, **SCALED}),
    ("dpmpp_2m", 7, {**LIN, **V, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", 25, {**TRAIL, "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", 25, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("pndm", 25, {}),
    ("pndm", 7, {**LIN, **V}),
    ("pndm", 7, {**TRAIL, **SCALED}),
    ("lcm", 4, {}),
    ("lcm", 7, {**V, "original_inference_steps": 40}),
]
SHAPE = (2, 4, 5, 6)


def _reference(name, n, options):
    """The diffusers scheduler with our defaults overlaid by `options` (DDIM's eta is a step argument)."""
    config = {**S._COMMON, **S._SPECIFIC[name], **options}
    eta = config.pop("eta", 0.0)
    ref = REFERENCE[name](**config)
    ref.set_timesteps(n)
    return ref, eta


def _fake_model(x, i, table):
    """A deterministic stand-in for the UNet whose output depends on the input and the step."""
    return 0.1 * x + table[i]


@pytest.mark.parametrize("name,n,options", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_sampling_loop_matches_diffusers(name, n, options, monkeypatch):
    ref, eta = _reference(name, n, options)
    ours = S.make_scheduler(name, n, **options)

    ref_ts = ref.timesteps.numpy()
    ts = np.asarray(ours.timesteps)
    assert ts.dtype == (np.float32 if name.startswith("euler") else np.int32)
    if options.get("use_karras_sigmas") and name == "euler":  # fractional t from a float32 table
        np.testing.assert_allclose(ts, ref_ts, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(ts, ref_ts.astype(ts.dtype))
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2e-6)

    m = ours.num_inference_steps
    rng = np.random.default_rng(0)
    table = rng.standard_normal((m,) + SHAPE).astype(np.float32)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), m)
    noises = np.array(jax.vmap(lambda k: jax.random.normal(k, SHAPE, jnp.float32))(keys))

    @jax.jit
    def run(sched, x, table, keys):
        def body(state, i):
            x, carry = state
            out = _fake_model(S.scale_model_input(sched, i, x), i, table)
            x, carry = S.step(sched, carry, i, out, x, keys[i])
            return (x, carry), x

        x = x * sched.init_noise_sigma
        _, xs = jax.lax.scan(body, (x, S.init_carry(sched, x)), jnp.arange(sched.num_inference_steps))
        return xs

    ours_xs = np.asarray(run(ours, jnp.asarray(x_init), jnp.asarray(table), keys))

    # diffusers draws ancestral/LCM noise through randn_tensor: hand it the same per-step noise.
    def same_noise(shape, **kwargs):
        return torch.from_numpy(noises[ref.step_index]).reshape(shape)

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", same_noise)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", same_noise)
    x = torch.from_numpy(x_init) * ref.init_noise_sigma
    table_t = torch.from_numpy(table)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        out = _fake_model(ref.scale_model_input(x, t), i, table_t)
        kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noises[i])) if name == "ddim" and eta > 0 else {}
        x = ref.step(out, t, x, **kwargs).prev_sample
        err = assert_close(ours_xs[i], x.numpy(), rtol=1e-5, atol=1e-5, what=f"{name} step {i} (t={int(t)})")
        worst = max(worst, err / max(1.0, float(x.abs().max())))
    print(f"{name} n={n} {options}: max error {worst:.2e} (relative to max(1, |x|))")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_training_forward_process_matches_ddpm(beta_schedule):
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ref = diffusers.DDPMScheduler(**kw)
    ac = S.make_alphas_cumprod(**kw)
    assert_close(ac, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=0, what="alphas_cumprod")

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    fwd = jax.jit(S.add_noise)(jnp.asarray(ac), x0, noise, t)
    assert_close(fwd, ref.add_noise(*args).numpy(), rtol=1e-6, atol=1e-6, what="add_noise")
    v = jax.jit(S.velocity)(jnp.asarray(ac), x0, noise, t)
    assert_close(v, ref.get_velocity(*args).numpy(), rtol=1e-6, atol=1e-6, what="velocity")
    # A scalar timestep applies to every batch entry.
    one = S.add_noise(jnp.asarray(ac), x0, noise, 500)
    assert_close(one[2], ref.add_noise(*args).numpy()[2], rtol=1e-6, atol=1e-6, what="add_noise scalar t")


def test_bad_names_and_options_are_rejected():
    with pytest.raises(ValueError, match="ddim.*euler_ancestral.*dpmpp_2m"):
        S.make_scheduler("heun", 10)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.make_scheduler("ddim", 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.make_scheduler("euler", 10, timestep_spacing="middle")
    with pytest.raises(ValueError, match="skip_prk_steps"):
        S.make_scheduler("pndm", 10, skip_prk_steps=False)
