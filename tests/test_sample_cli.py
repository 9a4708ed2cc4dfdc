"""`animatediff-jax sample`: configs and `config_flags` overrides, loading/merging every adapter
exactly as `lora.merge` with the config's scales, the files written equal to `generate`'s frames, a
saved run replayed to the same frames, bad input rejected in one line before anything compiles, and
the benchmark script kept runnable.

Models: `testing.tiny.write_tiny_models` (tiny random SD1.5/motion module/LoRAs in the PyTorch
formats users have: original AnimateDiff naming, kohya).
"""

import glob
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import assert_close
from flax.traverse_util import flatten_dict
from PIL import Image

from animatediff_jax import cli
from animatediff_jax import sample as S
from animatediff_jax.checkpoints.load import load_lora, load_motion
from animatediff_jax.checkpoints.motion import merge_motion
from animatediff_jax.checkpoints.sd15 import load_sd15
from animatediff_jax.errors import ConfigError
from animatediff_jax.io.video import read_video, write_gif
from animatediff_jax.lora import lora_layers, merge
from animatediff_jax.models.init import random_params
from animatediff_jax.sampling import PROGRAMS, AnimationPipeline, assemble, generate, load_pipeline, sampling_mesh
from animatediff_jax.sampling.assemble import validate
from animatediff_jax.testing.tiny import write_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sample", "tiny.py")
REPLAY = os.path.join(ROOT, "configs", "sample", "replay.py")
FAST = ["--config.L=6", "--config.steps=3"]  # fewer frames/steps than tiny.py: quicker, same paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_models"))
    return folder, write_tiny_models(folder)


def spec(models) -> str:
    return f"{TINY}:{models[0]}"


def assert_same_tree(got, want, what):
    g, w = flatten_dict(got), flatten_dict(want)
    assert set(g) == set(w), f"{what}: {sorted(set(g) ^ set(w))[:4]}"
    for k in w:
        np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=f"{what} {'/'.join(k)}")


# ------------------------------------------------------------------------------ overrides


