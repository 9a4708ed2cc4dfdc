"""Stage 3: MotionLoRA on the motion modules' temporal attention, from a few reference clips; short runs."""

from animatediff_jax.training.config import base_config


def get_config():
    c = base_config()
    c.stage = "motion_lora"
    c.workdir = "runs/stage3_motion_lora"
    c.model.pretrained = "models/sd15"
    c.model.motion_version = "v2"
    c.model.motion_module = "runs/stage2_motion_module/motion_module.safetensors"
    c.model.domain_adapter = ""  # optionally the stage-1 adapter
    c.model.lora_rank = 32
    # Frozen base in bf16 (half the weight memory); the LoRA is applied unmerged at run time in
    # float32, so the bf16 base does not round its delta away; LoRA and AdamW state stay float32.
    c.parallel.frozen_dtype = "bfloat16"
    c.train.num_frames = 16
    c.train.resolution = 256
    c.train.batch_size = 4
    c.train.steps = 2_000
    # Same clips and backward depth as stage 2, so the same per-block remat: "full" (see its config);
    # "dots_with_no_batch_dims_saveable" needs 21.8 GiB of temporaries at 4 clips on a 16 GB v5e
    # (`animatediff-jax compile train --topology v5e-1`).
    c.parallel.remat = "full"
    c.checkpoint.every = 500
    c.data.source = "webvid"  # a small CSV of reference clips (e.g. one camera motion)
    c.data.csv = "data/motion_lora/clips.csv"
    c.data.video_folder = "data/motion_lora/videos"
    c.data.caption_dropout = 0.1
    return c
