"""Data sources, the grain pipeline (sharding, resume) and the latent cache, checked value by value."""

import csv
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from animatediff_jax.data import (
    CachedLatentSource,
    ClipSource,
    Skipped,
    SyntheticVideoSource,
    TFDSSource,
    WebVidSource,
    make_dataset,
    prepare_cache,
)
from animatediff_jax.data.pipeline import shuffled_index
from animatediff_jax.data.synthetic import COLOURS, DIRECTIONS
from animatediff_jax.data.webvid import (
    STREAM_CLIP,
    ClipOptions,
    drop_caption,
    make_clip,
    record_rng,
    resize_center_crop,
    sample_clip_indices,
)
from animatediff_jax.io import write_mp4

GRAY0, GRAY_STEP = 10, 6  # frame t of a test video is flat gray GRAY0 + GRAY_STEP * t


def gray_video(n_frames, h=16, w=24):
    values = GRAY0 + GRAY_STEP * np.arange(n_frames)
    return np.broadcast_to(values[:, None, None, None], (n_frames, h, w, 3)).astype(np.uint8)


def frame_ids(video):
    """Frame numbers back from a decoded clip in [-1, 1] (gray level of the frame's center)."""
    level = (np.asarray(video)[:, :, :, 0].mean(axis=(1, 2)) + 1.0) * 127.5
    return np.round((level - GRAY0) / GRAY_STEP).astype(int)