def test_override_parsing(models, tmp_path):
    c = S.load_config(spec(models), "--config.W=48", "--config.guidance_scale=8", "--config.seed=(3, 4)",
                      "--config.prompt=('a', 'b')", "--config.n_prompt", "('x',)",
                      "--config.output.formats=('gif', 'png')", "--config.output.grid=false",
                      "--config.scheduler_options={'eta': 0.5}", "--config.context_windows.length=8",
                      "--config.output.dir=out/{time}=x", "--config.motion_module_lora_configs=()")
    assert c["W"] == 48 and c["guidance_scale"] == 8.0 and isinstance(c["guidance_scale"], float)
    assert c["seed"] == (3, 4) and c["prompt"] == ("a", "b") and c["n_prompt"] == ("x",)
    assert c["output"] == dict(dir="out/{time}=x", formats=("gif", "png"), fps=8.0, grid=False)
    assert c["scheduler_options"] == {"eta": 0.5} and c["context_windows"] == {"length": 8, "overlap": 4, "weighting": "flat", "noise": "random", "schedule": "uniform",
                                                                   "scope": "unet"}
    assert c["motion_module_lora_configs"] == () and c["H"] == 32 and c["lora_alpha"] == 0.7  # untouched: tiny.py's
    v = validate(c)
    assert v["n_prompt"] == ["x", "x"] and v["seed"] == [3, 4]
    # A tuple field takes one value as a 1-tuple: one seed for all prompts; -1 draws one per prompt (saved resolved).
    assert S.load_config(spec(models), "--config.seed=7")["seed"] == (7,)
    assert validate(dict(c, seed=(7,)))["seed"] == [7, 7]
    drawn = validate(dict(c, seed=(-1,)))["seed"]
    assert len(drawn) == 2 and all(0 <= s < 2**63 for s in drawn) and drawn[0] != drawn[1]
    with pytest.raises(ConfigError, match=r"seed=7: expected a tuple of integers"):
        validate(dict(c, seed=7))

    for bad, msg in [
        (["--config.bogus=1"], "unknown config field 'bogus' (fields of the config: H, L, W, "),
        (["--config.output.bogus=1"], "unknown config field 'output.bogus' (fields of output: dir, formats, fps, grid)"),
        (["--config.steps=abc"], "--config.steps=abc: invalid literal for int()"),
        (["--config.steps=2.5"], "--config.steps=2.5: invalid literal for int()"),
        (["--config.context_windows.size=4"], "unknown config field 'context_windows.size' (fields of context_windows"),
        (["--config.scheduler_options.eta=0.5"], "unknown config field 'scheduler_options.eta'"),
        (["--config.output.grid=maybe"], "--config.output.grid=maybe: ('Non-boolean argument"),
        (["stray"], "unexpected arguments: ['stray']"),
    ]:
        with pytest.raises(ValueError) as e:
            S.load_config(spec(models), *bad)
        assert msg in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))
    with pytest.raises(ValueError, match="--config is required"):
        cli.parse_config_flags(["--config.W=8"], "sample", "configs/sample/tiny.py")
    with pytest.raises(FileNotFoundError, match="--config /nonexistent.py: no such file"):
        S.load_config("/nonexistent.py")
    # A config file with a misspelt field is refused the same way; one with a wrong type names the field.
    typo = tmp_path / "typo.py"
    typo.write_text("from animatediff_jax.sampling.config import base_config\n\ndef get_config():\n"
                    "    c = base_config()\n    c.promt = ('x',)\n    return c\n")
    with pytest.raises(ConfigError, match="unknown config field 'promt'"):
        validate(S.load_config(str(typo)))
    typed = tmp_path / "typed.py"
    typed.write_text(typo.read_text().replace("c.promt = ('x',)", "c.seed = 42"))
    with pytest.raises(ValueError) as e:
        S.load_config(str(typed))
    assert "TypeError: Could not override field 'seed'" in str(e.value) and "\n" not in str(e.value), str(e.value)
    # Batches keep one compiled shape: the last one is padded with its last entry.
    assert S._batches(5, 2) == [[0, 1], [2, 3], [4, 4]] and S._batches(1, 4) == [[0, 0, 0, 0]]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """The CLI once, end to end, recording the pipeline it built (to re-run `generate` on it)."""
    out = str(tmp_path_factory.mktemp("out") / "tiny-{time}")
    built = []

    def recording(config):
        built.append(real(config))
        return built[-1]

    real = assemble.load_pipeline
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assemble, "load_pipeline", recording)
        rc = cli.main(["sample", "--config", spec(models), f"--config.output.dir={out}",
                       "--config.output.formats=('gif', 'mp4', 'png')"] + FAST)
    folders = glob.glob(out.replace("{time}", "*"))
    assert rc == 0 and len(folders) == 1 and len(built) == 1
    return folders[0], built[0]


