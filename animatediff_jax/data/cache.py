"""Encode a clip source once (VAE latents + CLIP text embeddings) into ArrayRecord shards, and read them back.

What is stored: the VAE posterior's *unscaled* `mean` and `logvar` per frame (not a sample),
so training can still draw a fresh posterior sample every epoch, as the original AnimateDiff
does online (`latent_dist.sample() * 0.18215`), or use the mean. This doubles the latent
bytes but keeps the objective identical. Captions are stored uncut (no dropout) with their
token ids and text-encoder output; dropout happens at read time, swapping in the stored
embedding of the empty prompt. Clip sampling (start frame, flip) is fixed at cache time: clip
`c` of a row (`clips_per_video` of them, each its own random start and flip) is the epoch-`c`
clip of that row with the cache `seed`, so clip 0 is the epoch-0 clip.

Layout of `out_dir` (`n` rows, `N` shards, `P` processes):

* `shard-SSSSS-of-NNNNN.pPPP.array_record`: shard `s` holds the rows `[s*n//N, (s+1)*n//N)` in
  order (each row's clips in order; unreadable ones left out), as `np.savez` bytes, and is written
  by process `s mod P`, whose index `PPP` its name carries;
* `<shard>.done.json`: written atomically after the shard's writer closed: its record count,
  rows, and what it was made from (arguments, clip options, a fingerprint of the weights). Only a
  shard with its done file is complete: a restarted `prepare_cache` keeps the complete shards
  made from the same inputs and rewrites the others;
* `null_text.npz`: the empty prompt's `context` / `input_ids`;
* `cache_info.json`, the index, written last, by process 0 once every process is done: the shards
  in row order with their record counts. Readers read only the shards it lists, and it is
  removed when a run starts, so an interrupted run leaves no valid-looking cache.

`out_dir` may be a bucket folder (`gs://...`, `io.fs`); ArrayRecord reads and writes local files
only, so each shard is written to a local temporary file and uploaded whole when complete (then its
done file), and a reader copies the shards its index lists to this host's disk once
(`io.fs.local_copy`: kept under `$ANIMATEDIFF_JAX_LOCAL_CACHE` or the temp dir, reused while the
objects are unchanged). Every host needs room for the whole cache.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import tempfile
import time
import zlib
from typing import Any, Iterator

import jax
import numpy as np

from animatediff_jax.data.webvid import (
    STREAM_LATENT,
    ClipSource,
    Record,
    Skipped,
    drop_caption,
    pixels_to_float,
    record_rng,
)
from animatediff_jax.dtypes import CANONICAL, canonical
from animatediff_jax.io import fs
from animatediff_jax.models.vae import AutoencoderKL, encode_moments

INFO_FILE, NULL_TEXT_FILE, DONE_SUFFIX = "cache_info.json", "null_text.npz", ".done.json"
LATENT_DTYPES = CANONICAL  # by any of their names in animatediff_jax.dtypes (fp16, bf16, half, ...)
_LOG_FIRST, _LOG_EVERY = 10, 100


def serialize(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def deserialize(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@functools.partial(jax.jit, static_argnames=("model", "clip_skip"))
def _encode_ids(model, params: Any, ids: jax.Array, clip_skip: int) -> jax.Array:
    return model.apply({"params": params}, ids, clip_skip)


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to `size` so the last (short) batch reuses the compiled encoder."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def shard_name(shard: int, num_shards: int, process: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.p{process:03d}.array_record"


def shard_rows(shard: int, num_shards: int, n: int) -> tuple[int, int]:
    """Rows `[lo, hi)` of shard `shard` (contiguous, as even as possible)."""
    return shard * n // num_shards, (shard + 1) * n // num_shards


def _store(x: np.ndarray, latent_dtype: str) -> np.ndarray:
    if latent_dtype == "bfloat16":  # np.savez cannot name ml_dtypes' bfloat16: its bits as uint16
        import ml_dtypes

        return np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(x).astype(latent_dtype)


def _fingerprint(params: Any) -> str:
    """crc32 of the shapes of every weight and the values of the small ones (biases, norms):
    different weights give a different fingerprint without reading all of them."""
    crc = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        crc = zlib.crc32(f"{jax.tree_util.keystr(path)}{tuple(np.shape(leaf))}".encode(), crc)
        if np.size(leaf) <= 4096:
            crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes(), crc)
    return f"{crc:08x}"


def _describe(source) -> dict:
    opts = getattr(source, "opts", None)
    return {"type": type(source).__name__, "rows": len(source), "seed": getattr(source, "seed", None),
            "opts": dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else None}


def _write_json(path: str, obj: Any) -> None:
    """Atomically: a temporary file, flushed to disk, renamed over `path` (in a bucket: `fs.atomic_file`)."""
    if fs.is_remote(path):
        with fs.atomic_file(path) as tmp, open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        return
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> Any:
    try:
        with fs.open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove(*paths: str) -> None:
    for p in paths:
        fs.remove(p, missing_ok=True)


@dataclasses.dataclass
class _Fetch:
    """Item `k` -> the clip of `(row, clip)` = `items[k]`, or a `Skipped` marker (picklable for workers)."""

    source: Any
    items: np.ndarray  # int64 [K, 2]: (row, clip)
    seed: int

    def __call__(self, k: int) -> Record | Skipped:
        row, clip = (int(v) for v in self.items[int(k)])
        if isinstance(self.source, ClipSource):  # uint8 through the workers, scaled in the main process
            return self.source.get(row, clip, seed=self.seed, caption_dropout=0.0, pixels="uint8")
        if hasattr(self.source, "get"):
            return self.source.get(row, clip, seed=self.seed, caption_dropout=0.0)
        try:
            return self.source[row]
        except Exception as e:  # noqa: BLE001
            return Skipped(row, f"{type(e).__name__}: {e}")


def _items(shards: list[int], num_shards: int, n: int, clips: int) -> np.ndarray:
    rows = [np.arange(*shard_rows(s, num_shards, n)) for s in shards]
    rows = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
    return np.stack([np.repeat(rows, clips), np.tile(np.arange(clips), len(rows))], axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """What `prepare_cache` encodes and how (its keyword arguments; see its docstring).

    `latent_dtype` takes any name of `animatediff_jax.dtypes` (`fp16`, `bf16`, `half`, ...); the
    cache records its long name."""

    batch_size: int = 8
    num_shards: int | None = None  # default: one per process
    clip_skip: int = 0
    seed: int = 0
    latent_dtype: str = "float32"
    limit: int | None = None
    clips_per_video: int = 1
    read_threads: int = 8
    worker_count: int = 0
    progress: bool = True

    def checked(self, num_proc: int) -> "CacheSettings":
        """These settings with `num_shards` and `latent_dtype` resolved; a `ValueError` naming a bad one."""
        num_shards = num_proc if self.num_shards is None else int(self.num_shards)
        latent_dtype = canonical(self.latent_dtype, "latent_dtype", LATENT_DTYPES)
        if num_shards < num_proc:
            raise ValueError(f"num_shards={num_shards} is fewer than the {num_proc} processes "
                             "(each writes whole shards)")
        if self.batch_size < 1 or self.clips_per_video < 1:
            raise ValueError("batch_size and clips_per_video must be >= 1; "
                             f"got {self.batch_size}, {self.clips_per_video}")
        return dataclasses.replace(self, num_shards=num_shards, latent_dtype=latent_dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One process's view of a cache being written: its folder, rows, shards and what they are made from."""

    out_dir: str
    num_rows: int
    num_shards: int
    num_proc: int
    proc: int
    made_from: dict  # as it reads back from a done file

    @property
    def who(self) -> str:
        return f"[cache p{self.proc}]" if self.num_proc > 1 else "[cache]"

    @property
    def mine(self) -> list[int]:
        """The shards this process writes: `proc, proc + P, ...`."""
        return list(range(self.proc, self.num_shards, self.num_proc))

    def rows(self, shard: int) -> tuple[int, int]:
        return shard_rows(shard, self.num_shards, self.num_rows)

    def paths(self, shard: int, process: int | None = None) -> tuple[str, str]:
        """(the shard, its done file), as written by `process` (default: this one)."""
        path = os.path.join(self.out_dir, shard_name(shard, self.num_shards, self.proc if process is None else process))
        return path, path + DONE_SUFFIX

    def complete(self, shard: int, process: int | None = None) -> dict | None:
        """The done file of `shard` if the shard is there, complete, and made from this run's inputs."""
        path, done = self.paths(shard, process)
        d = _read_json(done)
        ok = isinstance(d, dict) and d.get("made_from") == self.made_from and fs.isfile(path)
        return d if ok and d.get("rows") == list(self.rows(shard)) else None


