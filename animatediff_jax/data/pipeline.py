"""The grain input pipeline: shuffled, epoch-aware, per-process sharded, batched, checkpointable.

The pipeline is one global stream of examples `g = 0, 1, 2, ...`: example `g` is record
`shuffle_e(g mod n)` of epoch `e = g // n` (a fresh permutation per epoch, grain's
`index_shuffle`), loaded with the record RNG `(seed, record, epoch)`. Process `p` of `P` takes
the examples `g ≡ p (mod P)`, so global step `s` is examples `[s*B, (s+1)*B)` spread over the
processes, each holding `B / P` of them, and the processes' shards are disjoint.

Decoding runs in `read_threads` threads, or in `worker_count` processes (grain's `mp_prefetch`,
`read_threads` threads each); skipped records come back from the workers as markers and are
dropped (and counted, for every worker together) in the main process, then batched.

`iter(pipeline)` gives a `PipelineIterator`; `it.get_state()` is `{"next_index": k}`, the number
of this process's examples consumed so far, and `it.set_state(state)` restarts the readers at
example `k`: every element is a pure function of its position in the stream, so a run resumes
exactly, also with another `worker_count` / `read_threads` / `prefetch` than it was saved with
(and from the states of earlier, thread-only versions, which were grain's own `next_index`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from animatediff_jax.data.webvid import PIXELS, ClipSource, Record, Skipped

log = logging.getLogger(__name__)

_LOG_FIRST, _LOG_EVERY = 10, 100


def shuffled_index(position: int, n: int, seed: int, epoch: int) -> int:
    """Record at `position` of `epoch`'s permutation of `range(n)` (as grain's `MapDataset.shuffle`)."""
    if n <= 1:
        return position
    return int(grain.experimental.index_shuffle(position, max_index=n - 1, seed=(seed + epoch) % 2**32, rounds=4))


@dataclasses.dataclass
class _Load:
    """Global example number -> record (picklable, so it can run in worker processes)."""

    source: Any
    n: int
    seed: int
    shuffle: bool
    tokenizer: Callable[[Sequence[str]], np.ndarray] | None
    pixels: str = "float32"

    def __call__(self, g: int) -> Record | Skipped:
        epoch, position = divmod(int(g), self.n)
        index = shuffled_index(position, self.n, self.seed, epoch) if self.shuffle else position
        get = getattr(self.source, "get", None)
        if isinstance(self.source, ClipSource):
            record = self.source.get(index, epoch, seed=self.seed, pixels=self.pixels)
        elif get is not None:
            record = get(index, epoch, seed=self.seed)
        else:  # a plain grain RandomAccessDataSource
            try:
                record = self.source[index]
            except Exception as e:
                return Skipped(index, f"{type(e).__name__}: {e}")
        if isinstance(record, Skipped):
            return record
        if self.tokenizer is not None and "input_ids" not in record:
            record["input_ids"] = np.asarray(self.tokenizer([record["text"]]), np.int32)[0]
        return record


class NoReadableData(RuntimeError):
    """Every record tried in a row was skipped: the data cannot feed a single batch."""


class SkipCounter:
    """grain filter: drops `Skipped` markers, counts them, and logs the first few then every 100th.

    `limit` skips in a row (none readable in between) raise `NoReadableData`, naming `where` and a
    few of the reasons (e.g. the paths tried), instead of spinning forever on a wrong folder.
    """

    def __init__(self, limit: int = 0, where: str = "the data source") -> None:
        self.count = 0
        self.in_a_row = 0
        self.limit = int(limit)
        self.where = where
        self._reasons: list[str] = []

    def __call__(self, element: Any) -> bool:
        if not isinstance(element, Skipped):
            self.in_a_row, self._reasons = 0, []
            return True
        self.count += 1
        self.in_a_row += 1
        if len(self._reasons) < 3:
            self._reasons.append(element.reason)
        if self.count <= _LOG_FIRST or self.count % _LOG_EVERY == 0:
            log.warning("skipped record %d (%s); %d skipped so far", element.index, element.reason, self.count)
        if self.limit and self.in_a_row >= self.limit:
            raise NoReadableData(
                f"no readable record in {self.where}: the last {self.in_a_row} records tried were all skipped "
                f"(data.max_skips_in_a_row, or two passes over the data), e.g. {'; '.join(self._reasons)}")
        return False


def collate(records: Sequence[Record]) -> dict[str, np.ndarray]:
    """Stacks records into a batch: arrays stacked, strings (captions) into a numpy str array."""
    out = {}
    for key in records[0]:
        values = [r[key] for r in records]
        if isinstance(values[0], str):
            out[key] = np.array(values, dtype=np.str_)
        else:
            out[key] = np.stack([np.asarray(v) for v in values])
    return out


def _absl_flags_parsed() -> None:
    """grain's multiprocess prefetch reads absl flags; outside an absl app nobody parsed them, so use the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _describe(source) -> str:
    folder = getattr(source, "video_folder", None)
    if folder is not None:
        return f"{type(source).__name__} (video folder {folder}, {len(source)} rows)"
    return f"{type(source).__name__} ({len(source)} records)"


