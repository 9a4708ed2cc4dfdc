"""HotshotXL (hotshotco/Hotshot-XL) temporal layers on the SDXL base: one `UNet3D`, layout `hotshot_xl`.

The reference is a minimal PyTorch re-implementation of Hotshot-XL's temporal layer in
`torch_refs` (`HotshotTransformerTemporal`, module for module after hotshot_xl/models/
transformer_temporal.py, on diffusers' `Attention`/`FeedForward` as the original is; the original
cannot be imported here: CI has no copy), inserted into diffusers' tiny SDXL `UNetMotionModel` where
Hotshot's unet_blocks.py puts its `temporal_attentions`, with the resnet/output GroupNorms across
frames as Hotshot's `ResnetBlock3D`. Its temporal layers' `state_dict()` is the released
`hsxl_temporal_layers.safetensors` layout; our key table converts it (fp32, random weights).
The real-size key layout is checked on shapes alone (the reference built on the meta device).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax.traverse_util import flatten_dict
from test_motion_formats import assert_trees_equal
from test_sdxl_unet import FRAMES, _Shape, inputs, ours
from torch_refs import HotshotTemporalLayers, HotshotTransformerTemporal, randomize, torch_hotshot_unet

from animatediff_jax.checkpoints import motion as motion_io
from animatediff_jax.checkpoints import torch_io
from animatediff_jax.checkpoints.load import load_motion
from animatediff_jax.checkpoints.motion import (
    detect_motion_version,
    diffusers_to_hotshot_key,
    hotshot_to_diffusers_key,
    merge_motion,
    motion_family,
    motion_state_dict,
    save_motion_module_hotshot,
    save_motion_module_original,
)
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import CheckpointError, ModelSizeError, load_state_dict, save_state_dict
from animatediff_jax.models.config import MotionConfig, sdxl_unet, tiny_sdxl_unet, tiny_unet
from animatediff_jax.models.init import random_params
from animatediff_jax.models.motion_module import MotionModule
from animatediff_jax.models.shapes import motion_shapes, unet_shapes

BASE = tiny_sdxl_unet(None)
# Hotshot's 8 heads (of 4/8/16 channels here); 8 groups for the tiny channels (Hotshot: 32).
HOTSHOT = BASE.with_motion(MotionConfig.for_version("hotshot_xl", norm_num_groups=8))
TOL = 1e-5  # relative to the reference's max |value| (fp32, CPU)


def _numpy(sd) -> dict:
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


def test_layout_is_data():
    """`hotshot_xl`: SDXL family, 24 positions, per-frame temporal norms, no mid block; its UNet's resnet
    norms span all frames; told from the SDXL beta by its origin, not by its numbers."""
    m = sdxl_unet("hotshot_xl").motion
    assert (m.version, m.family, m.origin, m.max_positions, m.mid_block, m.norm_per_frame, m.heads) == (
        "hotshot_xl", "sdxl", "hotshot_xl", 24, False, True, 8)
    assert not sdxl_unet("hotshot_xl").spatial_norm_per_frame and sdxl_unet("sdxl_beta").spatial_norm_per_frame
    assert MotionConfig.for_version("sdxl_beta", max_positions=24).version == "sdxl_beta"
    with pytest.raises(ValueError, match=r"motion modules for SDXL \(hotshot_xl\) but the base is SD1\.5"):
        tiny_unet("hotshot_xl")


def test_temporal_layer_matches_reference():
    """One temporal layer, ours (`MotionModule`, hotshot_xl layout) vs the reference: B=2, F=5, 6x6."""
    c, b, f = 32, 2, 5
    ref = randomize(HotshotTransformerTemporal(c, heads=8, groups=8), seed=3)
    sd = {f"down_blocks.0.temporal_attentions.0.{k}": v for k, v in _numpy(ref.state_dict()).items()}
    assert sum(k.endswith(".pos_encoder.positional_encoding") for k in sd) == 2
    renamed, naming, _ = motion_io._motion_state_dict(sd, "layer", ignore_spatial=False)
    rest, length = motion_io.split_position_tables(renamed)
    assert naming == "HotshotXL" and length == 24
    module = MotionModule(HOTSHOT.motion)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((f, 4, 4, c)), f))["params"]
    prefix = "down_blocks.0.motion_modules.0."
    params = torch_io.torch_to_flax({k[len(prefix):]: v for k, v in rest.items()}, shapes, what="layer")
    x = torch.randn(b, c, f, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).numpy()
    got = module.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())
                                             .reshape(b * f, 6, 6, c), f)
    got = np.asarray(got).reshape(b, f, 6, 6, c).transpose(0, 4, 1, 2, 3)
    err = assert_close(got, want, rtol=TOL, atol=0, what="HotshotXL temporal layer")
    print(f"HotshotXL temporal layer: max abs err {err:.2e} (ref max {np.abs(want).max():.2f}, tol {TOL} x ref max)")


def test_unet_matches_reference(tmp_path):
    """Tiny SDXL UNet3D with HotshotXL temporal layers (read from the layers' file by our key table) ==
    the reference UNet, B=2, F=4; its norms told apart (per-frame resnets, across-frame temporal)."""
    t0 = time.time()
    tm, layers = torch_hotshot_unet(HOTSHOT, FRAMES, seed=5)
    save_state_dict(tmp_path / "hsxl_temporal_layers.safetensors", _numpy(layers.state_dict()))
    # (the spatial weights under their own names: the across-frames wrappers' `.inner.` dropped)
    spatial = {k.replace(".inner.", "."): v for k, v in tm.state_dict().items() if ".motion_modules." not in k}
    base_params = convert_unet_state_dict(spatial, BASE)
    mm, cfg = load_motion(tmp_path / "hsxl_temporal_layers.safetensors", BASE)
    assert cfg == HOTSHOT  # (8 heads: the SDXL default a file does not record; 8 groups: the base's)
    params = merge_motion(base_params, mm, cfg)
    x, t, ctx, text, ids = inputs(cfg)
    with torch.no_grad():
        ref = tm(x, t, ctx.repeat_interleave(FRAMES, 0), added_cond_kwargs={"text_embeds": text, "time_ids": ids})
    ref = ref.sample.numpy()
    got = ours(cfg, params, x, t, ctx, text, ids)
    err = assert_close(got, ref, rtol=TOL, atol=0, what="SDXL UNet3D + HotshotXL")
    print(f"SDXL + HotshotXL UNet: max abs err {err:.2e} (ref max {np.abs(ref).max():.2f}, tol {TOL} x ref max), "
          f"{time.time() - t0:.1f} s")
    for other in (cfg.replace(spatial_norm_per_frame=True), cfg.replace(motion=cfg.motion.replace(norm_per_frame=False))):
        assert np.abs(ours(other, params, x, t, ctx, text, ids) - ref).max() > 1e-3

    # written back in Hotshot's naming: exactly the file's keys and values (tables included)
    back = motion_state_dict(mm, cfg, "hotshot_xl")
    want = _numpy(layers.state_dict())
    assert back.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(back[k], want[k], rtol=0, atol=2e-6 if k.endswith("positional_encoding") else 0,
                                   err_msg=k)
    save_motion_module_hotshot(tmp_path / "back.safetensors", mm, cfg)
    assert_trees_equal(load_motion(tmp_path / "back.safetensors", BASE)[0], mm)
    with pytest.raises(ValueError, match="HotshotXL's naming"):
        save_motion_module_original(tmp_path / "as_animatediff.ckpt", mm, cfg)

    # `export motion` writes a trained HotshotXL module in Hotshot's naming, and refuses diffusers' MotionAdapter
    from animatediff_jax.checkpoints.params_io import save_motion
    from animatediff_jax.cli import main as cli_main

    save_motion(tmp_path / "ours.safetensors", mm, cfg)
    assert cli_main(["export", "motion", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "ex.safetensors"),
                     "--format", "original"]) == 0
    assert load_state_dict(tmp_path / "ex.safetensors").keys() == want.keys()
    assert cli_main(["export", "motion", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "ad"),
                     "--format", "diffusers"]) == 2

    # its whole UNet3D file (`unet/`: the same temporal-layer keys among the spatial ones), with ignore_spatial
    whole = {**_numpy(spatial), **want}
    save_state_dict(tmp_path / "unet.safetensors", whole)
    with pytest.raises(CheckpointError, match="ignore_spatial"):
        load_motion(tmp_path / "unet.safetensors", BASE)
    assert_trees_equal(load_motion(tmp_path / "unet.safetensors", BASE, ignore_spatial=True)[0], mm)


def test_key_table_both_ways():
    """Every Hotshot key <-> ours: renamed to diffusers' names they are our motion params' (as flax_to_torch
    names them), and back they are the file's (position tables aside)."""
    sd = HotshotTemporalLayers((32, 64, 128), 1, heads=8, groups=8).state_dict()
    keys = {k for k in sd if not k.endswith(".positional_encoding")}
    ours_keys = set(torch_io.flax_to_torch(random_params(motion_shapes(HOTSHOT), 0)))
    assert {hotshot_to_diffusers_key(k) for k in keys} == ours_keys
    assert {diffusers_to_hotshot_key(k) for k in ours_keys} == keys
    assert hotshot_to_diffusers_key("up_blocks.2.temporal_attentions.1.transformer_blocks.0.attention_blocks.1.to_q"
                                    ".weight") == "up_blocks.2.motion_modules.1.transformer_blocks.0.attn2.to_q.weight"
    assert hotshot_to_diffusers_key("conv_in.weight") == "conv_in.weight"  # outside temporal layers: unchanged


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_mismatch_is_one_line(tmp_path):
    """HotshotXL where AnimateDiff-SDXL is expected, the reverse, and either family's mismatch: one line naming both."""
    hs = random_params(motion_shapes(HOTSHOT), 1)
    save_motion_module_hotshot(tmp_path / "hsxl.safetensors", hs, HOTSHOT)
    beta = tiny_sdxl_unet()
    save_motion_module_original(tmp_path / "mm_sdxl.ckpt", random_params(motion_shapes(beta), 2), beta)
    v2 = tiny_unet("v2")
    save_motion_module_original(tmp_path / "mm_v2.ckpt", random_params(motion_shapes(v2), 3), v2)

    assert detect_motion_version(load_state_dict(tmp_path / "hsxl.safetensors")) == "hotshot_xl"
    assert motion_family(load_state_dict(tmp_path / "hsxl.safetensors")) == "sdxl"
    assert detect_motion_version(load_state_dict(tmp_path / "mm_sdxl.ckpt")) == "sdxl_beta"

    with pytest.raises(CheckpointError) as e:
        load_motion(tmp_path / "hsxl.safetensors", beta)
    assert _one_line(e).endswith("hsxl.safetensors (HotshotXL motion module, hotshot_xl): the motion module is "
                                 "HotshotXL (3 levels, 32/64/128) but the base expects AnimateDiff-SDXL motion modules")
    with pytest.raises(CheckpointError) as e:
        load_motion(tmp_path / "mm_sdxl.ckpt", HOTSHOT)
    assert _one_line(e).endswith("mm_sdxl.ckpt (original AnimateDiff motion module, sdxl_beta): the motion module is "
                                 "AnimateDiff-SDXL (3 levels, 32/64/128) but the base expects HotshotXL motion modules")
    with pytest.raises(ModelSizeError) as e:
        load_motion(tmp_path / "mm_v2.ckpt", HOTSHOT)
    assert _one_line(e).endswith("the motion module is AnimateDiff SD1.5 v2 (2 levels, 32/64, mid-block module) but "
                                 "the base is SDXL (3 levels, 32/64/128) expecting HotshotXL motion modules")
    with pytest.raises(ModelSizeError) as e:
        load_motion(tmp_path / "hsxl.safetensors", tiny_unet(None))
    assert _one_line(e).endswith("the motion module is HotshotXL (3 levels, 32/64/128) but the base is SD1.5 "
                                 "(2 levels, 32/64)")
    # our own params file records the origin too
    from animatediff_jax.checkpoints import params_io

    params_io.save_motion(tmp_path / "ours.safetensors", hs, HOTSHOT)
    assert load_motion(tmp_path / "ours.safetensors", BASE)[1] == HOTSHOT
    with pytest.raises(CheckpointError) as e:
        load_motion(tmp_path / "ours.safetensors", beta)
    assert "is HotshotXL (3 levels, 32/64/128) but the base expects AnimateDiff-SDXL motion modules" in _one_line(e)


def test_real_size_layout(monkeypatch):
    """The released `hsxl_temporal_layers.safetensors` layout (the reference's tree at SDXL size, on the
    meta device): every key lands on `sdxl_unet("hotshot_xl")`'s motion params with its shape, nothing
    missing or unexpected, and is detected as HotshotXL."""
    with torch.device("meta"):
        layers = HotshotTemporalLayers()
    sd = {}
    for k, v in layers.state_dict().items():
        shape = tuple(v.shape)
        sd[k] = (motion_io.position_table(shape[-2], shape[-1])[None] if k.endswith("positional_encoding")
                 else np.broadcast_to(np.zeros((), np.float32), shape))
    assert detect_motion_version(sd) == "hotshot_xl" and motion_family(sd) == "sdxl"
    assert {np.shape(v)[1] for k, v in sd.items() if k.endswith("positional_encoding")} == {24}
    cfg = sdxl_unet("hotshot_xl")
    real = torch_io._torch_to_flax_value
    monkeypatch.setattr(torch_io, "_torch_to_flax_value", lambda *a: _Shape(real(*a)))
    mf = motion_io.MotionFile(*_read(sd))
    params = motion_io.motion_params(mf, cfg)  # strict: raises on any missing, unexpected or misshapen key
    got = {p: v.shape for p, v in flatten_dict(params).items()}
    want = {p: tuple(v.shape) for p, v in flatten_dict(motion_shapes(cfg)).items()}
    assert got == want
    n = sum(int(np.prod(s)) for s in want.values())
    assert n == sum(v.numel() for v in layers.parameters())
    assert len(sd) == len(got) + 2 * 15  # two position tables per temporal layer, 15 layers
    assert not any(p[0] == "mid_block" for p in flatten_dict(unet_shapes(cfg)) if "motion_modules_0" in p)
    print(f"real-size HotshotXL temporal layers: {len(sd)} keys, {n / 1e6:.1f} M params")


def _read(sd):
    """`MotionFile` fields for an in-memory state dict, as `read_motion_file` builds them."""
    motion, naming, names = motion_io._motion_state_dict(sd, "hsxl_temporal_layers", ignore_spatial=False)
    rest, length = motion_io.split_position_tables(motion)
    assert naming == "HotshotXL" and length == 24
    layout = MotionConfig.for_version("hotshot_xl")
    return rest, layout, frozenset(), None, "hsxl_temporal_layers", names
