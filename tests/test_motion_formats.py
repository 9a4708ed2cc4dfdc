"""Motion-module files: original AnimateDiff `.ckpt`/`.safetensors` and diffusers `MotionAdapter` folders.

The original files are faked from a randomized diffusers reference: its motion keys are
renamed back to the original naming here in the test (plain string rules, independent of
the code under test) and the `pos_encoder.pe` tables added, as the released files hold them.
Loaded, merged into the converted base UNet and run, they must give the patched diffusers
reference's output (`torch_refs.patch_to_original`).
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax.traverse_util import flatten_dict
from torch_refs import motion_adapter_kwargs, patch_to_original, randomize, run_unet3d, torch_motion_unet

from animatediff_jax.checkpoints.load import load_motion
from animatediff_jax.checkpoints.motion import (
    detect_motion_version,
    diffusers_to_original_key,
    merge_motion,
    original_to_diffusers_key,
    save_motion_adapter,
    save_motion_module_original,
)
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import CheckpointError, ModelSizeError, load_state_dict
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.shapes import motion_subtree, unet_shapes

FRAMES = 4
BASE = tiny_unet(None)


def original_name(key: str) -> str:
    """diffusers -> original AnimateDiff motion-module naming, written out as plain string rules."""
    key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
    renames = {".attn1.": ".attention_blocks.0.", ".attn2.": ".attention_blocks.1.", ".norm1.": ".norms.0."}
    renames.update({".norm2.": ".norms.1.", ".norm3.": ".ff_norm."})
    for new, old in renames.items():
        key = key.replace(new, old)
    return key


def fake_original(motion_sd: dict) -> dict:
    """A diffusers motion state dict as an original checkpoint: renamed, one pe table per attention."""
    out = {}
    for k, v in motion_sd.items():
        if k.endswith(".pos_embed.pe"):
            block = original_name(k[: -len("pos_embed.pe")])
            for i in (0, 1):
                out[f"{block}attention_blocks.{i}.pos_encoder.pe"] = v
        else:
            out[original_name(k)] = v
    return out


def split(tm) -> tuple[dict, dict]:
    sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    motion = {k: v for k, v in sd.items() if ".motion_modules." in k}
    return {k: v for k, v in sd.items() if k not in motion}, motion


def reference(tm, cfg, x, t, ctx) -> np.ndarray:
    patch_to_original(tm, cfg, FRAMES)
    with torch.no_grad():
        return tm(x, t, ctx.repeat_interleave(FRAMES, 0)).sample.numpy()


def inputs(cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, FRAMES, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 730]), ctx


def assert_trees_equal(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), "/".join(k)


def test_renaming_matches_diffusers():
    """Our original<->diffusers renaming equals diffusers' `convert_animatediff_checkpoint_to_diffusers`."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    adapter = randomize(MotionAdapter(**motion_adapter_kwargs(tiny_unet("v2"))))
    sd = adapter.state_dict()
    orig = fake_original(sd)
    ref = convert_animatediff_checkpoint_to_diffusers(dict(orig))
    no_pe = {k: v for k, v in sd.items() if not k.endswith(".pe")}
    assert ref.keys() == no_pe.keys() and all(torch.equal(ref[k], no_pe[k]) for k in ref)
    mine = {original_to_diffusers_key(k): k for k in orig if not k.endswith(".pe")}
    assert mine.keys() == ref.keys()
    assert all(diffusers_to_original_key(d) == o for d, o in mine.items())
    assert (
        original_to_diffusers_key("down_blocks.0.attentions.0.norm.weight") == "down_blocks.0.attentions.0.norm.weight"
    )


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_original_file_parity(version, tmp_path):
    """Original `.ckpt` -> detected version -> merged into the converted base -> == patched diffusers."""
    cfg = tiny_unet(version)
    tm = torch_motion_unet(cfg, seed=5)
    spatial, motion = split(tm)
    orig = fake_original(motion)
    path = tmp_path / f"mm_{version}.ckpt"
    torch.save({"state_dict": orig, "global_step": 7} if version == "v2" else orig, path)

    assert detect_motion_version(load_state_dict(path)) == version
    motion_params, loaded = load_motion(path, BASE)
    assert loaded == cfg
    params = merge_motion(convert_unet_state_dict(spatial, BASE), motion_params, loaded)
    x, t, ctx = inputs(cfg)
    err = assert_close(run_unet3d(cfg, params, x, t, ctx), reference(tm, cfg, x, t, ctx), rtol=1e-5, what=version)
    print(f"{version} original file: max abs err {err:.2e}")


