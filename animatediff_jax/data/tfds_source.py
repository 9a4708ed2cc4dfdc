"""Video/caption records from a prepared TFDS dataset, read through `tfds.data_source` (no TensorFlow needed).

TFDS is optional: `tensorflow_datasets` is imported only when a `TFDSSource` is made. Reading
a prepared dataset (ArrayRecord files) does not need TensorFlow when its video feature is a
`tfds.features.Tensor(shape=(T, H, W, 3), dtype=np.uint8)`; TFDS's own `Video` feature imports
TensorFlow even to be declared (tfds 4.9), and building any dataset (`download_and_prepare`)
needs it, which is why this stays an extra.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from animatediff_jax.data.webvid import STREAM_CLIP, ClipOptions, ClipSource, Record, clip_frames, record_rng

_INSTALL_HINT = (
    "TFDSSource needs tensorflow-datasets: `pip install tensorflow-datasets` "
    "(reading a prepared dataset does not need TensorFlow; preparing one does)."
)


def import_tfds():
    """`tensorflow_datasets`, or an ImportError that says how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return tfds


def _lookup(example: Any, key: str) -> Any:
    """`example["a"]["b"]` for key "a/b" (TFDS nests features in dicts)."""
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = list(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"feature {key!r} not in the example (has {have})")
        value = value[part]
    return value


def _text(value: Any) -> str:
    value = np.asarray(value)
    if value.ndim > 0:  # e.g. a Sequence(Text) of several captions: use the first
        value = value.reshape(-1)[0]
    value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TFDSSource(ClipSource):
    """Clips from a TFDS split, with the WebVid clip sampling (`video_key`: uint8 `[T, H, W, 3]`).

    `name_or_builder_dir` is a registered dataset name (e.g. "my_videos:1.0.0", found under
    `data_dir`) or the directory of a prepared dataset version (`builder_from_directory`).
    `caption_key` may name a nested feature as "a/b".
    """

    def __init__(
        self,
        name_or_builder_dir: str | os.PathLike,
        split: str = "train",
        n_frames: int = 16,
        stride: int = 4,
        size: int = 256,
        *,
        data_dir: str | os.PathLike | None = None,
        video_key: str = "video",
        caption_key: str = "caption",
        is_image: bool = False,
        flip: bool = True,
        min_frames: int | None = None,
        caption_dropout: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(caption_dropout=caption_dropout, seed=seed)
        tfds = import_tfds()
        self.opts = ClipOptions(n_frames, stride, size, is_image, flip, min_frames)
        self.video_key, self.caption_key = video_key, caption_key
        target = os.fspath(name_or_builder_dir)
        if os.path.isdir(target):
            self._source = tfds.builder_from_directory(target).as_data_source(split=split)
        else:
            kw = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
            self._source = tfds.data_source(target, split=split, **kw)

    def __len__(self) -> int:
        return len(self._source)

    def _load(self, index: int, epoch: int, seed: int) -> Record:
        example = self._source[index]
        frames = np.asarray(_lookup(example, self.video_key))
        if frames.ndim == 3:  # a single image feature
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
            raise ValueError(f"video feature {self.video_key!r} has shape {frames.shape}, expected [T, H, W, 3]")
        if frames.shape[-1] == 1:
            frames = np.repeat(frames, 3, axis=-1)
        frames = frames.astype(np.uint8, copy=False)
        if len(frames) < self.opts.required_frames:
            raise ValueError(f"{len(frames)} frames, need at least {self.opts.required_frames}")
        rng = record_rng(seed, index, epoch, STREAM_CLIP)
        video = clip_frames(len(frames), lambda idx: frames[idx], self.opts, rng)
        return {"video": video, "text": _text(_lookup(example, self.caption_key))}