def test_sample_writes_generates_frames(run, models, capfd):
    folder, pipe = run
    names = sorted(os.path.relpath(p, folder) for p in glob.glob(f"{folder}/**/*.*", recursive=True))
    stems = ["sample/0-a-cat-and-the-dog", "sample/1-the-dog-4k"]
    want = sorted([f"{s}.{e}" for s in stems for e in ("gif", "mp4")] + [f"{s}/{i:04d}.png" for s in stems for i in range(6)]
                  + ["sample.gif", "sample.mp4", "config.yaml", "timings.json"])
    assert names == want

    # The resolved config reloads as a config (replay.py): same prompts, negative prompts broadcast, seeds.
    saved = validate(S.load_config(f"{REPLAY}:{folder}/config.yaml"))
    assert saved["prompt"] == ["a cat and the dog", "the dog, 4k"] and saved["n_prompt"] == ["bad quality"] * 2
    assert saved["seed"] == [10788741199826055526, 6520604954829636163] and saved["L"] == 6

    # The videos as `generate` makes them: both in one call (`batch_size` 0: up to 4 per device), so the
    # same pipeline reuses the compiled executable.
    kw = dict(num_frames=6, height=32, width=32, steps=3, guidance_scale=7.5, mesh=sampling_mesh(1), progress=lambda i: None)
    res = generate(pipe, saved["prompt"], ["bad quality"] * 2, saved["seed"], **kw)
    assert res.timings["compile_s"] == 0.0
    for i, stem in enumerate(stems):
        frames = res.frames[i]
        assert frames.shape == (6, 32, 32, 3) and frames.std() > 10
        pngs = np.stack([np.asarray(Image.open(f"{folder}/{stem}/{j:04d}.png")) for j in range(6)])
        np.testing.assert_array_equal(pngs, frames)  # lossless: exact
        gif = read_video(f"{folder}/{stem}.gif")
        write_gif(f"{folder}/check.gif", frames, 8.0)
        np.testing.assert_array_equal(gif, read_video(f"{folder}/check.gif"))  # the same GIF encoding of them
        err = np.abs(gif.astype(np.int32) - frames).mean()
        assert err < 12, f"GIF palette error {err}"  # adaptive palette on random-weight noise
        mp4 = read_video(f"{folder}/{stem}.mp4")
        assert mp4.shape == frames.shape
        os.remove(f"{folder}/check.gif")
    grid = read_video(f"{folder}/sample.gif")
    assert grid.shape == (6, 32, 64, 3)

    with open(f"{folder}/timings.json") as f:
        timings = json.load(f)
    assert timings["compile_s"] > 0 and timings["run_s"] > 0 and timings["load_s"] > 0


def test_replaying_a_saved_run_reproduces_its_frames(run, tmp_path):
    """`--config configs/sample/replay.py:RUN/config.yaml`: the same videos, bit for bit (seeds saved resolved)."""
    folder, pipe = run
    config = S.load_config(f"{REPLAY}:{folder}/config.yaml", f"--config.output.dir={tmp_path}/again")
    again = S.sample(config, pipe)
    assert again.folder == f"{tmp_path}/again" and again.timings["compile_s"] == 0.0
    for i, stem in enumerate(["sample/0-a-cat-and-the-dog", "sample/1-the-dog-4k"]):
        pngs = np.stack([np.asarray(Image.open(f"{folder}/{stem}/{j:04d}.png")) for j in range(6)])
        np.testing.assert_array_equal(again.frames[i], pngs)
    with open(f"{tmp_path}/again/config.yaml") as f, open(f"{folder}/config.yaml") as g:
        assert f.read().replace(f"{tmp_path}/again", "DIR") == g.read().replace(os.path.dirname(folder) + "/tiny-{time}", "DIR")


def test_context_windows_length_override_runs_windows(run, models, tmp_path):
    """`--config.context_windows.length=6` (a field of the fixed group; 0 = off) samples in windows, as `generate`."""
    _, pipe = run
    config = S.load_config(spec(models), "--config.L=10", "--config.context_windows.length=6",
                           "--config.context_windows.overlap=2", "--config.steps=1", "--config.prompt=('the cat',)",
                           "--config.seed=5", f"--config.output.dir={tmp_path}/w", "--config.output.formats=png")
    assert config["context_windows"] == {"length": 6, "overlap": 2, "weighting": "flat", "noise": "random",
                                         "schedule": "uniform", "scope": "unet"}
    res = S.sample(config, pipe)
    want = generate(pipe, ["the cat"], ["bad quality"], [5], num_frames=10, height=32, width=32, steps=1,
                    context_windows=dict(length=6, overlap=2), progress=lambda i: None)
    assert want.timings["compile_s"] == 0.0  # the executable sample compiled: the same windows
    np.testing.assert_array_equal(res.frames, want.frames)
    plain = generate(pipe, ["the cat"], ["bad quality"], [5], num_frames=10, height=32, width=32, steps=1,
                     context_windows=dict(length=0, overlap=2), progress=lambda i: None)
    assert np.abs(plain.frames.astype(int) - res.frames.astype(int)).max() > 0  # windows change the video


