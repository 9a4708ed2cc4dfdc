"""AnimateDiff-SDXL (beta) on SDXL 1.0: the original's `sdxl` branch example,
`configs/prompts/1-original_sdxl.yaml` (guoyww/AnimateDiff, commit d6f459d), with that branch's
`configs/inference/inference.yaml` scheduler betas (scaled_linear, 0.00085 to 0.020: not SDXL's 0.012).

    animatediff-jax sample --config configs/sample/sdxl_beta.py

Needs: `models/sdxl` (a diffusers SDXL folder such as stabilityai/stable-diffusion-xl-base-1.0, an SGM single
file `sd_xl_base_1.0.safetensors`, or `animatediff-jax convert sdxl`'s output) and
`models/Motion_Module/mm_sdxl_v10_beta.ckpt` (3 levels, no mid-block module, 32 positions, GroupNorm across
frames). The yaml's `seed: -1` draws a seed per prompt; set `--config.seed="(1, 2)"` to repeat a run.

Scheduler: DDIM (the branch's animate script) over the branch's betas; the yaml's 100 steps and guidance 8.5.
16 frames at 1024x1024 take ~2x SD1.5's 512² memory per frame: on one 16 GiB TPU v5e chip, one video per
call (`batch_size=1`); `animatediff-jax compile sample --config configs/sample/sdxl_beta.py --topology v5e-1`
checks a slice before you rent it.

You get `samples/sdxl_beta-<time>/`: two 16-frame 1024x1024 videos (a panda surfing at sunset, an
astronaut adrift in swirling colour) as GIF and MP4, the grid, `config.yaml`, `timings.json`.
"""

from animatediff_jax.sampling.config import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sdxl"
    c.motion_module = "models/Motion_Module/mm_sdxl_v10_beta.ckpt"
    c.seed = (-1, -1)
    c.steps = 100
    c.guidance_scale = 8.5
    c.scheduler = "ddim"
    c.scheduler_options = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.020,
                           "steps_offset": 1, "clip_sample": False}
    c.prompt = (
        "A panda standing on a surfboard in the ocean in sunset, 4k, high resolution.Realistic, Cinematic, high "
        "resolution",
        "A disoriented astronaut, lost in a galaxy of swirling colors, floating in zero gravity, grasping at "
        "memories, poignant loneliness, stunning realism, cosmic chaos, emotional depth, 12K, hyperrealism, "
        "unforgettable, mixed media, celestial, dark, introspective",
    )
    c.n_prompt = ("", "")
    c.prompt_syntax = "plain"  # as the original reads prompts
    c.W, c.H, c.L = 1024, 1024, 16
    c.batch_size = 1
    c.output.dir = "samples/sdxl_beta-{time}"
    c.output.formats = ("gif", "mp4")
    return c
