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
    # Per-block remat (each resnet / transformer / motion module recomputed in the backward pass);
    # "dots_with_no_batch_dims_saveable" keeps weight matmuls. Turn on when a chip's memory is short.
    c.parallel.remat = "none"
    c.data.source = "webvid"
    c.data.csv = "data/webvid/results_2M_train.csv"
    c.data.video_folder = "data/webvid/videos"
    c.data.stride = 4
    c.data.caption_dropout = 0.1
    return c
