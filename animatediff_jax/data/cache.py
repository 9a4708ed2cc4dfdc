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
from typing import Any

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
from animatediff_jax.io import fs
from animatediff_jax.models.vae import AutoencoderKL, encode_moments

INFO_FILE, NULL_TEXT_FILE, DONE_SUFFIX = "cache_info.json", "null_text.npz", ".done.json"
LATENT_DTYPES = ("float32", "float16", "bfloat16")
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


def prepare_cache(
    source,
    vae_model: AutoencoderKL,
    vae_params: Any,
    text_model,
    text_params: Any,
    tokenizer,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    num_shards: int | None = None,
    *,
    clip_skip: int = 0,
    seed: int = 0,
    latent_dtype: str = "float32",
    limit: int | None = None,
    clips_per_video: int = 1,
    read_threads: int = 8,
    worker_count: int = 0,
    devices: list | None = None,
    progress: bool = True,
) -> dict:
    """Encodes the first `limit` rows of `source` (all by default; `clips_per_video` clips each,
    captions kept) into `out_dir`; returns the info dict (the index).

    Run it in every process of a multi-process JAX runtime (`jax.distributed` initialised), all
    with the same arguments and an `out_dir` every process sees: process `p` of `P` writes shards
    `p, p + P, ...` of `num_shards` (default `P`), encoding `batch_size` clips at a time (rounded
    up to a multiple of its local devices, or of `devices`), split over its devices. Decoding runs
    in `read_threads` threads, or `worker_count` processes. Complete shards of an earlier run
    with the same inputs are kept (see the module docstring). Records that fail to load are
    skipped and counted (`info["skipped"]`). `latent_dtype` ("float32", "float16" or "bfloat16")
    sets how mean/logvar are stored; the text encoder gets the token ids from `tokenizer` and
    `clip_skip` as in `animatediff_jax.text.encode_prompts`. `progress`: a bar on process 0.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    num_proc, proc = jax.process_count(), jax.process_index()
    num_shards = num_proc if num_shards is None else int(num_shards)
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {', '.join(LATENT_DTYPES)}; got {latent_dtype!r}")
    if num_shards < num_proc:
        raise ValueError(f"num_shards={num_shards} is fewer than the {num_proc} processes (each writes whole shards)")
    if batch_size < 1 or clips_per_video < 1:
        raise ValueError(f"batch_size and clips_per_video must be >= 1; got {batch_size}, {clips_per_video}")
    out_dir = os.fspath(out_dir)
    fs.makedirs(out_dir, exist_ok=True)
    info_path = os.path.join(out_dir, INFO_FILE)
    if proc == 0:
        _remove(info_path)  # the cache is invalid until this run completes
    n = len(source) if limit is None else min(limit, len(source))
    made_from = dict(num_rows=n, num_shards=num_shards, clips_per_video=int(clips_per_video), seed=int(seed),
                     clip_skip=int(clip_skip), latent_dtype=latent_dtype, source=_describe(source),
                     vae=_fingerprint(vae_params), text_encoder=_fingerprint(text_params))
    made_from = json.loads(json.dumps(made_from))  # as it reads back from a done file

    devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.asarray(devices, dtype=object), ("data",))
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    batch = -(-int(batch_size) // len(devices)) * len(devices)
    vae_params, text_params = jax.device_put((vae_params, text_params), whole)

    null_ids = np.asarray(tokenizer([""]), np.int32)
    null_ctx = np.asarray(_encode_ids(text_model, text_params, null_ids, clip_skip), np.float32)
    if proc == 0:
        with fs.atomic_file(os.path.join(out_dir, NULL_TEXT_FILE)) as tmp, open(tmp, "wb") as f:
            np.savez(f, context=null_ctx[0], input_ids=null_ids[0])

    def paths(s: int, p: int | None = None) -> tuple[str, str]:
        path = os.path.join(out_dir, shard_name(s, num_shards, proc if p is None else p))
        return path, path + DONE_SUFFIX

    def complete(s: int, p: int | None = None) -> dict | None:
        path, done = paths(s, p)
        d = _read_json(done)
        ok = isinstance(d, dict) and d.get("made_from") == made_from and fs.isfile(path)
        return d if ok and d.get("rows") == list(shard_rows(s, num_shards, n)) else None

    mine = list(range(proc, num_shards, num_proc))
    todo = [s for s in mine if complete(s) is None]
    items = _items(todo, num_shards, n, clips_per_video)
    who = f"[cache p{proc}]" if num_proc > 1 else "[cache]"
    if len(todo) < len(mine):
        print(f"{who} {len(mine) - len(todo)} of this process's {len(mine)} shards are complete already: kept",
              flush=True)
    t0 = time.time()
    mine_clips = sum(hi - lo for lo, hi in (shard_rows(s, num_shards, n) for s in mine)) * clips_per_video
    bar = tqdm(total=int(mine_clips), initial=int(mine_clips - len(items)), unit="clip", dynamic_ncols=True,
               desc="prepare" + (f" (process 0 of {num_proc})" if num_proc > 1 else ""),
               disable=not progress or proc != 0)
    loader = None
    if len(items):
        import grain

        ds = grain.MapDataset.range(len(items)).map(_Fetch(source, items, int(seed)))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch, 16)))
        if worker_count > 0:
            from animatediff_jax.data.pipeline import _absl_flags_parsed

            _absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        loader = iter(it)
    skipped_here = 0

    def encode(pending: list[tuple[int, int, Record]], writer) -> tuple[list, list]:
        video = _pad_batch(np.stack([pixels_to_float(r["video"]) for _, _, r in pending]).astype(np.float32), batch)
        texts = [r["text"] for _, _, r in pending]
        ids = np.asarray(tokenizer(texts), np.int32)
        ctx = np.asarray(_encode_ids(text_model, text_params, jax.device_put(_pad_batch(ids, batch), split), clip_skip),
                         np.float32)
        mean, logvar = jax.device_get(encode_moments(vae_model, vae_params, jax.device_put(video, split)))
        for j, (row, clip, record) in enumerate(pending):
            rec = {
                "index": np.int64(row),
                "mean": _store(mean[j], latent_dtype),
                "logvar": _store(logvar[j], latent_dtype),
                "context": ctx[j],
                "input_ids": ids[j],
                "text": np.str_(record["text"]),
            }
            if clips_per_video > 1:
                rec["clip"] = np.int64(clip)
            writer.write(serialize(rec))
        return list(mean.shape[1:]), list(ctx.shape[1:])

    k = 0
    stage = tempfile.mkdtemp(prefix="animatediff-jax-cache-") if fs.is_remote(out_dir) else None
    try:
        for s in todo:
            path, done = paths(s)
            _remove(done, path, path + ".tmp")
            # ArrayRecord writes local files: a shard for a bucket is staged locally, uploaded when complete.
            tmp = path + ".tmp" if stage is None else os.path.join(stage, os.path.basename(path) + ".tmp")
            writer = ArrayRecordWriter(tmp, "group_size:1")
            lo, hi = shard_rows(s, num_shards, n)
            written = skipped = 0
            shapes: tuple[list | None, list | None] = (None, None)
            pending: list[tuple[int, int, Record]] = []
            for _ in range((hi - lo) * clips_per_video):
                row, clip = (int(v) for v in items[k])
                k += 1
                record = next(loader)
                bar.update(1)
                if isinstance(record, Skipped):
                    skipped += 1
                    skipped_here += 1
                    if skipped_here <= _LOG_FIRST or skipped_here % _LOG_EVERY == 0:
                        tqdm.write(f"{who} skipped row {row} clip {clip}: {record.reason} ({skipped_here} skipped)")
                    continue
                pending.append((row, clip, record))
                if len(pending) == batch:
                    shapes = encode(pending, writer)
                    written += len(pending)
                    pending = []
            if pending:
                shapes = encode(pending, writer)
                written += len(pending)
            writer.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            fs.put(tmp, path)
            _write_json(done, dict(shard=os.path.basename(path), records=written, skipped=skipped, rows=[lo, hi],
                                   latent_shape=shapes[0], context_shape=shapes[1], made_from=made_from))
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        bar.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()

    if num_proc > 1:  # every process's shards are done (and their done files written)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("animatediff_jax.data.cache.prepare_cache")
    shards = []
    for s in range(num_shards):
        d = complete(s, s % num_proc)
        if d is None:
            raise FileNotFoundError(f"{paths(s, s % num_proc)[1]}: missing or from other inputs after every process "
                                    "finished: is the output folder one that every host sees (a shared filesystem)?")
        shards.append(d)
    shape = lambda key: next((d[key] for d in shards if d[key] is not None), None)  # noqa: E731
    info = dict(
        num_records=sum(d["records"] for d in shards),
        skipped=sum(d["skipped"] for d in shards),
        shards=[d["shard"] for d in shards],
        shard_records=[d["records"] for d in shards],
        num_rows=n,
        clips_per_video=int(clips_per_video),
        scaling_factor=float(vae_model.config.scaling_factor),
        latent_shape=shape("latent_shape"),
        context_shape=shape("context_shape"),
        latent_dtype=latent_dtype,
        clip_skip=clip_skip,
        seed=seed,
        stores="unscaled VAE posterior mean and logvar; CLIP context; token ids; caption",
    )
    if proc == 0:
        _write_json(info_path, info)
        print(f"[cache] wrote {info['num_records']} records ({info['skipped']} skipped) in {num_shards} shard(s) to "
              f"{out_dir}; this run encoded {len(items) - skipped_here} clips in {time.time() - t0:.1f}s", flush=True)
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
