"""CLIP metrics (`animatediff_jax.evaluation`): the definitions against NumPy, constructed videos
(identical frames, a frame equal to the reference), the `evaluate` command on a folder `sample`
wrote (prompts from its config.yaml) and its one-line errors, `sample` with `evaluate.clip` and with a
safety checker that flags everything, and training logging the metrics (`log.eval_every`).

Models: `testing.tiny` (SD1.5-like, motion module, LoRAs) and `testing.tiny_clip` (a CLIPModel
folder with a tokenizer, safety checkers), random weights, 32x32; one sample run shared by the file.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from animatediff_jax import cli
from animatediff_jax import evaluate as E
from animatediff_jax import sample as S
from animatediff_jax.checkpoints.clip import load_clip
from animatediff_jax.errors import ConfigError
from animatediff_jax.evaluation import clip_eval
from animatediff_jax.evaluation import metrics as M
from animatediff_jax.io.video import read_video, write_gif
from animatediff_jax.sampling.assemble import validate
from animatediff_jax.testing.tiny import write_tiny_models
from animatediff_jax.testing.tiny_clip import write_tiny_clip, write_tiny_safety_checker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sample", "tiny.py")
FAST = ["--config.L=4", "--config.steps=2", "--config.output.formats=('gif', 'png')"]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- definitions


def reference_metrics(e, t, r):
    """The definitions, in NumPy float64 (e [F, D], t [F, D], r [D], all normalised)."""
    cos_t = np.sum(e * t, axis=-1)
    pairs = [e[i] @ e[j] for i in range(len(e)) for j in range(i + 1, len(e))]
    return dict(text_alignment=cos_t.mean(), clip_score=np.mean(100 * np.maximum(cos_t, 0)),
                domain_similarity=np.mean(e @ r), smoothness=np.mean(np.sum(e[1:] * e[:-1], axis=-1)),
                consistency=np.mean(pairs))


def test_metrics_match_numpy_definitions():
    rng = np.random.default_rng(0)
    frames = [unit(rng.standard_normal((f, 8))) for f in (5, 5, 3)]
    frames[1] = unit(frames[0] + 0.3 * rng.standard_normal((5, 8)))  # positive cosines: clip_score's clamp passes
    texts = [unit(rng.standard_normal(8)), unit(rng.standard_normal((5, 8))), unit(rng.standard_normal(8))]
    texts[1] = unit(frames[1] + 0.5 * rng.standard_normal((5, 8)))
    refs = [unit(rng.standard_normal(8)) for _ in range(3)]
    rows = M.per_video(frames, texts, refs)  # two batches: 5 and 3 frames
    for e, t, r, row in zip(frames, texts, refs, rows):
        want = reference_metrics(e, np.broadcast_to(t, e.shape), r)
        for k, v in want.items():
            assert abs(row[k] - v) < 1e-5, (k, row[k], v)
    agg = M.aggregate(rows)
    for k in M.NAMES:
        vals = np.array([row[k] for row in rows])
        assert agg[k]["n"] == 3 and abs(agg[k]["mean"] - vals.mean()) < 1e-9 and abs(agg[k]["std"] - vals.std()) < 1e-9
    # Without texts / references those metrics are None (and not counted), one frame has no temporal ones.
    rows = M.per_video([frames[0], frames[2][:1]])
    assert rows[0]["text_alignment"] is None and rows[0]["domain_similarity"] is None
    assert rows[1]["smoothness"] is None and rows[1]["consistency"] is None
    assert M.aggregate(rows)["smoothness"]["n"] == 1 and M.aggregate(rows)["clip_score"]["mean"] is None


def test_constructed_embeddings():
    e = unit(np.random.default_rng(1).standard_normal(16))
    same = np.tile(e, (6, 1))
    row = M.per_video([same], [same], [e])[0]
    assert all(abs(row[k] - 1) < 1e-6 for k in ("smoothness", "consistency", "domain_similarity", "text_alignment"))
    assert abs(row["clip_score"] - 100) < 1e-4
    other = unit(np.random.default_rng(2).standard_normal((2, 16)))
    video = np.stack([e, other[0], other[1]])  # frame 0 is the reference: its cosine is 1
    row = M.per_video([video], None, [e])[0]
    assert abs(row["domain_similarity"] - (1 + other[0] @ e + other[1] @ e) / 3) < 1e-6


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models, a tiny CLIP, safety checkers, and one `sample` run with `evaluate.clip` set."""
    root = tmp_path_factory.mktemp("evaluation")
    models = str(root / "models")
    write_tiny_models(models)
    clip = write_tiny_clip(root / "clip")
    flag_all = write_tiny_safety_checker(root / "flag_all", flag_everything=True)
    config = S.load_config(f"{TINY}:{models}", *FAST, f"--config.output.dir={root / 'run'}",
                           f"--config.evaluate.clip={clip}")
    result = S.sample(config)
    return dict(root=root, models=models, clip=clip, flag_all=flag_all, config=config, run=result)


