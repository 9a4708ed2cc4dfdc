"""Encode a clip source once (VAE latents + CLIP text embeddings) into ArrayRecord shards, and read them back.

What is stored: the VAE posterior's *unscaled* `mean` and `logvar` per frame (not a sample),
so training can still draw a fresh posterior sample every epoch, as the original AnimateDiff
does online (`latent_dist.sample() * 0.18215`), or use the mean. This doubles the latent
bytes but keeps the objective identical. Captions are stored uncut (no dropout) with their
token ids and text-encoder output; dropout happens at read time, swapping in the stored
embedding of the empty prompt. Clip sampling (start frame, flip) is fixed at cache time:
the epoch-0 clip of each record, with the cache `seed`.

Layout of `out_dir`: `shard-XXXXX-of-YYYYY.array_record` (records as `np.savez` bytes, written
round-robin), `null_text.npz` (empty-prompt `context` / `input_ids`) and `cache_info.json`,
written last, so an interrupted run leaves no valid-looking cache.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.data.webvid import STREAM_LATENT, Record, Skipped, drop_caption, record_rng
from animatediff_jax.models.vae import AutoencoderKL, encode_moments

INFO_FILE, NULL_TEXT_FILE = "cache_info.json", "null_text.npz"


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


def prepare_cache(
    source,
    vae_model: AutoencoderKL,
    vae_params: Any,
    text_model,
    text_params: Any,
    tokenizer,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    num_shards: int = 1,
    *,
    clip_skip: int = 0,
    seed: int = 0,
    latent_dtype: str = "float32",
    limit: int | None = None,
    log_every: int = 10,
) -> dict:
    """Encodes every record of `source` (epoch 0, captions kept) into `out_dir`; returns the info dict.

    Records that fail to load are skipped and counted (`info["skipped"]`). `latent_dtype`
    ("float32" or "float16") sets how mean/logvar are stored; the text encoder gets the
    token ids from `tokenizer` and `clip_skip` as in `animatediff_jax.text.encode_prompts`.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    info_path = os.path.join(out_dir, INFO_FILE)
    if os.path.exists(info_path):
        os.remove(info_path)  # the cache is invalid until this run completes
    if latent_dtype not in ("float32", "float16"):
        raise ValueError(f"latent_dtype must be 'float32' or 'float16', got {latent_dtype!r}")
    store = np.dtype(latent_dtype)
    n = len(source) if limit is None else min(limit, len(source))
    names = [f"shard-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    writers = [ArrayRecordWriter(os.path.join(out_dir, nm + ".tmp"), "group_size:1") for nm in names]

    null_ids = np.asarray(tokenizer([""]), np.int32)
    null_ctx = np.asarray(_encode_ids(text_model, text_params, null_ids, clip_skip), np.float32)
    np.savez(os.path.join(out_dir, NULL_TEXT_FILE), context=null_ctx[0], input_ids=null_ids[0])

    written = skipped = 0
    latent_shape = context_shape = None
    t0 = time.time()
    pending: list[tuple[int, Record]] = []

    def flush() -> None:
        nonlocal written, latent_shape, context_shape
        if not pending:
            return
        video = _pad_batch(np.stack([r["video"] for _, r in pending]).astype(np.float32), batch_size)
        texts = [r["text"] for _, r in pending]
        ids = np.asarray(tokenizer(texts), np.int32)
        ctx = np.asarray(_encode_ids(text_model, text_params, _pad_batch(ids, batch_size), clip_skip), np.float32)
        mean, logvar = jax.device_get(encode_moments(vae_model, vae_params, jnp.asarray(video)))
        for j, (index, record) in enumerate(pending):
            rec = {
                "index": np.int64(index),
                "mean": np.asarray(mean[j]).astype(store),
                "logvar": np.asarray(logvar[j]).astype(store),
                "context": ctx[j],
                "input_ids": ids[j],
                "text": np.str_(record["text"]),
            }
            writers[written % num_shards].write(serialize(rec))
            written += 1
        latent_shape, context_shape = list(mean.shape[1:]), list(ctx.shape[1:])
        pending.clear()

    batches = 0
    for index in range(n):
        record = source.get(index, 0, seed=seed, caption_dropout=0.0) if hasattr(source, "get") else source[index]
        if isinstance(record, Skipped):
            skipped += 1
            print(f"[cache] skipped record {index}: {record.reason}", flush=True)
            continue
        pending.append((index, record))
        if len(pending) == batch_size:
            flush()
            batches += 1
            if batches % log_every == 0:
                rate = (index + 1) / (time.time() - t0)
                print(f"[cache] {index + 1}/{n} records ({rate:.1f}/s, ETA {(n - index - 1) / rate:.0f}s), "
                      f"{skipped} skipped", flush=True)
    flush()
    for w, nm in zip(writers, names):
        w.close()
        os.replace(os.path.join(out_dir, nm + ".tmp"), os.path.join(out_dir, nm))
    info = dict(
        num_records=written,
        skipped=skipped,
        shards=names,
        scaling_factor=float(vae_model.config.scaling_factor),
        latent_shape=latent_shape,
        context_shape=context_shape,
        latent_dtype=str(store),
        clip_skip=clip_skip,
        seed=seed,
        stores="unscaled VAE posterior mean and logvar; CLIP context; token ids; caption",
    )
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(info_path + ".tmp", info_path)
    print(f"[cache] wrote {written} records to {out_dir} in {time.time() - t0:.1f}s ({skipped} skipped)", flush=True)
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
        if not os.path.exists(info_path):
            raise FileNotFoundError(f"{out_dir}: no {INFO_FILE}; run prepare_cache (an interrupted run leaves none)")
        with open(info_path) as f:
            self.info = json.load(f)
        self._records = ArrayRecordDataSource([os.path.join(out_dir, s) for s in self.info["shards"]])
        with np.load(os.path.join(out_dir, NULL_TEXT_FILE)) as z:
            self.null_context, self.null_input_ids = z["context"], z["input_ids"]
        self.scaling_factor = float(self.info["scaling_factor"])
        self.sample_posterior, self.caption_dropout, self.seed = sample_posterior, float(caption_dropout), int(seed)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self.get(int(index))

    def raw(self, index: int) -> dict[str, np.ndarray]:
        """The stored arrays of record `index` (`mean`, `logvar` unscaled; `index` is the source's)."""
        return deserialize(self._records[index])

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