def _plan(source, vae_params: Any, text_params: Any, out_dir: str | os.PathLike, settings: CacheSettings) -> _Plan:
    """What this run writes, from `settings` (`checked`) and the inputs (the done files' `made_from`);
    creates `out_dir` and, on process 0, removes its index: the cache is invalid until this run completes."""
    num_proc, proc = jax.process_count(), jax.process_index()
    s = settings
    out_dir = os.fspath(out_dir)
    fs.makedirs(out_dir, exist_ok=True)
    if proc == 0:
        _remove(os.path.join(out_dir, INFO_FILE))
    n = len(source) if s.limit is None else min(s.limit, len(source))
    made_from = dict(num_rows=n, num_shards=s.num_shards, clips_per_video=int(s.clips_per_video), seed=int(s.seed),
                     clip_skip=int(s.clip_skip), latent_dtype=s.latent_dtype, source=_describe(source),
                     vae=_fingerprint(vae_params), text_encoder=_fingerprint(text_params))
    return _Plan(out_dir, n, s.num_shards, num_proc, proc, json.loads(json.dumps(made_from)))


def _resume(plan: _Plan) -> list[int]:
    """This process's shards still to write: those without a complete done file from the same inputs
    (an earlier run's complete shards are kept, and said so)."""
    todo = [s for s in plan.mine if plan.complete(s) is None]
    if len(todo) < len(plan.mine):
        print(f"{plan.who} {len(plan.mine) - len(todo)} of this process's {len(plan.mine)} shards are complete "
              "already: kept", flush=True)
    return todo


