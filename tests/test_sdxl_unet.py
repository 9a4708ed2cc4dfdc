"""The SDXL UNet and AnimateDiff-SDXL motion modules: one `UNet3D`, its layout from `UNetConfig`.

Tiny sizes (`tiny_sdxl_unet`: 3 levels, per-level heads and depths, text_time conditioning) against
diffusers' `UNet2DConditionModel` (per frame) and `UNetMotionModel` (fp32, random weights); the SDXL
beta's motion-module norms span all frames, as diffusers' do, so no patch is needed. The real-size
layout is checked on shapes alone (diffusers on the meta device, ours by `eval_shape`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax.traverse_util import flatten_dict
from test_motion_formats import assert_trees_equal, fake_original
from torch_refs import motion_adapter_kwargs, randomize, torch_motion_unet, unet2d_kwargs

from animatediff_jax.checkpoints import motion as motion_io
from animatediff_jax.checkpoints import params_io, torch_io
from animatediff_jax.checkpoints.load import load_motion
from animatediff_jax.checkpoints.motion import (
    detect_motion_version,
    diffusers_to_original_key,
    merge_motion,
    original_to_diffusers_key,
    save_motion_module_original,
)
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import ModelSizeError, load_state_dict
from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet, sdxl_unet, tiny_sdxl_unet, tiny_unet
from animatediff_jax.models.init import random_params
from animatediff_jax.models.shapes import motion_shapes, motion_subtree, unet_shapes
from animatediff_jax.models.unet import AddedCond, UNet3D, cross_attentions

FRAMES = 4
BASE = tiny_sdxl_unet(None)
MOTION = tiny_sdxl_unet()

# stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json` (the fields diffusers reads).
SDXL_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# guoyww/animatediff-motion-adapter-sdxl-beta `config.json`.
SDXL_ADAPTER_CONFIG = {
    "_class_name": "MotionAdapter", "block_out_channels": [320, 640, 1280], "conv_in_channels": None,
    "motion_layers_per_block": 2, "motion_max_seq_length": 32, "motion_mid_block_layers_per_block": 1,
    "motion_norm_num_groups": 32, "motion_num_attention_heads": 8, "motion_transformer_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1, "use_motion_mid_block": False,
}


def inputs(cfg: UNetConfig, batch: int = 2):
    """Latents `[B, C, F, H, W]`, timesteps, text `[B, L, D]`, pooled text `[B, P]` and time ids `[B, 6]`
    (original size, crop corner, target size: each video its own)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, FRAMES, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    text = torch.randn(batch, cfg.text_embeds_dim, generator=g)
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 48.0, 512.0, 896.0]])
    return x, torch.tensor([10, 730]), ctx, text, ids[:batch]


_apply: dict = {}


def ours(cfg, params, x, t, ctx, text, ids) -> np.ndarray:
    """Our UNet3D on torch-layout tensors, output in torch layout; one jitted apply per config."""
    if cfg not in _apply:
        _apply[cfg] = jax.jit(UNet3D(cfg).apply)
    out = _apply[cfg]({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()), jnp.asarray(t.numpy()),
                      jnp.asarray(ctx.numpy()), added_cond=AddedCond(jnp.asarray(text.numpy()), jnp.asarray(ids.numpy())))
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def test_config_round_trips_and_layout():
    """SDXL base's config.json <-> `sdxl_unet()`; per-level heads/depths (mid block: the last level's)."""
    cfg = UNetConfig.from_diffusers(SDXL_BASE_CONFIG)
    assert cfg == sdxl_unet()
    assert cfg.attention_heads == (5, 10, 20) and cfg.transformer_layers == (1, 2, 10)
    assert [cfg.level_heads(i) for i in (0, 1, 2, -1)] == [5, 10, 20, 20]
    assert cfg.text_embeds_dim == 1280 and cfg.family == "sdxl" and cfg.describe() == "SDXL (3 levels, 320/640/1280)"
    assert {k: SDXL_BASE_CONFIG[k] for k in cfg.to_diffusers()} == cfg.to_diffusers()
    for c in (BASE, MOTION):
        assert UNetConfig.from_diffusers(c.to_diffusers(), motion=c.motion) == c
        assert params_io.config_from_dict(UNetConfig, dataclasses.asdict(c)) == c  # (our files' meta)
    # 10-deep transformers in the mid block and the last level, 2 at the middle one: 70 cross-attentions
    assert len(cross_attentions(cfg)) == 2 * 2 + 2 * 10 + 3 * 10 + 3 * 2 + 10

    m = sdxl_unet("sdxl_beta").motion
    assert m.version == "sdxl_beta" and not m.mid_block and m.max_positions == 32 and not m.norm_per_frame
    assert sdxl_unet("sdxl_beta").spatial_norm_per_frame  # resnets per frame (frames folded into the batch)
    assert MotionConfig.for_version("v3").version == "v3"  # the same layout without the family is still v3
    with pytest.raises(ValueError, match=r"motion modules for SD1\.5 \(v2\) but the base is SDXL"):
        sdxl_unet("v2")
    with pytest.raises(ValueError, match=r"motion modules for SDXL \(sdxl_beta\) but the base is SD1\.5"):
        tiny_unet("sdxl_beta")


