"""A motion module trained with diffusers' GroupNorm semantics (across all frames of a video,
`MotionConfig.norm_per_frame=False`) keeps them through every consumer of its file:

- `checkpoints.load.load_motion` returns them, whatever the base UNet's motion config says (the
  file records how its weights were trained, so it wins, and a note says so); a layout that does
  not fit is refused by name;
- `sample`'s pipeline and training build their UNet with them;
- `export --format diffusers` writes a MotionAdapter whose `UNetMotionModel` (which normalises
  across frames) gives our outputs (fp32, rtol 1e-5); the original format cannot say it and is
  refused with one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from torch_refs import randomize, run_unet3d, unet2d_kwargs

from animatediff_jax.checkpoints import params_io
from animatediff_jax.checkpoints.load import load_motion
from animatediff_jax.checkpoints.motion import merge_motion
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.cli import main as cli
from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.config import MotionConfig, tiny_unet
from animatediff_jax.models.init import random_params
from animatediff_jax.models.shapes import motion_shapes

FRAMES = 4
# The spatial UNet of the tiny models (`testing.tiny.write_tiny_models`, training's `model.size=tiny`),
# with a v2 layout of SD1.5's motion-module sizes (8 heads, 32 groups) as training builds it.
BASE = tiny_unet(None, cross_attention_dim=CLIPTextConfig.tiny().hidden_size)
ACROSS = BASE.with_motion(MotionConfig.for_version("v2", norm_per_frame=False))


@pytest.fixture(scope="module")
def across_file(tmp_path_factory):
    """Our params file of a motion module trained with across-frame norms."""
    path = tmp_path_factory.mktemp("norms") / "mm_across.safetensors"
    params_io.save_motion(path, random_params(motion_shapes(ACROSS), 3), ACROSS)
    return path


def test_load_motion_keeps_the_files_norms(across_file, capsys):
    _, config = load_motion(across_file, BASE)  # a spatial base: the file's layout, norms included
    assert config == ACROSS and config.motion.norm_per_frame is False

    per_frame = BASE.with_motion(MotionConfig.for_version("v2"))  # configured per frame (the default)
    capsys.readouterr()
    _, config = load_motion(across_file, per_frame)
    assert config.motion.norm_per_frame is False  # the weights' semantics win ...
    assert "across frames" in capsys.readouterr().err  # ... and the user is told

    with pytest.raises(CheckpointError, match="motion mid_block True \\(base: False\\)"):
        load_motion(across_file, BASE.with_motion(MotionConfig.for_version("v3")))  # a layout that differs: refused


def test_sample_pipeline_runs_the_files_norms(across_file, tmp_path):
    from animatediff_jax.sampling import load_pipeline
    from animatediff_jax.sampling.config import base_config
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path / "models")
    c = base_config()
    c.base_model, c.motion_module, c.dtype = paths["base_model"], str(across_file), "float32"
    pipe = load_pipeline(c)
    assert pipe.unet_config.motion.norm_per_frame is False
    assert pipe.unet.config.motion.norm_per_frame is False  # the module that runs


@pytest.mark.parametrize("stage", ["motion_module", "motion_lora"])
def test_training_keeps_the_files_norms(across_file, stage):
    from animatediff_jax.training import base_config, load_models
    from animatediff_jax.training.config import tiny_overrides

    c = tiny_overrides(base_config())
    c.stage = stage
    c.model.motion_module = str(across_file)
    models = load_models(c)  # stage 2 continues the file's modules; stage 3 trains a MotionLoRA over them
    assert models.unet_config.motion.norm_per_frame is False

    c.model.motion_module = ""
    c.model.motion_norm_per_frame = False  # fresh modules with diffusers' norms, as configured
    assert load_models(c).unet_config.motion.norm_per_frame is False


def test_export_says_it_or_refuses(across_file, tmp_path, capsys):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    # (diffusers' UNetMotionModel gives motion-module norms the UNet's group count, whatever the adapter
    # says: compare outputs with a module whose groups are the tiny UNet's, as in test_export.)
    tiny = tiny_unet("v2", cross_attention_dim=BASE.cross_attention_dim)
    tiny = tiny.replace(motion=tiny.motion.replace(norm_per_frame=False))
    params_io.save_motion(tmp_path / "tiny.safetensors", random_params(motion_shapes(tiny), 4), tiny)
    capsys.readouterr()
    rc = cli(["export", "motion", str(across_file), "--out", str(tmp_path / "mm.ckpt"), "--format", "original"])
    err = capsys.readouterr().err
    assert rc == 2 and "across frames" in err and "--format diffusers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mm.ckpt").exists()

    assert cli(["export", "motion", str(tmp_path / "tiny.safetensors"), "--out", str(tmp_path / "adapter"),
                "--format", "diffusers"]) == 0
    adapter = MotionAdapter.from_pretrained(tmp_path / "adapter")
    unet2d = randomize(UNet2DConditionModel(**unet2d_kwargs(BASE)), seed=7)
    model = UNetMotionModel.from_unet2d(unet2d, adapter).eval()  # diffusers' own numerics: across frames
    motion, config = load_motion(tmp_path / "tiny.safetensors")
    assert config == tiny
    params = merge_motion(convert_unet_state_dict(unet2d.state_dict(), BASE), motion, config)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, BASE.in_channels, FRAMES, 8, 8, generator=g)
    t, ctx = torch.tensor([321]), torch.randn(1, 5, BASE.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = model(x, t, ctx.repeat_interleave(FRAMES, 0)).sample.numpy()
    err = assert_close(run_unet3d(config, params, x, t, ctx), ref, rtol=1e-5, what="across-frame module vs diffusers")
    # ... and the norms matter here: run per frame, the same weights give other outputs.
    per_frame = config.replace(motion=config.motion.replace(norm_per_frame=True))
    assert np.abs(run_unet3d(per_frame, params, x, t, ctx) - ref).max() > 100 * max(err, 1e-6)
    print(f"across-frame motion module exported to diffusers: max abs err {err:.2e} vs UNetMotionModel")
