"""Multi-host for real on CPU: 2 processes x 4 devices (gloo collectives over localhost), each
feeding only its own rows of the global batch, train exactly like 1 process x 8 devices; the
checkpoint written by both processes restores their params and per-process data states.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    pid, nproc, port, out, ckdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    jax.config.update("jax_num_cpu_devices", 8 // nproc)
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    from animatediff_jax import parallel
    if nproc > 1:
        assert parallel.maybe_initialize_distributed("auto", f"localhost:{port}", nproc, pid)
    from flax.traverse_util import flatten_dict
    from animatediff_jax.training import base_config, build_trainer, load_models
    from animatediff_jax.training.checkpointing import Checkpointer
    from animatediff_jax.training.config import tiny_overrides

    assert jax.device_count() == 8 and jax.process_count() == nproc
    c = tiny_overrides(base_config())
    c.stage = "motion_module"
    c.model.vae = c.model.text_encoder = False
    c.train.batch_size = 8
    c.parallel.mesh_shape = {"data": 2, "fsdp": 4}
    c.parallel.min_fsdp_size = 256
    c.optim.learning_rate = 1e-3
    c.optim.eps = 1e-3  # see test_sharding: keeps Adam from amplifying rounding in ~0 gradients
    trainer = build_trainer(c, load_models(c))
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((8, 4, 8, 8, 4)).astype(np.float32),
             "context": rng.standard_normal((8, 8, 32)).astype(np.float32)}
    rows = parallel.process_rows(trainer.batch_sharding({"latents": batch["latents"]})["latents"], 8)
    local = {k: v[rows] for k, v in batch.items()}
    losses = [float(trainer.train_step(trainer.put_batch(local))["loss"]) for _ in range(2)]
    params = {"/".join(k): v for k, v in flatten_dict(parallel.fetch(trainer.state.params)).items()}

    ck = Checkpointer(ckdir, every=1, async_save=True)
    ck.save(2, trainer.state, {"process": pid, "rows": [rows.start, rows.stop]}, force=True)
    ck.wait()
    restored, data_state = ck.restore(trainer.state)
    ck.close()
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(parallel.fetch(restored)),
                                                    jax.tree.leaves(parallel.fetch(trainer.state))))
    info = dict(losses=losses, rows=[rows.start, rows.stop], restored_same=bool(same), data_state=data_state)
    if pid == 0:
        np.savez(out, **params)
    print("RESULT " + json.dumps(info), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(pid: int, nproc: int, port: int, out: str, ckdir: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    env["XLA_FLAGS"] = xla_flags()
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(pid), str(nproc), str(port), out, ckdir], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    multi = [_launch(i, 2, port, str(tmp_path / "multi.npz"), str(tmp_path / "ck_multi")) for i in range(2)]
    try:
        res = [_result(p) for p in multi]
    finally:
        for p in multi:
            p.kill()
    single = _result(_launch(0, 1, 0, str(tmp_path / "single.npz"), str(tmp_path / "ck_single")))

    assert [r["rows"] for r in res] == [[0, 4], [4, 8]]  # each process fed only its half
    assert single["rows"] == [0, 8]
    for r in res:
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-6)
        assert r["restored_same"]
    assert [r["data_state"]["process"] for r in res] == [0, 1]  # per-process data-iterator states
    assert os.path.exists(tmp_path / "ck_multi" / "2" / "data" / "process_1-of-2.json")
    a, b = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    scale = max(float(np.abs(b[k]).max()) for k in b.files)
    print(f"2x4 processes vs 1x8: losses {res[0]['losses']} vs {single['losses']}, max param diff {diff:.3g}")
    assert diff <= 1e-6 * max(1.0, scale)
