"""AnimateDiff v3 + SparseCtrl RGB: one keyframe image animated (image to video), after the original's
`configs/prompts/3_sparsectrl/3_2_sparsectrl_rgb_RealisticVision.yaml` (its "animation-1" entry; once
`configs/prompts/v3/v3-2-animation-RealisticVision.yaml`).

The keyframe is VAE-encoded (a posterior sample, as the original's `latent_dist.sample()`) and put at
frame 0 with its mask; SparseCtrl's residuals join the UNet's in every step. Scheduler: the original's
DDIM of `inference-v3.yaml` (our default). `get_config("0,8,15")` puts one image at each of those frames
instead (give as many `sparsectrl.images`; negative indices count from the end, as the original's
`controlnet_image_indexs: [0, -1]`).

    animatediff-jax sample --config configs/sample/v3_sparsectrl_rgb.py
    animatediff-jax sample --config configs/sample/v3_sparsectrl_rgb.py \\
        --config.sparsectrl="{'path': 'models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt', 'images': ('my.png',), 'frame_indices': (0,)}"

Needs: `models/sd15`, `models/Motion_Module/v3_sd15_mm.ckpt`, `models/Motion_Module/v3_sd15_adapter.ckpt`,
`models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors`, `models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt`
(guoyww/animatediff on the hub) and the keyframe `__assets__/demos/image/RealisticVision_firework.png` of the
original repository (any image works: it is resized to W x H).

You get `samples/v3_sparsectrl_rgb-<time>/`: 2 videos (random seeds, saved resolved) of 16 frames at
512x512 starting from the keyframe, DDIM 25 steps, guidance 8.5, the grid, `config.yaml`, `timings.json`.
"""

from animatediff_jax.sampling.config import base_config

PROMPT = "closeup face photo of man in black clothes, night city street, bokeh, fireworks in background"


def get_config(indices: str = "0"):
    c = base_config()
    c.base_model = "models/sd15"
    c.dreambooth_path = "models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors"
    c.motion_module = "models/Motion_Module/v3_sd15_mm.ckpt"
    c.adapter_lora_path = "models/Motion_Module/v3_sd15_adapter.ckpt"
    c.adapter_lora_scale = 1.0
    frames = tuple(int(i) for i in indices.split(","))
    c.sparsectrl = {
        "path": "models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt",
        "images": ("__assets__/demos/image/RealisticVision_firework.png",) * len(frames),
        "frame_indices": frames,
        "scale": 1.0,
    }
    c.seed = (-1,)
    c.steps = 25
    c.guidance_scale = 8.5
    c.prompt = (PROMPT, PROMPT)
    c.n_prompt = ("worst quality, low quality, letterboxed",)
    c.prompt_syntax = "plain"  # as the original reads prompts (diffusers': brackets are text, cut at 77 tokens)
    c.W, c.H, c.L = 512, 512, 16
    c.output.dir = "samples/v3_sparsectrl_rgb-{time}"
    return c
