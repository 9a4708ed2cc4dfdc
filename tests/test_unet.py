"""Parity of the inflated UNet + motion modules with diffusers' `UNetMotionModel` (PyTorch, fp32).

The original AnimateDiff numerics are obtained by patching the reference's GroupNorms
(`torch_refs.patch_to_original`); diffusers' own numerics by selecting `norm_per_frame=False`.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from torch_refs import patch_to_original, torch_motion_unet

from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.unet import UNet3D

FRAMES = 4


def run_both(cfg, patch: bool = True, attention: str = "auto"):
    tm = torch_motion_unet(cfg)
    params = convert_unet_state_dict(tm.state_dict(), cfg)
    if patch:
        patch_to_original(tm, cfg, FRAMES)
    x = torch.randn(2, cfg.in_channels, FRAMES, 8, 8)
    t = torch.tensor([10, 730])
    ctx = torch.randn(2, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        ref = tm(x, t, ctx.repeat_interleave(FRAMES, 0)).sample.numpy()
    ours = UNet3D(cfg, attention=attention).apply(
        {"params": params},
        jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()),
        jnp.asarray(t.numpy()),
        jnp.asarray(ctx.numpy()),
    )
    return np.asarray(ours).transpose(0, 4, 1, 2, 3), ref


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_original_numerics(version):
    """Per-frame motion-module norms (and v1's across-frame resnet norms), as the original code."""
    cfg = tiny_unet(version)
    ours, ref = run_both(cfg)
    assert_close(ours, ref, rtol=1e-5, what=f"UNet3D {version} vs patched UNetMotionModel")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_original_numerics_with_chunked_attention(version, small_attention_blocks):
    """The blockwise (memory-efficient) attention in every spatial and temporal layer: same outputs."""
    cfg = tiny_unet(version)
    ours, ref = run_both(cfg, attention="chunked")
    err = assert_close(ours, ref, rtol=1e-5, what=f"UNet3D {version} (chunked attention) vs patched UNetMotionModel")
    print(f"chunked attention UNet3D {version}: max abs err {err:.2e}")


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_diffusers_numerics(version):
    """`norm_per_frame=False` reproduces diffusers' `AnimateDiffTransformer3D` as shipped."""
    cfg = tiny_unet(version)
    cfg = cfg.replace(motion=dataclasses.replace(cfg.motion, norm_per_frame=False))
    ours, ref = run_both(cfg, patch=False)
    assert_close(ours, ref, rtol=1e-5, what=f"UNet3D {version} vs UNetMotionModel")


def test_norm_semantics_matter():
    """The two GroupNorm semantics give clearly different outputs, so the tests above can tell them apart."""
    cfg = tiny_unet("v2")
    ours, _ = run_both(cfg)
    _, diffusers_ref = run_both(cfg, patch=False)
    assert np.abs(ours - diffusers_ref).max() > 1e-3


def test_image_unet_without_motion():
    """No motion config: the per-frame SD UNet, equal to diffusers' `UNet2DConditionModel` on each frame."""
    from diffusers import UNet2DConditionModel
    from torch_refs import randomize, unet2d_kwargs

    cfg = tiny_unet(None)
    tm = randomize(UNet2DConditionModel(**unet2d_kwargs(cfg)))
    params = convert_unet_state_dict(tm.state_dict(), cfg)
    x = torch.randn(2 * FRAMES, cfg.in_channels, 8, 8)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim)
    with torch.no_grad():
        ref = tm(x, torch.tensor(321), ctx.repeat_interleave(FRAMES, 0)).sample.numpy()
    video = x.reshape(2, FRAMES, cfg.in_channels, 8, 8).permute(0, 1, 3, 4, 2).numpy()
    ours = UNet3D(cfg).apply({"params": params}, jnp.asarray(video), 321, jnp.asarray(ctx.numpy()))
    ours = np.asarray(ours).reshape(2 * FRAMES, 8, 8, cfg.out_channels).transpose(0, 3, 1, 2)
    assert_close(ours, ref, rtol=1e-5, what="UNet3D (no motion) vs UNet2DConditionModel")


def test_per_block_remat_changes_nothing_but_memory():
    """`remat` recomputes activations block by block: same output and same gradients."""
    import jax

    cfg = tiny_unet("v2")
    tm = torch_motion_unet(cfg)
    params = convert_unet_state_dict(tm.state_dict(), cfg)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, FRAMES, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, cfg.cross_attention_dim)), jnp.float32)

    def loss(p, remat):
        return jnp.mean(UNet3D(cfg, remat=remat).apply({"params": p}, x, jnp.array([99]), ctx) ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = grad(params, "none")
    l1, g1 = grad(params, "dots_saveable")
    assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="remat policy"):
        UNet3D(cfg, remat="sometimes").apply({"params": params}, x, jnp.array([99]), ctx)