def test_int8_from_the_files_users_have(run, models, tmp_path):
    """`--config.quantize=int8_weights` on a base loaded from its files (numpy arrays): the spatial kernels are
    int8, and the video stays near the float one (it once failed here: qwix takes jax arrays only)."""
    from animatediff_jax.models import quantize

    _, pipe = run
    config = S.load_config(spec(models), "--config.quantize=int8_weights", "--config.steps=3", "--config.L=6",
                           "--config.prompt=('the cat',)", "--config.seed=5", f"--config.output.dir={tmp_path}/q",
                           "--config.output.formats=png")
    qpipe = assemble.load_pipeline(validate(config))
    flat = flatten_dict(qpipe.params["unet"], is_leaf=lambda _, v: quantize.is_quantized(v))
    assert qpipe.quantize == "int8_weights" and any(quantize.is_quantized(v) for v in flat.values())
    got = S.sample(config, qpipe).frames.astype(np.float64)
    want = generate(pipe, ["the cat"], ["bad quality"], [5], num_frames=6, height=32, width=32, steps=3,
                    progress=lambda i: None).frames.astype(np.float64)
    diff = np.abs(got - want)
    print(f"int8_weights vs float: mean |d| {diff.mean():.2f} / 255, max {diff.max():.0f}")
    assert 0 < diff.mean() < 3


# ------------------------------------------------------------------------------ loading


def test_load_pipeline_merges_like_lora_merge(models, tmp_path):
    _, paths = models
    config = validate(S.load_config(spec(models)))
    pipe = load_pipeline(config)
    assert isinstance(pipe, AnimationPipeline) and pipe.dtype == np.float32

    # Independently: the file readers and lora.merge, one by one, with the config's scales.
    base = load_sd15(paths["base_model"])
    motion, ucfg = load_motion(paths["motion_module"], base.unet_config)
    assert pipe.unet_config == ucfg and ucfg.motion.mid_block  # v2 layout detected
    unet = merge_motion(base.params["unet"], motion, ucfg)
    personal = load_lora(paths["lora_model_path"], "lora", base=ucfg, text_config=base.text_config)
    assert personal.source == "kohya" and lora_layers(personal.unet) and lora_layers(personal.text_encoder)
    unet = merge(unet, personal.unet, 0.7)
    text = merge(base.params["text_encoder"], personal.text_encoder, 0.7)
    unet = merge(unet, load_lora(paths["adapter_lora_path"], "domain_adapter", base=ucfg).unet, 0.8)
    before = unet
    zoom = load_lora(paths["motion_lora_zoom_in"], "motion_lora", base=ucfg).unet
    pan = load_lora(paths["motion_lora_pan_left"], "motion_lora", base=ucfg).unet
    unet = merge(merge(unet, zoom, 1.0), pan, 0.5)

    assert_same_tree(pipe.params["unet"], unet, "UNet")
    assert_same_tree(pipe.params["text_encoder"], text, "text encoder")
    assert_same_tree(pipe.params["vae"], base.params["vae"], "VAE")
    # The scales are the config's: the two MotionLoRAs' deltas at 1.0 and 0.5 (numpy, not merge).
    path = next(iter(lora_layers(zoom)))
    got = np.asarray(flatten_dict(pipe.params["unet"])[path + ("kernel",)]) - np.asarray(flatten_dict(before)[path + ("kernel",)])
    dz = flatten_dict(zoom)[path + ("down",)] @ flatten_dict(zoom)[path + ("up",)]
    dp = flatten_dict(pan)[path + ("down",)] @ flatten_dict(pan)[path + ("up",)]
    err = assert_close(got, 1.0 * dz + 0.5 * dp, rtol=1e-5, atol=1e-6, what="MotionLoRA deltas")
    print(f"MotionLoRA delta max abs err {err:.2e}")

    # Our converted files (params files) load to the very same weights as the PyTorch files.
    from animatediff_jax.checkpoints.params_io import save_lora, save_motion

    save_motion(tmp_path / "mm.safetensors", motion, ucfg)
    save_lora(tmp_path / "zoom.safetensors", zoom, "motion_lora", ucfg)
    mixed = [{"path": str(tmp_path / "zoom.safetensors"), "alpha": 1.0}, {"path": paths["motion_lora_pan_left"], "alpha": 0.5}]
    conv = load_pipeline(dict(config, motion_module=str(tmp_path / "mm.safetensors"), motion_module_lora_configs=mixed))
    assert_same_tree(conv.params["unet"], unet, "UNet from converted files")

    # A personalised single file (UNet only, LDM layout) over the base: its UNet, the base's rest.
    sys.path.insert(0, os.path.dirname(__file__))
    from diffusers import UNet2DConditionModel
    from ldm_fixture import diffusers_to_ldm

    from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
    from animatediff_jax.checkpoints.torch_io import save_state_dict
    from animatediff_jax.parity import randomize

    spatial = base.unet_config
    torch_unet = randomize(UNet2DConditionModel(**spatial.to_diffusers()), seed=42)
    usd = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    db_params = convert_unet_state_dict(usd, spatial)
    ldm = diffusers_to_ldm(usd, None, None, spatial, base.vae_config)
    db_path = str(tmp_path / "toon.safetensors")
    save_state_dict(db_path, ldm)
    db = load_pipeline(dict(config, dreambooth_path=db_path, lora_model_path="", adapter_lora_path="",
                              motion_module_lora_configs=[], dtype="bfloat16"))
    want = merge_motion(db_params, motion, ucfg)

    def cast(tree):
        return jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), tree)

    assert_same_tree(db.params["unet"], cast(want), "personalised UNet (bf16)")
    assert_same_tree(db.params["text_encoder"], cast(base.params["text_encoder"]), "text encoder from the base")
    assert db.dtype == jax.numpy.bfloat16


