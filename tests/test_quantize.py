"""int8 for the spatial UNet (`models.quantize`, qwix): what it quantizes, its arithmetic against a
numpy reference, what it changes in a 25-step sample, and the int8 FLOPs the TPU roofline times at the
int8 rate.

The reference for the arithmetic is written out here (symmetric absmax scales: per output channel for
kernels, per row for activations, absmax at 127.5, round to nearest, clip to int8): qwix must compute exactly that, in int32.
"""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from animatediff_jax import xla_cost
from animatediff_jax.errors import ConfigError
from animatediff_jax.models import quantize
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.shapes import unet_example_inputs, unet_shapes
from animatediff_jax.models.unet import UNet3D


def _int8(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 over `axis`, in float32: [-absmax, absmax] onto [-127.5, 127.5] (every bucket
    the same width) by the scale's reciprocal, rounded to nearest (even), saturated to [-128, 127]."""
    scale = np.abs(x).max(axis=axis, keepdims=True) / np.float32(127.5)
    return np.clip(np.round(x * (np.float32(1) / scale)), -128, 127), scale


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, use_bias=False, name="proj")(x)


def test_int8_matmul_is_absmax_int8_per_channel_and_per_row():
    rng = np.random.default_rng(0)
    # Each column's (row's) largest magnitude positive: it lands on 127.5 +- an ulp of the scale, which
    # saturates to 127 either way (a negative one would round to -128 or -127 by that ulp).
    x, w = rng.standard_normal((5, 48)).astype(np.float32), rng.standard_normal((48, 24)).astype(np.float32)
    x *= np.sign(np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1))
    w *= np.sign(np.take_along_axis(w, np.abs(w).argmax(0)[None], 0))
    model, params = _Linear(), {"proj": {"kernel": jnp.asarray(w)}}
    wq, ws = _int8(w, axis=0)  # one scale per output channel
    xq, xs = _int8(x, axis=1)  # one scale per row
    for mode, want in (("int8_weights", x @ (wq * ws)), ("int8", (xq @ wq) * xs * ws)):
        qp = quantize.quantize_params(model, params, mode, jnp.zeros((1, 48)))
        assert quantize.is_quantized(qp["proj"]["kernel"])
        # Params as loaded from a file (numpy arrays) quantize the same.
        from_file = quantize.quantize_params(model, {"proj": {"kernel": w}}, mode, jnp.zeros((1, 48)))
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), from_file, qp))
        got = np.asarray(quantize.quantized(model, mode).apply({"params": qp}, jnp.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.abs(got - x @ w).max() > 1e-3  # (quantized: not the float product)


@pytest.fixture(scope="module")
def unet():
    cfg = tiny_unet("v2")
    x = jax.random.normal(jax.random.key(1), (1, 4, 16, 16, 4))
    ctx = jax.random.normal(jax.random.key(2), (1, 7, cfg.cross_attention_dim))
    params = UNet3D(cfg).init(jax.random.key(0), x, jnp.array([10.0]), ctx)["params"]
    return cfg, params, (x, jnp.array([10.0]), ctx)


def _quantized_paths(params) -> list[str]:
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, v: quantize.is_quantized(v))
    return ["/".join(k) for k, v in flat.items() if quantize.is_quantized(v)]


def test_unet_quantizes_spatial_layers_only(unet):
    cfg, params, inputs = unet
    model = UNet3D(cfg)
    ref = model.apply({"params": params}, *inputs)
    for mode, kinds, bound in (("int8_weights", {"Dense"}, 0.03), ("int8", {"Dense", "Conv"}, 0.1)):
        qp = quantize.quantize_params(model, params, mode, *unet_example_inputs(cfg)[0])
        paths = _quantized_paths(qp)
        # every spatial resnet conv (int8 only), transformer projection and feed-forward ...
        assert "down_blocks_0/resnets_0/conv1/kernel" in paths if "Conv" in kinds else all("conv" not in p for p in paths)
        assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_q/kernel" in paths
        assert "mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel" in paths
        # ... and no motion module, first / last layer or time embedding
        assert not [p for p in paths if re.search(r"motion_modules|conv_in|conv_out|time_emb", p)]
        flat, qflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(qp, is_leaf=lambda _, v:
                                                                                       quantize.is_quantized(v))
        kept = [k for k in flat if "motion_modules_0" in k]
        assert kept and all(qflat[k] is flat[k] for k in kept)  # the same arrays, untouched
        out = quantize.quantized(model, mode).apply({"params": qp}, *inputs)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        assert 1e-4 < rel < bound, (mode, rel)  # measured: 0.008 (int8_weights), 0.03 (int8)
        # the abstract path (`compile`) gives the same tree
        abstract = quantize.quantize_params(model, unet_shapes(cfg), mode, *unet_example_inputs(cfg)[0])
        assert jax.tree.structure(abstract) == jax.tree.structure(qp)


def _taps(n: int, kernel: int, stride: int, pad: int) -> int:
    """Kernel taps that land inside an input of length `n` (not on padding), summed over the outputs."""
    outputs = (n + 2 * pad - kernel) // stride + 1
    return sum(0 <= i * stride - pad + k < n for i in range(outputs) for k in range(kernel))


def _layer_flops(model, params, inputs) -> dict[str, float]:
    """Each Dense / Conv of `model` on `inputs`: 2 x multiply-adds, counting (as XLA's cost model does) only
    the conv taps that fall inside the input, not on its zero padding. Keyed by kernel path."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.Conv)):
            kernel = mod.variables["params"]["kernel"].shape
            if isinstance(mod, nn.Dense):
                macs = np.prod(out.shape) * kernel[0]
            else:  # [N, H, W, C] through a square kernel, symmetric padding
                x, (kh, kw), (s, _), ((p, _), _) = args[0], mod.kernel_size, mod.strides, mod.padding
                macs = x.shape[0] * _taps(x.shape[1], kh, s, p) * _taps(x.shape[2], kw, s, p) * kernel[2] * kernel[3]
            seen["/".join(mod.path) + "/kernel"] = 2.0 * macs
        return out

    with nn.intercept_methods(record):
        model.apply({"params": params}, *inputs)
    return seen


def test_int8_flops_counted_from_the_optimised_program(unet):
    cfg, params, inputs = unet
    model = UNet3D(cfg)
    qp = quantize.quantize_params(model, params, "int8", *unet_example_inputs(cfg)[0])
    fn = jax.jit(lambda p, *a: quantize.quantized(model, "int8").apply({"params": p}, *a))
    counted = xla_cost.int8_flops(xla_cost.Module.parse(fn.lower(qp, *inputs).compile().as_text()))
    flops = _layer_flops(model, params, inputs)
    want = sum(flops[p] for p in _quantized_paths(qp))
    assert want > 0
    np.testing.assert_allclose(counted, want, rtol=1e-9)
    float_fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    assert xla_cost.int8_flops(xla_cost.Module.parse(float_fn.lower(params, *inputs).compile().as_text())) == 0


def test_int8_products_stay_int8_on_tpu():
    """Compiled for a v5e chip (abstract, libtpu): the quantized layers' products are s8 x s8 convolutions,
    and `int8_flops` finds them, at least the analytic count (XLA's TPU convolutions also compute on
    the padding of their rewritten windows: measured +17% here) and less than the whole program's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from animatediff_jax import tpu
    from animatediff_jax.models import attention

    cfg = tiny_unet("v2", block_out_channels=(128, 256), norm_num_groups=32)
    model = UNet3D(cfg)
    inputs = (jnp.zeros((1, 4, 16, 16, 4)), jnp.zeros((1,)), jnp.zeros((1, 7, cfg.cross_attention_dim)))
    params = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    qp = quantize.quantize_params(model, params, "int8", *unet_example_inputs(cfg)[0])
    rep = NamedSharding(Mesh(np.array(tpu.topology("v5e-1").devices()), ("data",)), PartitionSpec())
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), (qp,) + inputs)
    fn = jax.jit(lambda p, *a: quantize.quantized(model, "int8").apply({"params": p}, *a))
    with attention.target_platform("tpu"):
        compiled = fn.lower(*sds).compile()
    text = xla_cost.module_text(compiled)
    counted, total = xla_cost.int8_flops(xla_cost.Module.parse(text)), xla_cost.loop_aware_cost(compiled, text)["flops"]
    flops = _layer_flops(model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params), inputs)
    want = sum(flops[p] for p in _quantized_paths(qp))
    assert want <= counted <= 1.3 * want and counted < 0.8 * total, (counted, want, total)


