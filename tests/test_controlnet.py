"""Control models vs diffusers (PyTorch, CPU, fp32): ControlNet, SparseCtrl (RGB and scribble), the
UNet's residual inputs, and every file layout `checkpoints.controlnet.load_controlnet` reads.

Tolerance: `assert_close(rtol=1e-5)` -- max abs error <= 1e-5 + 1e-5 x the reference's max abs, per
output tensor. All weights are random (`randomize`: the zero convs too, so every path counts).

GroupNorm semantics: diffusers' SparseCtrl motion modules (`AnimateDiffTransformer3D`) normalise
across frames; the original SparseCtrl, whose weights the released files are, per frame (our default,
`MotionConfig.norm_per_frame=True`). The numeric tests patch the reference's motion-module norms to
per frame (`torch_refs.patch_to_original`, the same wrapper around the same `nn.GroupNorm`), and one
test runs diffusers as shipped against ours with `norm_per_frame=False`.
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
from ldm_fixture import _rename, unet_module_map
from torch_refs import patch_to_original, randomize, torch_motion_unet

from animatediff_jax.checkpoints.controlnet import (
    LDM_CONTROL_PREFIX,
    controlnet_from_state_dict,
    convert_controlnet_state_dict,
    load_controlnet,
)
from animatediff_jax.checkpoints.motion import diffusers_to_original_key, position_table
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import CheckpointError, save_state_dict
from animatediff_jax.models.config import sd15_unet, tiny_unet
from animatediff_jax.models.controlnet import (
    ControlNet,
    ControlNetConfig,
    sd15_controlnet,
    sparsectrl_config,
    tiny_controlnet,
)
from animatediff_jax.models.shapes import controlnet_shapes
from animatediff_jax.models.unet import UNet3D

B, F, H = 2, 3, 8  # videos, frames, latent side
SCALE = 0.7  # conditioning scale


def torch_control_model(cfg: ControlNetConfig, seed: int = 0, device: str | None = None):
    """diffusers' ControlNetModel / SparseControlNetModel for `cfg` (random weights unless on `meta`)."""
    import diffusers

    kwargs = cfg.to_diffusers()
    cls = getattr(diffusers, kwargs.pop("_class_name"))
    if device == "meta":
        with torch.device("meta"):
            return cls(**kwargs)
    return randomize(cls(**kwargs), seed)


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def inputs(cfg: ControlNetConfig, seed: int = 0):
    """Torch-layout inputs: sample [B, C, F, h, w], t [B], context [B, L, D], cond [B, Cc, F, H', W'], mask [B, F]."""
    g = torch.Generator().manual_seed(seed)
    side = H * cfg.condition_downscale
    x = torch.randn(B, cfg.unet.in_channels, F, H, H, generator=g)
    cond = torch.rand(B, cfg.conditioning_channels, F, side, side, generator=g)
    if cfg.latent_condition:
        cond = 2 * cond - 1
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:B, :F]
    cond = cond * mask[:, None, :, None, None]  # frames without a condition hold zeros, as diffusers' pipeline
    ctx = torch.randn(B, 5, cfg.unet.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 730]), ctx, cond, mask


def run_ours(cfg, params, x, t, ctx, cond, mask, scale=SCALE):
    to_last = lambda a: jnp.asarray(a.permute(0, 2, 3, 4, 1).numpy())  # [B, C, F, h, w] -> [B, F, h, w, C]
    down, mid = jax.jit(ControlNet(cfg).apply)(
        {"params": params}, to_last(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()), to_last(cond),
        jnp.asarray(mask.numpy()) if cfg.concat_conditioning_mask else None, scale,
    )
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # [B*F, h, w, c] -> [B*F, c, h, w]
    return [nchw(a) for a in down], nchw(mid)


