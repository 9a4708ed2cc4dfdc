"""SPMD: the train step on 8 fake CPU devices (meshes data x fsdp = 2x4, with remat, and 8x1, with
gradient accumulation) equals the single-device step, and FSDP really shards params and Adam state.

Runs in a subprocess: the device count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from conftest import xla_flags

from animatediff_jax.parallel import ShardingRules, resolve_mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from animatediff_jax import parallel
    from flax.traverse_util import flatten_dict
    from animatediff_jax.training import base_config, build_trainer, load_models
    from animatediff_jax.training.config import tiny_overrides

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((16, 4, 8, 8, 4)).astype(np.float32),
             "context": rng.standard_normal((16, 8, 32)).astype(np.float32)}

    def run(mesh_shape, devices, accum, remat="none"):
        c = tiny_overrides(base_config())
        c.stage = "motion_module"
        c.model.vae = c.model.text_encoder = False
        c.train.batch_size = 16
        c.train.grad_accum_steps = accum
        c.parallel.min_fsdp_size = 256
        c.parallel.remat = remat
        c.optim.learning_rate = 1e-3
        # Fresh motion modules end in a zero proj_out, so early gradients inside them are ~1e-9:
        # with eps=1e-8 Adam would blow float rounding there up to +-lr steps. A larger eps keeps
        # updates proportional to gradients, so the comparison sees the sharded math itself.
        c.optim.eps = 1e-3
        mesh = parallel.make_mesh(mesh_shape, devices)
        tr = build_trainer(c, load_models(c), mesh)
        losses = [float(tr.train_step(tr.put_batch(batch))["loss"]) for _ in range(2)]
        params = flatten_dict(parallel.fetch(tr.state.params))
        mu = flatten_dict(parallel.fetch(tr.state.opt_state[1][0].mu))
        specs = [str(x.sharding.spec) for x in jax.tree.leaves(tr.state.params)]
        big = max(jax.tree.leaves(tr.state.params), key=lambda x: x.size)
        info = dict(losses=losses,
                    n_fsdp=sum("fsdp" in s for s in specs), n_leaves=len(specs),
                    big_shape=list(big.shape), big_shard=list(big.addressable_shards[0].data.shape),
                    n_frozen_fsdp=sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(tr.frozen)),
                    batch_shard=list(tr.put_batch(batch)["latents"].addressable_shards[0].data.shape))
        return params, mu, info

    ref, ref_mu, ref_info = run({"data": 1, "fsdp": 1}, jax.devices()[:1], 1)
    out = {"single": ref_info}
    for name, mesh, accum, remat in (("2x4_remat", {"data": 2, "fsdp": 4}, 1, "dots_saveable"),
                                     ("8x1_accum2", {"data": 8, "fsdp": 1}, 2, "none")):
        params, mu, info = run(mesh, jax.devices(), accum, remat)
        scale = max(np.abs(v).max() for v in ref.values())
        info["max_abs_diff"] = float(max(np.abs(params[k] - ref[k]).max() for k in ref))
        info["param_scale"] = float(scale)
        info["max_mu_diff"] = float(max(np.abs(mu[k] - ref_mu[k]).max() for k in ref_mu))
        info["mu_scale"] = float(max(np.abs(v).max() for v in ref_mu.values()))
        info["same_keys"] = sorted(map(str, params)) == sorted(map(str, ref))
        out[name] = info
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_step_equals_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[-1][len("RESULT "):])
    ref = out["single"]
    for name in ("2x4_remat", "8x1_accum2"):
        r = out[name]
        print(name, {k: r[k] for k in ("max_abs_diff", "param_scale", "max_mu_diff", "mu_scale", "losses")})
        assert r["same_keys"]
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=name)
        assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["param_scale"]), name
        assert r["max_mu_diff"] <= 1e-5 * r["mu_scale"], name
        assert r["batch_shard"][0] == 2  # 16 clips over 8 devices
    # FSDP over 4 devices: most params, their Adam moments and the frozen weights are split 4 ways.
    r = out["2x4_remat"]
    assert r["n_fsdp"] >= r["n_leaves"] // 2, r
    assert r["big_shard"] != r["big_shape"] and np.prod(r["big_shard"]) * 4 == np.prod(r["big_shape"]), r
    assert r["n_frozen_fsdp"] > 0
    assert out["8x1_accum2"]["n_fsdp"] == 0  # fsdp axis of size 1: replicated


def test_sharding_rules():
    """Shape-only rules: the largest dim divisible by the fsdp size (last on ties); small arrays replicate."""
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    rules = ShardingRules(min_fsdp_size=16)
    assert tuple(rules.param_spec(mesh, (64, 64))) == ()  # fsdp size 1: nothing to split
    assert tuple(rules.batch_spec(mesh, 3)) == (("data", "fsdp"), None, None)

    class FakeMesh:  # param_spec only reads mesh.shape
        shape = {"data": 2, "fsdp": 4}

    fm = FakeMesh()
    assert tuple(rules.param_spec(fm, (3, 3, 32, 64))) == (None, None, None, "fsdp")
    assert tuple(rules.param_spec(fm, (64, 64))) == (None, "fsdp")
    assert tuple(rules.param_spec(fm, (320, 6))) == ("fsdp", None)
    assert tuple(rules.param_spec(fm, (3, 5))) == ()  # too small
    assert tuple(rules.param_spec(fm, (33, 35))) == ()  # nothing divisible
    assert tuple(rules.param_spec(fm, ())) == ()
    assert resolve_mesh_shape({"data": -1, "fsdp": 4}, 8) == {"data": 2, "fsdp": 4}
    assert resolve_mesh_shape({"data": 8, "fsdp": -1}, 8) == {"data": 8, "fsdp": 1}
    for bad in ({"data": -1, "fsdp": -1}, {"data": 3, "fsdp": 1}, {"data": -1, "fsdp": 3}):
        try:
            resolve_mesh_shape(bad, 8)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
