"""Each sampler, run for a whole loop inside one jitted `lax.scan`, against the diffusers scheduler
of the same config, step by step; plus the training forward process against DDPMScheduler."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

from animatediff_jax import schedulers as S

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
    ("ddim", 25, {"preset": "diffusers_sd15"}),
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
    config = S.scheduler_config(name, **options)
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
    _compare_loops(name, ref, eta, S.make_scheduler(name, n, **options), monkeypatch)
    print(f"  options {options}")


# The original AnimateDiff's scheduler, constructed as its scripts/animate.py does:
# `DDIMScheduler(**noise_scheduler_kwargs)` of configs/inference/inference-v{1,2,3}.yaml.
ORIGINAL_NOISE_SCHEDULER_KWARGS = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1, clip_sample=False
)
# Its inference-v1/v2.yaml from 2023-07-18 to 2023-12-15 (commits 4f0efbe..63bb388^), which the
# v1 `1-ToonYou.yaml` and v2 `5-RealisticVision-MotionLoRA.yaml` prompt configs ran with: no
# steps_offset / clip_sample, so DDIM's class defaults 0 / True. configs/sample/v1_toonyou.py and
# v2_motion_lora_zoom_in.py set the matching scheduler_options.
ORIGINAL_2023_NOISE_SCHEDULER_KWARGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
ORIGINAL_2023_OPTIONS = {"steps_offset": 0, "clip_sample": True}
# SD1.5's scheduler/scheduler_config.json (a PNDM config), as DDIMScheduler.from_config reads it.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


@pytest.mark.parametrize("n", [25, 3])
@pytest.mark.parametrize("era", ["current", "2023"])
def test_default_ddim_is_the_original_animatediff_scheduler(n, era, monkeypatch):
    """`make_scheduler("ddim", n)` with no options is the original's DDIM, step by step (and with the
    2023 configs' options, the original's DDIM of that time)."""
    kwargs, options = {
        "current": (ORIGINAL_NOISE_SCHEDULER_KWARGS, {}),
        "2023": (ORIGINAL_2023_NOISE_SCHEDULER_KWARGS, ORIGINAL_2023_OPTIONS),
    }[era]
    ref = diffusers.DDIMScheduler(**kwargs)
    assert ref.config.set_alpha_to_one is True  # the class default the original keeps
    ref.set_timesteps(n)
    ours = S.make_scheduler("ddim", n, **options)
    # The last step lands on alpha = 1: this is where it differs from SD1.5's config.
    np.testing.assert_allclose(float(ours.coefs["sqrt_a_prev"][-1]), 1.0)
    _compare_loops("ddim", ref, 0.0, ours, monkeypatch)


def test_sample_configs_use_the_scheduler_of_the_original_config_they_reproduce():
    from pathlib import Path

    from animatediff_jax.sample import load_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "sample"
    want = {"v1_toonyou": ORIGINAL_2023_OPTIONS, "v2_motion_lora_zoom_in": ORIGINAL_2023_OPTIONS, "v3_domain_adapter": {}}
    for name, options in want.items():
        c = load_config(str(configs / f"{name}.py"))
        assert (c["scheduler"], c["scheduler_options"]) == ("ddim", options), name


def test_diffusers_sd15_preset_is_sd15_scheduler_config(monkeypatch):
    """preset="diffusers_sd15": SD1.5's scheduler_config.json (final alpha = alphas_cumprod[0]) with the
    original's linear betas, as diffusers' AnimateDiff docs build it."""
    ref = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG, beta_schedule="linear")
    assert ref.config.set_alpha_to_one is False
    ref.set_timesteps(25)
    ours = S.make_scheduler("ddim", 25, preset="diffusers_sd15")
    assert float(ours.coefs["sqrt_a_prev"][-1]) < 0.9996
    _compare_loops("ddim", ref, 0.0, ours, monkeypatch)
    default = S.make_scheduler("ddim", 25)
    assert abs(float(default.coefs["sqrt_a_prev"][-1]) - float(ours.coefs["sqrt_a_prev"][-1])) > 4e-4
    with pytest.raises(ValueError, match="unknown scheduler preset 'sd15'.*animatediff.*diffusers_sd15"):
        S.make_scheduler("ddim", 25, preset="sd15")


def _compare_loops(name, ref, eta, ours, monkeypatch):
    """Our whole loop in one jitted scan against `ref` (a diffusers scheduler with timesteps set), step by step."""
    ref_ts = ref.timesteps.numpy()
    ts = np.asarray(ours.timesteps)
    assert ts.dtype == (np.float32 if name.startswith("euler") else np.int32)
    if name == "euler" and ref.config.use_karras_sigmas:  # fractional t from a float32 table
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
    print(f"{name} n={len(ref.timesteps)}: max error {worst:.2e} (relative to max(1, |x|))")


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


# The few-step models' samplers, built as their model cards build them in diffusers.
FEW_STEP = {
    "lightning.py:4": lambda: diffusers.EulerDiscreteScheduler.from_config(
        SD15_SCHEDULER_CONFIG, timestep_spacing="trailing", beta_schedule="linear"),
    "lightning.py:2": lambda: diffusers.EulerDiscreteScheduler.from_config(
        SD15_SCHEDULER_CONFIG, timestep_spacing="trailing", beta_schedule="linear"),
    "animatelcm.py": lambda: diffusers.LCMScheduler.from_config(SD15_SCHEDULER_CONFIG, beta_schedule="linear"),
}


@pytest.mark.parametrize("spec", sorted(FEW_STEP))
def test_few_step_configs_use_their_model_cards_scheduler(spec, monkeypatch):
    from pathlib import Path

    from animatediff_jax.sample import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "sample" / spec.split(":")[0]
    c = load_config(str(path) + spec[len(spec.split(":")[0]):])
    ref = FEW_STEP[spec]()
    ref.set_timesteps(c["steps"])
    ours = S.make_scheduler(c["scheduler"], c["steps"], **c["scheduler_options"])
    _compare_loops(c["scheduler"], ref, 0.0, ours, monkeypatch)
    assert c["guidance_scale"] == (1.0 if "lightning" in spec else 2.0)