# ------------------------------------------------------------------------------ bad input


def _other_motion_module(folder: str) -> str:
    """A v2 motion module made for other UNet channels (16/32 instead of 32/64)."""
    from animatediff_jax.checkpoints.motion import save_motion_module_original
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.shapes import motion_shapes

    path = os.path.join(folder, "mm_other.safetensors")
    if not os.path.exists(path):
        cfg = tiny_unet("v2", block_out_channels=(16, 32), cross_attention_dim=32)
        save_motion_module_original(path, random_params(motion_shapes(cfg), 0), cfg)
    return path


BEFORE_LOADING = [
    (["--config.motion_module=/nonexistent/mm.ckpt"], "motion_module: /nonexistent/mm.ckpt: no such file or folder"),
    (["--config.motion_module_lora_configs=({'path': '/nope.ckpt', 'alpha': 1.0},)"],
     "motion_module_lora_configs[0].path: /nope.ckpt: no such file"),
    (["--config.W=30"], "W=30 must be a positive multiple of 4"),
    (["--config.H=-8"], "H=-8: expected an integer >= 1"),
    (["--config.steps=abc"], "--config.steps=abc: invalid literal for int()"),
    (["--config.scheduler=ddpm"], "unknown scheduler 'ddpm'"),
    (["--config.scheduler_options={'foo': 1}"], "scheduler 'ddim' has no option foo"),
    (["--config.bogus=1"], "unknown config field 'bogus'"),
    (["--config.n_prompt=('a', 'b', 'c')"], "n_prompt: 2 prompts but 3 given: give 1 or 2"),
    (["--config.seed=(1, 2, 3)"], "seed: 2 prompts but 3 given: give 1 or 2"),
    (["--config.dtype=float64"], "dtype='float64': expected one of"),
    (["--config.n_prompt=('(worst quality:1.4',)"], "n_prompt[0]='(worst quality:1.4': unbalanced '(' at character 1"),
    (["--config.embeddings=('/nope/EasyNegative.safetensors',)"],
     "embeddings[0]: /nope/EasyNegative.safetensors: no such file or folder"),
    (["--config.output.formats=('webm',)"], "output.formats"),
    (["--config.context_windows.length=4", "--config.context_windows.overlap=4"],
     "context_windows.overlap=4: expected 0 <= overlap < length (4)"),
    (["--config.context_windows.length=-1"], "context_windows.length=-1: expected an integer >= 1 (0: off)"),
    (["--config.devices=9"], "devices: num_devices=9: there are 1 devices"),
    (["--config.output.dir=/proc/version"], "output.dir='/proc/version': is a file, not a folder"),
    (["--config.output.dir=/proc/version/samples"], "output.dir='/proc/version/samples': cannot be created"),
    (["--config.W=100000", "--config.H=100000"], "W=100000, H=100000, L=6: needs about"),
    (["--config.allow_nonfinite='yes'"], "--config.allow_nonfinite='yes'"),
    (["--config.attention=flash"], "attention='flash': unknown attention implementation 'flash'; valid: auto, xla"),
    (["--config.attention=cudnn"], "attention='cudnn': attention \"cudnn\" needs a GPU (platform cpu); q [1, 16, 8, 40]"),
]
AFTER_LOADING = [  # generate's checks, on the loaded models
    ("other_mm", "motion_module: "),
    (["--config.L=40"], "L=40 exceeds the motion module's position table (32 frames)"),
    ("mlora_as_adapter", "adapter_lora_path: "),
    (["--config.clip_skip=9"], "clip_skip=9: the text encoder has"),
    (["--config.L=40", "--config.context_windows.length=40"],
     "context_windows.length=40 exceeds the motion module's position table (32 frames)"),
]


