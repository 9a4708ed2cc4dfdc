"""Training memory: the attention choice reaches the step's UNet, stage configs store the frozen base
in bf16, LoRA stages apply their factors unmerged at run time (so a bf16 base does not round the
trained delta away), and FSDP gathers weights per layer, in the compute dtype, inside each remat
block (checked by counting the all-gathers of the compiled step on 8 fake CPU devices).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from flax.traverse_util import flatten_dict, unflatten_dict

from animatediff_jax import lora
from animatediff_jax.models.attention import AttentionError
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.init import random_params
from animatediff_jax.models.shapes import is_motion_path, unet_shapes
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.training import base_config, build_trainer, load_models, stages
from animatediff_jax.training.config import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(stage: str):
    c = tiny_overrides(base_config())
    c.stage = stage
    c.model.vae = c.model.text_encoder = False
    c.parallel.mesh_shape = {"data": 1, "fsdp": 1}
    return c


def _stage_config(name: str):
    path = os.path.join(ROOT, "configs", "train", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


# ----------------------------------------------------------------------------- 1. attention


def test_attention_field_validated_and_used():
    c = _tiny_config("motion_module")
    c.parallel.attention = "flash"
    with pytest.raises(ValueError, match=r"parallel\.attention='flash' is not one of: auto, xla, chunked, cudnn, splash"):
        build_trainer(c)  # before any model loads or compiles
    c.parallel.attention = "cudnn"
    tr = build_trainer(c)
    assert tr.spec.unet.attention == "cudnn"
    from animatediff_jax.training.step import make_loss_fn

    args = (tr.state.params, tr.frozen, {"latents": jnp.zeros((1, 2, 8, 8, 4)), "context": jnp.zeros((1, 8, 32))},
            jax.random.key(0), jnp.arange(1))
    # The forced kernel is the one the step traces: cuDNN cannot run on CPU, XLA can (trace only).
    with pytest.raises(AttentionError, match="cudnn"):
        jax.eval_shape(make_loss_fn(tr.spec), *args)
    xla_spec = dataclasses.replace(tr.spec, unet=tr.spec.unet.clone(attention="xla"))
    assert jax.eval_shape(make_loss_fn(xla_spec), *args).shape == ()


# ----------------------------------------------------------------------------- 2. frozen bf16


def test_stage_configs_and_frozen_dtype_applies_to_frozen_weights_only():
    for name in ("stage1_domain_adapter", "stage2_motion_module", "stage3_motion_lora"):
        assert _stage_config(name).parallel.frozen_dtype == "bfloat16", name
    # Recompute everything: what fits 4 clips of 16x256² per 16 GB v5e (`animatediff-jax compile`, BENCHMARKS.md).
    for name in ("stage2_motion_module", "stage3_motion_lora"):
        assert _stage_config(name).parallel.remat == "full", name

    c = _tiny_config("motion_module")
    c.model.vae = True  # frozen VAE too
    c.parallel.frozen_dtype = "bfloat16"
    models = load_models(c)
    base = flatten_dict(jax.tree.map(np.asarray, models.unet))
    vae = flatten_dict(jax.tree.map(np.asarray, models.vae))
    tr = build_trainer(c, models)
    frozen = flatten_dict(jax.tree.map(np.asarray, tr.frozen["unet"]))
    trainable = flatten_dict(jax.tree.map(np.asarray, tr.state.params))
    assert frozen and set(frozen) | set(trainable) == set(base) and not set(frozen) & set(trainable)
    for k, v in frozen.items():  # the frozen base: bf16, equal to the rounded fp32 weights
        assert v.dtype == jnp.bfloat16 and np.array_equal(v, base[k].astype(jnp.bfloat16)), k
    for k, v in flatten_dict(jax.tree.map(np.asarray, tr.frozen["vae"])).items():
        assert v.dtype == jnp.bfloat16 and np.array_equal(v, vae[k].astype(jnp.bfloat16)), k
    for k, v in trainable.items():  # the motion modules: float32, bit-identical to the loaded ones
        assert v.dtype == np.float32 and np.array_equal(v, base[k]), k
    for x in jax.tree.leaves(tr.state.opt_state):
        assert x.dtype in (jnp.float32, jnp.int32), x.dtype
    mu = jax.tree.leaves(tr.state.opt_state[1][0].mu)
    assert all(x.dtype == jnp.float32 and float(jnp.abs(x).max()) == 0.0 for x in mu)


# ----------------------------------------------------------------------------- 3. run-time LoRA


CFG = tiny_unet("v2")
X = jax.random.normal(jax.random.key(3), (1, 2, 8, 8, 4))
T = jnp.array([321])
CTX = jax.random.normal(jax.random.key(4), (1, 8, CFG.cross_attention_dim))
W = jax.random.normal(jax.random.key(5), (1, 2, 8, 8, 4))  # a random linear functional of the output
SCALE = 0.8


def _lora_setup(targets, motion: bool, up_std: float = 0.05):
    cfg = CFG if motion else CFG.replace(motion=None)
    params = random_params(unet_shapes(cfg), 0, like_init=True)
    if motion:  # fresh motion modules end in a zero proj_out: stand in for trained ones
        flat = flatten_dict(params)
        rng = np.random.default_rng(0)
        for k in flat:
            if is_motion_path(k) and k[-2:] == ("proj_out", "kernel"):
                flat[k] = 0.1 * rng.standard_normal(flat[k].shape).astype(np.float32)
        params = unflatten_dict(flat)
    tree = lora.init_lora(params, targets, 4, jax.random.key(1))
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    tree = jax.tree.unflatten(treedef, [x + up_std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return cfg, params, tree


def _paths(cfg):
    unet = UNet3D(cfg)

    def objective(out):
        return jnp.sum(out.astype(jnp.float32) * W)

    @jax.jit
    def merged(base, tree):
        def f(tree):
            out = unet.apply({"params": lora.merge(base, tree, SCALE)}, X, T, CTX)
            return objective(out), out
        return jax.value_and_grad(f, has_aux=True)(tree)

    @jax.jit
    def runtime(base, tree):
        def f(tree):
            with lora.at_runtime(tree, SCALE):
                out = unet.apply({"params": base}, X, T, CTX)
            return objective(out), out
        return jax.value_and_grad(f, has_aux=True)(tree)

    return merged, runtime


@pytest.mark.parametrize("stage", ["domain_adapter", "motion_lora"])
def test_runtime_lora_equals_merged_fp32(stage):
    """Stage 1's and stage 3's LoRA trees: outputs and gradients w.r.t. the factors, run-time == merged."""
    st = stages.get_stage(stage)
    cfg, params, tree = _lora_setup(st.targets, st.motion_modules)
    merged, runtime = _paths(cfg)
    (_, out_m), g_m = merged(params, tree)
    (_, out_r), g_r = runtime(params, tree)
    (_, base), _ = runtime(params, jax.tree.map(jnp.zeros_like, tree))  # no LoRA (same compiled function)
    effect = float(jnp.abs(out_m - base).max())
    err = float(jnp.abs(out_r - out_m).max())
    g_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_m))
    g_err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_r)))
    print(f"{stage}: {len(lora.lora_layers(tree))} layers, LoRA effect {effect:.3g}, run-time vs merged "
          f"{err:.2g}; grad max {g_scale:.3g}, diff {g_err:.2g}")
    assert effect > 1e-2  # the LoRA changes the output, so the comparison means something
    assert err <= 1e-5
    assert jax.tree.structure(g_m) == jax.tree.structure(g_r)
    assert g_scale > 0 and g_err <= 1e-5 * max(1.0, g_scale)
    # The trainer's path (stages.apply_unet) is the run-time one, bit for bit (both forward-only programs:
    # the gradient program's forward may round differently), and combine() is the merged one.
    out_s = jax.jit(lambda p, l: stages.apply_unet(st, UNet3D(cfg), l, p, SCALE, X, T, CTX))(params, tree)

    @jax.jit
    def runtime_forward(p, l):
        with lora.at_runtime(l, SCALE):
            return UNet3D(cfg).apply({"params": p}, X, T, CTX)

    assert float(jnp.abs(out_s - runtime_forward(params, tree)).max()) == 0.0
    assert float(jnp.abs(out_s - out_r).max()) <= 1e-5
    combined, merged_params = flatten_dict(stages.combine(st, tree, params, SCALE)), flatten_dict(lora.merge(params, tree, SCALE))
    assert set(combined) == set(merged_params)
    assert all(np.array_equal(np.asarray(combined[k]), np.asarray(merged_params[k])) for k in combined)


def test_runtime_lora_survives_bf16_base():
    """Frozen base stored in bf16: the run-time path keeps the small trained delta, merging into
    bf16 kernels rounds most of it away. Reference: float32 math on the same (bf16-rounded) base
    with the delta exact, i.e. the model the bf16 run means to compute."""
    cfg, params, tree = _lora_setup(lora.domain_adapter_targets, False, up_std=0.002)
    merged, runtime = _paths(cfg)
    base16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    base_ref = jax.tree.map(lambda x: x.astype(jnp.float32), base16)  # the stored weights, exactly
    (_, ref), g_ref = merged(base_ref, tree)
    (_, out_rt), g_rt = runtime(base16, tree)
    merged16 = jax.jit(lambda b, t: UNet3D(cfg).apply({"params": lora.merge(b, t, SCALE)}, X, T, CTX))
    out_m16 = merged16(base16, tree)
    zero = jax.tree.map(jnp.zeros_like, tree)
    (_, ref0), _ = merged(base_ref, zero)
    effect = ref - ref0  # what the LoRA adds to the output
    delta_rel = max(float(jnp.abs(lora.lora_delta(l)).max() * SCALE / jnp.abs(lora._get_kernel(params, p)).max())
                    for p, l in lora.lora_layers(tree).items())
    err_rt = float(jnp.abs(out_rt - ref).max())
    err_m16 = float(jnp.abs(out_m16 - ref).max())
    eff = float(jnp.abs(effect).max())
    print(f"bf16 base, delta/|W| <= {delta_rel:.2g}: LoRA effect on the output {eff:.3g}; error vs fp32 reference: "
          f"run-time {err_rt:.3g} ({100 * err_rt / eff:.2g}% of the effect), merged into bf16 {err_m16:.3g} "
          f"({100 * err_m16 / eff:.2g}%); ratio {err_m16 / max(err_rt, 1e-30):.3g}x")
    assert eff > 1e-3
    assert err_rt <= 1e-5 and err_m16 > 0.1 * eff
    assert err_m16 > 1000 * err_rt
    # Gradients w.r.t. the factors: the bf16-base run-time path == float32 math on the same base.
    g_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    g_err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_rt)))
    assert g_scale > 0 and g_err <= 1e-5 * max(1.0, g_scale), (g_err, g_scale)


def test_runtime_lora_rejects_misfits():
    cfg, params, tree = _lora_setup(lora.domain_adapter_targets, False)
    unet = UNet3D(cfg)
    bad = {"nope": {"to_q": next(iter(lora.lora_layers(tree).values()))}}
    with pytest.raises(ValueError, match="never reached"):
        with lora.at_runtime(bad):
            jax.eval_shape(lambda p: unet.apply({"params": p}, X, T, CTX), params)
    (path, layer), *_ = lora.lora_layers(tree).items()
    wrong = unflatten_dict({path + ("down",): np.zeros((3, 4), np.float32), path + ("up",): np.zeros((4, 5), np.float32)})
    with pytest.raises(ValueError, match="does not fit"):
        with lora.at_runtime(wrong):
            jax.eval_shape(lambda p: unet.apply({"params": p}, X, T, CTX), params)


# ----------------------------------------------------------------------------- 4. FSDP per layer

FSDP_SCRIPT = textwrap.dedent(
    r"""
    import glob, json, re, sys
    import jax, numpy as np
    from animatediff_jax import parallel
    from flax.traverse_util import flatten_dict
    from animatediff_jax.training import base_config, build_trainer, load_models
    from animatediff_jax.training.config import tiny_overrides

    assert jax.device_count() == 8
    SIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}

    def gathers(text):
        # {"forward"/"backward": [count, {dtype: bytes}]} of the all-gathers (backward: under transpose).
        out = {"forward": [0, {}], "backward": [0, {}]}
        for line in text.splitlines():
            m = re.search(r"=\s+(.+?)\s+all-gather(-start)?\(", line)
            if m:
                op = re.search(r'op_name="([^"]*)"', line)
                side = out["backward" if op and "transpose(" in op.group(1) else "forward"]
                side[0] += 1
                for dt, dims in re.findall(r"([a-z]+[0-9]+)\[([0-9,]*)\]", m.group(1)):
                    size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                    side[1][dt] = side[1].get(dt, 0) + size * SIZE[dt]
        return out

    c = tiny_overrides(base_config())
    c.stage = "motion_module"
    c.model.vae = c.model.text_encoder = False
    c.train.batch_size = 8
    c.train.num_frames = 2
    c.parallel.mesh_shape = {"data": 2, "fsdp": 4}
    c.parallel.min_fsdp_size = 256
    c.parallel.remat = "full"
    c.parallel.compute_dtype = "bfloat16"
    c.parallel.frozen_dtype = "float32"  # stored fp32: the gathers must still be bf16
    tr = build_trainer(c, load_models(c))
    rng = np.random.default_rng(0)
    batch = tr.put_batch({"latents": rng.standard_normal((8, 2, 8, 8, 4)).astype(np.float32),
                          "context": rng.standard_normal((8, 8, 32)).astype(np.float32)})
    compiled = tr.step_fn(batch).lower(tr.state, tr.frozen, batch).compile()
    in_compiled = gathers(compiled.as_text())
    dumps = sorted(glob.glob(sys.argv[1] + "/*jit_step_fn*after_spmd-partitioning*"))
    partitioned = gathers(open(dumps[-1]).read()) if dumps else None
    # Sharded leaves (count, bf16 bytes): all; inside remat blocks; in the two blocks upstream of
    # the first motion module (down_blocks_0's resnet and attention: no gradient flows through them).
    block = re.compile(r"^(resnets|attentions|motion_modules)_[0-9]+$")
    leaves = {**flatten_dict(tr.frozen["unet"]), **flatten_dict(tr.state.params)}
    count = {"all": [0, 0], "blocks": [0, 0], "upstream": [0, 0]}
    for k, v in leaves.items():
        if "fsdp" not in str(v.sharding.spec):
            continue
        groups = ["all"] + (["blocks"] if any(block.match(p) for p in k) else [])
        groups += ["upstream"] if k[:2] in (("down_blocks_0", "resnets_0"), ("down_blocks_0", "attentions_0")) else []
        for g in groups:
            count[g][0] += 1
            count[g][1] += 2 * v.size
    loss = float(tr.train_step(batch)["loss"])
    print("RESULT " + json.dumps(dict(compiled=in_compiled, partitioned=partitioned, leaves=count,
                                      n_leaves=len(leaves), loss=loss)))
    """
)


def test_fsdp_gathers_per_layer_in_bf16(tmp_path):
    """data=2 x fsdp=4, bf16 compute, fp32 storage, per-block remat: each sharded weight is
    all-gathered on its own (no whole-tree gather), in bf16, and the weights inside remat blocks
    are gathered a second time for the backward pass, so no gathered copy outlives its block."""
    dump = tmp_path / "dump"
    # No persistent compile cache here: a cache hit would skip the compile, and with it the dump.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8", f"--xla_dump_to={dump}",
                                       "--xla_dump_hlo_pass_re=spmd-partitioning", "--xla_dump_hlo_module_re=jit_step_fn"))
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(dump)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    r = json.loads(line[-1][len("RESULT "):])
    (n_all, b_all), (n_blk, b_blk), (n_up, b_up) = (r["leaves"][k] for k in ("all", "blocks", "upstream"))
    fwd, bwd = r["compiled"]["forward"], r["compiled"]["backward"]
    print(f"sharded leaves: {n_all} ({b_all} B in bf16), {n_blk} inside remat blocks, {n_up} of them upstream of "
          f"the first motion module. All-gathers in the compiled step: forward {fwd[0]} (expected {n_all}), "
          f"backward re-gathers {bwd[0]} (expected {n_blk} - {n_up} = {n_blk - n_up}). After SPMD partitioning "
          f"(before CPU widens bf16 collectives to f32): {r['partitioned']}; expected bf16 bytes forward {b_all}, "
          f"backward {b_blk - b_up}. Loss {r['loss']:.4f}")
    assert np.isfinite(r["loss"])
    assert n_blk > 20 and n_all > n_blk > n_up > 0
    # Each sharded weight is gathered once by its own layer in the forward pass (no whole-tree
    # gather), and again in the backward pass inside its remat block wherever a gradient flows.
    assert fwd[0] == n_all and bwd[0] == n_blk - n_up
    # The module right after SPMD partitioning (XLA's dump): the gathers are bf16, of exactly these weights.
    assert r["partitioned"] is not None, "no dump of the partitioned module (XLA renamed the pass?)"
    assert r["partitioned"]["forward"] == [n_all, {"bf16": b_all}]
    assert r["partitioned"]["backward"] == [n_blk - n_up, {"bf16": b_blk - b_up}]
