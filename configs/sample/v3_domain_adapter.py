"""AnimateDiff v3: motion module + domain adapter (LoRA on the spatial attention), text to video
(after the original's `configs/prompts/v3/v3-1-T2V.yaml` of 2023-12-15..2024-07-17, its first
entry without the SparseCtrl image input; the second prompt is ours, as that entry repeats its first).

Scheduler: the original's `DDIMScheduler(**noise_scheduler_kwargs)` of `inference-v3.yaml`
(linear betas, `steps_offset: 1`, `clip_sample: false`, `set_alpha_to_one` True by class
default), which is our default: no `scheduler_options`.

    animatediff-jax sample --config configs/sample/v3_domain_adapter.py

Needs: `models/sd15` (converted or diffusers SD1.5), `models/Motion_Module/v3_sd15_mm.ckpt`
(v3: no mid-block module, 32 positions) and `models/Motion_Module/v3_sd15_adapter.ckpt`, merged at
`adapter_lora_scale` (the original reads this name; its YAML's `domain_lora_scale` is ignored
there). Lower it (`--config.adapter_lora_scale=0.5`) for less of the adapter's video-frame look.

You get `samples/v3_domain_adapter-<time>/`: 2 videos of 16 frames at 384x256 (W x H), DDIM 25
steps, guidance 8.5, as `sample/<i>-an-oil-painting-....gif`, the grid, `config.yaml`, `timings.json`.
"""

from animatediff_jax.sampling.config import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sd15"
    c.motion_module = "models/Motion_Module/v3_sd15_mm.ckpt"
    c.adapter_lora_path = "models/Motion_Module/v3_sd15_adapter.ckpt"
    c.adapter_lora_scale = 1.0
    c.dreambooth_path = ""
    c.seed = (123, 234)
    c.steps = 25
    c.guidance_scale = 8.5
    c.prompt = ("an oil painting of a sailboat in the ocean wave", "an oil painting of a lighthouse on a cliff at dusk")
    c.n_prompt = ("worst quality, low quality, letterboxed",)
    c.prompt_syntax = "plain"  # as the original reads prompts (diffusers': brackets are text, cut at 77 tokens)
    c.W, c.H, c.L = 384, 256, 16
    c.output.dir = "samples/v3_domain_adapter-{time}"
    return c
