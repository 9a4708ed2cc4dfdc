"""Where the toy recipe keeps its files, and the settings every toy config shares.

One root folder (default `runs/toy`) holds everything a run makes:

    data/{images,videos,zoom}/    the toy world (WebVid CSV + MP4s + ground truth)
    base/model/                   the base text-to-image model (a converted SD1.5 folder)
    stage1/domain_adapter.safetensors
    stage2/motion_module.safetensors
    stage3/motion_lora.safetensors
    demo/                         GIFs, metrics.json

The config files in `configs/toy/` take the root as their argument
(`--config configs/toy/stage2_motion_module.py:runs/toy`).
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from animatediff_jax.toy.base import SIZE

DEFAULT_ROOT = "runs/toy"
FRAMES = 8  # frames per training clip and per sample


def paths(root: str = DEFAULT_ROOT) -> dict[str, str]:
    """Every file and folder of a toy run under `root`."""
    j = os.path.join
    return {
        "data": j(root, "data"),
        "base": j(root, "base"),
        "model": j(root, "base", "model"),
        "stage1": j(root, "stage1"),
        "stage2": j(root, "stage2"),
        "stage3": j(root, "stage3"),
        "domain_adapter": j(root, "stage1", "domain_adapter.safetensors"),
        "motion_module": j(root, "stage2", "motion_module.safetensors"),
        "motion_lora": j(root, "stage3", "motion_lora.safetensors"),
        "demo": j(root, "demo"),
    }


def dataset(root: str, name: str) -> tuple[str, str]:
    """(CSV, video folder) of toy dataset `name` ("images", "videos" or "zoom")."""
    folder = os.path.join(paths(root)["data"], name)
    return os.path.join(folder, "data.csv"), os.path.join(folder, "videos")


def toy_overrides(c: ConfigDict, root: str, data: str) -> ConfigDict:
    """Settings shared by the toy configs: the toy base model, 16x16 pixel-space clips of the
    toy world read as WebVid data (no flips: they would contradict left/right captions), the
    hash tokenizer, v-prediction (sample with `prediction_type="v_prediction"`), fp32 on one CPU,
    a checkpoint at the end only."""
    p = paths(root)
    c.model.pretrained = p["model"]
    c.model.random_init = "fast"  # fresh motion modules from host numpy (no Flax init compile)
    c.model.lora_rank = 8
    c.train.resolution = SIZE
    c.train.num_frames = FRAMES
    c.loss.prediction_type = "v_prediction"  # pixel-space 16x16: learns ~2x faster than epsilon here
    c.parallel.compute_dtype = "float32"
    c.parallel.mesh_shape = ConfigDict({"data": 1, "fsdp": 1})
    c.data.source = "webvid"
    c.data.csv, c.data.video_folder = dataset(root, data)
    c.data.stride = 1
    c.data.flip = False
    c.data.tokenizer = "hash"
    c.data.read_threads = 2
    c.data.prefetch = 16
    c.checkpoint.every = 1_000_000  # the run's end is always saved
    c.checkpoint.keep = 1
    c.log.every = 25
    c.log.tensorboard = False
    return c
