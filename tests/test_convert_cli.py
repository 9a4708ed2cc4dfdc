"""`animatediff-jax convert sd15`: PyTorch files in, a params folder out that loads without torch, same values."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from animatediff_jax.checkpoints.params_io import load_converted, load_params, save_params
from animatediff_jax.checkpoints.sd15 import load_sd15
from animatediff_jax.checkpoints.torch_io import CheckpointError, flatten
from animatediff_jax.cli import main as cli_main


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as TConfig, CLIPTextModel as TCLIP

    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.vae import VAEConfig
    from torch_refs import randomize, unet2d_kwargs

    d = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    randomize(UNet2DConditionModel(**unet2d_kwargs(tiny_unet(None)))).save_pretrained(d / "unet")
    randomize(AutoencoderKL(**VAEConfig.tiny().to_diffusers())).save_pretrained(d / "vae")
    TCLIP(TConfig(**CLIPTextConfig.tiny().transformers_kwargs())).save_pretrained(d / "text_encoder")
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "vocab.json").write_text("{}")
    return d


def test_convert_writes_identical_params_and_configs(sd_folder, tmp_path):
    out = tmp_path / "converted"
    assert cli_main(["convert", "sd15", str(sd_folder), "--out", str(out)]) == 0
    direct = load_sd15(sd_folder)
    loaded = load_converted(out)
    assert (loaded.unet_config, loaded.vae_config, loaded.text_config) == (
        direct.unet_config, direct.vae_config, direct.text_config)
    a, b = flatten(direct.params), flatten(loaded.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg="/".join(k))
    assert (out / "tokenizer" / "vocab.json").exists()
    # load_sd15 recognises a converted folder too.
    again = load_sd15(out)
    np.testing.assert_array_equal(again.params["unet"]["conv_in"]["kernel"], b[("unet", "conv_in", "kernel")])


def test_converted_folder_loads_without_torch(sd_folder, tmp_path):
    out = tmp_path / "converted"
    cli_main(["convert", "sd15", str(sd_folder), "--out", str(out)])
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from animatediff_jax.checkpoints.params_io import load_converted\n"
        f"m = load_converted({str(out)!r})\n"
        "print(float(abs(m.params['vae']['decoder']['conv_out']['kernel']).sum()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = float(np.abs(load_sd15(sd_folder).params["vae"]["decoder"]["conv_out"]["kernel"]).sum())
    assert abs(float(r.stdout) - expected) <= 1e-6 * expected


def test_convert_bad_input_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert cli_main(["convert", "sd15", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(bad) in err


def test_params_file_rejects_foreign_safetensors(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(p))
    with pytest.raises(CheckpointError, match="not an animatediff-jax params file"):
        load_params(p)
    save_params(p, {"a": {"b": np.arange(3, dtype=np.float32)}}, {"note": {"k": 1}})
    tree, meta = load_params(p)
    np.testing.assert_array_equal(tree["a"]["b"], np.arange(3))
    assert meta == {"note": {"k": 1}}