def test_added_cond_is_checked():
    """An SDXL UNet needs `added_cond`, one without refuses it; shapes are checked (on shapes alone)."""
    x, ctx = jnp.zeros((2, 2, 8, 8, 4)), jnp.zeros((2, 5, 16))
    init = lambda cfg, added: jax.eval_shape(lambda: UNet3D(cfg).init(jax.random.key(0), x, jnp.zeros(2), ctx,
                                                                      added_cond=added))
    with pytest.raises(ValueError, match="needs added_cond"):
        init(BASE, None)
    with pytest.raises(ValueError, match="without addition_embed_type"):
        init(tiny_unet(None), AddedCond(jnp.zeros((2, 16)), jnp.zeros((2, 6))))
    with pytest.raises(ValueError, match=r"text_embeds \(2, 12\) and time_ids \(2, 6\) for 2 videos"):
        init(BASE, AddedCond(jnp.zeros((2, 12)), jnp.zeros((2, 6))))
    tree = flatten_dict(init(BASE, AddedCond(jnp.zeros((2, 16)), jnp.zeros((2, 6))))["params"])
    assert tree[("add_embedding", "linear_1", "kernel")].shape == (64, 128)


def test_spatial_unet_matches_unet2d():
    """No motion: SDXL's image UNet per frame == diffusers' `UNet2DConditionModel` given added_cond_kwargs."""
    from diffusers import UNet2DConditionModel

    tm = randomize(UNet2DConditionModel(**unet2d_kwargs(BASE)), seed=3)
    params = convert_unet_state_dict(tm.state_dict(), BASE)
    x, t, ctx, text, ids = inputs(BASE)
    frames = x.permute(0, 2, 1, 3, 4).reshape(2 * FRAMES, BASE.in_channels, 8, 8)
    per_frame = lambda v: v.repeat_interleave(FRAMES, 0)
    with torch.no_grad():
        ref = tm(frames, per_frame(t), per_frame(ctx),
                 added_cond_kwargs={"text_embeds": per_frame(text), "time_ids": per_frame(ids)}).sample
    ref = ref.reshape(2, FRAMES, BASE.out_channels, 8, 8).permute(0, 2, 1, 3, 4).numpy()
    err = assert_close(ours(BASE, params, x, t, ctx, text, ids), ref, rtol=1e-5, what="SDXL UNet3D (no motion)")
    print(f"SDXL spatial UNet: max abs err {err:.2e} (ref max {np.abs(ref).max():.2f})")
    # the added conditioning matters (so the comparison above exercises it)
    other = ours(BASE, params, x, t, ctx, text, ids.flip(0))
    assert np.abs(other - ref).max() > 1e-3