def test_sample_writes_metrics(world):
    run = world["run"]
    path = os.path.join(run.folder, "metrics.json")
    assert path in run.files
    with open(path) as f:
        m = json.load(f)
    assert m["prompts"] == list(run.config["prompt"]) and len(m["videos"]) == 2
    assert m["clip"]["path"] == os.path.abspath(world["clip"]) and m["clip"]["name"] == "tiny-clip"
    assert m["clip"]["preprocessing"]["crop_size"] == [32, 32]
    for k in ("text_alignment", "clip_score", "smoothness", "consistency"):
        assert m["metrics"][k]["n"] == 2 and m["metrics"][k]["mean"] is not None
    assert m["metrics"]["domain_similarity"]["n"] == 0  # evaluate.reference off
    # The metrics are the frames' own: the same numbers from the frames in memory.
    clip = load_clip(world["clip"])
    again = clip_eval.evaluate_videos(clip, list(run.frames), list(run.config["prompt"]))
    for got, want in zip(again["videos"], m["videos"]):
        assert abs(got["text_alignment"] - want["text_alignment"]) < 1e-6
    # A video of identical frames, and one whose only frame is the reference image: exactly 1.
    still = np.repeat(run.frames[0][:1], 3, axis=0)
    res = clip_eval.evaluate_videos(clip, [still, run.frames[1][:1]], None, [run.frames[0][0], run.frames[1][0]])
    a, b = res["videos"]
    assert abs(a["smoothness"] - 1) < 1e-5 and abs(a["consistency"] - 1) < 1e-5
    assert abs(b["domain_similarity"] - 1) < 1e-5 and b["smoothness"] is None
    assert res["skipped"] == ["text_alignment, clip_score: no prompts"]


def test_evaluate_command_on_a_sample_folder(world, tmp_path, capsys):
    run = world["run"]
    out = str(tmp_path / "m.json")
    assert cli.main(["evaluate", "--clip", world["clip"], "--videos", run.folder, "--out", out]) == 0
    captured = capsys.readouterr()
    assert "prompts from " + os.path.join(run.folder, "config.yaml") in captured.err
    assert "mean ± std (2 videos)" in captured.out and "0-a-cat-and-the-dog" in captured.out
    with open(out) as f:
        got = json.load(f)
    with open(os.path.join(run.folder, "metrics.json")) as f:
        want = json.load(f)
    assert got["prompts"] == want["prompts"] == list(run.config["prompt"])
    # Read from the lossless PNG frames (written beside the GIFs): the numbers `sample` measured.
    assert [os.path.basename(v["path"]) for v in got["videos"]] == ["0-a-cat-and-the-dog", "1-the-dog-4k"]
    for k in ("text_alignment", "smoothness", "consistency"):
        assert abs(got["metrics"][k]["mean"] - want["metrics"][k]["mean"]) < 1e-6

    # Other tools' files: GIFs without a config or <i>-<prompt> names -> no text alignment (said once);
    # a reference folder (matched by name) -> domain similarity.
    other, refs = tmp_path / "other", tmp_path / "refs"
    for folder in (other, refs):
        folder.mkdir()
    for name, video in zip(("clip_a", "clip_b"), run.frames):
        write_gif(other / f"{name}.gif", video)
        Image.fromarray(video[0]).save(refs / f"{name}.png")
    assert E.main(["--clip", world["clip"], "--videos", str(other), "--reference", str(refs),
                   "--safety-checker", world["flag_all"]]) == 0
    captured = capsys.readouterr()
    assert "text alignment skipped" in captured.err
    with open(other / "metrics.json") as f:
        got = json.load(f)
    assert got["prompts"] is None and got["metrics"]["text_alignment"]["n"] == 0
    assert got["metrics"]["domain_similarity"]["n"] == 2 and got["nsfw_flags"] == [True, True]