class IndexSource(ClipSource):
    """Record i is a 1-pixel 'video' holding i: makes shuffling and sharding checkable."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def __len__(self):
        return self.n

    def _load(self, index, epoch, seed):
        if index % 7 == 3 and getattr(self, "broken", False):
            raise OSError("corrupt")
        return {"video": np.full((1,), index, np.int64), "text": f"clip {index}"}


def ids_of(batch):
    return batch["video"][:, 0].tolist()


# ------------------------------------------------------------------------------- clip sampling


def test_clip_indices_follow_original_linspace():
    for num_frames, n, stride in [(100, 16, 4), (61, 16, 4), (30, 16, 4), (16, 16, 1), (5, 4, 3)]:
        for seed in range(5):
            idx = sample_clip_indices(num_frames, n, stride, np.random.default_rng(seed))
            clip_length = min(num_frames, (n - 1) * stride + 1)
            start = idx[0]
            assert 0 <= start <= num_frames - clip_length
            np.testing.assert_array_equal(idx, np.linspace(start, start + clip_length - 1, n, dtype=int))
            # The start is drawn uniformly from [0, num_frames - clip_length].
            assert start == np.random.default_rng(seed).integers(0, num_frames - clip_length + 1)
    starts = {sample_clip_indices(100, 16, 4, np.random.default_rng(s))[0] for s in range(200)}
    assert min(starts) == 0 and max(starts) == 100 - 61 and len(starts) > 30
    one = [sample_clip_indices(10, 16, 4, np.random.default_rng(s), is_image=True) for s in range(100)]
    assert all(len(i) == 1 for i in one) and {int(i[0]) for i in one} == set(range(10))


def test_resize_and_center_crop_match_numpy_reference():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    # Shorter side already equals `size`: no resampling, the crop is plain slicing.
    np.testing.assert_array_equal(resize_center_crop(frames, 20), frames[:, :, 5:25])
    tall = frames.transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(resize_center_crop(tall, 20), tall[:, 5:25])
    # Odd margins round like torchvision's CenterCrop: (31 - 20) / 2 = 5.5 -> 6.
    frames31 = rng.integers(0, 256, (2, 20, 31, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(frames31, 20), frames31[:, :, 6:26])
    # Downscaling: shorter side -> size, longer side truncated (torchvision Resize(int)); compare
    # with torch's antialiased bilinear interpolation (torchvision's tensor Resize) within a level.
    import torch

    smooth = (127.5 + 100 * np.sin(np.linspace(0, 3, 48))[None, :, None] * np.cos(np.linspace(0, 2, 40))[:, None, None])
    smooth = np.repeat(smooth[None], 2, 0).repeat(3, -1).astype(np.uint8)  # [2, 40, 48, 3]
    ours = resize_center_crop(smooth, 16)
    x = torch.from_numpy(smooth).permute(0, 3, 1, 2).double()
    ref = torch.nn.functional.interpolate(x, size=(16, 19), mode="bilinear", antialias=True, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).numpy()
    ref = np.clip(np.round(ref), 0, 255)[:, :, 2:18]  # int(16 * 48 / 40) = 19 wide, crop left round(1.5) = 2
    assert ours.shape == (2, 16, 16, 3)
    err = np.abs(ours.astype(np.float64) - ref)
    assert err.mean() < 0.5 and err.max() <= 2, (err.mean(), err.max())


def test_make_clip_crops_flips_and_scales():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (40, 20, 26, 3), dtype=np.uint8)
    opts = ClipOptions(n_frames=5, stride=3, size=20)
    flips = 0
    for seed in range(40):
        clip = make_clip(40, lambda idx: frames[idx], opts, np.random.default_rng(seed))
        idx = sample_clip_indices(40, 5, 3, np.random.default_rng(seed))
        expected = frames[idx][:, :, 3:23].astype(np.float32) / 127.5 - 1.0
        if np.array_equal(clip, expected):
            continue
        np.testing.assert_array_equal(clip, expected[:, :, ::-1])  # the only other option: flipped left-right
        flips += 1
    assert 10 <= flips <= 30
    no_flip = ClipOptions(n_frames=5, stride=3, size=20, flip=False)
    for seed in range(10):
        clip = make_clip(40, lambda idx: frames[idx], no_flip, np.random.default_rng(seed))
        idx = sample_clip_indices(40, 5, 3, np.random.default_rng(seed))
        np.testing.assert_array_equal(clip, frames[idx][:, :, 3:23].astype(np.float32) / 127.5 - 1.0)


def test_caption_dropout_rate_and_determinism():
    decisions = [drop_caption(3, i, 0, 0.1) for i in range(4000)]
    assert decisions == [drop_caption(3, i, 0, 0.1) for i in range(4000)]
    assert 0.08 < np.mean(decisions) < 0.12
    assert decisions != [drop_caption(3, i, 1, 0.1) for i in range(4000)]  # varies with the epoch
    assert not any(drop_caption(3, i, 0, 0.0) for i in range(100))
    src = SyntheticVideoSource(200, n_frames=2, size=8, caption_dropout=0.5, seed=4)
    texts = [src.get(i, 2, seed=9)["text"] for i in range(200)]
    assert [t == "" for t in texts] == [drop_caption(9, i, 2, 0.5) for i in range(200)]
    assert all(t.startswith("a ") for t in texts if t)


# ------------------------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def webvid(tmp_path_factory):
    """A WebVid CSV over: a 40-frame video, one in a page_dir subfolder, a missing one, junk, a too-short one."""
    root = tmp_path_factory.mktemp("webvid")
    videos = root / "videos"
    (videos / "page7").mkdir(parents=True)
    write_mp4(videos / "100.mp4", gray_video(40), fps=8)
    write_mp4(videos / "page7" / "200.mp4", gray_video(30, h=24, w=16), fps=8)
    (videos / "300.mp4").write_bytes(b"\x00garbage" * 64)
    write_mp4(videos / "500.mp4", gray_video(3), fps=8)
    rows = [("100", "a gray fade", "page1"), ("200", "another fade, with a comma", "page7"),
            ("400", "missing file", "page1"), ("300", "junk bytes", "page1"), ("500", "too short", "page1")]
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for vid, name, page in rows:
            w.writerow([vid, f"https://example/{vid}.mp4", "PT00H00M10S", page, name])
    return root / "results.csv", videos


def test_webvid_clips_are_the_linspace_frames(webvid):
    csv_path, videos = webvid
    src = WebVidSource(csv_path, videos, n_frames=4, stride=3, size=16, caption_dropout=0.0, seed=5)
    assert len(src) == 5 and src.caption(1) == "another fade, with a comma"
    for index, num in [(0, 40), (1, 30)]:
        for epoch in range(3):
            rec = src.get(index, epoch)
            assert rec["video"].shape == (4, 16, 16, 3) and rec["video"].dtype == np.float32
            start = record_rng(5, index, epoch, STREAM_CLIP).integers(0, num - 10 + 1)
            np.testing.assert_array_equal(frame_ids(rec["video"]), np.linspace(start, start + 9, 4, dtype=int))
            np.testing.assert_array_equal(rec["video"], src.get(index, epoch)["video"])  # deterministic
        assert rec["text"] == src.caption(index)
    image = WebVidSource(csv_path, videos, n_frames=4, stride=3, size=16, is_image=True, caption_dropout=0.0)
    got = {int(frame_ids(image.get(0, e)["video"])[0]) for e in range(30)}
    assert all(image.get(0, e)["video"].shape == (1, 16, 16, 3) for e in range(2))
    assert len(got) > 10 and got <= set(range(40))


def test_webvid_bad_videos_are_skipped_not_raised(webvid):
    csv_path, videos = webvid
    src = WebVidSource(csv_path, videos, n_frames=4, stride=3, size=16, caption_dropout=0.0)
    out = [src[i] for i in range(5)]
    assert [isinstance(r, Skipped) for r in out] == [False, False, True, True, True]
    assert "FileNotFoundError" in out[2].reason and "VideoReadError" in out[3].reason and "3 frames" in out[4].reason
    assert src.skipped == 3
    pipe = make_dataset(src, global_batch_size=2, seed=0, num_epochs=2, shard_index=0, shard_count=1)
    batches = list(pipe)
    assert len(batches) == 2 and pipe.skipped == 6  # 2 good records x 2 epochs; 3 bad ones x 2 epochs
    texts = sorted(t for b in batches for t in b["text"].tolist())
    assert texts == sorted(["a gray fade", "another fade, with a comma"] * 2)
    kept = WebVidSource(csv_path, videos, n_frames=4, stride=3, size=16, drop_missing=True)
    assert len(kept) == 4  # the row without a file is gone up front


def test_webvid_recounts_when_the_container_overstates_frames(webvid, monkeypatch):
    """A header frame count larger than what decodes: recount by decoding, then sample within it."""
    import animatediff_jax.data.webvid as webvid_mod

    csv_path, videos = webvid
    real = webvid_mod.count_frames
    overstated = lambda path, decode=False: real(path, decode) + (0 if decode else 500)  # noqa: E731
    monkeypatch.setattr(webvid_mod, "count_frames", overstated)
    src = WebVidSource(csv_path, videos, n_frames=4, stride=3, size=16, caption_dropout=0.0, seed=5)
    recounted = 0
    for epoch in range(6):
        ids = frame_ids(src.get(0, epoch)["video"])
        first = record_rng(5, 0, epoch, STREAM_CLIP).integers(0, 540 - 10 + 1)  # from the header's count
        start = first if first + 9 < 40 else record_rng(5, 0, epoch, STREAM_CLIP).integers(0, 40 - 10 + 1)
        recounted += start != first
        np.testing.assert_array_equal(ids, np.linspace(start, start + 9, 4, dtype=int))
    assert recounted >= 4


def test_synthetic_source_draws_what_it_says():
    src = SyntheticVideoSource(12, n_frames=6, size=32, seed=3, caption_dropout=0.0)
    for i in range(12):
        rec, d = src[i], src.describe(i)
        assert rec["text"] == f"a {d['colour']} square moving {d['direction']}"
        video = np.round((rec["video"] + 1) * 127.5).astype(np.uint8)
        dy, dx = DIRECTIONS[d["direction"]]
        for t in range(6):
            y, x = d["start"][0] + dy * d["speed"] * t, d["start"][1] + dx * d["speed"] * t
            mask = np.zeros((32, 32), bool)
            mask[y : y + d["side"], x : x + d["side"]] = True
            assert (video[t][mask] == COLOURS[d["colour"]]).all() and (video[t][~mask] == 20).all()
        np.testing.assert_array_equal(rec["video"], src[i]["video"])
    assert len({src[i]["text"] for i in range(12)}) > 3
    img = SyntheticVideoSource(4, n_frames=6, size=32, seed=3, is_image=True)
    frame = img.get(2, 1)["video"]
    assert frame.shape == (1, 32, 32, 3)
    assert any(np.array_equal(frame[0], src[2]["video"][t]) for t in range(6))


def _fake_tfds(monkeypatch, examples):
    fake = types.ModuleType("tensorflow_datasets")
    calls = []

    def data_source(name, split, **kw):
        calls.append((name, split, kw))
        return examples

    fake.data_source = data_source
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    return calls


def test_tfds_source_samples_clips_from_decoded_examples(monkeypatch):
    rng = np.random.default_rng(0)
    vids = [rng.integers(0, 256, (12, 16, 20, 3), dtype=np.uint8), rng.integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)]
    examples = [{"video": vids[0], "meta": {"caption": b"a cat"}}, {"video": vids[1], "meta": {"caption": b"short"}}]
    calls = _fake_tfds(monkeypatch, examples)
    src = TFDSSource("my_videos:1.0.0", "train", n_frames=3, stride=2, size=16, caption_key="meta/caption",
                     data_dir="/data", caption_dropout=0.0, flip=False, seed=2)
    assert calls == [("my_videos:1.0.0", "train", {"data_dir": "/data"})] and len(src) == 2
    rec = src.get(0, 1)
    idx = sample_clip_indices(12, 3, 2, record_rng(2, 0, 1, STREAM_CLIP))
    np.testing.assert_array_equal(rec["video"], vids[0][idx][:, :, 2:18].astype(np.float32) / 127.5 - 1.0)
    assert rec["text"] == "a cat"
    assert isinstance(src[1], Skipped) and "2 frames" in src[1].reason


def test_tfds_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        TFDSSource("anything")


def test_tfds_real_package_reads_a_mock_dataset():
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is an optional extra, not installed")

    class TinyClips(tfds.core.GeneratorBasedBuilder):  # a uint8 Tensor video feature reads without TensorFlow
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "video": tfds.features.Tensor(shape=(6, 20, 24, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {}

    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        src = TFDSSource("tiny_clips", "train", n_frames=2, stride=2, size=20, caption_dropout=0.0, flip=False, seed=1)
        raw = tfds.data_source("tiny_clips", split="train")
        assert len(src) == 3
        for i in range(3):
            rec = src.get(i, 1)
            assert not isinstance(rec, Skipped), rec
            idx = sample_clip_indices(6, 2, 2, record_rng(1, i, 1, STREAM_CLIP))
            expected = raw[i]["video"][idx][:, :, 2:22].astype(np.float32) / 127.5 - 1.0
            np.testing.assert_array_equal(rec["video"], expected)
            assert rec["text"] == raw[i]["caption"]


# ------------------------------------------------------------------------------------ pipeline


def test_pipeline_epochs_are_permutations_and_deterministic():
    src = IndexSource(10)
    pipe = make_dataset(src, global_batch_size=5, seed=7, num_epochs=3, shard_index=0, shard_count=1)
    got = [i for b in pipe for i in ids_of(b)]
    assert len(got) == 30
    epochs = [got[e * 10 : (e + 1) * 10] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    assert epochs[1] == [shuffled_index(p, 10, 7, 1) for p in range(10)]
    again = make_dataset(src, global_batch_size=5, seed=7, num_epochs=3, shard_index=0, shard_count=1)
    assert [i for b in again for i in ids_of(b)] == got
    ordered = make_dataset(src, global_batch_size=5, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    assert [i for b in ordered for i in ids_of(b)] == list(range(10))
    # drop_remainder: 10 records in batches of 4 -> 2 batches, or 3 with the short one kept.
    sizes = lambda **kw: [len(b["text"]) for b in make_dataset(  # noqa: E731
        src, global_batch_size=4, num_epochs=1, shard_index=0, shard_count=1, **kw)]
    assert sizes() == [4, 4] and sizes(drop_remainder=False) == [4, 4, 2]


def test_pipeline_shards_are_disjoint_and_make_up_the_global_batch():
    src = IndexSource(24)
    full = list(make_dataset(src, global_batch_size=6, seed=1, num_epochs=1, shard_index=0, shard_count=1))
    shards = [list(make_dataset(src, global_batch_size=6, seed=1, num_epochs=1, shard_index=p, shard_count=2))
              for p in range(2)]
    assert all(len(s) == 4 and all(len(b["text"]) == 3 for b in s) for s in shards)  # 6 // 2 per process per step
    ex = [[i for b in s for i in ids_of(b)] for s in shards]
    assert set(ex[0]).isdisjoint(ex[1]) and sorted(ex[0] + ex[1]) == list(range(24))
    for step in range(4):  # step s of the two processes together is step s of the unsharded pipeline
        assert sorted(ids_of(shards[0][step]) + ids_of(shards[1][step])) == sorted(ids_of(full[step]))
    with pytest.raises(ValueError, match="multiple"):
        make_dataset(src, global_batch_size=5, shard_index=0, shard_count=2)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_pipeline_resume_from_state_gives_the_same_batches():
    src = SyntheticVideoSource(7, n_frames=3, size=16, caption_dropout=0.3, is_image=False)
    make = lambda: make_dataset(src, global_batch_size=4, seed=3, shard_index=1, shard_count=2, read_threads=2)
    it = iter(make())
    _take(it, 3)  # crosses an epoch boundary: 7 records, 2 per step for this process
    state = it.get_state()
    state = json.loads(json.dumps(state))  # survives a round trip through a checkpoint file
    expected = _take(it, 6)
    resumed = iter(make())
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 6), expected)
    straight = iter(make())
    _assert_batches_equal(_take(straight, 9)[3:], expected)


def test_pipeline_workers_give_the_same_batches_and_resume():
    src = IndexSource(19, caption_dropout=0.2)
    src.broken = True  # records 3, 10, 17 fail to load: dropped and counted in the main process
    ref_pipe = make_dataset(src, global_batch_size=4, seed=2, num_epochs=1, shard_index=0, shard_count=1)
    ref = list(ref_pipe)
    assert ref_pipe.skipped == 3 and len(ref) == 4
    assert sorted(i for b in ref for i in ids_of(b)) == [i for i in range(19) if i % 7 != 3]  # 16 = 4 full batches
    pipe = make_dataset(src, global_batch_size=4, seed=2, num_epochs=1, shard_index=0, shard_count=1, worker_count=2)
    it = iter(pipe)
    first = _take(it, 2)
    state = it.get_state()
    rest = list(it)
    _assert_batches_equal(first + rest, ref)
    assert pipe.skipped == 3
    it2 = iter(pipe)
    it2.set_state(state)
    _assert_batches_equal(list(it2), rest)
    it.close()  # ends the worker processes now rather than at garbage collection
    it2.close()


def test_pipeline_tokenizes_captions():
    def tok(texts):  # a stand-in tokenizer: 77 ids per prompt
        return np.array([[len(t)] + [ord(c) for c in t[:76]] + [0] * (76 - len(t[:76])) for t in texts], np.int32)

    src = SyntheticVideoSource(6, n_frames=2, size=8, caption_dropout=0.5)
    batch = next(iter(make_dataset(src, global_batch_size=6, seed=0, shard_index=0, shard_count=1, tokenizer=tok)))
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (6, 77)
    np.testing.assert_array_equal(batch["input_ids"], tok(batch["text"].tolist()))
    assert "" in batch["text"].tolist()


# ------------------------------------------------------------------------------------ cache


def _tiny_tokenizer(folder):
    from animatediff_jax.testing.tiny import write_tiny_tokenizer
    from animatediff_jax.text import Tokenizer

    write_tiny_tokenizer(folder)
    return Tokenizer(folder)


def test_cache_roundtrip_matches_direct_encoding(tmp_path):
    from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from animatediff_jax.models.vae import AutoencoderKL, VAEConfig, encode_video

    tok = _tiny_tokenizer(tmp_path / "tok")
    vae = AutoencoderKL(VAEConfig.tiny())
    vae_params = vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    clip = CLIPTextModel(CLIPTextConfig.tiny())
    clip_params = clip.init(jax.random.PRNGKey(1), jnp.zeros((1, 77), jnp.int32))["params"]
    src = SyntheticVideoSource(5, n_frames=3, size=16, seed=1, caption_dropout=0.5)
    out = tmp_path / "cache"
    info = prepare_cache(src, vae, vae_params, clip, clip_params, tok, out, batch_size=2, num_shards=2)
    assert info["num_records"] == 5 and info["skipped"] == 0 and info["shard_records"] == [2, 3]
    assert len(os.listdir(out)) == 6  # 2 shards + their done files, null_text.npz, cache_info.json
    assert info["latent_shape"] == [3, 8, 8, 4] and info["context_shape"] == [77, 32]

    cached = CachedLatentSource(out, sample_posterior=False, caption_dropout=0.0)
    assert len(cached) == 5
    by_index = {int(cached.raw(k)["index"]): k for k in range(5)}
    assert sorted(by_index) == list(range(5))
    # Encode directly, batched as the cache batches (pairs in index order, the last padded with
    # zeros) so the compiled convolutions see the same shapes: the stored values must be exact.
    truth = [src.get(i, 0, caption_dropout=0.0) for i in range(5)]  # the cache keeps every caption
    vae_encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
    clip_apply = jax.jit(lambda p, ids: clip.apply({"params": p}, ids))
    for b in range(0, 5, 2):
        recs = truth[b : b + 2]
        frames = np.stack([r["video"] for r in recs] + [np.zeros_like(recs[0]["video"])] * (2 - len(recs)))
        mean, logvar = vae_encode(vae_params, jnp.asarray(frames.reshape(-1, 16, 16, 3)))
        mean, logvar = np.asarray(mean).reshape(2, 3, 8, 8, 4), np.asarray(logvar).reshape(2, 3, 8, 8, 4)
        direct = np.asarray(encode_video(vae, vae_params, jnp.asarray(frames)))  # = mean * scaling_factor
        ids = tok([r["text"] for r in recs])
        ctx = np.asarray(clip_apply(clip_params, np.concatenate([ids, np.zeros((2 - len(recs), 77), np.int32)])))
        for k, r in enumerate(recs):
            i = b + k
            rec, raw = cached[by_index[i]], cached.raw(by_index[i])
            assert rec["text"] == r["text"] and r["text"]
            np.testing.assert_array_equal(raw["mean"], mean[k])
            np.testing.assert_array_equal(raw["logvar"], logvar[k])
            np.testing.assert_array_equal(rec["input_ids"], ids[k])
            np.testing.assert_array_equal(rec["context"], ctx[k])
            np.testing.assert_allclose(rec["latents"], direct[k], rtol=1e-6, atol=1e-7)
            assert np.abs(rec["latents"]).max() > 1e-3 and np.abs(rec["context"]).max() > 0.1

    # Reading with dropout and posterior sampling: the empty prompt's stored embedding, and
    # latents = (mean + exp(logvar / 2) * eps) * scale with eps from the record RNG.
    null_ctx = np.asarray(clip_apply(clip_params, tok([""])))[0]
    sampled = CachedLatentSource(out, sample_posterior=True, caption_dropout=0.5, seed=4)
    n_dropped = 0
    for k in range(5):
        rec, raw = sampled.get(k, 3), cached.raw(k)
        eps = record_rng(4, k, 3, 2).standard_normal(raw["mean"].shape, dtype=np.float32)
        expected = (raw["mean"] + np.exp(0.5 * raw["logvar"]) * eps) * np.float32(0.18215)
        np.testing.assert_array_equal(rec["latents"], expected.astype(np.float32))
        if drop_caption(4, k, 3, 0.5):
            n_dropped += 1
            assert rec["text"] == "" and np.array_equal(rec["input_ids"], tok([""])[0])
            np.testing.assert_allclose(rec["context"], null_ctx, rtol=1e-6, atol=1e-6)
        else:
            assert rec["text"] == str(raw["text"])
    assert 0 < n_dropped < 5

    batch = next(iter(make_dataset(sampled, global_batch_size=4, seed=0, shard_index=0, shard_count=1)))
    assert batch["latents"].shape == (4, 3, 8, 8, 4) and batch["context"].shape == (4, 77, 32)
    assert batch["input_ids"].dtype == np.int32 and batch["text"].shape == (4,)


def test_cache_without_info_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_cache"):
        CachedLatentSource(tmp_path)


def test_pipeline_with_nothing_readable_raises_instead_of_spinning(webvid, tmp_path):
    from animatediff_jax.data import NoReadableData

    csv_path, _ = webvid
    src = WebVidSource(csv_path, tmp_path / "wrong_folder", n_frames=4, stride=3, size=16)
    with pytest.raises(NoReadableData, match="wrong_folder") as e:
        next(iter(make_dataset(src, global_batch_size=2, seed=0, shard_index=0, shard_count=1, read_threads=1)))
    assert "tried" in str(e.value) and ".mp4" in str(e.value)
    # A limit below two passes: 3 bad records in a row are enough to stop.
    src = WebVidSource(csv_path, tmp_path / "wrong_folder", n_frames=4, stride=3, size=16)
    pipe = make_dataset(src, global_batch_size=2, seed=0, shard_index=0, shard_count=1, max_skips_in_a_row=3)
    with pytest.raises(NoReadableData, match="last 3 records"):
        next(iter(pipe))
    assert pipe.skipped == 3
