"""Resume is exact: N steps, stop, resume for N more == 2N steps straight, bit for bit (params,
Adam state, RNG, data position), through the real CLI and data pipeline (tiny stage 2 with online
VAE and text encoder on synthetic clips). Also: checkpoints kept, metrics and sample GIFs written,
an interrupted save ignored on restore, the CLI's arguments and the stage configs.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from animatediff_jax import parallel
from animatediff_jax.checkpoints.params_io import load_params
from animatediff_jax.train import main, parse_config
from animatediff_jax.training import build_trainer, train
from animatediff_jax.training.checkpointing import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "train", "tiny_stage2.py")
N = 3


def args(workdir, steps: int, keep: int = 3):
    return ["--config", CONFIG, f"--config.workdir={workdir}", f"--config.train.steps={steps}",
            f"--config.checkpoint.every={N}", f"--config.checkpoint.keep={keep}", "--config.log.every=2",
            "--config.model.domain_adapter=", "--config.train.num_frames=2", "--config.train.batch_size=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    config, _ = parse_config(args(straight, 2 * N, keep=1))
    config.log.validate_every = 2  # sample GIFs with the current params every 2 steps
    config.log.sample_steps = 2
    train(config)  # what `main` runs
    assert main(args(resumed, N)) == 0
    assert main(args(resumed, 2 * N)) == 0  # finds step N and continues
    return straight, resumed, config


def restore_all(workdir, config):
    trainer = build_trainer(config)
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, data = ck.restore(trainer.state)
    ck.close()
    return parallel.fetch(state), data


def assert_same_run(straight, resumed, config, steps: int) -> None:
    """Two workdirs ended in the same place, bit for bit: the exported params and the whole latest
    train state (Adam moments, RNG, step) and data-iterator position. (Also used by
    test_fault_tolerance for runs stopped by SIGTERM or resumed past a damaged checkpoint.)"""
    a, meta_a = load_params(os.path.join(straight, "motion_module.safetensors"))
    b, meta_b = load_params(os.path.join(resumed, "motion_module.safetensors"))
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert set(fa) == set(fb) and len(fa) > 10
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), f"{'/'.join(k)}: max diff {np.abs(fa[k] - fb[k]).max()}"
    assert meta_a["step"] == meta_b["step"] == steps
    (sa, da), (sb, db) = restore_all(straight, config), restore_all(resumed, config)
    la, lb = jax.tree_util.tree_leaves_with_path(sa), jax.tree_util.tree_leaves_with_path(sb)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(p)
    assert int(sa.step) == steps and da == db and da is not None
    # Trained: the motion modules moved away from their (zero) initial proj_out.
    assert any(np.abs(v).max() > 0 for k, v in fa.items() if "proj_out" in k)


def test_resume_is_bit_exact(runs):
    straight, resumed, config = runs
    assert_same_run(straight, resumed, config, 2 * N)


def test_checkpoints_kept_logged_and_validated(runs):
    straight, resumed, config = runs
    assert Checkpointer(os.path.join(straight, "checkpoints")).all_steps() == [2 * N]  # keep=1
    assert Checkpointer(os.path.join(resumed, "checkpoints")).all_steps() == [N, 2 * N]
    rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and abs(r["lr"] - 1e-4) < 1e-9 and r["grad_norm"] > 0 for r in train_rows)
    assert all("clips_per_s" in r and "eta_s" in r for r in train_rows)
    assert [r["step"] for r in rows if "val/sample_s" in r] == [2, 4, 6]
    gifs = sorted(os.listdir(os.path.join(straight, "samples")))
    n_prompts = len(config.log.sample_prompts)
    assert gifs == [f"step_{s:07d}_{i}.gif" for s in (2, 4, 6) for i in range(n_prompts)]
    from PIL import Image

    with Image.open(os.path.join(straight, "samples", gifs[-1])) as im:
        assert im.size == (config.train.resolution,) * 2 and im.n_frames >= 1
    assert not os.path.exists(os.path.join(resumed, "samples"))  # validate_every = 0 there
    events = os.listdir(os.path.join(straight, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_interrupted_save_is_ignored(runs, tmp_path):
    _, resumed, config = runs
    ckdir = os.path.join(resumed, "checkpoints")
    # What a run killed during an async save leaves behind: an uncommitted temporary step dir.
    tmp = os.path.join(ckdir, f"{3 * N}.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(tmp, "state"))
    with open(os.path.join(tmp, "state", "garbage"), "w") as f:
        f.write("partial")
    ck = Checkpointer(ckdir)
    assert ck.latest_step() == 2 * N
    trainer = build_trainer(config)
    state, _ = ck.restore(trainer.state)
    assert int(parallel.fetch(state.step)) == 2 * N
    ck.close()


def test_cli_arguments(capsys):
    assert main(["--help"]) == 0
    assert main([]) == 2 and "--config is required" in capsys.readouterr().err
    assert main(["--config", CONFIG, "--config.train.no_such_field=1"]) == 2
    assert main(["--config", CONFIG, "--config.parallel.mesh_shape.fsdp=2", "--config.train.batch_size=8",
                 "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "fsdp: 2" in out and "batch_size: 8" in out and "stage: motion_module" in out


@pytest.mark.parametrize("name,stage", [
    ("stage1_domain_adapter", "domain_adapter"), ("stage2_motion_module", "motion_module"),
    ("stage3_motion_lora", "motion_lora"), ("tiny_stage1", "domain_adapter"), ("tiny_stage2", "motion_module"),
    ("tiny_stage3", "motion_lora")])
def test_stage_configs_load(name, stage):
    from animatediff_jax.training import get_stage

    config, _ = parse_config(["--config", os.path.join(ROOT, "configs", "train", f"{name}.py")])
    assert get_stage(config.stage).name == stage
    assert (config.train.num_frames == 1) == get_stage(stage).single_frame
