"""AnimateDiff v3 + SparseCtrl scribble: sketches at a few frames steer the video, after the original's
`configs/prompts/3_sparsectrl/3_3_sparsectrl_sketch_RealisticVision.yaml` (once
`configs/prompts/v3/v3-3-sketch-RealisticVision.yaml`): "1-sketch-to-video" by default,
`get_config("storyboard")` its "2-storyboarding" entry (three sketches at frames 0, 8 and 15).

The sketches go in as pixels in [0, 1] (the full condition embedding, no VAE) at their frames with the
mask. Scheduler: the original's DDIM of `inference-v3.yaml` (our default).

    animatediff-jax sample --config configs/sample/v3_sparsectrl_sketch.py
    animatediff-jax sample --config configs/sample/v3_sparsectrl_sketch.py:storyboard

Needs: `models/sd15`, `models/Motion_Module/v3_sd15_mm.ckpt`, `models/Motion_Module/v3_sd15_adapter.ckpt`,
`models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors`,
`models/SparseCtrl/v3_sd15_sparsectrl_scribble.ckpt` (guoyww/animatediff on the hub) and the sketches
`__assets__/demos/scribble/scribble_*.png` of the original repository (white strokes on black).

You get `samples/v3_sparsectrl_sketch-<time>/`: 2 videos (random seeds, saved resolved) of 16 frames at
512x512, DDIM 25 steps, guidance 8.5, the grid, `config.yaml`, `timings.json`.
"""

from animatediff_jax.sampling.config import base_config

ENTRIES = {
    "sketch": dict(
        images=("__assets__/demos/scribble/scribble_1.png",), frames=(0,),
        prompts=("a back view of a boy, standing on the ground, looking at the sky, sunlight, masterpieces",
                 "a back view of a boy, standing on the ground, looking at the sky, clouds, sunset, orange sky, "
                 "beautiful sunlight, masterpieces")),
    "storyboard": dict(
        images=tuple(f"__assets__/demos/scribble/scribble_2_{i}.png" for i in (1, 2, 3)), frames=(0, 8, 15),
        prompts=("an aerial view of a modern city, sunlight, day time, masterpiece, high quality",
                 "an aerial view of a cyberpunk city, night time, neon lights, masterpiece, high quality")),
}


def get_config(entry: str = "sketch"):
    e = ENTRIES[entry]
    c = base_config()
    c.base_model = "models/sd15"
    c.dreambooth_path = "models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors"
    c.motion_module = "models/Motion_Module/v3_sd15_mm.ckpt"
    c.adapter_lora_path = "models/Motion_Module/v3_sd15_adapter.ckpt"
    c.adapter_lora_scale = 1.0
    c.sparsectrl = {"path": "models/SparseCtrl/v3_sd15_sparsectrl_scribble.ckpt", "images": e["images"],
                    "frame_indices": e["frames"], "scale": 1.0}
    c.seed = (-1,)
    c.steps = 25
    c.guidance_scale = 8.5
    c.prompt = e["prompts"]
    c.n_prompt = ("worst quality, low quality, letterboxed",)
    c.prompt_syntax = "plain"  # as the original reads prompts (diffusers': brackets are text, cut at 77 tokens)
    c.W, c.H, c.L = 512, 512, 16
    c.output.dir = "samples/v3_sparsectrl_sketch-{time}"
    return c
