"""AnimateDiff v2 + the ZoomIn MotionLoRA on Realistic Vision: the original's
`configs/prompts/v2/5-RealisticVision-MotionLoRA.yaml`, ZoomIn entry (guoyww/AnimateDiff before
commit 63bb388, 2023-12-15), field for field, run as its `scripts/animate.py` ran it.

    animatediff-jax sample --config configs/sample/v2_motion_lora_zoom_in.py

Needs: `models/sd15` (converted or diffusers SD1.5), `models/DreamBooth_LoRA/realisticVisionV20_v20.safetensors`,
`models/Motion_Module/mm_sd_v15_v2.ckpt` (v2: mid-block motion module, 32 positions) and
`models/MotionLoRA/v2_lora_ZoomIn.ckpt`. Several MotionLoRAs combine: add entries, e.g.
`--config.motion_module_lora_configs="({'path': 'models/MotionLoRA/v2_lora_ZoomIn.ckpt', 'alpha': 1.0},
{'path': 'models/MotionLoRA/v2_lora_PanLeft.ckpt', 'alpha': 0.5})"`.

Scheduler: `DDIMScheduler(**noise_scheduler_kwargs)` of that time's `inference-v2.yaml`, which
held only the linear betas: diffusers' class defaults `steps_offset=0`, `clip_sample=True`,
`set_alpha_to_one=True` (our default preset has the last; `scheduler_options` sets the other two).
`--config.scheduler_options={}` runs today's inference-v2.yaml (`steps_offset: 1`, `clip_sample: false`).

You get `samples/v2_motion_lora_zoom_in-<time>/`: one 16-frame 512x512 video zooming in
(DDIM, 25 steps, guidance 7.5) as `sample/0-photo-of-coastline,-....gif` and `.mp4`, the grid,
`config.yaml`, `timings.json`.
"""

from animatediff_jax.sampling.config import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sd15"
    c.motion_module = "models/Motion_Module/mm_sd_v15_v2.ckpt"
    c.motion_module_lora_configs = ({"path": "models/MotionLoRA/v2_lora_ZoomIn.ckpt", "alpha": 1.0},)
    c.dreambooth_path = "models/DreamBooth_LoRA/realisticVisionV20_v20.safetensors"
    c.lora_model_path = ""
    c.seed = (45987230,)
    c.steps = 25
    c.guidance_scale = 7.5
    c.scheduler_options = {"steps_offset": 0, "clip_sample": True}  # inference-v2.yaml of that time
    c.prompt = (
        "photo of coastline, rocks, storm weather, wind, waves, lightning, 8k uhd, dslr, soft lighting, "
        "high quality, film grain, Fujifilm XT3",
    )
    c.n_prompt = (
        "blur, haze, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, "
        "anime, mutated hands and fingers, deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy, "
        "extra limb, missing limb, floating limbs, disconnected limbs, mutation, mutated, ugly, disgusting, amputation",
    )
    c.prompt_syntax = "plain"  # as the original reads prompts (diffusers': brackets are text, cut at 77 tokens)
    c.W, c.H, c.L = 512, 512, 16
    c.output.dir = "samples/v2_motion_lora_zoom_in-{time}"
    c.output.formats = ("gif", "mp4")
    return c
