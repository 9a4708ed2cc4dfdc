"""AnimateDiff-Lightning (ByteDance, 2024): a motion module distilled for 1, 2, 4 or 8 steps, no CFG.

    animatediff-jax sample --config configs/sample/lightning.py        # the 4-step module, 4 steps
    animatediff-jax sample --config configs/sample/lightning.py:8      # the 8-step module, 8 steps

Needs: `models/sd15` (converted or diffusers SD1.5; Lightning was distilled for personalised SD1.5
models, so give yours with `--config.dreambooth_path=...`, e.g. epiCRealism or ToonYou) and
`models/AnimateDiff-Lightning/animatediff_lightning_{N}step_diffusers.safetensors` from the Hugging
Face repo `ByteDance/AnimateDiff-Lightning` (a v2-layout module in diffusers naming; the
`_comfyui.safetensors` files hold the same weights in the original naming and load too).

Sampler: as the model card builds it in diffusers, `EulerDiscreteScheduler.from_config(SD1.5's
scheduler config, timestep_spacing="trailing", beta_schedule="linear")`, `guidance_scale=1.0`
(`tests/test_schedulers.py` checks this scheduler step by step against that construction).

You get `samples/lightning-<N>step-<time>/`: 2 videos of 16 frames at 512x512 in N Euler steps.
"""

from animatediff_jax.sampling.config import base_config

STEPS = (1, 2, 4, 8)


def get_config(steps: str = "4"):
    n = int(steps)
    if n not in STEPS:
        raise ValueError(f"AnimateDiff-Lightning has modules for {STEPS} steps, not {n}")
    c = base_config()
    c.base_model = "models/sd15"
    c.motion_module = f"models/AnimateDiff-Lightning/animatediff_lightning_{n}step_diffusers.safetensors"
    c.scheduler = "euler"
    c.scheduler_options = {"preset": "diffusers_sd15", "timestep_spacing": "trailing", "beta_schedule": "linear"}
    c.steps = n
    c.guidance_scale = 1.0  # distilled without classifier-free guidance: one UNet pass per step
    c.seed = (42, 7)
    c.prompt = ("a girl smiling, portrait, soft light", "a sailboat on a calm sea at sunset")
    c.n_prompt = ("",)
    c.output.dir = f"samples/lightning-{n}step-{{time}}"
    return c
