"""Stage 1: domain adapter, a LoRA on the spatial attention of frozen SD1.5, on single video frames."""

from animatediff_jax.training.config import base_config


def get_config():
    c = base_config()
    c.stage = "domain_adapter"
    c.workdir = "runs/stage1_domain_adapter"
    c.model.pretrained = "models/sd15"  # `animatediff-jax convert sd15 ... --out models/sd15`
    c.model.lora_rank = 64
    c.model.vae = True
    c.model.text_encoder = True
    # Frozen base in bf16 (half the weight memory); the LoRA is applied unmerged at run time in
    # float32, so the bf16 base does not round its delta away; LoRA and AdamW state stay float32.
    c.parallel.frozen_dtype = "bfloat16"
    c.train.num_frames = 1  # image objective: one frame per clip
    c.train.resolution = 512
    c.train.batch_size = 32
    c.train.steps = 20_000
    c.data.source = "webvid"
    c.data.csv = "data/webvid/results_2M_train.csv"
    c.data.video_folder = "data/webvid/videos"
    return c
