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


# The fast tier, `python -m pytest -q -m "not slow" tests` (CONTRIBUTING.md): what is slow is marked
# here, not in the test files. A whole file (real size, multi-process, subprocess-heavy, long
# compiles), or tests by function name (every parametrisation); each file keeps a fast test where it
# has one. Measured one by one on 2 CPU cores with `--durations`: a test over ~5 s goes here.
SLOW_FILES = {"test_real_size.py", "test_multihost.py"}
SLOW_TESTS = {
    "test_toy.py": {"test_shipped_checkpoint_moves_as_prompted", "test_shipped_checkpoint_travels_between_prompts",
                    "test_shipped_video_to_video_keeps_the_track_at_low_strength", "test_shipped_motion_lora_zooms",
                    "test_demo_quick_runs_every_stage"},
    "test_sharding.py": {"test_sharded_step_equals_single_device"},
    "test_train_memory.py": {"test_fsdp_gathers_per_layer_in_bf16"},
    "test_compile.py": {"test_stage2_step_compiles_on_a_v5e_2x2_data_x_fsdp_mesh", "test_per_chip_state_shrinks_with_fsdp",
                        "test_sampler_with_splash_and_a_controlnet_compiles_for_v5e_1x1",
                        "test_the_command_fits_and_does_not_fit", "test_compile_sample_reads_the_config_files_that_are_here"},
    "test_fault_tolerance.py": {"test_divergence_stops_with_one_line_and_saves_nothing_nonfinite",
                                "test_signal_saves_exits_0_and_resumes_bit_exact",
                                "test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_resumed",
                                "test_checkpoint_missing_files_are_damage", "test_checkpoint_of_another_config_is_refused_not_moved",
                                "test_checkpoint_of_another_process_count_is_refused_not_moved",
                                "test_rotation_never_deletes_the_last_intact_checkpoint"},
    "test_sd15_released.py": {"test_published_sd15_folder_at_real_size"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` / `-k` deselect: every item gets its marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.fspath))
        item.add_marker(pytest.mark.xdist_group("real-size" if name in HEAVY else name))
        if name in SLOW_FILES or getattr(item, "originalname", item.name) in SLOW_TESTS.get(name, ()):
            item.add_marker(pytest.mark.slow)
