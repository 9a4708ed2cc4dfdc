"""The README's Python examples run as written, on the tiny random models (`testing.tiny`).

Each ```python block that imports `animatediff_jax` is executed with its placeholder paths pointed at
the tiny files and its sizes made CPU-sized; the variables an example takes as given (`latents`, ...)
are provided. Blocks for PyTorch users (diffusers) are left to `test_export`, which does the same
with diffusers' own loaders.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from animatediff_jax.testing.tiny import write_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    return [b for b in blocks if "animatediff_jax" in b]


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("readme") / "models")


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tiny, monkeypatch, tmp_path):
    from animatediff_jax.checkpoints.sd15 import load_sd15

    code = python_blocks()[index]
    paths = {
        "models/sd15": tiny["base_model"],
        "path/to/mm_sd_v15_v2.ckpt": tiny["motion_module"],
        "models/zoom_in.safetensors": tiny["motion_lora_zoom_in"],
        "configs/sample/v2_motion_lora_zoom_in.py":
            os.path.join(ROOT, "configs", "sample", "tiny.py") + ":" + os.path.dirname(tiny["base_model"]),
    }
    for placeholder, path in paths.items():
        code = code.replace(f'"{placeholder}"', repr(str(path)))
    code = re.sub(r"num_frames=16", "num_frames=4", code)
    code = re.sub(r"height=512, width=512", "height=32, width=32", code)
    sd = load_sd15(tiny["base_model"])
    rng = np.random.default_rng(0)
    given = {  # what the examples take as given
        "latents": rng.standard_normal((1, 4, 8, 8, sd.unet_config.in_channels), np.float32),
        "timesteps": np.array([500]),
        "text_embeddings": rng.standard_normal((1, 77, sd.unet_config.cross_attention_dim), np.float32),
    }
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    exec(compile(code, f"README.md python block {index}", "exec"), dict(given))
