"""AnimateLCM (Wang et al., 2024): a consistency-distilled motion module + its spatial LCM LoRA, 4-8 steps.

    animatediff-jax sample --config configs/sample/animatelcm.py

Needs: `models/sd15` (converted or diffusers SD1.5; AnimateLCM's examples use a personalised model such
as epiCRealism: `--config.dreambooth_path=...`) and the Hugging Face repo `wangfuyun/AnimateLCM` in
`models/AnimateLCM/` (`config.json` + `diffusion_pytorch_model.safetensors`: a MotionAdapter folder,
and `AnimateLCM_sd15_t2v_lora.safetensors`, the spatial LoRA merged at 0.8 as its model card sets it).

Sampler: as the model card builds it in diffusers, `LCMScheduler.from_config(SD1.5's scheduler config,
beta_schedule="linear")`, 6 steps, `guidance_scale=2.0` (`tests/test_schedulers.py` checks this
scheduler step by step against that construction).

You get `samples/animatelcm-<time>/`: 2 videos of 16 frames at 512x512 in 6 LCM steps.
"""

from animatediff_jax.sampling.config import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sd15"
    c.motion_module = "models/AnimateLCM"
    c.lora_model_path = "models/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors"
    c.lora_alpha = 0.8
    c.scheduler = "lcm"
    c.scheduler_options = {"preset": "diffusers_sd15", "beta_schedule": "linear"}
    c.steps = 6
    c.guidance_scale = 2.0
    c.seed = (0, 1)
    c.prompt = ("a space rocket with trails of smoke behind it launching into space from the desert, 4k",
                "a red panda eating bamboo in a forest, high quality")
    c.n_prompt = ("bad quality, worse quality, low resolution",)
    c.output.dir = "samples/animatelcm-{time}"
    return c