@pytest.mark.parametrize("overrides,msg", BEFORE_LOADING + AFTER_LOADING,
                         ids=[f"pre{i}" for i in range(len(BEFORE_LOADING))] + ["motion_fit", "frames", "kind",
                                                                               "clip_skip", "windows"])
def test_bad_input_one_line_error_before_compiling(models, overrides, msg, capfd, monkeypatch):
    folder, paths = models
    if overrides == "other_mm":
        overrides = [f"--config.motion_module={_other_motion_module(folder)}"]
    elif overrides == "mlora_as_adapter":
        overrides = [f"--config.adapter_lora_path={paths['motion_lora_zoom_in']}"]
    preload = any(msg == m for _, m in BEFORE_LOADING)

    def never(*a, **k):
        raise AssertionError("must fail before this")

    monkeypatch.setattr(PROGRAMS, "compiled", never)
    if preload:
        monkeypatch.setattr(assemble, "load_pipeline", never)
    capfd.readouterr()
    t0 = time.perf_counter()
    rc = cli.main(["sample", "--config", spec(models)] + FAST + overrides)
    elapsed = time.perf_counter() - t0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and lines and lines[-1].startswith("error: "), err
    assert msg in lines[-1], lines[-1]
    if overrides[0].startswith("--config.adapter_lora_path"):
        assert "domain adapter" in lines[-1] and "MotionLoRA" in lines[-1]
    print(lines[-1])
    assert "Traceback" not in err and sum(line.startswith("error") for line in lines) == 1
    assert elapsed < (2.0 if preload else 20.0), f"{elapsed:.1f}s"


