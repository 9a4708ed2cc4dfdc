"""The grain input pipeline: shuffled, epoch-aware, per-process sharded, batched, checkpointable.

The pipeline is one global stream of examples `g = 0, 1, 2, ...`: example `g` is record
`shuffle_e(g mod n)` of epoch `e = g // n` (a fresh permutation per epoch, grain's
`index_shuffle`), loaded with the record RNG `(seed, record, epoch)`. Process `p` of `P` takes
the examples `g ≡ p (mod P)`, so global step `s` is examples `[s*B, (s+1)*B)` spread over the
processes, each holding `B / P` of them, and the processes' shards are disjoint.

Iterators come from grain (`iter(pipeline)`), and `it.get_state()` / `it.set_state(state)`
resume exactly: every element is a pure function of its position in the stream. Decoding
runs in `read_threads` threads, or in `worker_count` processes (`mp_prefetch`); skipped
records are dropped (and counted) in the main process after the workers, then batched.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from animatediff_jax.data.webvid import Record, Skipped

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

    def __call__(self, g: int) -> Record | Skipped:
        epoch, position = divmod(int(g), self.n)
        index = shuffled_index(position, self.n, self.seed, epoch) if self.shuffle else position
        get = getattr(self.source, "get", None)
        if get is not None:
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


@dataclasses.dataclass
class DataPipeline:
    """A grain `IterDataset` of per-process batches plus the count of skipped records.

    `iter(pipeline)` gives a grain `DatasetIterator` (`get_state` / `set_state`).
    """

    dataset: grain.IterDataset
    skip_counter: SkipCounter
    per_process_batch_size: int
    shard_index: int
    shard_count: int

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    @property
    def skipped(self) -> int:
        """Records skipped so far by this process's iterators."""
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
) -> DataPipeline:
    """A batched, sharded pipeline over `source` (a `ClipSource` or any grain random-access source).

    Each process gets `global_batch_size // shard_count` examples per step (shard defaults:
    `jax.process_index()` of `jax.process_count()`). `num_epochs=None` repeats forever.
    `tokenizer` (e.g. `animatediff_jax.text.Tokenizer`) adds `input_ids` int32 `[b, 77]`.
    `prefetch` is the read-ahead in elements per reader; `worker_count > 0` decodes in
    that many processes (`read_threads` threads each). An iterator state restores only into a
    pipeline made with the same arguments (grain's state layout depends on `worker_count`).
    `max_skips_in_a_row` skipped records in a row (at most two passes over the source: nothing
    readable) raise `NoReadableData` from the iterator; 0: never.
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
    per_process = global_batch_size // shard_count
    total = sys.maxsize if num_epochs is None else n * num_epochs

    ds = grain.MapDataset.range(total)[shard_index::shard_count]
    ds = ds.map(_Load(source, n, int(seed), shuffle, tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    limit = min(int(max_skips_in_a_row), 2 * n) if max_skips_in_a_row > 0 else 0
    counter = SkipCounter(limit, _describe(source))
    it = it.filter(counter).batch(per_process, drop_remainder=drop_remainder, batch_fn=collate)
    return DataPipeline(it, counter, per_process, shard_index, shard_count)
