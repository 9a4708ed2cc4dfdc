"""Data at pod scale: `prepare` over several processes and resumed after a kill, decoding in worker
processes, uint8 pixels scaled on the device.

One setup serves the prepare checks: the CLI runs as 2 processes x 4 CPU devices (gloo) while a
1 process x 8 devices run is SIGKILLed once its first shard is done, then restarted; the restarted
cache must hold exactly the records the two processes wrote between them, with the same index.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

from animatediff_jax.data import CachedLatentSource, WebVidSource, make_dataset
from animatediff_jax.data.webvid import pixels_to_float, to_float
from animatediff_jax.io import write_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, MISSING, SHARDS, CLIPS = 6, 3, 3, 2  # row 3 has no video file: its clips are skipped

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax
    ndev, nproc, slow_from = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    jax.config.update("jax_num_cpu_devices", ndev)
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    if slow_from >= 0:  # rows from slow_from on take long to decode: the kill lands inside a shard
        from animatediff_jax.data import webvid
        load = webvid.WebVidSource._load
        def slow(self, index, epoch, seed):
            if index >= slow_from:
                time.sleep(60)
            return load(self, index, epoch, seed)
        webvid.WebVidSource._load = slow
    from animatediff_jax.prepare import main
    sys.exit(main(sys.argv[4:]))
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from animatediff_jax.testing.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("prepare")
    models = write_tiny_models(root / "models")
    videos = root / "videos"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(ROWS):
        if i != MISSING:
            write_mp4(videos / f"{i}.mp4", rng.integers(0, 256, (8, 8, 12, 3), dtype=np.uint8), fps=8)
        rows.append((str(i), f"clip number {i}", "page"))
    with open(root / "rows.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        w.writerows(rows)
    return dict(root=root, model=models["base_model"], csv=root / "rows.csv", videos=videos)


@pytest.fixture(scope="module")
def tiny_sd(setup):
    from animatediff_jax.checkpoints.sd15 import load_sd15

    return load_sd15(setup["model"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(setup, out, ndev, nproc=1, pid=0, port=0, slow_from=-1) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    env["XLA_FLAGS"] = xla_flags()
    argv = ["--model", str(setup["model"]), "--csv", str(setup["csv"]), "--videos", str(setup["videos"]),
            "--out", str(out), "--n-frames", "2", "--stride", "2", "--size", "8", "--batch-size", "4",
            "--num-shards", str(SHARDS), "--clips-per-video", str(CLIPS), "--read-threads", "4", "--no-progress"]
    if nproc > 1:
        argv += ["--coordinator", f"localhost:{port}", "--num-processes", str(nproc), "--process-id", str(pid)]
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(ndev), str(nproc), str(slow_from)] + argv, cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _records(out):
    src = CachedLatentSource(out, sample_posterior=False, caption_dropout=0.0)
    raws = [src.raw(k) for k in range(len(src))]
    keys = [(int(r["index"]), int(r["clip"])) for r in raws]
    return src.info, dict(zip(keys, raws)), keys


def test_two_processes_and_a_killed_run_write_the_same_cache(setup, tmp_path):
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    port = _free_port()
    procs = [_launch(setup, two, 4, 2, i, port) for i in range(2)]
    killed = _launch(setup, one, 8, slow_from=2)  # shard 0 is rows 0-1: done fast; shard 1 then hangs
    try:
        done0 = one / "shard-00000-of-00003.p000.array_record.done.json"
        deadline = time.time() + 240
        while not done0.exists():
            assert killed.poll() is None and time.time() < deadline, killed.communicate()[0][-3000:]
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait()

        # What the kill left: shard 0 complete, shard 1 begun at most, no index, so no readable cache.
        names = sorted(os.listdir(one))
        assert "cache_info.json" not in names and done0.name in names
        assert not any(n.startswith(("shard-00001", "shard-00002")) and n.endswith((".array_record", ".done.json"))
                       for n in names), names
        with pytest.raises(FileNotFoundError):
            CachedLatentSource(one)
        kept = os.stat(one / done0.name.replace(".done.json", "")).st_mtime_ns
        log = _finish(_launch(setup, one, 8))  # the same command again
        assert "1 of this process's 3 shards are complete already" in log, log
        assert os.stat(one / done0.name.replace(".done.json", "")).st_mtime_ns == kept  # not rewritten
        assert not any(n.endswith(".tmp") for n in os.listdir(one))
        for p in procs:
            _finish(p)
    finally:
        for p in procs + [killed]:
            p.kill()

    info2, recs2, order2 = _records(two)
    info1, recs1, order1 = _records(one)
    expected = [(r, c) for r in range(ROWS) if r != MISSING for c in range(CLIPS)]
    assert order1 == order2 == expected  # shards in row order, each row's clips in order
    assert info1["num_records"] == len(expected) and info1["skipped"] == CLIPS
    assert info1["shard_records"] == info2["shard_records"] == [4, 2, 4]
    assert info1["shards"] == [f"shard-{s:05d}-of-00003.p000.array_record" for s in range(SHARDS)]
    assert info2["shards"] == [f"shard-{s:05d}-of-00003.p{s % 2:03d}.array_record" for s in range(SHARDS)]
    strip = lambda info: {k: v for k, v in info.items() if k != "shards"}  # noqa: E731
    assert strip(info1) == strip(info2)
    worst = 0.0
    for key in expected:
        a, b = recs1[key], recs2[key]
        assert a.keys() == b.keys() == {"index", "clip", "mean", "logvar", "context", "input_ids", "text"}
        assert str(a["text"]) == str(b["text"]) == f"clip number {key[0]}"
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        for k in ("mean", "logvar", "context"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=f"{key} {k}")
            worst = max(worst, float(np.abs(a[k] - b[k]).max()))
    # Each clip of a video has its own random start (and flip): the two clips of a row differ.
    differ = [not np.array_equal(recs1[(r, 0)]["mean"], recs1[(r, 1)]["mean"]) for r in range(ROWS) if r != MISSING]
    assert sum(differ) >= 3
    print(f"1x8 (killed, resumed) vs 2x4 processes: max abs diff {worst:.3g}")


def test_latent_dtypes_and_the_clip_of_each_record(setup, tiny_sd, tmp_path):
    """bfloat16 storage reads back; record (row, clip c) is the row's epoch-c clip, encoded."""
    from animatediff_jax.data import prepare_cache
    from animatediff_jax.data.cache import CacheSettings
    from animatediff_jax.models.clip_text import CLIPTextModel
    from animatediff_jax.models.vae import AutoencoderKL, encode_moments
    from animatediff_jax.text import Tokenizer

    sd = tiny_sd
    vae = AutoencoderKL(sd.vae_config)
    src = WebVidSource(setup["csv"], setup["videos"], n_frames=2, stride=2, size=8)
    args = (src, vae, sd.params["vae"], CLIPTextModel(sd.text_config), sd.params["text_encoder"],
            Tokenizer(sd.tokenizer_path))
    kw = dict(batch_size=4, num_shards=2, clips_per_video=CLIPS, limit=2, progress=False)
    info = prepare_cache(*args, tmp_path / "f32", CacheSettings(**kw))  # the settings as one value, or as keywords
    # any name of animatediff_jax.dtypes; decoded in a worker process (absl flags unparsed outside an app)
    info16 = prepare_cache(*args, tmp_path / "bf16", latent_dtype="BF16", worker_count=1, **kw)
    assert info16["latent_dtype"] == "bfloat16" and info16["num_records"] == info["num_records"] == 2 * CLIPS
    f32 = CachedLatentSource(tmp_path / "f32", sample_posterior=False, caption_dropout=0.0)
    bf16 = CachedLatentSource(tmp_path / "bf16", sample_posterior=False, caption_dropout=0.0)
    clips = np.stack([src.get(k // CLIPS, k % CLIPS, caption_dropout=0.0)["video"] for k in range(2 * CLIPS)])
    mean = np.asarray(encode_moments(vae, sd.params["vae"], jnp.asarray(clips))[0])
    for k in range(2 * CLIPS):
        raw = f32.raw(k)
        assert (int(raw["index"]), int(raw["clip"])) == (k // CLIPS, k % CLIPS)
        np.testing.assert_allclose(raw["mean"], mean[k], rtol=1e-5, atol=1e-6)
        assert bf16.raw(k)["mean"].dtype.name == "bfloat16"
        np.testing.assert_allclose(bf16[k]["latents"], f32[k]["latents"], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="latent_dtype"):
        prepare_cache(*args, tmp_path / "bad", latent_dtype="int8")


def test_uint8_pixels_scale_on_the_device_exactly(tiny_sd):
    """The step's `pixels_to_float` gives the host's `to_float` values bit for bit (XLA alone would
    compile x / 127.5 as a multiply, 1 ulp off), and the step encodes uint8 batches exactly as float ones."""
    from types import SimpleNamespace

    from animatediff_jax.models.vae import AutoencoderKL
    from animatediff_jax.training.step import _latents_and_context

    every = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(jax.jit(pixels_to_float)(every)), to_float(every))
    plain = np.asarray(jax.jit(lambda x: x.astype(jnp.float32) / 127.5 - 1.0)(every))
    assert plain.tobytes() != to_float(every).tobytes()  # why the lookup: XLA's division is not the host's
    vae = AutoencoderKL(tiny_sd.vae_config)
    frozen = {"vae": tiny_sd.params["vae"]}
    spec = SimpleNamespace(vae=vae, text=None, text_2=None, vae_sample_posterior=True)
    video = np.random.default_rng(0).integers(0, 256, (2, 2, 8, 8, 3), dtype=np.uint8)
    keys = jax.random.split(jax.random.key(1), 2)
    ctx = np.zeros((2, 4, 8), np.float32)
    fn = jax.jit(lambda frozen, batch, keys: _latents_and_context(spec, frozen, batch, keys))
    lat_u8 = fn(frozen, {"video": video, "context": ctx}, keys)[0]
    lat_f32 = fn(frozen, {"video": to_float(video), "context": ctx}, keys)[0]
    np.testing.assert_array_equal(np.asarray(lat_u8), np.asarray(lat_f32))


def test_workers_give_the_threads_batches_and_resume_across_worker_counts(setup):
    src = WebVidSource(setup["csv"], setup["videos"], n_frames=2, stride=2, size=8, caption_dropout=0.3, seed=1)
    make = lambda workers: make_dataset(  # noqa: E731
        src, global_batch_size=2, seed=4, num_epochs=2, shard_index=0, shard_count=1, read_threads=2,
        worker_count=workers, pixels="uint8")
    threads = make(0)
    ref = list(threads)
    assert len(ref) == 5 and threads.skipped == 2  # 2 epochs x 5 readable rows; the missing row twice
    assert ref[0]["video"].dtype == np.uint8 and ref[0]["video"].shape == (2, 2, 8, 8, 3)
    workers = make(2)
    it = iter(workers)
    first = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint keeps it
    rest = list(it)
    it.close()
    assert workers.skipped == 2  # counted in this process, for both workers
    for a, b in zip(first + rest, ref, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # The state is a position in the stream: it resumes into threads or another worker count alike.
    for resumed in (iter(make(0)), iter(make(1))):
        resumed.set_state(state)
        got = list(resumed)
        resumed.close()
        assert len(got) == len(rest)
        for a, b in zip(got, rest):
            np.testing.assert_array_equal(a["video"], b["video"])
            assert a["text"].tolist() == b["text"].tolist()
    with pytest.raises(ValueError, match="worker_count"):
        iter(make(0)).set_state({"workers_state": {}, "iterations_to_skip": {}, "last_worker_index": 0})


@pytest.mark.parametrize("field,value", [("worker_count", -1), ("worker_buffer_size", 0), ("prefetch", -2),
                                         ("read_threads", -1)])
def test_data_loader_fields_are_validated(field, value):
    from animatediff_jax.training import base_config
    from animatediff_jax.training.config import ConfigError, tiny_overrides, validate_config

    c = tiny_overrides(base_config())
    validate_config(c)
    c.data[field] = value
    with pytest.raises(ConfigError, match=f"data.{field}="):
        validate_config(c)
