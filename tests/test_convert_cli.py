"""`animatediff-jax convert sd15`: PyTorch files in, a params folder out that loads without torch, same values."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from animatediff_jax.checkpoints.params_io import load_params, save_params
from animatediff_jax.checkpoints.sd15 import load_converted, load_sd15
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.cli import main as cli_main


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch_refs import randomize, unet2d_kwargs
    from transformers import CLIPTextConfig as TConfig
    from transformers import CLIPTextModel as TCLIP

    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.vae import VAEConfig

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
    a, b = flatten_dict(direct.params), flatten_dict(loaded.params)
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
        "from animatediff_jax.checkpoints.sd15 import load_converted\n"
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
    assert cli_main(["convert", "sd15", str(bad), "--out", str(tmp_path / "o")]) == 2  # bad input
    err = capsys.readouterr().err
    assert "error:" in err and str(bad) in err


def test_convert_refuses_an_existing_out_and_never_writes_its_input(sd_folder, tmp_path, capsys):
    """The overwrite rule of every command (`io.fs.check_output`): an existing --out only with --overwrite
    (an empty folder is free), then replaced whole (the folder is written aside and renamed: complete or
    as it was); the input never, even with --overwrite."""
    import os

    out = tmp_path / "converted"
    out.mkdir()
    argv = ["convert", "sd15", str(sd_folder), "--out", str(out)]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == f"error: {out}: exists; pass --overwrite to replace it\n"
    (out / "stale.txt").write_text("from before")
    assert cli_main(argv + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["params.safetensors", "tokenizer"]  # replaced whole
    capsys.readouterr()
    assert cli_main(["convert", "sd15", str(sd_folder), "--out", str(sd_folder), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sd_folder}: is the input") and len(err.splitlines()) == 1, err
    assert os.listdir(tmp_path) == ["converted"]  # no temporary left


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


# ----------------------------------------------------------------- motion modules and LoRAs


def _tree_equal(a, b) -> bool:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """An original v2 motion module, a v1 MotionAdapter folder, an original MotionLoRA, a kohya LoRA."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from test_lora import MOTION_ATTN, kohya_file, modules, original_file, random_factors
    from test_motion_formats import fake_original
    from torch_refs import motion_adapter_kwargs, randomize, unet2d_kwargs

    from animatediff_jax.models.config import tiny_unet

    d = tmp_path_factory.mktemp("torch_files")
    adapter = randomize(MotionAdapter(**motion_adapter_kwargs(tiny_unet("v2"))), seed=1)
    torch.save(fake_original(adapter.state_dict()), d / "mm_v2.ckpt")
    randomize(MotionAdapter(**motion_adapter_kwargs(tiny_unet("v1"))), seed=2).save_pretrained(d / "adapter_v1")
    unet2d = UNet2DConditionModel(**unet2d_kwargs(tiny_unet(None)))
    motion_unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    torch.save(original_file(random_factors(modules(motion_unet, MOTION_ATTN), 2, seed=3)), d / "motion_lora.ckpt")
    return d, unet2d, kohya_file