def test_motion_unet_matches_unet_motion_model():
    """Tiny SDXL `UNetMotionModel` (MotionAdapter without mid block, 32 positions): same output for B=2, F=4."""
    tm = torch_motion_unet(MOTION, seed=4)
    assert tm.config.use_motion_mid_block is False and tm.config.motion_max_seq_length == 32
    params = convert_unet_state_dict(tm.state_dict(), MOTION)
    x, t, ctx, text, ids = inputs(MOTION)
    with torch.no_grad():  # (UNetMotionModel: text per frame, added conditioning per video)
        ref = tm(x, t, ctx.repeat_interleave(FRAMES, 0), added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
    ref = ref.numpy()
    err = assert_close(ours(MOTION, params, x, t, ctx, text, ids), ref, rtol=1e-5, what="SDXL UNet3D + motion")
    print(f"SDXL motion UNet: max abs err {err:.2e} (ref max {np.abs(ref).max():.2f})")
    per_frame = MOTION.replace(motion=dataclasses.replace(MOTION.motion, norm_per_frame=True))
    assert np.abs(ours(per_frame, params, x, t, ctx, text, ids) - ref).max() > 1e-3  # the norms are told apart


def test_adapter_and_original_files_load_to_the_same_params(tmp_path):
    """The SDXL MotionAdapter (folder, and renamed to the original naming as `mm_sdxl_v10_beta.ckpt`) ->
    the motion params diffusers' `UNetMotionModel` holds; detected as the SDXL beta by its shapes."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    adapter = randomize(MotionAdapter(**motion_adapter_kwargs(MOTION)), seed=6)
    unet2d = randomize(UNet2DConditionModel(**unet2d_kwargs(BASE)), seed=7)
    expected = motion_subtree(convert_unet_state_dict(UNetMotionModel.from_unet2d(unet2d, adapter).state_dict(), MOTION))

    adapter.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    from_folder, cfg = load_motion(tmp_path / "adapter", BASE.with_motion(MOTION.motion))
    assert cfg == MOTION and cfg.motion.version == "sdxl_beta"
    assert_trees_equal(from_folder, expected)

    sd = adapter.state_dict()
    orig = fake_original(sd)  # plain string rules, two pos_encoder.pe per temporal block
    assert not any(k.startswith(("mid_block.", "down_blocks.3.")) for k in orig)
    no_pe = {k: v for k, v in sd.items() if not k.endswith(".pe")}
    assert {original_to_diffusers_key(k) for k in orig if not k.endswith(".pe")} == no_pe.keys()
    assert {diffusers_to_original_key(k) for k in no_pe} == {k for k in orig if not k.endswith(".pe")}
    ref = convert_animatediff_checkpoint_to_diffusers(dict(orig))
    assert ref.keys() == no_pe.keys()
    torch.save(orig, tmp_path / "mm_sdxl.ckpt")
    assert detect_motion_version(load_state_dict(tmp_path / "mm_sdxl.ckpt")) == "sdxl_beta"
    from_original, cfg = load_motion(tmp_path / "mm_sdxl.ckpt", BASE.with_motion(MOTION.motion))
    assert cfg == MOTION
    assert_trees_equal(from_original, expected)

    # written back in the original naming: the same keys, and read again the same params
    save_motion_module_original(tmp_path / "back.safetensors", from_original, MOTION)
    assert load_state_dict(tmp_path / "back.safetensors").keys() == orig.keys()
    assert_trees_equal(load_motion(tmp_path / "back.safetensors", BASE.with_motion(MOTION.motion))[0], expected)
    merged = merge_motion(convert_unet_state_dict(unet2d.state_dict(), BASE), from_original, MOTION)
    assert flatten_dict(merged).keys() == flatten_dict(unet_shapes(MOTION)).keys()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_family_mismatch_is_one_line(tmp_path):
    """An SD1.5 motion module on an SDXL base, and the reverse: one line naming both, from every format."""
    v2 = tiny_unet("v2")
    save_motion_module_original(tmp_path / "mm_v2.ckpt", random_params(motion_shapes(v2), 1), v2)
    with pytest.raises(ModelSizeError) as e:
        load_motion(tmp_path / "mm_v2.ckpt", BASE)
    assert _one_line(e).endswith(": the motion module is AnimateDiff SD1.5 v2 (2 levels, 32/64, mid-block module) "
                                 "but the base is SDXL (3 levels, 32/64/128)"), e.value

    sdxl_params = random_params(motion_shapes(MOTION), 2)
    save_motion_module_original(tmp_path / "mm_sdxl.ckpt", sdxl_params, MOTION)
    for base in (tiny_unet(None), tiny_unet("v3")):
        with pytest.raises(ModelSizeError) as e:
            load_motion(tmp_path / "mm_sdxl.ckpt", base)
        assert _one_line(e).endswith("mm_sdxl.ckpt (original AnimateDiff motion module, sdxl_beta): the motion module "
                                     "is AnimateDiff-SDXL (3 levels, 32/64/128) but the base is SD1.5 (2 levels, 32/64)")

    with pytest.raises(ModelSizeError) as e:  # without a base: the real SDXL's (the file's family), not SD1.5's
        load_motion(tmp_path / "mm_sdxl.ckpt")
    assert "another model size" in str(e.value) and "SD1.5" not in str(e.value)

    params_io.save_motion(tmp_path / "ours.safetensors", sdxl_params, MOTION)  # our params file records its layout
    with pytest.raises(ModelSizeError) as e:
        load_motion(tmp_path / "ours.safetensors", tiny_unet(None))
    assert "is AnimateDiff-SDXL (3 levels, 32/64/128) but the base is SD1.5 (2 levels, 32/64)" in _one_line(e)
    loaded, cfg = load_motion(tmp_path / "ours.safetensors", BASE)
    assert cfg == MOTION


def _meta_state_dict(model) -> dict:
    """A meta-device model's state dict as zero-stride numpy views (no memory), pe tables computed."""
    out = {}
    for k, v in model.state_dict().items():
        shape = tuple(v.shape)
        if k.endswith(".pe"):
            out[k] = motion_io.position_table(shape[-2], shape[-1])[None]
        else:
            out[k] = np.broadcast_to(np.zeros((), np.float32), shape)
    return out


class _Shape:
    """A converted leaf that keeps its shape only (the conversion's `astype` would allocate 11 GB)."""

    def __init__(self, value):
        self.shape = tuple(value.shape)

    def astype(self, dtype):
        return self


def test_real_size_layout(monkeypatch):
    """Real SDXL base + the sdxl-beta MotionAdapter (diffusers on the meta device): every key of
    `UNetMotionModel`'s state dict lands on our tree with its shape, nothing missing or unexpected; the
    real keys are detected as the SDXL beta (SD1.5's v3 keys as v3), and mismatch in one line."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    cfg = sdxl_unet("sdxl_beta")
    unet_cfg = {k: v for k, v in SDXL_BASE_CONFIG.items() if k != "_class_name"}
    adapter_cfg = {k: v for k, v in SDXL_ADAPTER_CONFIG.items() if k != "_class_name"}
    assert motion_io._adapter_motion_config(adapter_cfg, "sdxl-beta")[0] == cfg.motion
    with torch.device("meta"):
        model = UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**adapter_cfg),
                                            load_weights=False)
        sd15_v3 = MotionAdapter(use_motion_mid_block=False)
    sd = _meta_state_dict(model)
    assert len(sd) > 2000

    real = torch_io._torch_to_flax_value
    monkeypatch.setattr(torch_io, "_torch_to_flax_value", lambda *a: _Shape(real(*a)))
    params = convert_unet_state_dict(sd, cfg, what="real-size SDXL UNetMotionModel")  # strict: raises on any misfit
    got = {p: v.shape for p, v in flatten_dict(params).items()}
    want = {p: tuple(v.shape) for p, v in flatten_dict(unet_shapes(cfg)).items()}
    assert got == want
    n = sum(int(np.prod(s)) for s in want.values())
    motion_n = sum(int(np.prod(v.shape)) for v in flatten_dict(motion_shapes(cfg)).values())
    assert n == sum(v.numel() for v in model.parameters())
    print(f"real SDXL + sdxl-beta: {len(want)} tensors, {n / 1e9:.3f} B params ({motion_n / 1e6:.1f} M in motion)")

    motion_keys = {k: v for k, v in sd.items() if ".motion_modules." in k}
    original = {diffusers_to_original_key(k): v for k, v in motion_keys.items()}
    assert detect_motion_version(original) == detect_motion_version(motion_keys) == "sdxl_beta"
    channels = motion_io.motion_blocks(motion_keys)[0]
    assert channels == (320, 640, 1280)
    v3_keys = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in sd15_v3.state_dict().items()}
    assert detect_motion_version(v3_keys) == "v3" and motion_io.motion_blocks(v3_keys)[0] == (320, 640, 1280, 1280)
    from animatediff_jax.checkpoints.load import _other_family

    assert str(_other_family("mm_sdxl_v10_beta.ckpt", cfg.motion, channels, sd15_unet())) == (
        "mm_sdxl_v10_beta.ckpt: the motion module is AnimateDiff-SDXL (3 levels, 320/640/1280) "
        "but the base is SD1.5 (4 levels, 320/640/1280/1280)")


def test_export_motion_adapter_loads_in_diffusers(tmp_path):
    """`export motion --format diffusers` of an SDXL beta module: a `MotionAdapter` folder diffusers reads back
    tensor for tensor (and builds its SDXL `UNetMotionModel` from); `--format original` the `mm_sdxl` naming."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from animatediff_jax.checkpoints.params_io import save_motion
    from animatediff_jax.cli import main as cli_main

    adapter = randomize(MotionAdapter(**motion_adapter_kwargs(MOTION)), seed=11)
    adapter.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    params, cfg = load_motion(tmp_path / "adapter", BASE.with_motion(MOTION.motion))
    save_motion(tmp_path / "ours.safetensors", params, cfg)
    assert cli_main(["export", "motion", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "exported"),
                     "--format", "diffusers"]) == 0
    back = MotionAdapter.from_pretrained(tmp_path / "exported")
    assert back.config.use_motion_mid_block is False and list(back.config.block_out_channels) == [32, 64, 128]
    want, got = adapter.state_dict(), back.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet2d_kwargs(BASE)), back)  # what AnimateDiffSDXLPipeline does

    assert cli_main(["export", "motion", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "mm.safetensors"),
                     "--format", "original"]) == 0
    assert detect_motion_version(load_state_dict(tmp_path / "mm.safetensors")) == "sdxl_beta"
    assert_trees_equal(load_motion(tmp_path / "mm.safetensors", BASE.with_motion(MOTION.motion))[0], params)
