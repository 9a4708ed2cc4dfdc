"""HotshotXL on SDXL 1.0: hotshotco/Hotshot-XL's `inference.py` defaults, argument for argument
(8 frames at 672x384, Euler ancestral, 30 steps, guidance 5.0 (its pipeline's default), seed 455, the
size conditioning it passes: original_size (1920, 1080), target_size (512, 512)).

    animatediff-jax sample --config configs/sample/hotshot_xl.py

Needs: `models/sdxl` (a diffusers SDXL folder, an SGM single file or `animatediff-jax convert sdxl`'s output;
Hotshot-XL's own `unet/` spatial weights are SDXL 1.0's) and `models/Motion_Module/hsxl_temporal_layers.safetensors`
(HotshotXL's temporal layers: 24 positions, no mid block; its UNet normalises the resnets across frames, which
the file's layout sets).

Scheduler: Hotshot builds `EulerAncestralDiscreteScheduler.from_config` of its pipeline's scheduler, SDXL's
`scheduler_config.json` (scaled_linear 0.00085 to 0.012, leading spacing, steps_offset 1). Its original_size is
passed as (width, height) = (1920, 1080) and becomes the time ids as given; it is repeated here as given.

You get `samples/hotshot_xl-<time>/`: one 8-frame 672x384 video of a bulldog in a spaceship's captain's chair
as GIF (Hotshot writes 1 s: `--config.output.fps=8`), the grid, `config.yaml`, `timings.json`.
"""

from animatediff_jax.sampling.config import base_config


def get_config():
    c = base_config()
    c.base_model = "models/sdxl"
    c.motion_module = "models/Motion_Module/hsxl_temporal_layers.safetensors"
    c.seed = (455,)
    c.steps = 30
    c.guidance_scale = 5.0
    c.scheduler = "euler_ancestral"
    c.scheduler_options = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                           "timestep_spacing": "leading", "steps_offset": 1}
    c.prompt = ("a bulldog in the captains chair of a spaceship, hd, high quality",)
    c.n_prompt = ("blurry",)
    c.prompt_syntax = "plain"
    c.W, c.H, c.L = 672, 384, 8
    c.original_size = (1920, 1080)
    c.target_size = (512, 512)
    c.output.dir = "samples/hotshot_xl-{time}"
    c.output.formats = ("gif",)
    c.output.fps = 8.0
    return c
