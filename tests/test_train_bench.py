"""bench/train_bench.py runs end to end at tiny size: both sides (ours and the diffusers reference
train step), both variants (cached latents, online VAE), finite positive timings and losses in its JSON.

The script is a benchmark, not a correctness check (parity of the loss and the optimizer with
PyTorch is tests/test_training.py's job); this test only keeps it from rotting.
"""

import json
import math
import os
import subprocess
import sys

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    # Speed is not what is checked: level-0 XLA backend optimisation halves the CPU compile time,
    # and passive OpenMP waiting keeps torch from stalling (seconds per tiny step) on a loaded machine.
    env = dict(os.environ, XLA_FLAGS=xla_flags(),
               JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_bench.py"), "--small", "--tiny", "--warmup", "0",
           "--repeats", "2", "--torch-device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"ours", "torch"}
    for side, r in results.items():
        assert r["trainable_params"] > 0 and r["frozen_params"] > r["trainable_params"] / 2, side
        assert set(r["variants"]) == {"cached", "online"}, side
        for variant, v in r["variants"].items():
            what = f"{side}/{variant}"
            assert len(v["times"]) == 2 and all(_positive(t) for t in v["times"]), what
            for key in ("s_per_step", "clips_per_s", "loss", "first_step_s"):
                assert _positive(v[key]), f"{what}: {key}={v[key]}"
            assert math.isclose(v["clips_per_s"] * v["s_per_step"], data["args"]["batch"]), what
            assert v["tflops"] is None and v["mfu"] is None, what  # tiny models: no FLOP budget
    # Both sides train the same architecture: the same motion-module parameter count.
    assert results["ours"]["trainable_params"] == results["torch"]["trainable_params"]
    assert results["ours"]["variants"]["cached"]["compile_s"] > 0
    for variant, ratio in data["ratio_ours_over_torch"].items():
        assert _positive(ratio), variant
    assert "ratio ours/torch" in proc.stdout
