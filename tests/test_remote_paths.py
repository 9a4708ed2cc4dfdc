"""Every path may be in a bucket: `sample` and `prepare` + `train` (+ resume) with all their files on gs://.

The bucket is a fake one, offline, reached through the very code a real gs:// path takes: `etils.epath`
dispatches gs:// to its fsspec backend (as it does when TensorFlow is not installed), and fsspec's
"gs" protocol, which is gcsfs in real life, is here a local folder with a bucket's habits (no empty
folders: mkdir does nothing and a folder exists through the objects in it; names come back as
`bucket/path`). Orbax's array data goes through tensorstore's own GCS driver, so that one driver is
pointed at the same folder (its `file` driver), and orbax's HNS-bucket probe (a GCS API call) says
no. Everything else -- epath, orbax's gs:// logic (commit-file atomicity), our `io.fs` -- runs as
on a pod. (`etils.epath.testing.mock_epath` is not used: it swaps the gs backend for the local `os`
one on the raw "gs://..." string, so a stray builtin `open("gs://...")` would pass unnoticed.)

The working directory is an empty folder that must stay empty: a path that bypassed `io.fs`
would land there as `gs:/...`.
"""

import contextlib
import csv
import json
import os
import sys
from unittest import mock

import numpy as np
import pytest

from animatediff_jax.io import fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://fake-bucket"