def run_torch(cfg, model, x, t, ctx, cond, mask, scale=SCALE):
    with torch.no_grad():
        if cfg.sparse:
            out = model(x, t, ctx.repeat_interleave(F, 0), cond, conditioning_scale=scale,
                        conditioning_mask=mask[:, None, :, None, None].expand(-1, -1, -1, *cond.shape[3:]),
                        return_dict=False)
        else:  # a ControlNetModel sees frames as batch
            fold = lambda a: a.permute(0, 2, 1, 3, 4).reshape(-1, *a.shape[1:2], *a.shape[3:])
            out = model(fold(x), t.repeat_interleave(F), ctx.repeat_interleave(F, 0), fold(cond),
                        conditioning_scale=scale, return_dict=False)
    return [_np(a) for a in out[0]], _np(out[1])


def compare(ours, ref, what: str) -> float:
    (down, mid), (rdown, rmid) = ours, ref
    assert len(down) == len(rdown)
    errs = [assert_close(a, r, rtol=1e-5, what=f"{what} down residual {i}") for i, (a, r) in enumerate(zip(down, rdown))]
    errs.append(assert_close(mid, rmid, rtol=1e-5, what=f"{what} mid residual"))
    print(f"{what}: max abs err {max(errs):.2e} (ref max {max(np.abs(r).max() for r in rdown + [rmid]):.3g})")
    return max(errs)


@pytest.fixture(scope="module")
def tiny_cn():
    # The hint net of a ControlNet 1.x file is SD's (4 levels, `input_hint_block.14` last): diffusers'
    # converter expects that layout, so the tiny model has 4 levels too (pixels at 8x the latent side).
    cfg = tiny_controlnet(conditioning_embedding_out_channels=(4, 8, 8, 16))
    model = torch_control_model(cfg)
    return cfg, model, convert_controlnet_state_dict(model.state_dict(), cfg)


# ----------------------------------------------------------------------------- numerics


def test_controlnet_vs_diffusers(tiny_cn):
    cfg, model, params = tiny_cn
    args = inputs(cfg)
    compare(run_ours(cfg, params, *args), run_torch(cfg, model, *args), "ControlNet")


@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_sparsectrl_vs_diffusers(kind):
    """Per-frame motion-module norms (the original's): the reference's are patched to per frame."""
    cfg = tiny_controlnet(kind)
    assert cfg.sparse and cfg.latent_condition == (kind == "rgb") and cfg.unet.motion.norm_per_frame
    model = torch_control_model(cfg)
    params = convert_controlnet_state_dict(model.state_dict(), cfg)
    patch_to_original(model, cfg.unet, F)
    x, t, ctx, cond, mask = inputs(cfg)
    if kind == "scribble":  # the same condition and mask for both videos (rgb: one each)
        cond, mask = cond[:1].repeat(B, 1, 1, 1, 1), mask[:1].repeat(B, 1)
    ours = run_ours(cfg, params, x, t, ctx, cond, mask)
    compare(ours, run_torch(cfg, model, x, t, ctx, cond, mask), f"SparseCtrl {kind}")
    if kind == "scribble":  # ... given once ([1, F, ...], [1, F]), they broadcast over the batch
        one = run_ours(cfg, params, x, t, ctx, cond[:1], mask[:1])
        for a, r in zip(one[0] + [one[1]], ours[0] + [ours[1]]):
            np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-6)


def test_sparsectrl_diffusers_norms():
    """`norm_per_frame=False` is diffusers' SparseControlNetModel as shipped (norms across frames)."""
    cfg = tiny_controlnet("rgb")
    cfg = cfg.replace(unet=cfg.unet.replace(motion=dataclasses.replace(cfg.unet.motion, norm_per_frame=False)))
    model = torch_control_model(cfg)
    params = convert_controlnet_state_dict(model.state_dict(), cfg)
    args = inputs(cfg)
    compare(run_ours(cfg, params, *args), run_torch(cfg, model, *args), "SparseCtrl rgb, diffusers norms")


def skip_shapes(cfg) -> list[tuple[int, int]]:
    """(channels, side) of each UNet skip: conv_in, then per level one per layer and the downsampler's."""
    out, side = [(cfg.block_out_channels[0], H)], H
    for i, c in enumerate(cfg.block_out_channels):
        out += [(c, side)] * cfg.layers_per_block
        if i < len(cfg.block_out_channels) - 1:
            side //= 2
            out.append((c, side))
    return out