def test_bad_mode_names_the_setting():
    with pytest.raises(ConfigError, match=r"^quantize='int4': expected one of none, int8_weights, int8$"):
        quantize.check_mode("int4")


def test_25_step_sample_with_int8_stays_near_bf16(tmp_path):
    """The whole sampler (tiny random SD1.5-like pipeline with v2 motion modules, 25 DDIM steps, CFG 7.5) with
    the spatial UNet in int8: the final latents move from bf16's by about what bf16 moves them from float32
    (measured, relative L2: bf16 vs fp32 0.021; int8_weights vs bf16 0.028, int8 vs bf16 0.051)."""
    import dataclasses

    from animatediff_jax import parity
    from animatediff_jax.sampling import generate
    from animatediff_jax.sampling.pipeline import AnimationPipeline, cast_floating, quantize_unet

    torch_pipe, tok = parity.build_random_pipeline("tiny", workdir=str(tmp_path))
    base = parity.ours_from_diffusers(torch_pipe, tok)

    def run(dtype, mode):
        unet = quantize_unet(base.unet_config, base.params["unet"], mode)
        pipe = dataclasses.replace(base, params=cast_floating({**base.params, "unet": unet}, dtype), dtype=dtype,
                                   quantize=mode)
        assert isinstance(pipe, AnimationPipeline)
        out = generate(pipe, ["the cat walks"], ["dog"], [3], num_frames=4, height=16, width=16,
                       steps=25, guidance_scale=7.5, progress=False)
        return out.latents.astype(np.float64)

    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    fp32, bf16 = run(jnp.float32, "none"), run(jnp.bfloat16, "none")
    w8, a8 = run(jnp.bfloat16, "int8_weights"), run(jnp.bfloat16, "int8")
    print(f"relative L2 change: bf16 vs fp32 {rel(bf16, fp32):.4f}; int8_weights vs bf16 {rel(w8, bf16):.4f}; "
          f"int8 vs bf16 {rel(a8, bf16):.4f}")
    assert 0.005 < rel(w8, bf16) < 0.1 and 0.005 < rel(a8, bf16) < 0.15


def test_int8_on_a_trained_model_moves_frames_less_than_bf16_does(monkeypatch):
    """`bench/quantize_quality.py` in small (the toy world's shipped checkpoint, one prompt per direction, 10
    steps; BENCHMARKS.md reports 8 prompts per direction at 20): int8 changes the frames less than bf16 itself
    changes them from float32 (mean |d| / 255, int8 vs bf16 against bf16 vs float32), and the motion is still
    found in every video."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("quantize_quality", os.path.join(root, "bench", "quantize_quality.py"))
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quantize_quality", bench)
    spec.loader.exec_module(bench)
    r = bench.measure(per_direction=1, modes=(("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")),
                      steps=10, log=lambda *_: None)
    print({k: (round(v["vs_float32"], 2), round(v["vs_bfloat16"], 2)) for k, v in r.items()})
    bf16 = r["bfloat16"]["vs_float32"]
    assert 1 < bf16 < 10, r
    assert 0 < r["bfloat16 int8"]["vs_bfloat16"] < 0.75 * bf16, r["bfloat16 int8"]
    assert r["bfloat16 int8"]["found"] == 1.0 and r["bfloat16 int8"]["accuracy"] >= r["float32"]["accuracy"] - 0.25, r
