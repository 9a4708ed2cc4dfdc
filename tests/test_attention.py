"""Attention implementations against the XLA reference (and XLA against torch), dispatch, lowering
for TPU on a CPU host, and the memory of the chunked backward."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from animatediff_jax.models import attention as A
from animatediff_jax.models.attention import (
    AttentionError,
    chunked_attention,
    dot_product_attention,
    interpret_kernels,
    resolve,
    splash_attention,
    target_platform,
)

ATOL = 1e-5


def _inputs(b, t, s, n, h, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h)]
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]


def _value_and_grads(attn, q, k, v, ct):
    def loss(q, k, v):
        o = attn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * ct.astype(jnp.float32)), o

    (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, g


def _xla(is_causal):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def _max_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all(), "non-finite values"
    assert np.abs(b).max() > 0, "reference is all zeros"
    return float(np.abs(a - b).max())


def _check_against_xla(attn, b, t, s, n, h, is_causal, atol=ATOL):
    q, k, v, ct = _inputs(b, t, s, n, h)
    o_ref, g_ref = _value_and_grads(_xla(is_causal), q, k, v, ct)
    o, g = _value_and_grads(attn, q, k, v, ct)
    errs = [_max_err(o, o_ref)] + [_max_err(x, y) for x, y in zip(g, g_ref)]
    print(f"T={t} S={s} H={h} causal={is_causal}: max abs err out/dq/dk/dv = "
          + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= atol, errs
    return errs


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("t,s,is_causal", [(64, 64, False), (64, 64, True), (48, 20, True), (20, 48, False)])
def test_xla_matches_torch(t, s, is_causal):
    import torch

    q, k, v, _ = _inputs(2, t, s, 3, 40)
    ours = _xla(is_causal)(q, k, v)
    tq, tk, tv = (torch.from_numpy(np.array(x)).permute(0, 2, 1, 3) for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=is_causal)
    err = _max_err(ours, ref.permute(0, 2, 1, 3).numpy())
    print(f"xla vs torch: {err:.2e}")
    assert err <= ATOL


CHUNKED_CASES = [
    # (t, s, h, causal): lengths not block multiples (blocks 64 x 128 -> several of each)
    (300, 300, 40, False),
    (300, 300, 80, True),
    (300, 300, 160, False),
    (200, 77, 40, True),
    (200, 77, 160, False),
    (77, 300, 80, True),
    (256, 256, 40, False),  # exact block multiples: the unmasked fast path
]


@pytest.mark.parametrize("t,s,h,is_causal", CHUNKED_CASES)
def test_chunked_matches_xla(t, s, h, is_causal):
    attn = lambda q, k, v: chunked_attention(q, k, v, is_causal=is_causal, block_q=64, block_k=128)
    _check_against_xla(attn, 2, t, s, 2, h, is_causal)


def test_chunked_default_blocks_via_dispatch():
    """The public entry point with the default (clamped) blocks, 2 key blocks, padding."""
    attn = lambda q, k, v: dot_product_attention(q, k, v, implementation="chunked", is_causal=True)
    _check_against_xla(attn, 1, 600, 1100, 1, 16, True)


SPLASH_CASES = [
    # (t, s, h, causal, block)
    (200, 200, 40, False, 128),  # 2 x 2 blocks, padded keys in the last block
    (200, 200, 160, True, 128),  # head_dim padded to 256
    (200, 77, 80, False, 512),  # cross attention, block clamped to 256 / 128
    (200, 128, 40, True, 128),  # padded queries, no padded keys: padded rows must stay finite
]


@pytest.mark.parametrize("t,s,h,is_causal,block", SPLASH_CASES)
def test_splash_interpret_matches_xla(t, s, h, is_causal, block):
    def attn(q, k, v):
        with interpret_kernels():
            return splash_attention(q, k, v, is_causal=is_causal, block=block)

    _check_against_xla(attn, 1, t, s, 2, h, is_causal)


def test_splash_via_dispatch_in_interpret_mode():
    q, k, v, _ = _inputs(2, 130, 130, 2, 40)
    with interpret_kernels():
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="splash"))(q, k, v)
    assert out.dtype == q.dtype
    assert _max_err(out, _xla(False)(q, k, v)) <= ATOL


def test_chunked_bf16():
    q, k, v, ct = _inputs(2, 300, 300, 2, 80, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    o_ref, g_ref = _value_and_grads(_xla(False), *f32)
    attn = lambda q, k, v: chunked_attention(q, k, v, block_q=64, block_k=128)
    o, g = _value_and_grads(attn, q, k, v, ct)
    assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
    err = _max_err(o, o_ref)
    gerr = [_max_err(x, y) / float(jnp.abs(y).max()) for x, y in zip(g, g_ref)]
    print(f"bf16 chunked: out abs err {err:.2e}, grad rel errs {gerr}")
    assert err <= 2e-2
    assert max(gerr) <= 2e-2


def test_chunked_under_vmap():
    q, k, v, _ = _inputs(3, 100, 90, 2, 16)
    extra = lambda x: jnp.stack([x, 2.0 * x])  # a leading axis to vmap over
    q2, k2, v2 = extra(q), extra(k), extra(v)
    f = lambda q, k, v: chunked_attention(q, k, v, is_causal=True, block_q=32, block_k=32)
    out = jax.jit(jax.vmap(f))(q2, k2, v2)
    ref = jax.vmap(_xla(True))(q2, k2, v2)
    assert _max_err(out, ref) <= ATOL
    g = jax.grad(lambda q: jnp.sum(jax.vmap(f)(q, k2, v2) ** 2))(q2)
    g_ref = jax.grad(lambda q: jnp.sum(jax.vmap(_xla(True))(q, k2, v2) ** 2))(q2)
    assert _max_err(g, g_ref) <= 1e-4


class _TinyAttention(nn.Module):
    implementation: str

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        q, k, v = (nn.Dense(c, name=n)(x).reshape(b, t, 2, c // 2) for n in ("q", "k", "v"))
        o = dot_product_attention(q, k, v, implementation=self.implementation)
        return nn.Dense(c, name="o")(o.reshape(b, t, c))


def test_chunked_inside_flax_module():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 1030, 16)), jnp.float32)
    params = _TinyAttention("xla").init(jax.random.PRNGKey(0), x)

    def run(impl):
        loss = lambda p: jnp.sum(_TinyAttention(impl).apply(p, x) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (l_ref, g_ref), (l_ch, g_ch), (l_auto, _) = run("xla"), run("chunked"), run("auto")
    assert abs(float(l_ch) - float(l_ref)) <= 1e-4 * abs(float(l_ref))
    assert abs(float(l_auto) - float(l_ref)) <= 1e-4 * abs(float(l_ref))  # auto -> chunked on cpu
    # one scale for the whole tree: the key bias's gradient is zero up to rounding (softmax is
    # invariant to it), so a per-leaf relative tolerance would compare noise
    scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves(g_ch), jax.tree.leaves(g_ref)):
        assert _max_err(a, b) <= 1e-4 * scale


# ----------------------------------------------------------------------------- dispatch

BF16 = jnp.bfloat16
SD_LONG = [(2, 4096, 8, 40), (2, 1024, 8, 80), (2, 4096, 8, 160)]


def test_resolve_cpu():
    assert A.LONG_SEQ_LEN == 1024
    for q in SD_LONG:
        assert resolve("auto", q, q, BF16, platform="cpu") == "chunked"
    assert resolve("auto", (2, 4096, 8, 40), (2, 77, 8, 40), BF16, platform="cpu") == "xla"
    assert resolve("auto", (8192, 16, 8, 40), (8192, 16, 8, 40), BF16, platform="cpu") == "xla"
    assert resolve("xla", (2, 4096, 8, 40), (2, 4096, 8, 40), BF16, platform="cpu") == "xla"
    with target_platform("cpu"):
        assert resolve("auto", (2, 4096, 8, 40), (2, 4096, 8, 40), BF16) == "chunked"


def test_resolve_gpu():
    for q in SD_LONG:
        assert resolve("auto", q, q, BF16, platform="gpu") == "cudnn"
        assert resolve("auto", q, q, jnp.float16, platform="gpu") == "cudnn"
        assert resolve("auto", q, q, jnp.float32, platform="gpu") == "chunked"
    assert resolve("auto", (2, 4096, 8, 40), (2, 77, 8, 40), BF16, platform="gpu") == "xla"  # cross attn
    assert resolve("auto", (8192, 16, 8, 40), (8192, 16, 8, 40), BF16, platform="gpu") == "xla"  # temporal
    vae = (1, 4096, 1, 512)
    assert resolve("auto", vae, vae, BF16, platform="gpu") == "chunked"
    # head_dim 160 is fine for cuDNN on Hopper, not before it
    h160 = (2, 4096, 8, 160)
    assert resolve("auto", h160, h160, BF16, platform="gpu", compute_capability=8.0) == "chunked"
    assert resolve("cudnn", h160, h160, BF16, platform="gpu", compute_capability="9.0") == "cudnn"
    with target_platform("gpu"):
        assert resolve("auto", h160, h160, BF16) == "cudnn"  # no GPU attached: Hopper assumed


def test_resolve_tpu():
    for q in SD_LONG:
        assert resolve("auto", q, q, BF16, platform="tpu") == "splash"
    assert resolve("auto", (2, 4096, 8, 40), (2, 77, 8, 40), BF16, platform="tpu") == "xla"
    assert resolve("auto", (8192, 16, 8, 40), (8192, 16, 8, 40), BF16, platform="tpu") == "xla"
    vae = (1, 4096, 1, 512)
    assert resolve("auto", vae, vae, BF16, platform="tpu") == "chunked"
    assert resolve("splash", vae, vae, BF16, platform="tpu") == "splash"


def test_forced_errors():
    q = (2, 4096, 8, 40)
    with pytest.raises(AttentionError, match=r'"cudnn" needs a GPU \(platform cpu\); q \[2, 4096, 8, 40\]'):
        resolve("cudnn", q, q, BF16, platform="cpu")
    with pytest.raises(AttentionError, match=r"bfloat16/float16.*float32.*q \[2, 4096, 8, 40\]"):
        resolve("cudnn", q, q, jnp.float32, platform="gpu")
    with pytest.raises(AttentionError, match=r"head_dim <= 128.*q \[2, 4096, 8, 160\]"):
        resolve("cudnn", (2, 4096, 8, 160), (2, 4096, 8, 160), BF16, platform="gpu", compute_capability=8.0)
    with pytest.raises(AttentionError, match=r"head_dim % 8"):
        resolve("cudnn", (2, 4096, 8, 36), (2, 4096, 8, 36), BF16, platform="gpu")
    with pytest.raises(AttentionError, match=r"head_dim <= 256"):
        resolve("cudnn", (1, 4096, 1, 512), (1, 4096, 1, 512), BF16, platform="gpu")
    with pytest.raises(AttentionError, match=r'"splash" needs a TPU \(platform cpu'):
        resolve("splash", q, q, BF16, platform="cpu")
    with pytest.raises(AttentionError, match=r"unknown attention implementation 'flash'.*auto, xla, chunked, cudnn, splash"):
        resolve("flash", q, q, BF16, platform="cpu")
    with pytest.raises(AttentionError, match=r"q \[2, 64, 8, 40\], k \[2, 64, 4, 40\]"):
        resolve("auto", (2, 64, 8, 40), (2, 64, 4, 40), BF16, platform="cpu")
    # the entry point raises too (no silent fallback), on the real CPU backend
    x = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
    for impl in ("cudnn", "splash"):
        with pytest.raises(AttentionError, match=impl):
            dot_product_attention(x, x, x, implementation=impl)
    with pytest.raises(AttentionError):
        dot_product_attention(x, x, x, implementation="bogus")
    with interpret_kernels():  # interpret mode makes the splash check pass on CPU
        assert resolve("splash", q, q, BF16) == "splash"
        assert resolve("auto", q, q, BF16) == "chunked"


# ----------------------------------------------------------------------------- TPU lowering

TPU_SHAPE = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16)


def _lower_for_tpu(f, *, grad=False):
    if grad:
        f = jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    with target_platform("tpu"):
        traced = jax.jit(f).trace(TPU_SHAPE, TPU_SHAPE, TPU_SHAPE)
        return traced, traced.lower(lowering_platforms=("tpu",)).as_text()


def test_splash_lowers_for_tpu_on_cpu():
    _, text = _lower_for_tpu(lambda q, k, v: dot_product_attention(q, k, v, implementation="splash"))
    fwd_calls = text.count("tpu_custom_call")
    _, text = _lower_for_tpu(lambda q, k, v: dot_product_attention(q, k, v), grad=True)  # auto -> splash
    grad_calls = text.count("tpu_custom_call")
    print(f"tpu_custom_call occurrences: forward {fwd_calls}, gradient {grad_calls}")
    assert fwd_calls >= 1
    assert grad_calls >= 3  # forward (with residuals), dq and dkv kernels


def test_splash_under_mesh_uses_shard_map():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with jax.set_mesh(mesh):
        traced, text = _lower_for_tpu(lambda q, k, v: dot_product_attention(q, k, v, implementation="splash"))
    assert "shard_map" in str(traced.jaxpr)
    assert text.count("tpu_custom_call") >= 1
    traced, _ = _lower_for_tpu(lambda q, k, v: dot_product_attention(q, k, v, implementation="splash"))
    assert "shard_map" not in str(traced.jaxpr)  # no mesh: the kernel is called directly


def test_splash_shard_map_two_devices():
    """With 2 host devices the batch is split: one example per shard in the Mosaic call, and the
    interpret-mode result under the mesh still matches XLA."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, numpy as np
        from animatediff_jax.models import attention as A
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 1), ("data", "model"))
        sd = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16)
        f = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="splash"))
        with A.target_platform("tpu"), jax.set_mesh(mesh):
            text = f.trace(sd, sd, sd).lower(lowering_platforms=("tpu",)).as_text()
        body = text[text.index("sdy.manual_computation"):]
        assert "tensor<1x8x4096x128xbf16>" in body, "per-shard batch should be 1"
        assert text.count("tpu_custom_call") >= 1
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((4, 150, 2, 40)), jnp.float32) for _ in range(3))
        with A.interpret_kernels(), jax.set_mesh(mesh):
            out = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="splash"))(q, k, v)
        err = float(jnp.abs(out - jax.nn.dot_product_attention(q, k, v)).max())
        assert err <= 1e-5, err
        print("OK", err)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


# ----------------------------------------------------------------------------- memory

def test_chunked_gradient_memory():
    sd = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.bfloat16)

    def temp_bytes(impl):
        loss = lambda q, k, v: dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(sd, sd, sd).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
    print(f"grad temp bytes: xla {xla / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB")
    assert xla > 8 * 4096 * 4096 * 4  # sanity: XLA holds at least the fp32 score matrix
    assert chunked < xla / 4


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("h", [40, 80, 160])
def test_cudnn_for_real_on_gpu(h):
    """On a GPU: "auto" picks cuDNN for a long bf16 self-attention, and it matches XLA within bf16 rounding."""
    q, k, v, ct = _inputs(2, 1024, 1024, 8, h, dtype=jnp.bfloat16)
    assert resolve("auto", q.shape, k.shape, q.dtype) == "cudnn"
    o_ref, g_ref = _value_and_grads(_xla(False), q, k, v, ct)
    o, g = _value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, implementation="cudnn"), q, k, v, ct)
    errs = [_max_err(a, b) for a, b in zip([o, *g], [o_ref, *g_ref])]
    print(f"cudnn H={h}: max abs err out/dq/dk/dv = {errs}")
    assert max(errs) < 0.1, errs