def test_unet_with_residuals_vs_diffusers():
    """`UNet3D(..., down_residuals, mid_residual)` = `UNetMotionModel(down_block_additional_residuals=,
    mid_block_additional_residual=)` (original norms on both sides)."""
    cfg = tiny_unet("v2")
    tm = torch_motion_unet(cfg)
    params = convert_unet_state_dict(tm.state_dict(), cfg)
    patch_to_original(tm, cfg, F)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(B, 4, F, H, H, generator=g), torch.tensor([10, 730]), torch.randn(B, 5, 16, generator=g)
    down = [torch.randn(B * F, c, h, h, generator=g) for c, h in skip_shapes(cfg)]
    mid = torch.randn(B * F, cfg.block_out_channels[-1], *down[-1].shape[2:], generator=g)
    with torch.no_grad():
        ref = tm(x, t, ctx.repeat_interleave(F, 0), down_block_additional_residuals=tuple(down),
                 mid_block_additional_residual=mid).sample.numpy()
        plain = tm(x, t, ctx.repeat_interleave(F, 0)).sample.numpy()
    last = lambda a: jnp.asarray(a.permute(0, 2, 3, 1).numpy())
    ours = jax.jit(UNet3D(cfg).apply)({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()),
                                       jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                                       tuple(last(d) for d in down), last(mid))
    ours = np.asarray(ours).transpose(0, 4, 1, 2, 3)
    assert np.abs(ref - plain).max() > 1e-2  # the residuals matter
    err = assert_close(ours, ref, rtol=1e-5, what="UNet3D + residuals vs UNetMotionModel")
    print(f"UNet3D + residuals: max abs err {err:.2e} (ref max {np.abs(ref).max():.3g})")


# ----------------------------------------------------------------------------- file layouts


def _ldm_module_map(cfg: ControlNetConfig) -> dict:
    """diffusers -> ControlNet 1.x LDM module names: the UNet encoder's (`ldm_fixture`), the zero convs
    (`zero_convs.I.0`, `middle_block_out.0`) and the hint net (`input_hint_block.{0, 2, 4, ..., 14}`)."""
    m = unet_module_map(cfg.unet)
    n_skips = 1 + len(cfg.unet.block_out_channels) * (cfg.unet.layers_per_block + 1) - 1
    m.update({f"controlnet_down_blocks.{i}": (f"zero_convs.{i}.0", {}) for i in range(n_skips)})
    m["controlnet_mid_block"] = ("middle_block_out.0", {})
    blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
    m["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", {})
    m.update({f"controlnet_cond_embedding.blocks.{j}": (f"input_hint_block.{2 * (j + 1)}", {}) for j in range(blocks)})
    m["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (blocks + 1)}", {})
    return m


def to_ldm(sd: dict, cfg: ControlNetConfig, prefix: str = LDM_CONTROL_PREFIX) -> dict:
    m = _ldm_module_map(cfg)
    return {prefix + _rename(k, m, "ControlNet"): v for k, v in sd.items()}