def test_cli_help_and_print_config(models, capsys, tmp_path, monkeypatch):
    assert cli.main(["sample", "--help"]) == 0
    assert "animatediff-jax sample --config" in capsys.readouterr().out
    assert cli.main(["sample", "--config", spec(models), "--print_config", "--config.L=5"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["L"] == 5 and printed["motion_module"] == models[1]["motion_module"]
    assert printed["context_windows"] == {"length": 0, "overlap": 4, "weighting": "flat", "noise": "random", "schedule": "uniform",
                                         "scope": "unet"} and len(printed["seed"]) == 2

    # tiny.py's get_config writes nothing (not even with --print_config); before the models are written
    # (`python -m animatediff_jax.testing.tiny DIR`, its docstring's first step) the error says what is missing.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sample", "--config", TINY, "--print_config"]) == 0
    assert cli.main(["sample", "--config", f"{TINY}:{tmp_path}/elsewhere", "--print_config"]) == 0
    assert os.listdir(tmp_path) == []
    capsys.readouterr()
    assert cli.main(["sample", "--config", TINY]) == 2
    err = capsys.readouterr().err  # every file the config names is missing: all in one line
    assert len(err.strip().splitlines()) == 1 and "files the config names are not there" in err, err
    assert "base_model: runs/tiny_models/sd15;" in err and "motion_module_lora_configs[1].path: " in err, err
    out = subprocess.run([sys.executable, "-m", "animatediff_jax.testing.tiny", "runs/tiny_models"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    validate(S.load_config(TINY))  # (the paths now exist)
    assert os.path.isfile(tmp_path / "runs" / "tiny_models" / "DONE")


# ------------------------------------------------------------------------------ benchmark script


def test_bench_small_tiny_runs():
    """`bench/sample_bench.py --small --tiny` runs both sides and reports (so the script cannot rot)."""
    t0 = time.perf_counter()
    argv = ["--small", "--tiny", "--repeats", "1", "--warmup", "0", "--ours-dtype", "float32", "--attention", "xla,chunked"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sample_bench.py")] + argv, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ours (JAX" in out.stdout and "diffusers AnimateDiffPipeline" in out.stdout, out.stdout
    assert "s/video" in out.stdout and "ratio diffusers/ours (attention chunked)" in out.stdout, out.stdout
    assert "attention xla = xla" in out.stdout and "attention chunked = chunked" in out.stdout, out.stdout
    print(out.stdout)
    print(f"bench --small --tiny: {elapsed:.1f}s")


def test_to_uint8_is_one_function_for_numpy_and_jit():
    """The sampler's compiled decode ends with io.video.to_uint8: same bytes as on the host."""
    from animatediff_jax.io.video import to_uint8

    x = np.random.default_rng(0).normal(0, 0.8, (2, 3, 5, 3)).astype(np.float32)
    x[0, 0, 0] = [-1.0, 1.0, 0.5 / 255 * 2 - 1]  # ends and a rounding tie
    host = to_uint8(x)
    dev = jax.jit(to_uint8)(jax.numpy.asarray(x))
    assert isinstance(host, np.ndarray) and isinstance(dev, jax.Array) and dev.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(dev), host)
    np.testing.assert_array_equal(host, np.round(np.clip(x / 2 + 0.5, 0, 1) * 255).astype(np.uint8))


def test_a_non_empty_output_dir_is_never_mixed_with_a_new_run(tmp_path, capfd):
    from animatediff_jax.sampling.outputs import output_folder

    (tmp_path / "run").mkdir()
    assert output_folder(str(tmp_path / "run")) == str(tmp_path / "run")  # empty: used as is
    (tmp_path / "run" / "sample.gif").write_bytes(b"old")
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "config.yaml").write_text("old")
    assert output_folder(str(tmp_path / "run")) == str(tmp_path / "run-3")
    assert "is not empty: writing" in capfd.readouterr().err
    assert output_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing is created before the videos exist


def test_an_unreadable_base_model_is_named_not_a_wrong_multiple(models, tmp_path, capfd):
    """A truncated converted base: one line naming its file, before anything loads (not "multiple of 64")."""
    folder, paths = models
    bad = tmp_path / "sd15_truncated"
    bad.mkdir()
    data = open(os.path.join(paths["base_model"], "params.safetensors"), "rb").read()
    (bad / "params.safetensors").write_bytes(data[: len(data) // 3])
    for sub in ("tokenizer",):
        import shutil

        shutil.copytree(os.path.join(paths["base_model"], sub), bad / sub)
    rc = cli.main(["sample", "--config", spec(models)] + FAST + [f"--config.base_model={bad}", "--config.W=40"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err[-1].startswith(f"error: base_model: {bad}/params.safetensors: cannot be read"), err
    (bad / "params.safetensors").unlink()
    (bad / "unet").mkdir()
    rc = cli.main(["sample", "--config", spec(models)] + FAST + [f"--config.base_model={bad}"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err[-1] == f"error: base_model: {bad}/unet/config.json: missing (not a converted or " \
                                  "diffusers SD1.5 folder)", err
