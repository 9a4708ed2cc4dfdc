"""`layers.GroupNorm` against `torch.nn.GroupNorm`: float32 compute in two passes (PyTorch's numerics,
tight), half-precision compute in one pass (`E[x²] - E[x]²` in float32) within the output's own bf16
rounding, also for activations far from zero mean (where one pass loses the most)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from animatediff_jax.models.layers import GroupNorm


def reference(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """torch's GroupNorm (float64) on channels-last `x`."""
    m = torch.nn.GroupNorm(groups, x.shape[-1], eps=1e-6).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(scale))
        m.bias.copy_(torch.from_numpy(bias))
        t = torch.from_numpy(np.moveaxis(x, -1, 1).astype(np.float64))
        return np.moveaxis(m(t).numpy(), 1, -1)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_group_norm_fp32_two_pass_and_bf16_one_pass(offset):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 8, 64)) * 3 + offset).astype(np.float32)
    scale, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    ref = reference(x, 32, scale, bias)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    fp32 = GroupNorm(32, 1e-6, jnp.float32).apply(params, jnp.asarray(x))
    assert_close(fp32, ref, rtol=1e-6, atol=1e-6, what=f"float32, mean {offset}")
    bf16 = GroupNorm(32, 1e-6, jnp.bfloat16).apply(params, jnp.asarray(x, jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    # bf16 keeps 8 bits: its input rounding alone moves an element by ~|x| * 2^-9 (~0.1 at mean 50, i.e.
    # ~0.03 standard deviations); the output's own rounding is 2^-9 relative. One pass adds nothing visible.
    in_rounding = np.abs(x).max() * 2.0**-8 / x.std()
    err = np.abs(np.asarray(bf16, np.float64) - ref).max()
    assert err <= 2.0**-7 * np.abs(ref).max() + 2 * in_rounding * np.abs(scale).max(), (offset, err)
    # ... and the same within bf16 rounding as the two-pass statistics on the same bf16 input.
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    assert_close(np.asarray(bf16, np.float32), reference(xb, 32, scale, bias), rtol=2.0**-7, atol=2.0**-7,
                 what=f"bf16 one pass vs two passes, mean {offset}")
