"""Scaled dot-product attention with a choice of kernels, picked per platform and shape.

Every implementation takes `jax.nn.dot_product_attention`'s layout, q `[B, T, N, H]`, k/v
`[B, S, N, H]`, uses the softmax scale `1/sqrt(H)` and returns `[B, T, N, H]` in q's dtype.

Why not always XLA's default: `jax.nn.dot_product_attention(implementation="xla")` materialises
the float32 score matrix `[B, N, T, S]` (and keeps the probabilities for the backward). At the
first SD1.5 level at 512² (4096 tokens, 8 heads) a CFG batch of 2 x 16 frames is
32 * 8 * 4096² * 4 B = 16 GiB of scores for one attention layer. The other kernels never hold more
than one block of scores.

Implementations
---------------
=========  =====================================================================================
"xla"      `jax.nn.dot_product_attention` (materialises scores). Any platform.
"chunked"  Pure-JAX flash attention: blockwise over queries and keys, online softmax, float32
           accumulation, `custom_vjp` backward that recomputes block scores (saves only the
           output and the per-query logsumexp). Any platform, shape, dtype.
"cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`. GPU only; bf16/fp16;
           head_dim % 8 == 0; head_dim <= 128 before Hopper (sm90), <= 256 from Hopper on.
"splash"   TPU Pallas splash attention. TPU only (or CPU inside `interpret_kernels()`).
           q is pre-scaled, head_dim is zero-padded to a multiple of 128, sequences are padded
           to the block and padded keys are masked with segment ids; under a mesh the kernel
           runs inside `shard_map` over the batch ("data"/"fsdp"/"context" axes).
=========  =====================================================================================

What "auto" picks (`LONG_SEQ_LEN` = 1024 keys is "long"):

=====================================  ==========  ===================  ==========
shape                                  cpu/other   gpu                  tpu
=====================================  ==========  ===================  ==========
S < LONG (77-key cross attention,      xla         xla                  xla
16-frame temporal, 16x16/8x8 levels)
long, head_dim <= 256 (SD levels with  chunked     cudnn if its         splash if
H = 40/80/160)                                     constraints hold,    T >= LONG,
                                                   else chunked         else chunked
long, head_dim 512 (VAE mid-block:     chunked     chunked              chunked
1 head x 512 channels)
=====================================  ==========  ===================  ==========

Short sequences stay on XLA because their score matrix is small and XLA fuses them well
(maxdiffusion's `flash_min_seq_length` plays the same role). A forced implementation never falls
back silently: if it cannot run the shape/dtype/platform, `AttentionError` says why.

The platform seen by "auto" and by the checks is `jax.default_backend()` unless overridden with
`target_platform(...)` (needed to lower for TPU on a CPU host). `interpret_kernels()` runs Pallas
kernels in interpret mode so "splash" executes on CPU (tests).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from animatediff_jax import parallel

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")

# Key length from which attention counts as "long": below it "auto" uses XLA everywhere.
LONG_SEQ_LEN = 1024
# Largest head_dim that "auto" sends to splash (padded to 256 lanes); larger ones (VAE) -> chunked.
SPLASH_MAX_AUTO_HEAD_DIM = 256
# Default chunked block sizes (clamped to the sequence lengths).
CHUNK_BLOCK_Q = 512
CHUNK_BLOCK_K = 1024
# Splash block size (a multiple of 128, clamped to the padded sequence length).
SPLASH_BLOCK = 512
# Mesh axes the splash kernel's batch dimension is split over under a mesh (a video's frames included).
SPLASH_BATCH_AXES = parallel.ROW_AXES

_MASK_VALUE = -1e30  # finite, so masked blocks never give inf - inf


class AttentionError(ValueError):
    """An attention implementation cannot run the given shape / dtype / platform."""


# ----------------------------------------------------------------------------- context state

_state = threading.local()


def _platform_override() -> str | None:
    return getattr(_state, "platform", None)


def _interpret() -> bool:
    return bool(getattr(_state, "interpret", False))


@contextlib.contextmanager
def _overriding(name: str, value: Any):
    """Sets trace-time state `name` to `value` inside the block (nested blocks restore the outer value)."""
    prev = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, prev)


def target_platform(platform: str):
    """Makes "auto" and the platform checks see `platform` ("cpu", "gpu", "tpu") at trace time."""
    return _overriding("platform", _normalise_platform(platform))


def interpret_kernels():
    """Runs Pallas kernels (splash) with `interpret=True`, so they execute on CPU."""
    return _overriding("interpret", True)


def using(implementation: str):
    """Makes `implementation` the default of every `dot_product_attention` traced inside.

    The models (`UNet3D`, `AutoencoderKL`, `CLIPTextModel`) take an `attention` field and trace
    their body inside `using(self.attention)`, so the choice is made once per model, not per layer.
    """
    return _overriding("implementation", check_implementation(implementation))


def check_implementation(implementation: str) -> str:
    """`implementation` if it is one of `IMPLEMENTATIONS`, else a one-line `AttentionError`."""
    if implementation not in IMPLEMENTATIONS:
        raise AttentionError(
            f"unknown attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    return implementation


def _normalise_platform(platform: str) -> str:
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "rocm") else platform


def current_platform() -> str:
    """The platform attention dispatches for: the `target_platform` override or the default backend."""
    return _platform_override() or _normalise_platform(jax.default_backend())


# ----------------------------------------------------------------------------- dispatch

def _shape_str(q_shape, k_shape) -> str:
    q = list(q_shape)
    k = list(k_shape)
    return f"q {q}" if q == k else f"q {q}, k {k}"


def _gpu_compute_capability() -> float | None:
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu":
            return None
        return float(dev.compute_capability)
    except Exception:  # noqa: BLE001 - not determinable
        return None


def _splash_module():
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention
    except Exception as e:  # noqa: BLE001
        return None, e
    return splash_attention, None


def _cudnn_problem(q_shape, k_shape, dtype, platform, compute_capability) -> str | None:
    h = q_shape[-1]
    if platform != "gpu":
        return f"needs a GPU (platform {platform})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"needs bfloat16/float16 inputs (got {jnp.dtype(dtype).name})"
    if h % 8:
        return f"needs head_dim % 8 == 0 (got {h})"
    if compute_capability is None:
        compute_capability = _gpu_compute_capability()
    if compute_capability is None:
        compute_capability = 9.0  # not determinable: assume Hopper
    limit = 256 if float(compute_capability) >= 9.0 else 128
    if h > limit:
        return f"needs head_dim <= {limit} on compute capability {compute_capability} (got {h})"
    return None


def _splash_problem(platform) -> str | None:
    if platform != "tpu" and not _interpret():
        return f"needs a TPU (platform {platform}; use interpret_kernels() to run it on CPU)"
    _, err = _splash_module()
    if err is not None:
        return f"cannot import jax.experimental.pallas.ops.tpu.splash_attention ({err})"
    return None


def resolve(
    implementation: str,
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    dtype: Any,
    *,
    is_causal: bool = False,
    platform: str | None = None,
    compute_capability: float | str | None = None,
) -> str:
    """The concrete implementation ("xla" | "chunked" | "cudnn" | "splash") that would run.

    Pure function of the shapes, dtype and platform (default: `current_platform()`). A forced
    implementation that cannot run raises `AttentionError`. `compute_capability` (e.g. 8.0 or
    "9.0") overrides the GPU generation used for cuDNN's head_dim limit; when it is not given and
    not determinable (no GPU attached), Hopper is assumed.
    """
    check_implementation(implementation)
    q_shape, k_shape = tuple(q_shape), tuple(k_shape)
    where = _shape_str(q_shape, k_shape)
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise AttentionError(f"attention needs rank-4 [B, T, N, H] q and [B, S, N, H] k; {where}")
    if q_shape[0] != k_shape[0] or q_shape[2] != k_shape[2] or q_shape[3] != k_shape[3]:
        raise AttentionError(f"attention needs equal batch, heads and head_dim in q and k; {where}")
    platform = _normalise_platform(platform) if platform else current_platform()
    t, s, h = q_shape[1], k_shape[1], q_shape[3]

    if implementation in ("xla", "chunked"):
        return implementation
    if implementation == "cudnn":
        problem = _cudnn_problem(q_shape, k_shape, dtype, platform, compute_capability)
        if problem:
            raise AttentionError(f'attention "cudnn" {problem}; {where}')
        return "cudnn"
    if implementation == "splash":
        problem = _splash_problem(platform)
        if problem:
            raise AttentionError(f'attention "splash" {problem}; {where}')
        return "splash"

    # auto
    if s < LONG_SEQ_LEN:
        return "xla"
    if platform == "gpu":
        ok = _cudnn_problem(q_shape, k_shape, dtype, platform, compute_capability) is None
        return "cudnn" if ok else "chunked"
    if platform == "tpu":
        if t >= LONG_SEQ_LEN and h <= SPLASH_MAX_AUTO_HEAD_DIM and _splash_problem(platform) is None:
            return "splash"
        return "chunked"
    return "chunked"


def dot_product_attention(q, k, v, *, implementation: str | None = None, is_causal: bool = False) -> jax.Array:
    """q: [B, T, N, H], k/v: [B, S, N, H] (jax.nn.dot_product_attention's layout), softmax scale
    1/sqrt(H); returns [B, T, N, H] in q.dtype. `implementation` is one of `IMPLEMENTATIONS`;
    None is the innermost `using(...)`, or "auto" outside any."""
    if implementation is None:
        implementation = getattr(_state, "implementation", None) or "auto"
    if k.shape != v.shape:
        raise AttentionError(f"attention needs k and v of equal shape; k {list(k.shape)}, v {list(v.shape)}")
    impl = resolve(implementation, q.shape, k.shape, q.dtype, is_causal=is_causal)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    if impl == "chunked":
        return chunked_attention(q, k, v, is_causal=is_causal)
    return splash_attention(q, k, v, is_causal=is_causal)


# ----------------------------------------------------------------------------- chunked

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block_mask(qi, ki, bq, bk, t, s, is_causal):
    """[bq, bk] bool mask of the (qi, ki) block, or None when every entry is visible."""
    if not is_causal and s % bk == 0:
        return None
    kpos = ki * bk + jnp.arange(bk)
    mask = jnp.broadcast_to(kpos[None, :] < s, (bq, bk))
    if is_causal:
        qpos = qi * bq + jnp.arange(bq)
        mask = mask & (kpos[None, :] <= qpos[:, None])
    return mask


def _scores(q_blk, k_blk, scale):
    # [B, N, bq, H] x [B, N, bk, H] -> [B, N, bq, bk] float32
    return jnp.einsum("bnqh,bnkh->bnqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


def _blocks(x, b):
    """[B, N, L, H] -> [L/b, B, N, b, H]."""
    bsz, n, length, h = x.shape
    return x.reshape(bsz, n, length // b, b, h).transpose(2, 0, 1, 3, 4)


def _unblocks(x):
    """[L/b, B, N, b, H] -> [B, N, L, H]."""
    nb, bsz, n, b, h = x.shape
    return x.transpose(1, 2, 0, 3, 4).reshape(bsz, n, nb * b, h)


def _flash_fwd(q, k, v, t, s, is_causal, bq, bk):
    """q [B, N, Tp, H], k/v [B, N, Sp, H] (padded) -> out [B, N, Tp, H] (q.dtype), lse [B, N, Tp] f32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qb, kb, vb = _blocks(q, bq), _blocks(k, bk), _blocks(v, bk)
    nq, nk = qb.shape[0], kb.shape[0]
    bsz, n, h = q.shape[0], q.shape[1], q.shape[3]

    def q_step(_, xs):
        qi, q_blk = xs

        def k_step(carry, ys):
            m, l, acc = carry
            ki, k_blk, v_blk = ys
            sc = _scores(q_blk, k_blk, scale)
            mask = _block_mask(qi, ki, bq, bk, t, s, is_causal)
            if mask is not None:
                sc = jnp.where(mask, sc, _MASK_VALUE)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bnqk,bnkh->bnqh", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * corr[..., None] + pv
            return (m_new, l, acc), None

        init = (
            jnp.full((bsz, n, bq), _MASK_VALUE, jnp.float32),
            jnp.zeros((bsz, n, bq), jnp.float32),
            jnp.zeros((bsz, n, bq, h), jnp.float32),
        )
        (m, l, acc), _ = lax.scan(k_step, init, (jnp.arange(nk), kb, vb))
        l_safe = jnp.where(l == 0.0, 1.0, l)
        out = (acc / l_safe[..., None]).astype(q.dtype)
        lse = m + jnp.log(l_safe)
        return None, (out, lse)

    _, (ob, lseb) = lax.scan(q_step, None, (jnp.arange(nq), qb))
    out = _unblocks(ob)
    lse = lseb.transpose(1, 2, 0, 3).reshape(bsz, n, nq * bq)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _flash(q, k, v, t, s, is_causal, bq, bk):
    return _flash_fwd(q, k, v, t, s, is_causal, bq, bk)[0]


def _flash_vjp_fwd(q, k, v, t, s, is_causal, bq, bk):
    out, lse = _flash_fwd(q, k, v, t, s, is_causal, bq, bk)
    return out, (q, k, v, out, lse)


def _flash_vjp_bwd(t, s, is_causal, bq, bk, res, do):
    """FlashAttention-2 backward: outer loop over key blocks (dk, dv accumulate in registers of
    the loop), inner loop over query blocks (dq accumulates in a float32 buffer in the carry)."""
    q, k, v, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    bsz, n, tp, h = q.shape
    do = do.astype(q.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, N, Tp]
    qb, dob = _blocks(q, bq), _blocks(do, bq)
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    nq, nk = qb.shape[0], kb.shape[0]
    lseb = lse.reshape(bsz, n, nq, bq).transpose(2, 0, 1, 3)  # [nq, B, N, bq]
    deltab = delta.reshape(bsz, n, nq, bq).transpose(2, 0, 1, 3)

    def k_step(dq_acc, xs):
        ki, k_blk, v_blk = xs

        def q_step(carry, ys):
            dq_acc, dk, dv = carry
            qi, q_blk, do_blk, lse_blk, delta_blk = ys
            sc = _scores(q_blk, k_blk, scale)
            p = jnp.exp(sc - lse_blk[..., None])
            mask = _block_mask(qi, ki, bq, bk, t, s, is_causal)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + jnp.einsum("bnqk,bnqh->bnkh", p.astype(do_blk.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bnqh,bnkh->bnqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_blk[..., None])).astype(q_blk.dtype)
            dk = dk + jnp.einsum("bnqk,bnqh->bnkh", ds, q_blk, preferred_element_type=jnp.float32) * scale
            dq_blk = jnp.einsum("bnqk,bnkh->bnqh", ds, k_blk, preferred_element_type=jnp.float32) * scale
            dq_acc = dq_acc.at[qi].add(dq_blk)
            return (dq_acc, dk, dv), None

        zeros = jnp.zeros((bsz, n, bk, h), jnp.float32)
        (dq_acc, dk, dv), _ = lax.scan(q_step, (dq_acc, zeros, zeros),
                                        (jnp.arange(nq), qb, dob, lseb, deltab))
        return dq_acc, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros((nq, bsz, n, bq, h), jnp.float32)
    dq_acc, (dkb, dvb) = lax.scan(k_step, dq0, (jnp.arange(nk), kb, vb))
    return _unblocks(dq_acc).astype(q.dtype), _unblocks(dkb), _unblocks(dvb)


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def chunked_attention(q, k, v, *, is_causal: bool = False, block_q: int = CHUNK_BLOCK_Q,
                      block_k: int = CHUNK_BLOCK_K) -> jax.Array:
    """Memory-efficient attention in pure JAX (layout and semantics of `dot_product_attention`).

    Blocks of `block_q` queries x `block_k` keys (clamped to the sequence lengths); sequences that
    are not block multiples are padded, padded keys masked and padded queries sliced off. Causal
    masking is top-left aligned like `jax.nn.dot_product_attention` (query i sees keys j <= i).
    The backward recomputes block scores from the saved output and logsumexp.
    """
    bsz, t, n, h = q.shape
    s = k.shape[1]
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L, H]
    if tp != t:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    if sp != s:
        kt = jnp.pad(kt, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        vt = jnp.pad(vt, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    out = _flash(qt, kt, vt, t, s, bool(is_causal), bq, bk)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


# ----------------------------------------------------------------------------- splash

def _context_mesh():
    """The mesh in context (`jax.set_mesh`), else the legacy `with mesh:` one, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh
    try:  # deprecated `with Mesh(...):` contexts don't set the abstract mesh in JAX 0.10
        from jax._src import mesh as mesh_lib

        phys = mesh_lib.thread_resources.env.physical_mesh
        if phys is not None and not phys.empty:
            return phys
    except Exception:  # noqa: BLE001
        pass
    return None


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """Mesh axes among SPLASH_BATCH_AXES (not already manual) whose product divides the batch."""
    manual = set()
    try:
        manual = {name for name, typ in zip(mesh.axis_names, mesh.axis_types)
                  if typ == jax.sharding.AxisType.Manual}
    except Exception:  # noqa: BLE001
        pass
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes, prod = [], 1
    for name in SPLASH_BATCH_AXES:
        if name in sizes and name not in manual and batch % (prod * sizes[name]) == 0:
            axes.append(name)
            prod *= sizes[name]
    return tuple(axes)


def _default_precision(fn):
    """`fn(q, k, v)` with its forward and backward traced at the default matmul precision.

    A process-wide `jax_default_matmul_precision="highest"` would make the splash kernels ask Mosaic
    for fp32 contractions of bf16 blocks, which it cannot compile ("Bad lhs type"); half-precision
    inputs have nothing to gain from it. The backward kernels are traced when the gradient is
    transposed, outside any context around the forward call, hence a `custom_vjp` that enters the
    context in both passes.
    """

    @jax.custom_vjp
    def call(q, k, v):
        with jax.default_matmul_precision("default"):
            return fn(q, k, v)

    def fwd(q, k, v):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, q, k, v)

    def bwd(vjp, g):
        with jax.default_matmul_precision("default"):
            return vjp(g)

    call.defvjp(fwd, bwd)
    return call


def splash_attention(q, k, v, *, is_causal: bool = False, block: int = SPLASH_BLOCK) -> jax.Array:
    """TPU splash attention with `dot_product_attention`'s layout and semantics.

    `block` (a multiple of 128) is the q/kv block, clamped to the padded sequence lengths.
    """
    problem = _splash_problem(current_platform())
    if problem:
        raise AttentionError(f'attention "splash" {problem}; {_shape_str(q.shape, k.shape)}')
    if block % 128:
        raise AttentionError(f"splash block must be a multiple of 128 (got {block})")
    sa, _ = _splash_module()
    bsz, t, n, h = q.shape
    s = k.shape[1]
    hp = _round_up(h, 128)
    bq = min(block, _round_up(t, 128))
    bk = min(block, _round_up(s, 128))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    interpret = _interpret()

    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # splash has no scale argument
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, hp - h)))
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, hp - h)))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L, Hp]

    def kernel_call(q, k, v):
        shape = (tp, sp)
        head_mask = sa.CausalMask(shape) if is_causal else sa.FullMask(shape)
        mask = sa.MultiHeadMask([head_mask] * n)
        sizes = sa.BlockSizes(
            block_q=bq, block_kv=bk, block_kv_compute=bk,
            block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
            block_q_dq=bq, block_kv_dq=bk,
        )
        kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
        # Padded keys are segment 1, every query segment 0: real queries never see padding, and
        # padded query rows (sliced off) still see key 0, so no row is empty (no NaN).
        seg = sa.SegmentIds(q=jnp.zeros((tp,), jnp.int32),
                            kv=(jnp.arange(sp) >= s).astype(jnp.int32))
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, seg)

    mesh = _context_mesh()
    axes = _batch_axes(mesh, bsz) if mesh is not None else ()
    if axes:
        spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
        kernel_call = jax.shard_map(kernel_call, mesh=mesh, in_specs=(spec, spec, spec),
                                    out_specs=spec, check_vma=False)
    if q.dtype in (jnp.bfloat16, jnp.float16):
        kernel_call = _default_precision(kernel_call)
    out = kernel_call(q, k, v)  # [B, N, Tp, Hp]
    return out.transpose(0, 2, 1, 3)[:, :t, :, :h].astype(q.dtype)
