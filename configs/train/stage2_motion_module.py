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
    c.train.batch_size = 4  # the original: 4 per GPU; scale with the number of devices
    c.train.steps = 100_000
    # Frozen SD1.5 (+ merged domain adapter) stored in bf16: half the weight memory; the motion
    # modules and their AdamW state stay float32.
    c.parallel.frozen_dtype = "bfloat16"
    # Per-block remat (each resnet / spatial transformer / motion module recomputed in the backward
    # pass), keeping the weight matmuls' outputs (maxdiffusion's choice): what a 16 GB chip needs for
    # 16x256x256 clips (XLA's accounting of the un-rematerialised gradient is 24 GiB of temp buffers).
    # Measured FLOPs of the stage-2 gradient (1 clip, bf16, XLA attention, compile-only on CPU;
    # `bench/train_bench.py --remat-sweep ...`): none 9.11 TFLOP, this policy 9.90 (+8.7%),
    # "dots_saveable" 9.16 (+0.5%, but it keeps the attention score matmuls too), "full" 11.89
    # (+30.5%). CPU's memory_analysis does not show what remat saves: measure memory on the device,
    # and use "none" (or "dots_saveable") where the chip has room.
    c.parallel.remat = "dots_with_no_batch_dims_saveable"
    c.data.source = "webvid"
    c.data.csv = "data/webvid/results_2M_train.csv"
    c.data.video_folder = "data/webvid/videos"
    c.data.stride = 4
    c.data.caption_dropout = 0.1
    return c
