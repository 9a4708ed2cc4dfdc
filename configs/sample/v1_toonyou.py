"""AnimateDiff v1 on ToonYou: the original's `configs/prompts/1-ToonYou.yaml` (guoyww/AnimateDiff as of
commit bdfd3da, 2023-09-25, removed in 63bb388), field for field, run as its `scripts/animate.py` ran it.

    animatediff-jax sample --config configs/sample/v1_toonyou.py

Needs (paths as in the original repo; override any with `--config.<field>=PATH`):
`models/sd15` (SD1.5: `animatediff-jax convert sd15 ...` output, or the diffusers
`stable-diffusion-v1-5` folder), `models/DreamBooth_LoRA/toonyou_beta3.safetensors` (CivitAI
single file; its UNet/text encoder replace the base's), `models/Motion_Module/mm_sd_v15.ckpt`
(v1, detected from the file: 24 positions, GroupNorm across frames).

Scheduler: the original builds `DDIMScheduler(**noise_scheduler_kwargs)` from
`configs/inference/inference-v1.yaml`; that file then held only the linear betas, so DDIM ran with
diffusers' class defaults `steps_offset=0`, `clip_sample=True`, `set_alpha_to_one=True` (our
default preset has the last; `scheduler_options` sets the other two). Today's inference-v1.yaml
sets `steps_offset: 1`, `clip_sample: false`: `--config.scheduler_options={}` runs that.
Other defaults as `animate.py`: 16 frames at 512x512, `lora_alpha` 0.8.

You get `samples/v1_toonyou-<time>/`: 4 videos of 16 frames at 512x512 (DDIM, 25 steps,
guidance 7.5), `sample/<i>-<prompt>.gif`, a 4-wide grid `sample.gif`, `config.yaml`, and
`timings.json`. The original's other motion module (`mm_sd_v14.ckpt`) is one more run with
`--config.motion_module=models/Motion_Module/mm_sd_v14.ckpt`.
"""

from animatediff_jax.sampling.config import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sd15"
    c.motion_module = "models/Motion_Module/mm_sd_v15.ckpt"
    c.dreambooth_path = "models/DreamBooth_LoRA/toonyou_beta3.safetensors"
    c.lora_model_path = ""
    c.seed = (10788741199826055526, 6520604954829636163, 6519455744612555650, 16372571278361863751)
    c.steps = 25
    c.guidance_scale = 7.5
    c.scheduler_options = {"steps_offset": 0, "clip_sample": True}  # inference-v1.yaml of that time
    c.prompt = (
        "best quality, masterpiece, 1girl, looking at viewer, blurry background, upper body, contemporary, dress",
        "masterpiece, best quality, 1girl, solo, cherry blossoms, hanami, pink flower, white flower, spring season, "
        "wisteria, petals, flower, plum blossoms, outdoors, falling petals, white hair, black eyes,",
        "best quality, masterpiece, 1boy, formal, abstract, looking at viewer, masculine, marble pattern",
        "best quality, masterpiece, 1girl, cloudy sky, dandelion, contrapposto, alternate hairstyle,",
    )
    c.n_prompt = (
        "",
        "badhandv4,easynegative,ng_deepnegative_v1_75t,verybadimagenegative_v1.3, bad-artist, "
        "bad_prompt_version2-neg, teeth",
        "",
        "",
    )
    c.prompt_syntax = "plain"  # as the original reads prompts (diffusers': brackets are text, cut at 77 tokens)
    c.W, c.H, c.L = 512, 512, 16
    c.output.dir = "samples/v1_toonyou-{time}"
    return c