@contextlib.contextmanager
def fake_gcs(root):
    """gs:// (and gcs://) -> `root/<bucket>/<path>` for epath, fsspec and orbax's tensorstore."""
    import fsspec
    from etils.epath import backend as epath_backend
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.realpath(os.fspath(root))

    def local(p):
        p = os.fspath(p)
        if p == root or p.startswith(root + "/"):
            return p.rstrip("/")
        for prefix in ("gs://", "gcs://"):
            p = p.removeprefix(prefix)
        return os.path.join(root, p).rstrip("/")

    def unmap(name):
        return os.path.relpath(name, root) if name.startswith(root + "/") else name

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, p):
            return local(p)

        def glob(self, p, **kw):  # names as gcsfs gives them: bucket/path
            out = super().glob(p, **kw)
            return {unmap(k): v for k, v in out.items()} if isinstance(out, dict) else [unmap(o) for o in out]

        def mkdir(self, p, create_parents=True, **kw):  # a bucket has no folders
            pass

        def makedirs(self, p, exist_ok=False):
            pass

        def _open(self, p, mode="rb", **kw):
            if any(m in mode for m in "wax"):
                os.makedirs(os.path.dirname(local(p)), exist_ok=True)
            return super()._open(p, mode, **kw)

        def touch(self, p, truncate=True, **kw):
            os.makedirs(os.path.dirname(local(p)), exist_ok=True)
            return super().touch(p, truncate, **kw)

        def mv(self, p1, p2, recursive=True, **kw):
            os.makedirs(os.path.dirname(local(p2)), exist_ok=True)
            super().mv(p1, p2, recursive, **kw)
            self._prune(p1)

        def rm(self, p, recursive=False, maxdepth=None):
            super().rm(p, recursive, maxdepth)
            for q in p if isinstance(p, list) else [p]:
                self._prune(q)

        def _prune(self, p):  # a folder whose last object went is gone
            d = os.path.dirname(local(p))
            while os.path.dirname(d) != root and d.startswith(root + "/") and os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
                d = os.path.dirname(d)

    def kvstore(path):
        bucket, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, rest)}

    saved = {k: fsspec.registry[k] for k in ("gs", "gcs") if k in fsspec.registry}
    for k in ("gs", "gcs"):
        fsspec.register_implementation(k, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        with mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
                mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False):
            yield root
    finally:
        registry = sys.modules["fsspec.registry"]
        for k in ("gs", "gcs"):
            registry._registry.pop(k, None)
            if k in saved:
                fsspec.register_implementation(k, saved[k], clobber=True)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake bucket's local folder; the cwd is an empty folder checked to stay empty."""
    from etils.epath import gpath

    if gpath._is_tf_installed():  # epath would take tf.io.gfile for gs://, not fsspec
        monkeypatch.setenv("EPATH_USE_TF", "false")
        gpath._is_tf_installed.cache_clear()
    monkeypatch.setenv("ANIMATEDIFF_JAX_LOCAL_CACHE", str(tmp_path / "host_cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs(tmp_path / "bucket") as root:
        yield root
    assert os.listdir(cwd) == [], "a path bypassed io.fs and was written locally"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from animatediff_jax.testing.tiny import write_tiny_models

    folder = tmp_path_factory.mktemp("tiny_models")
    write_tiny_models(folder)
    return str(folder)


def test_fs_basics_on_the_bucket(bucket, tmp_path):
    d = f"{BUCKET}/basics"
    assert fs.is_remote(d) and not fs.is_remote(str(tmp_path)) and not fs.exists(d)
    fs.makedirs(d)
    assert not fs.isdir(d)  # buckets have no empty folders
    fs.write_bytes(f"{d}/a/b.bin", b"123")
    assert fs.isdir(d) and fs.isdir(f"{d}/a") and fs.isfile(f"{d}/a/b.bin") and not fs.isfile(f"{d}/a")
    assert fs.listdir(d) == ["a"] and fs.read_bytes(f"{d}/a/b.bin") == b"123"
    assert os.path.isfile(os.path.join(bucket, "fake-bucket", "basics", "a", "b.bin"))
    with pytest.raises(RuntimeError), fs.atomic_file(f"{d}/a/b.bin") as tmp:  # a failed write changes nothing
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError
    assert fs.read_bytes(f"{d}/a/b.bin") == b"123" and fs.listdir(f"{d}/a") == ["b.bin"]
    with fs.atomic_folder(f"{d}/folder") as tmp:
        with open(os.path.join(tmp, "x.txt"), "w") as f:
            f.write("x")
    assert fs.walk_files(d) == ["a/b.bin", "folder/x.txt"]
    with fs.open(f"{d}/t.csv", "w", newline="") as f:
        f.write("é,1\r\n")
    with fs.open(f"{d}/t.csv", newline="", encoding="utf-8") as f:
        assert f.read() == "é,1\r\n"
    with pytest.raises(FileNotFoundError):
        fs.open(f"{d}/missing.json").read()
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        fs.check_output(f"{d}/a/b.bin")
    fs.rename(f"{d}/folder", f"{d}/moved")
    assert fs.walk_files(d) == ["a/b.bin", "moved/x.txt", "t.csv"]
    copy = fs.local_copy(f"{d}/a")
    assert not fs.is_remote(copy) and open(os.path.join(copy, "b.bin"), "rb").read() == b"123"
    assert fs.local_copy(f"{d}/a") == copy


def test_sample_with_every_file_in_the_bucket(bucket, tiny_models):
    from animatediff_jax.io.video import read_video
    from animatediff_jax.sample import load_config, sample

    models = f"{BUCKET}/models"
    fs.copytree(tiny_models, models)
    out = f"{BUCKET}/samples/run"
    c = load_config(os.path.join(ROOT, "configs", "sample", f"tiny.py:{models}"), "--config.L=4", "--config.steps=2",
                    "--config.W=32", "--config.H=32", f"--config.output.dir={out}")
    assert c["base_model"] == f"{models}/sd15" and c["lora_model_path"].startswith(models)
    res = sample(c)
    assert res.folder == out and res.frames.shape == (2, 4, 32, 32, 3)
    assert all(f.startswith(out + "/") and fs.isfile(f) for f in res.files), res.files
    names = fs.walk_files(out)
    assert {"config.yaml", "timings.json", "sample.gif", "sample.mp4"} <= set(names), names
    assert read_video(f"{out}/sample/0-a-cat-and-the-dog.mp4").shape == (4, 32, 32, 3)
    with fs.open(f"{out}/timings.json") as f:
        assert json.load(f)["write_s"] >= 0
    # The folder is not empty now: a second run goes next to it, as locally.
    from animatediff_jax.sampling.outputs import output_folder

    assert output_folder(out) == out + "-2"


def test_prepare_then_train_and_resume_in_the_bucket(bucket, tiny_models, capsys):
    from animatediff_jax.checkpoints.params_io import load_params
    from animatediff_jax.data import CachedLatentSource
    from animatediff_jax.io import write_mp4
    from animatediff_jax.prepare import main as prepare
    from animatediff_jax.train import main as train

    models, data = f"{BUCKET}/models", f"{BUCKET}/webvid"
    fs.copytree(tiny_models, models)
    rng = np.random.default_rng(0)
    with fs.open(f"{data}/rows.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        for i in range(4):
            if i != 2:  # row 2 has no video: skipped
                write_mp4(f"{data}/videos/page/{i}.mp4", rng.integers(0, 256, (6, 8, 12, 3), dtype=np.uint8), fps=8)
            w.writerow([str(i), f"clip number {i}", "page"])
    cache = f"{BUCKET}/cache"
    assert prepare(["--model", f"{models}/sd15", "--csv", f"{data}/rows.csv", "--videos", f"{data}/videos",
                    "--out", cache, "--n-frames", "2", "--stride", "2", "--size", "8", "--batch-size", "2",
                    "--num-shards", "2", "--read-threads", "2", "--no-progress", "--distributed", "false"]) == 0
    names = fs.listdir(cache)
    assert {"cache_info.json", "null_text.npz", "shard-00000-of-00002.p000.array_record"} <= set(names), names
    assert not any(".tmp" in n for n in names), names
    src = CachedLatentSource(cache, sample_posterior=False, caption_dropout=0.0)
    assert len(src) == 3 and src.info["skipped"] == 1 and src[0]["latents"].shape[0] == 2

    workdir = f"{BUCKET}/runs/stage2"

    def run(steps):
        return train(["--config", os.path.join(ROOT, "configs", "train", "tiny_stage2.py"),
                      f"--config.workdir={workdir}", f"--config.train.steps={steps}", "--config.checkpoint.every=1",
                      "--config.log.every=1", "--config.model.domain_adapter=", "--config.train.num_frames=2",
                      "--config.train.batch_size=2", "--config.train.resolution=8", "--config.data.source=cache",
                      f"--config.data.cache_dir={cache}", f"--config.model.pretrained={models}/sd15",
                      f"--config.model.motion_module={models}/mm_tiny_v2.safetensors", "--config.model.vae=False",
                      "--config.model.text_encoder=False", "--config.parallel.distributed=false"])

    assert run(2) == 0
    assert run(3) == 0  # finds step 2 in the bucket and goes on
    assert "resumed from step 2" in capsys.readouterr().out
    steps = sorted(int(n) for n in fs.listdir(f"{workdir}/checkpoints") if n.isdigit())
    assert steps == [1, 2, 3]
    assert fs.isfile(f"{workdir}/checkpoints/3/commit_success.txt")  # orbax's gs:// commit marker
    with fs.open(f"{workdir}/metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert any(n.startswith("events.out.tfevents") for n in fs.listdir(f"{workdir}/tensorboard"))
    tree, meta = load_params(f"{workdir}/motion_module.safetensors")
    assert meta["step"] == 3 and tree["unet"]


def test_convert_and_export_in_the_bucket(bucket, tiny_models, capsys):
    from flax.traverse_util import flatten_dict

    from animatediff_jax.checkpoints.load import describe, load_motion
    from animatediff_jax.checkpoints.sd15 import load_sd15
    from animatediff_jax.convert import main as convert
    from animatediff_jax.export import main as export

    models = f"{BUCKET}/models"
    fs.copytree(tiny_models, models)
    converted, adapter = f"{BUCKET}/out/mm.safetensors", f"{BUCKET}/out/mm_diffusers"
    assert convert(["motion", f"{models}/mm_tiny_v2.safetensors", "--out", converted,
                    "--base-config", f"{models}/sd15"]) == 0
    assert export(["motion", converted, "--out", adapter, "--format", "diffusers"]) == 0
    assert sorted(fs.listdir(adapter)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert export(["motion", converted, "--out", adapter, "--format", "diffusers"]) != 0  # no --overwrite
    assert f"{adapter}: exists; pass --overwrite" in capsys.readouterr().err
    assert describe(adapter)[0] == "motion_module"
    base = load_sd15(f"{models}/sd15").unet_config
    a, b = (flatten_dict(load_motion(p, base)[0]) for p in (converted, adapter))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
