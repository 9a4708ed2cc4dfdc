"""Shared test setup: fp32 everywhere, a persistent compile cache, seeded torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (tests/test_compile.py compiles for abstract TPU chips) holds a lock file per process; the
# two xdist workers and the benches' subprocesses may each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def assert_close(ours, ref, rtol: float = 1e-5, atol: float = 1e-5, what: str = ""):
    """Compares against the PyTorch reference and reports the max error (relative to the ref's scale)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    assert np.isfinite(ours).all(), f"{what}: non-finite output"
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    assert err <= atol + rtol * scale, f"{what}: max abs err {err:.3g} (ref max {scale:.3g})"
    return err


@pytest.fixture
def small_attention_blocks(monkeypatch):
    """`attention="chunked"` in blocks of 16 queries x 24 keys, so the tiny models' 64-token
    sequences span several uneven blocks (padding and masking exercised)."""
    import functools

    from animatediff_jax.models import attention

    monkeypatch.setattr(attention, "chunked_attention",
                        functools.partial(attention.chunked_attention, block_q=16, block_k=24))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


# CI runs the suite on two workers (`pytest -n 2`, README): each file stays on one worker (its module
# fixtures are built once), and the files that hold real-size models share one worker, so two of them
# never sit in the 24 GiB at once (test_real_size alone peaks at ~15 GiB).
HEAVY = {"test_real_size.py", "test_sd15_released.py", "test_memory_bench.py", "test_train_memory.py",
         "test_clip_vision.py", "test_clip_text.py", "test_controlnet.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.fspath))
        item.add_marker(pytest.mark.xdist_group("real-size" if name in HEAVY else name))
