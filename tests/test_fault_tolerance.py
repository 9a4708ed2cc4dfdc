"""Training that survives a pod: divergence stops cleanly (nothing non-finite saved), SIGTERM saves
and exits 0 with a bit-exact resume, a damaged newest checkpoint is moved aside, a dataset with no
readable video fails fast, and bad configs are refused up front. Tiny stage 2 through the CLI.
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags
from test_resume import ROOT, args, assert_same_run

from animatediff_jax.train import main, parse_config
from animatediff_jax.training.checkpointing import Checkpointer


def run_main(workdir, steps, *extra):
    return main(args(workdir, steps) + list(extra))


def checkpoint_leaves(workdir, step):
    """The saved train state of `step` as host arrays (read without a target tree)."""
    import orbax.checkpoint as ocp

    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        ck.close()
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(out["state"])]


def metrics_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]  # json.loads accepts bare NaN: checked below


# ----------------------------------------------------------------------------- 1. divergence


def test_divergence_stops_with_one_line_and_saves_nothing_nonfinite(tmp_path, capsys):
    workdir = tmp_path / "diverge"
    rc = run_main(workdir, 8, "--config.optim.learning_rate=1e30", "--config.train.max_nonfinite_steps=3",
                  "--config.checkpoint.every=1", "--config.log.every=1")
    err = capsys.readouterr().err
    assert rc == 3, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "diverged at step" in lines[0] and "optim.learning_rate" in lines[0], err
    assert not os.path.exists(workdir / "motion_module.safetensors")  # no export
    steps = Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    assert steps, "the finite steps before the divergence are checkpointed"
    for s in steps:
        assert all(np.isfinite(x).all() for x in checkpoint_leaves(workdir, s) if x.dtype.kind == "f"), s
    text = (workdir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = metrics_rows(workdir)
    assert rows[-1]["loss"] is None and rows[-1]["nonfinite_steps"] == 1
    assert sum(r["nonfinite_steps"] for r in rows) == 3


def test_export_refuses_nonfinite_params(tmp_path):
    from animatediff_jax.training.checkpointing import export_trainable
    from animatediff_jax.training.config import TrainingError

    path = tmp_path / "m.safetensors"
    with pytest.raises(TrainingError, match="NaN"):
        export_trainable(path, {"a": {"kernel": np.array([1.0, np.nan], np.float32)}}, {"step": 1})
    assert not path.exists()


# ----------------------------------------------------------------------------- 2. SIGTERM / SIGINT

STEPS = 10
EXTRA = ["--config.log.every=1", "--config.checkpoint.every=100"]  # no periodic checkpoint before the end


def cli(workdir, steps, *extra) -> list[str]:
    """The real command line (`animatediff-jax train ...`, run from this checkout)."""
    return [sys.executable, "-m", "animatediff_jax.cli", "train"] + args(workdir, steps) + list(extra)


def cli_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    env["XLA_FLAGS"] = xla_flags()
    return env


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted STEPS-step run."""
    workdir = tmp_path_factory.mktemp("straight")
    assert main(args(workdir, STEPS) + EXTRA) == 0
    return workdir


