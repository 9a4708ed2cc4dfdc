"""bench/memory_bench.py: XLA's compiled accounting per attention implementation (CPU, compile only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import memory_bench  # noqa: E402


def test_loop_aware_cost_counts_every_trip():
    """XLA's cost_analysis counts a while body once; the bench's count multiplies nested trip counts."""

    def f(x, w):
        def outer(c, _):
            inner = lambda c2, _: (jnp.tanh(c2 @ w), None)
            return jax.lax.scan(inner, c, None, length=3)[0], None

        return jax.lax.scan(outer, x, None, length=5)[0]

    s = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    cost = memory_bench.loop_aware_cost(jax.jit(f).lower(s, s).compile())
    matmul = 2 * 64**3
    assert cost["loop_aware"], cost.get("loop_aware_error")
    assert cost["raw_flops"] == pytest.approx(matmul, rel=0.05)
    assert cost["flops"] == pytest.approx(15 * matmul, rel=0.05)
    assert cost["unknown_trip_loops"] == 0


def test_count_kernel_calls_follows_private_functions():
    text = """
module @jit_f {
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = call @_kernel(%arg0) : (tensor<4xf32>) -> tensor<4xf32>
    %1 = call @_kernel(%0) : (tensor<4xf32>) -> tensor<4xf32>
    %2 = call @wrapper(%1) : (tensor<4xf32>) -> tensor<4xf32>
    return %2 : tensor<4xf32>
  }
  func.func private @wrapper(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = call @_kernel(%arg0) : (tensor<4xf32>) -> tensor<4xf32>
    %1 = stablehlo.custom_call @tpu_custom_call(%0) : (tensor<4xf32>) -> tensor<4xf32>
    return %1 : tensor<4xf32>
  }
  func.func private @_kernel(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.custom_call @tpu_custom_call(%arg0) : (tensor<4xf32>) -> tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}
"""
    assert memory_bench.count_kernel_calls(text) == (4, 2)


def test_memory_bench_small(tmp_path):
    """--small: tiny-width SD1.5 layout, 2 frames at 512² (4096-token first level), CFG batch."""
    out = tmp_path / "mem.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "memory_bench.py"), "--small", "--only", "unet,tpu",
         "--attention", "xla,chunked", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| UNet CFG call" in proc.stdout and "Pallas kernel calls" in proc.stdout
    data = json.loads(out.read_text())
    rows = {(r["part"], r["attention"]): r for r in data["rows"]}
    xla, chunked = rows[("unet", "xla")], rows[("unet", "chunked")]
    for r in (xla, chunked):
        assert r["loop_aware"], r.get("loop_aware_error")
        for k in ("temp_bytes", "argument_bytes", "output_bytes", "flops", "bytes_accessed"):
            assert r[k] > 0, (r["attention"], k)
    # xla holds the [4, 8, 4096, 4096] float32 scores (2 GiB) of a first-level layer; chunked one block.
    assert xla["temp_bytes"] > 2 * 2**30
    assert chunked["temp_bytes"] * 4 < xla["temp_bytes"]
    # Same math: loop-aware FLOPs agree; XLA's raw count sees one block of each chunked loop.
    assert chunked["flops"] == pytest.approx(xla["flops"], rel=0.10)
    assert chunked["raw_flops"] < 0.8 * chunked["flops"]
    assert xla["raw_flops"] == pytest.approx(xla["flops"], rel=0.01)
    splash, auto_tpu = rows[("tpu", "splash")], rows[("tpu", "auto")]
    # auto on TPU: splash for the 4096- and 1024-token self-attentions only; forced: every attention.
    assert auto_tpu["tpu_custom_calls"] >= 1
    assert splash["tpu_custom_calls"] > auto_tpu["tpu_custom_calls"]


def test_train_program_differentiates_the_training_steps_loss(monkeypatch):
    """The "train" part measures the step's own loss (`training.step.make_loss_fn`: noise, timesteps,
    epsilon MSE), split into motion modules and the rest by `models.shapes.is_motion_path`."""
    from animatediff_jax.models import shapes
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.training import step

    calls = {"is_motion_path": [], "make_loss_fn": []}
    for module, name in ((shapes, "is_motion_path"), (step, "make_loss_fn")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls[_n].append(a) or _f(*a))
    fn, args = memory_bench.train_program(tiny_unet("v2"), "xla", 2, 64, 1, "none")
    assert calls["is_motion_path"] and len(calls["make_loss_fn"]) == 1
    assert calls["make_loss_fn"][0][0].stage.name == "motion_module"
    grads = jax.eval_shape(fn, *args)
    assert jax.tree.structure(grads) == jax.tree.structure(args[0])
    assert all(shapes.is_motion_path(tuple(k.key for k in p)) for p, _ in jax.tree_util.tree_leaves_with_path(grads))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads))