def test_convert_motion_and_lora(sd_folder, torch_files, tmp_path, capsys):
    """`convert motion|lora` params files hold exactly what the PyTorch readers give; `load_motion` /
    `load_lora` take both."""
    from transformers import CLIPTextModel as TCLIP

    from animatediff_jax.checkpoints.load import load_lora, load_motion
    from animatediff_jax.checkpoints.params_io import save_lora
    from animatediff_jax.checkpoints.torch_io import save_state_dict
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import tiny_unet

    d, unet2d, kohya_file = torch_files
    base = tiny_unet(None)
    for src, version in ((d / "mm_v2.ckpt", "v2"), (d / "adapter_v1", "v1")):
        out = tmp_path / f"{version}.safetensors"
        assert cli_main(["convert", "motion", str(src), "--out", str(out), "--base-config", str(sd_folder)]) == 0
        assert f"{version} motion module" in capsys.readouterr().err
        ref, ref_cfg = load_motion(src, base)
        params, cfg = load_motion(out)  # the config the file records
        assert cfg == ref_cfg == tiny_unet(version) and _tree_equal(params, ref)
        again, cfg2 = load_motion(out, base)
        assert cfg2 == cfg and _tree_equal(again, ref)

    out = tmp_path / "ml.safetensors"
    assert cli_main(["convert", "lora", str(d / "motion_lora.ckpt"), "--kind", "motion_lora", "--out", str(out),
                     "--base-config", str(sd_folder)]) == 0
    ref = load_lora(d / "motion_lora.ckpt", "motion_lora", base=tiny_unet("v2"))
    assert ref.source == "original AnimateDiff" and ref.unet_config == tiny_unet("v2")
    b = load_lora(out, "motion_lora")  # the config the file records
    assert b.kind == "motion_lora" and b.unet_config == tiny_unet("v2") and _tree_equal(b.unet, ref.unet)
    assert b.source == "animatediff-jax" and b.text_encoder is None
    assert _tree_equal(load_lora(out, "motion_lora", base=tiny_unet("v2")).unet, ref.unet)
    # A base without motion modules is inflated as the file records (v2, as the PyTorch file's mid block says).
    assert load_lora(out, "motion_lora", base=base).unet_config == tiny_unet("v2")
    assert load_lora(d / "motion_lora.ckpt", "motion_lora", base=base).unet_config == tiny_unet("v2")

    # A kohya LoRA with text-encoder layers: the base folder's text config gives its target.
    clip = TCLIP.from_pretrained(sd_folder / "text_encoder")
    sd, _ = kohya_file(unet2d, clip)
    save_state_dict(tmp_path / "kohya.safetensors", {k: v.numpy() for k, v in sd.items()})
    out = tmp_path / "kohya_params.safetensors"
    assert cli_main(["convert", "lora", str(tmp_path / "kohya.safetensors"), "--kind", "lora", "--out", str(out),
                     "--base-config", str(sd_folder)]) == 0
    tcfg = CLIPTextConfig.tiny()
    ref = load_lora(tmp_path / "kohya.safetensors", "lora", base=base, text_config=tcfg)
    assert ref.source == "kohya" and ref.text_config == tcfg
    b = load_lora(out, "lora")  # the configs the file records
    assert b.kind == "lora" and b.unet_config == base and b.text_config == tcfg
    assert _tree_equal(b.unet, ref.unet) and _tree_equal(b.text_encoder, ref.text_encoder)
    lf = load_lora(out, "lora", base=base, text_config=tcfg)
    assert _tree_equal(lf.unet, ref.unet) and _tree_equal(lf.text_encoder, ref.text_encoder)
    with pytest.raises(CheckpointError, match=r"kohya_params\.safetensors .*does not fit the model"):
        load_lora(out, "lora", base=base, text_config=CLIPTextConfig.sd15())  # another text encoder
    # A file with text-encoder layers and no text config: refused without a text encoder to check them on.
    save_lora(tmp_path / "no_text_config.safetensors", b.unet, "lora", base, b.text_encoder)
    with pytest.raises(CheckpointError, match="text-encoder layers but no text-encoder model"):
        load_lora(tmp_path / "no_text_config.safetensors", "lora")


def test_motion_params_file_loads_without_torch(sd_folder, torch_files, tmp_path):
    d, _, _ = torch_files
    out = tmp_path / "mm.safetensors"
    assert cli_main(["convert", "motion", str(d / "mm_v2.ckpt"), "--out", str(out), "--base-config", str(sd_folder)]) == 0
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from animatediff_jax.checkpoints.load import load_motion\n"
        f"p, c = load_motion({str(out)!r})\n"
        "print(c.motion.mid_block, float(abs(p['mid_block']['motion_modules_0']['proj_out']['kernel']).sum()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from animatediff_jax.checkpoints.load import load_motion
    from animatediff_jax.convert import resolve_base

    ref = load_motion(d / "mm_v2.ckpt", resolve_base(str(sd_folder))[0])[0]
    mid, total = r.stdout.split()
    assert mid == "True" and float(total) == pytest.approx(
        float(np.abs(ref["mid_block"]["motion_modules_0"]["proj_out"]["kernel"]).sum()), rel=1e-6)


def test_convert_motion_lora_errors(sd_folder, torch_files, tmp_path, capsys):
    """The wrong kind of file, a wrong output name, a bad base: exit 2 (bad input) and one line."""
    d, _, _ = torch_files
    base = ["--base-config", str(sd_folder)]
    cases = [
        (["motion", str(d / "motion_lora.ckpt"), "--out", str(tmp_path / "o.safetensors")],
         r"motion_lora\.ckpt: no motion module in it: it holds a MotionLoRA \(original AnimateDiff naming"),
        (["lora", str(d / "motion_lora.ckpt"), "--kind", "domain_adapter", "--out", str(tmp_path / "o.safetensors")],
         r"no domain adapter in it: it holds a MotionLoRA"),
        (["lora", str(d / "mm_v2.ckpt"), "--kind", "motion_lora", "--out", str(tmp_path / "o.safetensors")],
         r"mm_v2\.ckpt: no MotionLoRA in it: it holds a motion module \(original AnimateDiff naming, v2 layout"),
        (["motion", str(d / "mm_v2.ckpt"), "--out", str(tmp_path / "o.ckpt")], r"params files are \.safetensors"),
        (["motion", str(d / "missing.ckpt"), "--out", str(tmp_path / "o.safetensors")], r"missing\.ckpt: no such file"),
    ]
    for argv, pattern in cases:
        capsys.readouterr()
        assert cli_main(["convert", *argv, *base]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    capsys.readouterr()
    assert cli_main(["convert", "motion", str(d / "mm_v2.ckpt"), "--out", str(tmp_path / "o.safetensors"),
                     "--base-config", str(tmp_path)]) == 2
    assert "not a base model folder" in capsys.readouterr().err
    # A motion module for other channels than the base: the mismatch, in one line.
    assert cli_main(["convert", "motion", str(d / "mm_v2.ckpt"), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "shape mismatches" in err
