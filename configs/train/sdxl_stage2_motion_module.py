"""Stage 2 on SDXL: AnimateDiff-SDXL (beta layout) motion modules on frozen SDXL base 1.0, 16x512x512 clips.

    animatediff-jax convert sdxl path/to/stable-diffusion-xl-base-1.0 --out models/sdxl   # once (diffusers folder)
    animatediff-jax compile train --config configs/train/sdxl_stage2_motion_module.py --topology v5e-1
    animatediff-jax train --config configs/train/sdxl_stage2_motion_module.py

`model.pretrained` may be the converted folder or the diffusers folder itself; SDXL is told from
SD1.5 by its files (`compile` on a host without them takes `model.size`: "sdxl"). The step encodes
pixels with SDXL's VAE and captions with both text towers (penultimate hidden states side by side;
the second's pooled output and time ids (512, 512, 0, 0, 512, 512) are the UNet's added
conditioning); 10% of captions are "" (encoded, as diffusers' SDXL training script does). Motion
modules start fresh (zero `proj_out`) or from `model.motion_module` (e.g. `mm_sdxl_v10_beta.ckpt`);
HotshotXL's layout: `--config.model.motion_version=hotshot_xl`. Exports `motion_module.safetensors`.

The SDXL beta was trained at 1024²; 512² is the default here because a 16-frame 1024² clip has 4x
the tokens (16 x 128² latents). Measured with `compile train ... --quick` (remat full, bf16 frozen base):
- v5e-1, 512²: 1 clip fits (13.5 GiB of 15.75 per chip, memory-bound roofline 605 ms per clip);
  2 clips do not (temporaries 15.9 GiB on their own).
- v5e-1, 1024²: 1 clip does not fit (temporaries 23.5 GiB): a 1024² clip needs a larger chip.
- v5p-8 (4 chips, FSDP), 512²: `--config.train.batch_size=16` (4 clips per chip, 24.8 GiB, 240 ms per clip);
  1024²: `--config.train.batch_size=16` (4 clips per chip, 74.9 GiB; 2 per chip: 39.1 GiB), 1.2 s per clip.
Expect the fixed-key loss to drop slowly: the base is frozen and only the 237 M motion params train.
"""

from animatediff_jax.training.config import base_config


def get_config():
    c = base_config()
    c.stage = "motion_module"
    c.workdir = "runs/sdxl_stage2_motion_module"
    c.model.pretrained = "models/sdxl"
    c.model.size = "sdxl"  # (what `compile` takes model.pretrained to be where it is not on the host)
    c.model.motion_version = "sdxl_beta"  # or "hotshot_xl"; norms: the release's own
    c.train.num_frames = 16
    c.train.resolution = 512
    c.train.batch_size = 1  # global; 1 clip per v5e chip at 512² (4 per v5p chip: the figures above)
    c.train.steps = 100_000
    # Frozen SDXL (UNet, VAE, both text encoders: 3.47 B params) in bf16: 6.5 GiB instead of 12.9; the
    # motion modules (237 M) and their AdamW state stay float32 (2.6 GiB).
    c.parallel.frozen_dtype = "bfloat16"
    # Per-block remat, everything recomputed in the backward pass: one 16-frame 512² SDXL clip takes 13.5 GiB
    # of a v5e's 15.75 with it (`compile train --topology v5e-1`; lighter policies not measured for SDXL).
    c.parallel.remat = "full"
    c.data.source = "webvid"
    c.data.csv = "data/webvid/results_2M_train.csv"
    c.data.video_folder = "data/webvid/videos"
    c.data.stride = 4
    c.data.caption_dropout = 0.1
    return c
