"""Steering the motion (issue 14), at the UNet, against diffusers' `UNetMotionModel` (PyTorch, fp32,
original GroupNorm semantics via `torch_refs.patch_to_original`, rtol 1e-5):

- a text context per frame (prompt travel): diffusers takes `(B*F, L, D)` encoder states, one per
  frame; ours `[B, F, L, D]`;
- motion scale: every motion module adds `scale x` its output to its input, `motion_scale` for all
  times `motion_block_scales` per block; the reference wraps each of diffusers' motion modules so.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.unet import UNet3D
from conftest import assert_close
from torch_refs import patch_to_original, torch_motion_unet

FRAMES = 4
CFG = tiny_unet("v2")


@pytest.fixture(scope="module")
def reference():
    tm = torch_motion_unet(CFG, seed=3)
    params = convert_unet_state_dict(tm.state_dict(), CFG)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, CFG.in_channels, FRAMES, 8, 8, generator=g)
    ctx = torch.randn(2, FRAMES, 5, CFG.cross_attention_dim, generator=g)  # a different text per frame
    return patch_to_original(tm, CFG, FRAMES), params, x, torch.tensor([10, 730]), ctx


def ours(params, x, t, ctx, **unet_kw) -> np.ndarray:
    out = UNet3D(CFG, **unet_kw).apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()),
                                       jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def test_a_context_per_frame(reference):
    tm, params, x, t, ctx = reference
    with torch.no_grad():
        ref = tm(x, t, ctx.reshape(-1, *ctx.shape[2:])).sample.numpy()  # (B*F, L, D), frame-major per video
    err = assert_close(ours(params, x, t, ctx), ref, rtol=1e-5, what="per-frame contexts vs UNetMotionModel")
    # ... and it is not one context repeated: frame 0's text everywhere gives another output.
    same = ours(params, x, t, ctx[:, :1].expand_as(ctx).contiguous())
    assert np.abs(same - ref).max() > 100 * max(err, 1e-6)
    print(f"per-frame context: max abs err {err:.2e}")


class _Scaled(torch.nn.Module):
    """A diffusers motion module whose contribution is scaled: `x + s * (module(x) - x)`."""

    def __init__(self, inner, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.scale * (self.inner(hidden_states, *args, **kwargs) - hidden_states)


def _scaled_reference(tm, scales: dict[str, float]):
    import copy

    tm = copy.deepcopy(tm)
    blocks = {f"down_blocks_{i}": b for i, b in enumerate(tm.down_blocks)}
    blocks.update({"mid_block": tm.mid_block}, **{f"up_blocks_{i}": b for i, b in enumerate(tm.up_blocks)})
    for name, block in blocks.items():
        mms = getattr(block, "motion_modules", None)
        for j in range(len(mms) if mms is not None else 0):
            mms[j] = _Scaled(mms[j], scales.get(name, 1.0))
    return tm


@pytest.mark.parametrize("scale, per_block", [(0.0, ()), (1.6, (("mid_block", 0.25), ("up_blocks_1", 0.5)))])
def test_motion_scale(reference, scale, per_block):
    tm, params, x, t, ctx = reference
    names = [f"down_blocks_{i}" for i in range(2)] + ["mid_block"] + [f"up_blocks_{i}" for i in range(2)]
    scales = {n: scale * dict(per_block).get(n, 1.0) for n in names}
    with torch.no_grad():
        ref = _scaled_reference(tm, scales)(x, t, ctx.reshape(-1, *ctx.shape[2:])).sample.numpy()
    got = ours(params, x, t, ctx, motion_scale=scale, motion_block_scales=per_block)
    err = assert_close(got, ref, rtol=1e-5, what=f"motion scale {scale} {per_block} vs scaled UNetMotionModel")
    assert np.abs(got - ours(params, x, t, ctx)).max() > 1e-3  # the scale changes the output
    print(f"motion scale {scale} {per_block}: max abs err {err:.2e}")


def test_motion_scale_names_the_blocks(reference):
    _, params, x, t, ctx = reference
    with pytest.raises(ValueError, match="no block \\['up_blocks_7'\\]"):
        ours(params, x, t, ctx, motion_block_scales=(("up_blocks_7", 1.0),))