class _Encoder:
    """The VAE and the text encoder on this process's devices: clips -> records, `batch` clips a call
    (`batch_size` rounded up to a multiple of the devices, split over them; a short batch is padded)."""

    def __init__(self, vae_model: AutoencoderKL, vae_params: Any, text_model, text_params: Any, tokenizer,
                 settings: CacheSettings, devices: list | None):
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        devices = list(jax.local_devices() if devices is None else devices)
        mesh = Mesh(np.asarray(devices, dtype=object), ("data",))
        self.split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        self.batch = -(-int(settings.batch_size) // len(devices)) * len(devices)
        self.vae_params, self.text_params = jax.device_put((vae_params, text_params), whole)
        self.vae_model, self.text_model, self.tokenizer, self.settings = vae_model, text_model, tokenizer, settings

    def null_text(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt's `(context, input_ids)`, what caption dropout swaps in at read time."""
        ids = np.asarray(self.tokenizer([""]), np.int32)
        ctx = np.asarray(_encode_ids(self.text_model, self.text_params, ids, self.settings.clip_skip), np.float32)
        return ctx[0], ids[0]

    def encode(self, pending: list[tuple[int, int, Record]]) -> list[dict[str, np.ndarray]]:
        """The records of `pending` (`(row, clip, record)`, at most `batch`), as the shards store them."""
        s = self.settings
        video = _pad_batch(np.stack([pixels_to_float(r["video"]) for _, _, r in pending]).astype(np.float32),
                           self.batch)
        ids = np.asarray(self.tokenizer([r["text"] for _, _, r in pending]), np.int32)
        ctx = _encode_ids(self.text_model, self.text_params, jax.device_put(_pad_batch(ids, self.batch), self.split),
                          s.clip_skip)
        ctx = np.asarray(ctx, np.float32)
        mean, logvar = jax.device_get(encode_moments(self.vae_model, self.vae_params,
                                                     jax.device_put(video, self.split)))
        out = []
        for j, (row, clip, record) in enumerate(pending):
            rec = {"index": np.int64(row), "mean": _store(mean[j], s.latent_dtype),
                   "logvar": _store(logvar[j], s.latent_dtype), "context": ctx[j], "input_ids": ids[j],
                   "text": np.str_(record["text"])}
            if s.clips_per_video > 1:
                rec["clip"] = np.int64(clip)
            out.append(rec)
        return out


def _open_loader(source, items: np.ndarray, settings: CacheSettings, batch: int):
    """An iterator of the clips of `items` in order (`Record`s or `Skipped`), decoded in
    `read_threads` threads or `worker_count` processes; None when there is nothing to read."""
    if not len(items):
        return None
    import grain

    ds = grain.MapDataset.range(len(items)).map(_Fetch(source, items, int(settings.seed)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=settings.read_threads,
                                              prefetch_buffer_size=max(2 * batch, 16)))
    if settings.worker_count > 0:
        from absl import flags

        # grain's worker processes read absl flags; outside an absl app nobody parsed them: their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.worker_count))
    return iter(it)


class _Clips:
    """`(row, clip, record)` of `items` in order, from `loader`: advances the bar, counts and logs the
    clips that failed to load (`Skipped` records, passed on)."""

    def __init__(self, items: np.ndarray, loader, bar, who: str):
        self.items, self.loader, self.bar, self.who = items, loader, bar, who
        self.next = self.skipped = 0

    def take(self, count: int) -> Iterator[tuple[int, int, Record | Skipped]]:
        from tqdm import tqdm

        for _ in range(count):
            row, clip = (int(v) for v in self.items[self.next])
            self.next += 1
            record = next(self.loader)
            self.bar.update(1)
            if isinstance(record, Skipped):
                self.skipped += 1
                if self.skipped <= _LOG_FIRST or self.skipped % _LOG_EVERY == 0:
                    tqdm.write(f"{self.who} skipped row {row} clip {clip}: {record.reason} ({self.skipped} skipped)")
            yield row, clip, record


def _write_records(writer, records: list[dict[str, np.ndarray]]) -> tuple[list, list]:
    """Appends `records` to an ArrayRecord `writer`; returns their (latent, context) shapes."""
    for rec in records:
        writer.write(serialize(rec))
    return list(records[0]["mean"].shape), list(records[0]["context"].shape)


def _write_shard(plan: _Plan, shard: int, clips: Iterator, encoder: _Encoder, stage: str | None) -> None:
    """Shard `shard` from `clips` (its rows' `(row, clip, record)` in order): the records to a temporary
    file (under `stage` for a bucket: ArrayRecord writes local files), flushed, put in place (uploaded),
    then its done file, atomically. Whatever an earlier run left of it is removed first."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path, done = plan.paths(shard)
    _remove(done, path, path + ".tmp")
    tmp = path + ".tmp" if stage is None else os.path.join(stage, os.path.basename(path) + ".tmp")
    writer = ArrayRecordWriter(tmp, "group_size:1")
    written = skipped = 0
    shapes: tuple[list | None, list | None] = (None, None)
    pending: list[tuple[int, int, Record]] = []
    for row, clip, record in clips:
        if isinstance(record, Skipped):
            skipped += 1
            continue
        pending.append((row, clip, record))
        if len(pending) == encoder.batch:
            shapes = _write_records(writer, encoder.encode(pending))
            written, pending = written + len(pending), []
    if pending:
        shapes = _write_records(writer, encoder.encode(pending))
        written += len(pending)
    writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    fs.put(tmp, path)
    latent, context = shapes
    _write_json(done, dict(shard=os.path.basename(path), records=written, skipped=skipped, rows=list(plan.rows(shard)),
                           latent_shape=latent, context_shape=context, made_from=plan.made_from))


def _finalize(plan: _Plan, settings: CacheSettings, scaling_factor: float) -> dict:
    """The index of a cache every process has finished (they wait for each other here): every shard's
    done file, in row order, must be complete; process 0 writes it, last. Returns it."""
    if plan.num_proc > 1:  # every process's shards are done (and their done files written)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("animatediff_jax.data.cache.prepare_cache")
    shards = []
    for s in range(plan.num_shards):
        d = plan.complete(s, s % plan.num_proc)
        if d is None:
            raise FileNotFoundError(f"{plan.paths(s, s % plan.num_proc)[1]}: missing or from other inputs after every "
                                    "process finished: is the output folder one that every host sees (a shared "
                                    "filesystem)?")
        shards.append(d)
    shape = lambda key: next((d[key] for d in shards if d[key] is not None), None)  # noqa: E731
    info = dict(
        num_records=sum(d["records"] for d in shards),
        skipped=sum(d["skipped"] for d in shards),
        shards=[d["shard"] for d in shards],
        shard_records=[d["records"] for d in shards],
        num_rows=plan.num_rows,
        clips_per_video=int(settings.clips_per_video),
        scaling_factor=float(scaling_factor),
        latent_shape=shape("latent_shape"),
        context_shape=shape("context_shape"),
        latent_dtype=settings.latent_dtype,
        clip_skip=settings.clip_skip,
        seed=settings.seed,
        stores="unscaled VAE posterior mean and logvar; CLIP context; token ids; caption",
    )
    if plan.proc == 0:
        _write_json(os.path.join(plan.out_dir, INFO_FILE), info)
    return info


def prepare_cache(
    source,
    vae_model: AutoencoderKL,
    vae_params: Any,
    text_model,
    text_params: Any,
    tokenizer,
    out_dir: str | os.PathLike,
    settings: CacheSettings | None = None,
    *,
    devices: list | None = None,
    **options: Any,
) -> dict:
    """Encodes the first `limit` rows of `source` (all by default; `clips_per_video` clips each,
    captions kept) into `out_dir`; returns the info dict (the index).

    The settings (a `CacheSettings`, or its fields as keyword arguments `options`): run it in every
    process of a multi-process JAX runtime (`jax.distributed` initialised), all with the same
    arguments and an `out_dir` every process sees: process `p` of `P` writes shards `p, p + P, ...`
    of `num_shards` (default `P`), encoding `batch_size` clips at a time (rounded up to a multiple of
    its local devices, or of `devices`), split over its devices. Decoding runs in `read_threads`
    threads, or `worker_count` processes. Complete shards of an earlier run with the same inputs are
    kept (see the module docstring). Records that fail to load are skipped and counted
    (`info["skipped"]`). `latent_dtype` (float32, float16 or bfloat16, by any name of
    `animatediff_jax.dtypes`) sets how mean/logvar are stored; the text encoder gets the token ids
    from `tokenizer` and `clip_skip` as in `animatediff_jax.text.encode_prompts`; `seed` fixes the
    clips (start frames, flips). `progress`: a bar on process 0.

    The steps: `_plan`, the empty prompt's embedding, `_resume`, `_write_shard` for each
    shard still to write, `_finalize`.
    """
    from tqdm import tqdm

    settings = dataclasses.replace(settings or CacheSettings(), **options).checked(jax.process_count())
    plan = _plan(source, vae_params, text_params, out_dir, settings)
    encoder = _Encoder(vae_model, vae_params, text_model, text_params, tokenizer, settings, devices)
    null_ctx, null_ids = encoder.null_text()
    if plan.proc == 0:
        with fs.atomic_file(os.path.join(plan.out_dir, NULL_TEXT_FILE)) as tmp, open(tmp, "wb") as f:
            np.savez(f, context=null_ctx, input_ids=null_ids)
    todo = _resume(plan)
    items = _items(todo, plan.num_shards, plan.num_rows, settings.clips_per_video)
    t0 = time.time()
    mine_clips = sum(hi - lo for lo, hi in map(plan.rows, plan.mine)) * settings.clips_per_video
    bar = tqdm(total=int(mine_clips), initial=int(mine_clips - len(items)), unit="clip", dynamic_ncols=True,
               desc="prepare" + (f" (process 0 of {plan.num_proc})" if plan.num_proc > 1 else ""),
               disable=not settings.progress or plan.proc != 0)
    loader = _open_loader(source, items, settings, encoder.batch)
    clips = _Clips(items, loader, bar, plan.who)
    stage = tempfile.mkdtemp(prefix="animatediff-jax-cache-") if fs.is_remote(plan.out_dir) else None
    try:
        for s in todo:
            lo, hi = plan.rows(s)
            _write_shard(plan, s, clips.take((hi - lo) * settings.clips_per_video), encoder, stage)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        bar.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    info = _finalize(plan, settings, vae_model.config.scaling_factor)
    if plan.proc == 0:
        print(f"[cache] wrote {info['num_records']} records ({info['skipped']} skipped) in {plan.num_shards} shard(s) "
              f"to {plan.out_dir}; this run encoded {len(items) - clips.skipped} clips in {time.time() - t0:.1f}s",
              flush=True)
    return info


class CachedLatentSource:
    """Records of a `prepare_cache` directory: `{"latents", "context", "input_ids", "text"}`.

    `latents` float32 `[F, h, w, C]` are scaled by the VAE's scaling factor: a posterior sample
    (noise from the record RNG `(seed, index, epoch)`) when `sample_posterior`, else the mean.
    With probability `caption_dropout` (deterministic per record and epoch) the caption is
    replaced by the empty prompt's text, ids and embedding.
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, sample_posterior: bool = True, caption_dropout: float = 0.1, seed: int = 0
    ):
        from grain.sources import ArrayRecordDataSource

        out_dir = os.fspath(out_dir)
        info_path = os.path.join(out_dir, INFO_FILE)
        if not fs.exists(info_path):
            raise FileNotFoundError(f"{out_dir}: no {INFO_FILE}; run prepare_cache (an interrupted run leaves none)")
        with fs.open(info_path) as f:
            self.info = json.load(f)
        # ArrayRecord reads local files: a cache in a bucket is copied to this host once.
        local = fs.local_copy(out_dir, [*self.info["shards"], NULL_TEXT_FILE])
        self._records = ArrayRecordDataSource([os.path.join(local, s) for s in self.info["shards"]])
        with np.load(os.path.join(local, NULL_TEXT_FILE)) as z:
            self.null_context, self.null_input_ids = z["context"], z["input_ids"]
        self.scaling_factor = float(self.info["scaling_factor"])
        self.sample_posterior, self.caption_dropout, self.seed = sample_posterior, float(caption_dropout), int(seed)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self.get(int(index))

    def raw(self, index: int) -> dict[str, np.ndarray]:
        """The stored arrays of record `index` (`mean`, `logvar` unscaled, in the cache's `latent_dtype`;
        `index` is the source's row, `clip` its clip number when there are several per row)."""
        r = deserialize(self._records[index])
        if self.info.get("latent_dtype") == "bfloat16":
            import ml_dtypes

            r["mean"], r["logvar"] = r["mean"].view(ml_dtypes.bfloat16), r["logvar"].view(ml_dtypes.bfloat16)
        return r

    def get(
        self, index: int, epoch: int = 0, *, seed: int | None = None, caption_dropout: float | None = None
    ) -> Record | Skipped:
        seed = self.seed if seed is None else int(seed)
        p = self.caption_dropout if caption_dropout is None else caption_dropout
        try:
            r = self.raw(index)
        except Exception as e:
            self.skipped += 1
            return Skipped(index, f"{type(e).__name__}: {e}")
        mean = r["mean"].astype(np.float32)
        if self.sample_posterior:
            eps = record_rng(seed, index, epoch, STREAM_LATENT).standard_normal(mean.shape, dtype=np.float32)
            mean = mean + np.exp(0.5 * r["logvar"].astype(np.float32)) * eps
        out = {
            "latents": (mean * np.float32(self.scaling_factor)).astype(np.float32),
            "context": r["context"],
            "input_ids": r["input_ids"],
            "text": str(r["text"]),
        }
        if drop_caption(seed, index, epoch, p):
            out.update(context=self.null_context, input_ids=self.null_input_ids, text="")
        return out
