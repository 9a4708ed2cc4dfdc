"""Stage 2: motion modules on frozen SD1.5 (+ the stage-1 domain adapter), 16x256x256 clips, stride 4."""

from animatediff_jax.training.config import base_config


def get_config():
    c = base_config()
    c.stage = "motion_module"
    c.workdir = "runs/stage2_motion_module"
    c.model.pretrained = "models/sd15"
    c.model.motion_version = "v2"
    c.model.domain_adapter = "runs/stage1_domain_adapter/domain_adapter.safetensors"  # "" to train without
    c.model.domain_adapter_scale = 1.0
    c.train.num_frames = 16
    c.train.resolution = 256
    c.train.batch_size = 4  # global; the original's 4 per GPU: on a slice, 4 x its chips (v5e-256: 1024)
    c.train.steps = 100_000
    # Frozen SD1.5 (+ merged domain adapter) stored in bf16: half the weight memory; the motion
    # modules and their AdamW state stay float32.
    c.parallel.frozen_dtype = "bfloat16"
    # Per-block remat, everything recomputed in the backward pass: what fits the original's 4 clips per
    # chip on a 16 GB TPU v5e (`animatediff-jax compile train --topology v5e-1`, BENCHMARKS.md: 11.7 GiB;
    # "dots_with_no_batch_dims_saveable" needs 20.5 GiB of temporaries at 4 clips and fits only 2). It
    # costs +30% FLOPs over no remat (the step is bound by memory traffic on v5e, not FLOPs); on chips
    # with room, `--config.parallel.remat=dots_with_no_batch_dims_saveable` (+8.7%).
    c.parallel.remat = "full"
    c.data.source = "webvid"
    c.data.csv = "data/webvid/results_2M_train.csv"
    c.data.video_folder = "data/webvid/videos"
    c.data.stride = 4
    c.data.caption_dropout = 0.1
    return c
