"""AnimateDiff v2 + the ZoomIn MotionLoRA on Realistic Vision (the original's
`configs/prompts/v2/5-RealisticVision-MotionLoRA.yaml`, ZoomIn entry).

    animatediff-jax sample --config configs/sample/v2_motion_lora_zoom_in.py

Needs: `models/sd15` (converted or diffusers SD1.5), `models/DreamBooth_LoRA/realisticVisionV20_v20.safetensors`,
`models/Motion_Module/mm_sd_v15_v2.ckpt` (v2: mid-block motion module, 32 positions) and
`models/MotionLoRA/v2_lora_ZoomIn.ckpt`. Several MotionLoRAs combine: add entries, e.g.
`--config.motion_module_lora_configs="[{'path': 'models/MotionLoRA/v2_lora_ZoomIn.ckpt', 'alpha': 1.0},
{'path': 'models/MotionLoRA/v2_lora_PanLeft.ckpt', 'alpha': 0.5}]"`.

You get `samples/v2_motion_lora_zoom_in-<time>/`: one 16-frame 512x512 video zooming in
(DDIM, 25 steps, guidance 7.5) as `sample/0-photo-of-coastline,-....gif` and `.mp4`, the grid,
`config.yaml`, `timings.json`.
"""

from animatediff_jax.sample import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sd15"
    c.motion_module = "models/Motion_Module/mm_sd_v15_v2.ckpt"
    c.motion_module_lora_configs = [{"path": "models/MotionLoRA/v2_lora_ZoomIn.ckpt", "alpha": 1.0}]
    c.dreambooth_path = "models/DreamBooth_LoRA/realisticVisionV20_v20.safetensors"
    c.lora_model_path = ""
    c.seed = 45987230
    c.steps = 25
    c.guidance_scale = 7.5
    c.prompt = [
        "photo of coastline, rocks, storm weather, wind, waves, lightning, 8k uhd, dslr, soft lighting, "
        "high quality, film grain, Fujifilm XT3",
    ]
    c.n_prompt = [
        "blur, haze, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, "
        "anime, mutated hands and fingers, deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy, "
        "extra limb, missing limb, floating limbs, disconnected limbs, mutation, mutated, ugly, disgusting, amputation",
    ]
    c.W, c.H, c.L = 512, 512, 16
    c.output.dir = "samples/v2_motion_lora_zoom_in-{time}"
    c.output.formats = ("gif", "mp4")
    return c