def to_original_sparsectrl(sd: dict, cfg: ControlNetConfig) -> dict:
    """diffusers' SparseControlNetModel state dict in the original SparseCtrl naming: motion modules
    renamed (`temporal_transformer`, `attention_blocks.0`, `norms.0`, `ff_norm`) with one
    `attention_blocks.0.pos_encoder.pe` per temporal block instead of diffusers' `pos_embed.pe`."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".pos_embed.pe"):
            block = diffusers_to_original_key(k[: -len(".pos_embed.pe")])
            out[f"{block}.attention_blocks.0.pos_encoder.pe"] = position_table(cfg.unet.motion.max_positions, v.shape[-1])[None]
        else:
            out[diffusers_to_original_key(k)] = v
    return out


def _host(model) -> dict:
    return {k: _np(v) for k, v in model.state_dict().items()}


def assert_same_params(a, b, rtol=0.0):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=rtol, err_msg="/".join(k))


def test_diffusers_folders(tiny_cn, tmp_path):
    """`save_pretrained` folders: ControlNetModel (safetensors) and SparseControlNetModel (fp16 variant only)."""
    cfg, model, params = tiny_cn
    model.save_pretrained(tmp_path / "cn")
    got_cfg, got = load_controlnet(tmp_path / "cn", base=tiny_unet(None))
    assert got_cfg == cfg
    assert_same_params(got, params)

    scfg = tiny_controlnet("rgb")
    sparse = torch_control_model(scfg, seed=1)
    sparse.half().save_pretrained(tmp_path / "sparse", variant="fp16")
    got_cfg, got = load_controlnet(tmp_path / "sparse")
    assert got_cfg == scfg and got_cfg.sparse and got_cfg.latent_condition
    assert_same_params(got, convert_controlnet_state_dict(sparse.float().state_dict(), scfg))


@pytest.mark.parametrize("prefix,ext", [(LDM_CONTROL_PREFIX, ".pth"), ("", ".safetensors")])
def test_controlnet11_single_file(tiny_cn, tmp_path, prefix, ext):
    """ControlNet 1.1 files (LDM names, `control_model.` prefix or none): config from the shapes, same params."""
    cfg, model, params = tiny_cn
    path = tmp_path / f"control_v11p_sd15_tiny{ext}"
    sd = to_ldm(_host(model), cfg, prefix)
    if prefix:  # ControlNet 1.0 files hold SD1.5 as well: only `control_model.*` is read
        sd.update({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((2, 4, 3, 3), np.float32),
                   "betas": np.zeros((1000,), np.float32)})
    save_state_dict(path, sd)
    base = tiny_unet(None)
    got_cfg, got = load_controlnet(path, base=base)
    assert got_cfg == cfg
    assert_same_params(got, params)


def test_original_sparsectrl_file(tmp_path):
    """`v3_sd15_sparsectrl_*.ckpt` layout: original motion names + pe tables, under the original
    loader's `{"controlnet": ...}` wrapper (with its `animatediff_config` entry) or a `controlnet.` prefix."""
    cfg = tiny_controlnet("scribble")
    model = torch_control_model(cfg, seed=2)
    params = convert_controlnet_state_dict(model.state_dict(), cfg)
    sd = to_original_sparsectrl(_host(model), cfg)
    motion = [k for k in sd if ".motion_modules." in k]
    assert any(k.endswith(".attention_blocks.0.pos_encoder.pe") for k in motion) and not any("attn1" in k for k in motion)
    torch.save({"controlnet": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                "animatediff_config": {"note": "not a tensor"}}, tmp_path / "wrapped.ckpt")
    save_state_dict(tmp_path / "prefixed.safetensors", {"controlnet." + k: v for k, v in sd.items()})
    for name in ("wrapped.ckpt", "prefixed.safetensors"):
        got_cfg, got = load_controlnet(tmp_path / name, base=tiny_unet("v3"))  # (motion heads from the base)
        assert got_cfg == cfg, name
        assert_same_params(got, params)