def test_evaluate_command_errors(world, tmp_path, capsys):
    run = world["run"]

    def error(*args) -> str:
        assert E.main(["--clip", world["clip"], *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    # a CLIP folder of another kind (the safety checker)
    assert E.main(["--clip", world["flag_all"], "--videos", run.folder]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and world["flag_all"] in err[0] and "not a CLIP model folder" in err[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    assert f"--prompts {prompts}: 3 prompts for 2 videos" in error("--videos", run.folder, "--prompts", str(prompts))
    frames = tmp_path / "frames" / "v0"
    frames.mkdir(parents=True)
    Image.fromarray(run.frames[0][0]).save(frames / "0000.png")
    Image.fromarray(run.frames[0][1][:16]).save(frames / "0001.png")
    msg = error("--videos", str(frames.parent))
    assert str(frames) in msg and "frames of different sizes" in msg
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a not really")
    assert str(broken) in error("--videos", str(broken))


def test_sample_safety_checker_blacks_flagged_videos(world, capsys):
    c = dict(world["run"].config, safety_checker=world["flag_all"], evaluate={"clip": "", "reference": False})
    c["output"] = dict(c["output"], dir=str(world["root"] / "flagged"), formats=["gif"])
    res = S.sample(c, pipeline=world["run"].pipeline)
    assert "2 of 2 video(s) flagged" in capsys.readouterr().err
    assert not res.frames.any()
    with open(os.path.join(res.folder, "timings.json")) as f:
        assert json.load(f)["nsfw_flags"] == [True, True]
    assert not read_video(os.path.join(res.folder, "sample", "0-a-cat-and-the-dog.gif")).any()
    assert not os.path.exists(os.path.join(res.folder, "metrics.json"))
    # A checker that flags nothing leaves the videos as they are.
    from animatediff_jax.checkpoints.clip import load_safety_checker

    never = load_safety_checker(write_tiny_safety_checker(world["root"] / "never", flag_everything=False))
    videos, flags, counts = clip_eval.check_videos(never, list(world["run"].frames))
    assert flags == [False, False] and counts == [0, 0] and np.array_equal(np.stack(videos), world["run"].frames)


def test_sample_config_checks(world, tmp_path, capsys):
    c = dict(world["config"])
    with pytest.raises(ConfigError, match=r"evaluate.clip: /nowhere: no such file"):
        validate(dict(c, evaluate={"clip": "/nowhere"}))
    with pytest.raises(ConfigError, match=r"evaluate.reference: needs evaluate.clip"):
        validate(dict(c, evaluate={"reference": True}))
    with pytest.raises(ConfigError, match=r"safety_checker: /nowhere: no such file"):
        validate(dict(c, safety_checker="/nowhere"))
    from animatediff_jax.checkpoints.torch_io import CheckpointError
    from animatediff_jax.evaluation.sample_checks import SampleChecks

    with pytest.raises(CheckpointError, match="evaluate.clip: .*an SD safety checker folder"):
        SampleChecks(dict(safety_checker="", base_model="", evaluate={"clip": world["flag_all"], "reference": False}))
    # evaluate.reference: frame 0 of each motion-free video is its reference (sample passes a re-run of
    # `generate` with motion_scale 0; here the videos themselves).
    frames = world["run"].frames
    checks = SampleChecks(dict(safety_checker="", base_model="", evaluate={"clip": world["clip"], "reference": True}))
    m = checks.metrics(str(tmp_path), frames, ["a cat", {0: "a dog", 2: "a cat"}], motion_free=lambda: frames)
    assert m["metrics"]["domain_similarity"]["n"] == 2 and os.path.isfile(tmp_path / "metrics.json")
    assert m["prompts"][1] == "0: a dog | 2: a cat"
    capsys.readouterr()
    pipe = tmp_path / "sd15_diffusers"
    shutil.copytree(world["flag_all"], pipe / "safety_checker")
    SampleChecks(dict(safety_checker="", base_model=str(pipe), evaluate={"clip": "", "reference": False}))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safety_checker/ but safety_checker is off" in err[0]


# ----------------------------------------------------------------------------- training


def test_training_logs_clip_metrics(world, tmp_path):
    """The loop's hooks at each step (`run_hooks`, what `training.loop.run` calls after every step) with
    the `log.eval_every` hook `train` makes. (A whole tiny training run is ~50 s with a cold compile
    cache, the train step's compile: the hook runs on a built trainer instead.)"""
    from animatediff_jax.train import parse_config
    from animatediff_jax.training import build_trainer, loop
    from animatediff_jax.training.config import ConfigError as TrainConfigError
    from animatediff_jax.training.config import validate_config

    args = ["--config", os.path.join(ROOT, "configs", "train", "tiny_stage2.py"), f"--config.workdir={tmp_path}",
            "--config.model.domain_adapter=", "--config.train.num_frames=2", "--config.train.batch_size=2",
            "--config.log.sample_steps=2", "--config.log.eval_every=2"]
    config, _ = parse_config(args)
    with pytest.raises(TrainConfigError, match="log.eval_clip=''"):
        validate_config(config)
    config.log.eval_clip = world["clip"]
    config.log.eval_seeds = (1, 2, 3)
    with pytest.raises(TrainConfigError, match=r"log.eval_seeds=\(1, 2, 3\)"):
        validate_config(config)
    config.log.eval_seeds = (7,)
    validate_config(config)
    trainer = build_trainer(config)
    evaluate = loop.make_eval_hook(config, trainer)
    writer = loop.MetricsWriter(str(tmp_path), tensorboard=True)
    for step in (1, 2, 3):
        loop.run_hooks(writer, config, step, trainer, None, evaluate)
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2]
    for k in ("text_alignment", "clip_score", "smoothness", "consistency", "eval_s"):
        assert np.isfinite(rows[0][f"eval/{k}"]), k
    assert -1 <= rows[0]["eval/text_alignment"] <= 1 and 0 < rows[0]["eval/smoothness"] <= 1 + 1e-6
    assert any(e.startswith("events.out.tfevents") for e in os.listdir(tmp_path / "tensorboard"))