@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_signal_saves_exits_0_and_resumes_bit_exact(tmp_path, straight, sig):
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(cli(workdir, STEPS, *EXTRA), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[train] step 2/"):
                proc.send_signal(sig)
                break
        out = "".join(seen) + proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    name = signal.Signals(sig).name
    m = re.search(rf"stopped by {name} at step (\d+)/{STEPS}, checkpoint saved; "
                  rf"resume with the same command: workdir (\S+), step (\d+)", out)
    assert m, out[-3000:]
    stopped_at = int(m[1])
    assert 2 <= stopped_at < STEPS and m[2] == str(workdir) and int(m[3]) == stopped_at
    assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [stopped_at]
    assert not os.path.exists(workdir / "motion_module.safetensors")  # the stage is not done
    assert [r["step"] for r in metrics_rows(workdir)] == list(range(1, stopped_at + 1))

    assert main(args(workdir, STEPS) + EXTRA) == 0  # the same command resumes
    assert [r["step"] for r in metrics_rows(workdir)] == list(range(1, STEPS + 1))  # no step twice
    config, _ = parse_config(args(straight, STEPS) + EXTRA)
    assert_same_run(straight, workdir, config, STEPS)


def test_sigint_sets_the_flag_and_a_second_one_interrupts():
    import time

    from animatediff_jax.training.preemption import StopRequest

    previous = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.agreed(at_log_step=False) and stop.name == "SIGINT"  # one process: every step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------------------- 3. damaged checkpoint


def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_resumed(tmp_path, straight, capsys):
    workdir = tmp_path / "damaged"
    every = ["--config.log.every=1", "--config.checkpoint.every=3"]
    assert main(args(workdir, 6) + every) == 0  # checkpoints at 3 and 6
    ckdir = workdir / "checkpoints"
    shards = sorted((ckdir / "6" / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    os.truncate(shards[-1], 1000)  # the largest shard, cut short (a disk that filled up, a torn copy)
    capsys.readouterr()
    assert main(args(workdir, STEPS) + every) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and "checkpoint step 6 is damaged" in warnings[0], captured.err
    assert "resuming from step 3" in warnings[0] and "resumed from step 3" in captured.out
    assert (workdir / "checkpoints_damaged" / "6" / "state").is_dir()  # moved, not deleted
    assert Checkpointer(ckdir).all_steps() == [6, 9, 10]  # 6 written again by the resumed run; keep=3
    config, _ = parse_config(args(straight, STEPS) + EXTRA)
    assert_same_run(straight, workdir, config, STEPS)  # == a run that resumed from step 3


@pytest.mark.parametrize("damage", ["_CHECKPOINT_METADATA", "state/manifest.ocdbt", "data/process_0-of-1.json",
                                    "state/_METADATA"])
def test_checkpoint_missing_files_are_damage(tmp_path, straight, damage, capsys):
    import shutil

    from animatediff_jax.training import build_trainer

    ckdir = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckdir)
    os.remove(ckdir / str(STEPS) / damage)
    config, _ = parse_config(args(tmp_path, STEPS))
    ck = Checkpointer(ckdir)
    try:
        assert ck.restore(build_trainer(config).state) is None  # the only checkpoint is damaged
    finally:
        ck.close()
    assert f"checkpoint step {STEPS} is damaged (missing {damage})" in capsys.readouterr().err
    assert (tmp_path / "checkpoints_damaged" / str(STEPS)).is_dir() and Checkpointer(ckdir).all_steps() == []


def test_checkpoint_of_another_config_is_refused_not_moved(tmp_path, straight):
    import shutil

    from animatediff_jax.training import build_trainer
    from animatediff_jax.training.config import ConfigError

    ckdir = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckdir)
    config, _ = parse_config(args(tmp_path, STEPS) + ["--config.model.motion_version=v1"])
    ck = Checkpointer(ckdir)
    try:
        with pytest.raises(ConfigError, match="does not match this config") as info:
            ck.restore(build_trainer(config).state, config=config.to_dict())
        assert "changed since it was saved: model.motion_version: 'v2' -> 'v1'" in str(info.value), info.value
    finally:
        ck.close()
    assert Checkpointer(ckdir).all_steps() == [STEPS] and not (tmp_path / "checkpoints_damaged").exists()


# ----------------------------------------------------------------------------- 4. no readable video


def test_webvid_with_a_wrong_folder_fails_fast(tmp_path, capsys):
    import time

    csv_path = tmp_path / "webvid.csv"
    csv_path.write_text("videoid,name,page_dir\n" + "".join(f"{i},clip {i},p{i % 2}\n" for i in range(20)))
    t0 = time.perf_counter()
    (tmp_path / "wrong_folder").mkdir()  # exists (so up-front validation passes) but holds no videos
    rc = main(args(tmp_path / "w", 5) + ["--config.data.source=webvid", f"--config.data.csv={csv_path}",
                                         f"--config.data.video_folder={tmp_path / 'wrong_folder'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no readable record" in lines[0] and "wrong_folder" in lines[0], err
    assert ".mp4" in lines[0] and "data.video_folder" in lines[0]  # names paths it tried
    assert time.perf_counter() - t0 < 60



# ----------------------------------------------------------------------------- 5. up-front validation


@pytest.mark.parametrize("override,expected", [
    ("--config.train.num_frames=0", "train.num_frames=0: expected an integer >= 1"),
    ("--config.train.resolution=18", "train.resolution=18 must be a multiple of 4"),
    ("--config.train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
    ("--config.train.grad_accum_steps=3", "train.batch_size=2 must be a multiple of train.grad_accum_steps=3"),
    ("--config.parallel.mesh_shape.data=3", "parallel.mesh_shape="),
    ("--config.stage=stage9", "stage: unknown training stage 'stage9'"),
    ("--config.train.foo=1", "unknown config field 'train.foo' (fields of train: "),
    ("--config.trainn.steps=1", "unknown config field 'trainn'"),
    ("--config.train.steps=0", "train.steps=0: expected an integer >= 1"),
    ("--config.optim.learning_rate=-0.1", "optim.learning_rate=-0.1: expected a finite number >= 0"),
    ("--config.optim.learning_rate=inf", "optim.learning_rate=inf"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.data.source=webvid", "data.csv=''"),
    ("--config.data.source=nope", "data.source='nope' is not one of"),
    ("--config.parallel.remat=sometimes", "parallel.remat='sometimes' is not one of"),
])
def test_bad_config_is_one_line_before_the_workdir(tmp_path, capsys, override, expected):
    workdir = tmp_path / "w"
    assert main(args(workdir, 2) + [override]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not workdir.exists()


def test_batch_size_against_the_mesh():
    from animatediff_jax.training.config import ConfigError, check_batch

    config, _ = parse_config(args("unused", 2) + ["--config.train.batch_size=6"])
    check_batch(config, 2)
    with pytest.raises(ConfigError, match="train.batch_size=6 must be a multiple of 4"):
        check_batch(config, 4)
    with pytest.raises(ConfigError, match="divide among 4 processes"):
        check_batch(config, 1, processes=4)


def test_checkpoint_of_another_process_count_is_refused_not_moved(tmp_path, straight):
    import shutil

    from animatediff_jax.training import build_trainer
    from animatediff_jax.training.config import ConfigError

    ckdir = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckdir)
    data = ckdir / str(STEPS) / "data"
    os.rename(data / "process_0-of-1.json", data / "process_0-of-2.json")
    config, _ = parse_config(args(tmp_path, STEPS))
    ck = Checkpointer(ckdir)
    try:
        with pytest.raises(ConfigError, match="another number of processes"):
            ck.restore(build_trainer(config).state)
    finally:
        ck.close()
    assert Checkpointer(ckdir).all_steps() == [STEPS] and not (tmp_path / "checkpoints_damaged").exists()


def test_rotation_never_deletes_the_last_intact_checkpoint(tmp_path, straight, capsys):
    import shutil

    from animatediff_jax.training import build_trainer

    ckdir = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckdir)
    config, _ = parse_config(args(tmp_path, STEPS))
    state = build_trainer(config).state
    ck = Checkpointer(ckdir, keep=1, async_save=False)
    ck.save(STEPS + 1, state, {"pos": 1}, force=True)
    os.remove(ckdir / str(STEPS + 1) / "state" / "manifest.ocdbt")  # the newest breaks after its commit
    ck.save(STEPS + 2, state, {"pos": 2}, force=True)  # rotation: the newest committed one is damaged
    ck.close()  # STEPS + 2 is intact: now the older ones go
    err = capsys.readouterr().err
    assert f"newest checkpoint step {STEPS + 1} looks damaged" in err and "keeping the older ones" in err
    assert Checkpointer(ckdir).all_steps() == [STEPS + 2]


def test_prepare_with_nothing_readable_is_an_error(tmp_path, capfd):
    """`prepare` over a CSV whose videos are all missing: one line, rc 2, not an empty cache and rc 0."""
    from animatediff_jax.cli import main as cli
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(str(tmp_path / "models"))
    csv_path = tmp_path / "webvid.csv"
    csv_path.write_text("videoid,name,page_dir\n1,a cat,x\n2,a dog,x\n")
    (tmp_path / "videos").mkdir()
    rc = cli(["prepare", "--model", paths["base_model"], "--csv", str(csv_path), "--videos", str(tmp_path / "videos"),
              "--out", str(tmp_path / "cache"), "--n-frames", "2", "--size", "16"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err[-1].startswith("error: "), err
    assert str(tmp_path / "videos") in err[-1], err


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from animatediff_jax.testing.tiny import write_tiny_models

    return write_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.mark.parametrize("field,given,expected", [
    ("model.motion_module", "motion_lora_zoom_in", "no motion module in it: it holds a MotionLoRA"),
    ("model.domain_adapter", "motion_module", "no domain adapter in it: it holds a motion module"),
    ("model.pretrained", "motion_module", "no params.safetensors there: not a converted SD1.5 folder"),
])
def test_a_file_of_the_wrong_kind_is_one_line_naming_the_field(tmp_path, capsys, tiny_files, field, given, expected):
    workdir = tmp_path / "w"
    rc = main(args(workdir, 2) + [f"--config.{field}={tiny_files[given]}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith(f"error: {field}") and expected in lines[-1], lines[-3:]
    assert not workdir.exists()