def test_bad_files(tiny_cn, tmp_path):
    """A missing and an unexpected key are both named (one line each, file names); another base: one line."""
    cfg, model, _ = tiny_cn
    ldm = to_ldm(_host(model), cfg)
    del ldm["control_model.zero_convs.2.0.weight"]
    ldm["control_model.input_hint_block.99.weight"] = np.zeros((1,), np.float32)
    save_state_dict(tmp_path / "bad.safetensors", ldm)
    with pytest.raises(CheckpointError) as e:
        load_controlnet(tmp_path / "bad.safetensors")
    msg = str(e.value)
    missing = next(line for line in msg.splitlines() if "missing keys" in line)
    unexpected = next(line for line in msg.splitlines() if "unexpected keys" in line)
    # The file's own (LDM) names, shapes in its layout: the missing weight is named after its bias.
    assert missing == "  missing keys: control_model.zero_convs.2.0.weight (32, 32, 1, 1)", msg
    assert unexpected == "  unexpected keys: control_model.input_hint_block.99.weight (1,)", msg

    scfg = tiny_controlnet("rgb")
    sd = to_original_sparsectrl(_host(torch_control_model(scfg)), scfg)
    gone = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"
    del sd[gone]
    sd["down_blocks.1.motion_modules.0.temporal_transformer.extra.weight"] = np.zeros((2,), np.float32)
    save_state_dict(tmp_path / "bad_sparse.safetensors", sd)
    with pytest.raises(CheckpointError) as e:
        load_controlnet(tmp_path / "bad_sparse.safetensors")
    assert str(e.value).splitlines()[1:] == [
        f"  missing keys: {gone} (64, 64)",
        "  unexpected keys: down_blocks.1.motion_modules.0.temporal_transformer.extra.weight (2,)",
    ], str(e.value)

    model.save_pretrained(tmp_path / "cn")
    for path in (tmp_path / "cn", tmp_path / "bad_sparse.safetensors"):
        with pytest.raises(CheckpointError, match="a control model for another base: cross_attention_dim 16 "
                                                  r"\(base: 32\)") as e:
            load_controlnet(path, base=tiny_unet(None, cross_attention_dim=32))
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- real sizes


def _meta_state_dict(cfg: ControlNetConfig) -> dict:
    """The real-size reference model's state dict as zero-stride arrays of its shapes (nothing allocated)."""
    model = torch_control_model(cfg, device="meta")
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["ldm", "ldm-unprefixed", "sparsectrl-rgb", "sparsectrl-scribble"])
def test_real_size_layouts(layout):
    """The released layouts at SD1.5 size: the config read off the keys is the real one and every key
    converts (strictly) -- ControlNet 1.1 LDM files, and the original SparseCtrl files, whose RGB
    embedding is one conv `[320, 5, 3, 3]`."""
    if layout.startswith("ldm"):
        cfg = sd15_controlnet()
        sd = to_ldm(_meta_state_dict(cfg), cfg, "" if layout == "ldm-unprefixed" else LDM_CONTROL_PREFIX)
        assert ("control_model.input_hint_block.14.weight" in sd) == (layout == "ldm")
    else:
        kind = layout.split("-")[1]
        cfg = sparsectrl_config(kind)
        sd = to_original_sparsectrl(_meta_state_dict(cfg), cfg)
        if kind == "rgb":
            assert sd["controlnet_cond_embedding.weight"].shape == (320, 5, 3, 3)
    got_cfg, params = controlnet_from_state_dict(sd, base=sd15_unet(), what=layout)
    assert got_cfg == cfg
    want = flatten_dict(controlnet_shapes(cfg))
    got = flatten_dict(params)
    assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)


def test_sd15_controlnet_real_architecture():
    """The SD1.5 ControlNet at full size (random weights, one frame, 8x8 latents) vs diffusers.
    Measured: max abs err 2.6e-5 for outputs up to 11.5 (2e-6 relative)."""
    cfg = sd15_controlnet()
    kwargs = cfg.to_diffusers()
    kwargs.pop("_class_name")
    import diffusers

    with torch.device("meta"):
        model = diffusers.ControlNetModel(**kwargs)
    model = randomize(model.to_empty(device="cpu"))
    params = convert_controlnet_state_dict(model.state_dict(), cfg, what="SD1.5 ControlNetModel")
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 1, H, H, generator=g), torch.rand(1, 3, 1, 8 * H, 8 * H, generator=g)
    ctx, t = torch.randn(1, 77, 768, generator=g), torch.tensor([500])
    with torch.no_grad():
        out = model(x[:, :, 0], t, ctx, cond[:, :, 0], conditioning_scale=SCALE, return_dict=False)
    ref = [_np(a) for a in out[0]], _np(out[1])
    del model
    to_last = lambda a: jnp.asarray(a.permute(0, 2, 3, 4, 1).numpy())
    down, mid = ControlNet(cfg).apply({"params": params}, to_last(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                                      to_last(cond), None, SCALE)
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
    compare(([nchw(a) for a in down], nchw(mid)), ref, "SD1.5 ControlNet")