class _Position:
    """grain filter in front of the skip counter: counts the examples one iterator consumed."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter, self.seen = counter, 0

    def __call__(self, element: Any) -> bool:
        self.seen += 1
        return self.counter(element)


class PipelineIterator:
    """Batches of a `DataPipeline`, with a state that does not depend on how they are decoded.

    `get_state()` is `{"next_index": k}`: this process's examples consumed so far (skipped ones
    included; grain's own state of a thread-only pipeline is the same number). `set_state` starts
    the readers (threads or worker processes) again at example `k`; they start lazily, at the
    first `next`, so `set_state` right after `iter` costs nothing. `close()` ends the workers.
    """

    def __init__(self, pipeline: "DataPipeline", position: int = 0) -> None:
        self._pipeline = pipeline
        self._it: grain.DatasetIterator | None = None
        self._base, self._pos = int(position), None

    def __iter__(self) -> "PipelineIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._pos = _Position(self._pipeline.skip_counter)
            self._it = iter(self._pipeline.build(self._base, self._pos))
        return next(self._it)

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._base + (self._pos.seen if self._pos is not None else 0)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"next_index"}:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a data-pipeline state (expected {{'next_index': k}}, got {keys}): a state saved "
                             "by grain's worker processes (data.worker_count > 0) of an earlier version cannot be "
                             "restored; resume from a later checkpoint or start the run again")
        position = int(state["next_index"])
        if position < 0:
            raise ValueError(f"data state next_index={position} is negative")
        self.close()
        self._base, self._pos = position, None

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            if self._pos is not None:  # keep the position reached
                self._base, self._pos = self._base + self._pos.seen, None
            close = getattr(it, "close", None)
            if close is not None:
                close()


@dataclasses.dataclass
class DataPipeline:
    """Per-process batches of a source plus the count of skipped records (all its iterators).

    `iter(pipeline)` gives a `PipelineIterator` (`get_state` / `set_state` / `close`);
    `build(position)` the grain `IterDataset` from example `position` on.
    """

    load: "_Load"
    skip_counter: SkipCounter
    per_process_batch_size: int
    shard_index: int
    shard_count: int
    total: int
    read_options: grain.ReadOptions
    multiprocessing: grain.MultiprocessingOptions | None = None
    drop_remainder: bool = True

    def build(self, position: int = 0, position_counter: Callable[[Any], bool] | None = None) -> grain.IterDataset:
        """The grain dataset of this process's batches from its example `position` on (example `k` of
        this process is global example `shard_index + k * shard_count`)."""
        start = self.shard_index + int(position) * self.shard_count
        ds = grain.MapDataset.range(min(start, self.total), self.total, self.shard_count).map(self.load)
        it = ds.to_iter_dataset(self.read_options)
        if self.multiprocessing is not None:
            _absl_flags_parsed()
            it = it.mp_prefetch(self.multiprocessing)
        keep = self.skip_counter if position_counter is None else position_counter
        return it.filter(keep).batch(self.per_process_batch_size, drop_remainder=self.drop_remainder, batch_fn=collate)

    @property
    def dataset(self) -> grain.IterDataset:
        return self.build(0)

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self)

    @property
    def skipped(self) -> int:
        """Records skipped so far by this process's iterators (in every worker)."""
        return self.skip_counter.count


def make_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 8,
    prefetch: int = 64,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None,
    max_skips_in_a_row: int = 1000,
    pixels: str = "float32",
) -> DataPipeline:
    """A batched, sharded pipeline over `source` (a `ClipSource` or any grain random-access source).

    Each process gets `global_batch_size // shard_count` examples per step (shard defaults:
    `jax.process_index()` of `jax.process_count()`). `num_epochs=None` repeats forever.
    `tokenizer` (e.g. `animatediff_jax.text.Tokenizer`) adds `input_ids` int32 `[b, 77]`.
    `prefetch` is the read-ahead in elements per reader; `worker_count > 0` decodes in that many
    processes (`read_threads` threads and `prefetch` read-ahead each, `worker_buffer_size`
    elements queued per worker); the batches are the same whatever the worker count.
    `pixels="uint8"`: a `ClipSource`'s clips stay uint8 (the train step scales them on the
    device, `webvid.pixels_to_float`). `max_skips_in_a_row` skipped records in a row (at most two
    passes over the source: nothing readable) raise `NoReadableData` from the iterator; 0: never.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the {shard_count} processes"
        )
    n = len(source)
    if n == 0:
        raise ValueError("the data source is empty")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if pixels not in PIXELS:
        raise ValueError(f"pixels={pixels!r} is not one of: {', '.join(PIXELS)}")
    if worker_count < 0 or worker_buffer_size < 1 or read_threads < 0 or prefetch < 0:
        raise ValueError(f"need worker_count >= 0, worker_buffer_size >= 1, read_threads >= 0, prefetch >= 0; got "
                         f"{worker_count}, {worker_buffer_size}, {read_threads}, {prefetch}")
    per_process = global_batch_size // shard_count
    total = sys.maxsize if num_epochs is None else n * num_epochs
    limit = min(int(max_skips_in_a_row), 2 * n) if max_skips_in_a_row > 0 else 0
    mp = (grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
          if worker_count > 0 else None)
    return DataPipeline(
        load=_Load(source, n, int(seed), shuffle, tokenizer, pixels),
        skip_counter=SkipCounter(limit, _describe(source)),
        per_process_batch_size=per_process, shard_index=shard_index, shard_count=shard_count, total=total,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch),
        multiprocessing=mp, drop_remainder=drop_remainder)