def test_motion_adapter_folder(tmp_path):
    """`MotionAdapter.save_pretrained` folder (v1: 24 positions) -> same params, same output."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from torch_refs import unet2d_kwargs

    cfg = tiny_unet("v1")
    adapter = randomize(MotionAdapter(**motion_adapter_kwargs(cfg)), seed=11)
    unet2d = randomize(UNet2DConditionModel(**unet2d_kwargs(cfg)), seed=12)
    adapter.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    motion_params, loaded = load_motion(tmp_path / "adapter", BASE)
    assert loaded == cfg
    tm = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    base = convert_unet_state_dict(unet2d.state_dict(), BASE)
    params = merge_motion(base, motion_params, loaded)
    assert_trees_equal(params, convert_unet_state_dict(tm.state_dict(), cfg))
    x, t, ctx = inputs(cfg)
    err = assert_close(run_unet3d(cfg, params, x, t, ctx), reference(tm, cfg, x, t, ctx), rtol=1e-5, what="v1 folder")
    print(f"MotionAdapter folder: max abs err {err:.2e}")


@pytest.fixture(scope="module")
def v2_motion():
    cfg = tiny_unet("v2")
    _, motion = split(torch_motion_unet(cfg, seed=2))
    return cfg, motion


def test_original_round_trips(v2_motion, tmp_path):
    """params -> original .ckpt / .safetensors -> params, bit-exact; the file equals the original layout."""
    cfg, motion = v2_motion
    orig = fake_original(motion)
    torch.save(orig, tmp_path / "ref.ckpt")
    params, _ = load_motion(tmp_path / "ref.ckpt", cfg)

    save_motion_module_original(tmp_path / "mm.ckpt", params, cfg)
    written = torch.load(tmp_path / "mm.ckpt", weights_only=True)
    assert written.keys() == orig.keys()
    for k, v in orig.items():
        if k.endswith(".pe"):
            assert written[k].shape == v.shape == (1, 32, v.shape[-1])
            np.testing.assert_allclose(written[k].numpy(), v.numpy(), atol=1e-6)
        else:
            assert torch.equal(written[k], v), k
    back, _ = load_motion(tmp_path / "mm.ckpt", cfg)
    assert_trees_equal(back, params)

    save_motion_module_original(tmp_path / "mm16.safetensors", params, cfg, dtype=np.float16)
    half, _ = load_motion(tmp_path / "mm16.safetensors", cfg)
    save_motion_module_original(tmp_path / "mm16b.safetensors", half, cfg, dtype=np.float16)
    a, b = load_state_dict(tmp_path / "mm16.safetensors"), load_state_dict(tmp_path / "mm16b.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == np.float16 and np.array_equal(a[k], b[k]) for k in a)
    assert_trees_equal(half, jax.tree.map(lambda v: np.asarray(v).astype(np.float16).astype(np.float32), params))


def test_motion_adapter_export(v2_motion, tmp_path):
    """`save_motion_adapter` -> `MotionAdapter.from_pretrained` with nothing missing/unexpected, same weights."""
    from diffusers import MotionAdapter

    cfg, motion = v2_motion
    torch.save(motion, tmp_path / "diffusers_named.ckpt")  # diffusers naming is read from files too
    params, _ = load_motion(tmp_path / "diffusers_named.ckpt", cfg)
    save_motion_adapter(tmp_path / "out", params, cfg)
    adapter, info = MotionAdapter.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    sd = adapter.state_dict()
    assert sd.keys() == motion.keys()
    for k, v in motion.items():
        if k.endswith(".pe"):
            np.testing.assert_allclose(sd[k].numpy(), v.numpy(), atol=1e-6)
        else:
            assert torch.equal(sd[k], v), k
    back, loaded = load_motion(tmp_path / "out", BASE)
    assert loaded == cfg
    assert_trees_equal(back, params)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["_class_name"] == "MotionAdapter"


def test_whole_unet_checkpoint(tmp_path):
    """A whole `UNetMotionModel` checkpoint is refused as a motion module (one line saying what else it
    holds) unless `ignore_spatial`: then its motion modules, as the whole-UNet converter reads them."""
    cfg = tiny_unet("v2")
    tm = torch_motion_unet(cfg, seed=8)
    torch.save(tm.state_dict(), tmp_path / "whole.ckpt")
    besides = r"whole\.ckpt: holds \d+ keys besides the motion modules .*ignore_spatial"
    with pytest.raises(CheckpointError, match=besides):
        load_motion(tmp_path / "whole.ckpt", BASE)
    motion_params, loaded = load_motion(tmp_path / "whole.ckpt", BASE, ignore_spatial=True)
    assert loaded == cfg
    assert_trees_equal(motion_params, motion_subtree(convert_unet_state_dict(tm.state_dict(), cfg)))


def test_errors(v2_motion, tmp_path):
    """Wrong kind, truncated file, wrong layout or channels: CheckpointError naming file and keys."""
    cfg, motion = v2_motion
    orig = fake_original(motion)
    torch.save(orig, tmp_path / "mm.ckpt")

    sd_unet = {"down_blocks.0.attentions.0.proj_in.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(CheckpointError, match="not a motion module"):
        detect_motion_version(sd_unet, "sd.ckpt")
    torch.save({k: torch.zeros(2, 2) for k in sd_unet}, tmp_path / "sd.ckpt")
    holds_unet = r"sd\.ckpt: no motion module in it: it holds a UNet without motion modules"
    with pytest.raises(CheckpointError, match=holds_unet):
        load_motion(tmp_path / "sd.ckpt", cfg)

    stem = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0"
    lora = {f"{stem}.processor.to_q_lora.down.weight": torch.zeros(2, 32)}
    torch.save(lora, tmp_path / "lora.ckpt")
    holds_lora = r"lora\.ckpt: no motion module in it: it holds a MotionLoRA \(original"
    with pytest.raises(CheckpointError, match=holds_lora):
        load_motion(tmp_path / "lora.ckpt", cfg)

    for name in ("mm.ckpt",):
        data = (tmp_path / name).read_bytes()
        (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=r"cut\.ckpt: cannot be read"):
            load_motion(tmp_path / "cut.ckpt", cfg)

    misfit = r"mm\.ckpt \(original AnimateDiff motion module, v2\): a v2 motion module that does not fit .*mid_block"
    with pytest.raises(CheckpointError, match=misfit):
        load_motion(tmp_path / "mm.ckpt", tiny_unet("v3"))

    key = "up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.ff.net.2.weight"
    broken = dict(orig)
    del broken[key]
    broken["down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.zeros(32, 31)
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_motion(tmp_path / "broken.ckpt", cfg)
    msg = str(e.value)
    assert "broken.ckpt (original AnimateDiff motion module, v2)" in msg
    # In the file's words: its key names, both shapes in its (PyTorch) layout.
    assert f"missing keys: {key} (32, 128)" in msg, msg
    assert ("shape mismatches: down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight: "
            "the file has (32, 31), the model needs (32, 32)") in msg, msg

    wide = tiny_unet("v2", block_out_channels=(64, 128))
    wide_motion = motion_subtree(unet_shapes(wide))
    base = convert_unet_state_dict(split(torch_motion_unet(cfg))[0], BASE)
    with pytest.raises(CheckpointError, match=r"different base model: down_blocks_0/motion_modules_0 has 64 channels"):
        merge_motion(base, wide_motion, cfg)
    save_motion_module_original(
        tmp_path / "wide.safetensors", jax.tree.map(lambda s: np.zeros(s.shape, np.float32), wide_motion), wide
    )
    with pytest.raises(ModelSizeError, match=r"shape mismatches in (\d+) of \1 tensors: this file is for another "
                                             r"model size \(e\.g\. channels 64 vs 32\)$"):
        load_motion(tmp_path / "wide.safetensors", cfg)
    v2_params, _ = load_motion(tmp_path / "mm.ckpt", cfg)
    with pytest.raises(CheckpointError, match="unexpected keys: mid_block/motion_modules_0"):
        merge_motion(base, v2_params, tiny_unet("v3"))


def test_half_precision_tables():
    """fp16/bf16-stored position tables are accepted (the released fp16 files hold them so)."""
    import ml_dtypes

    from animatediff_jax.checkpoints.motion import split_position_tables
    from animatediff_jax.models.layers import sinusoidal_table

    table = np.asarray(sinusoidal_table(32, 64))[None]
    for dt in (np.float16, ml_dtypes.bfloat16):
        _, length = split_position_tables({"a.pos_encoder.pe": table.astype(dt).astype(np.float32)})
        assert length == 32
    with pytest.raises(CheckpointError, match="not the sinusoidal table"):
        split_position_tables({"a.pos_encoder.pe": table + 1e-3})
