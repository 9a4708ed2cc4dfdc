"""What the step is fed: this process's rows of every global batch, from `config.data`.

The grain pipeline of `animatediff_jax.data` with the tokenizer the config names (a CLIP folder,
or word hashing for toy runs that have no vocabulary on disk).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np

from animatediff_jax.training.config import TrainingError


def next_batch(data: Iterator, config) -> Mapping[str, Any]:
    """The next batch; a pipeline with nothing readable is a `TrainingError` naming the data fields."""
    from animatediff_jax.data import NoReadableData

    try:
        return next(data)
    except NoReadableData as e:
        d = config.data
        where = (f"data.csv={d.csv!r}, data.video_folder={d.video_folder!r}" if d.source == "webvid"
                 else f"data.source={d.source!r}")
        raise TrainingError(f"{e} -- check {where}", exit_code=2) from e


def hash_tokenizer(vocab_size: int, length: int = 77) -> Callable[[list[str]], np.ndarray]:
    """A toy word-hashing tokenizer (BOS, words, EOS, padding with EOS), for tiny runs without a
    CLIP vocabulary on disk. Same word -> same id across runs (crc32, not Python's `hash`).
    """
    import zlib

    bos, eos = vocab_size - 2, vocab_size - 1

    def tokenize(texts) -> np.ndarray:
        out = np.full((len(texts), length), eos, np.int32)
        for i, t in enumerate(texts):
            ids = [bos] + [zlib.crc32(w.encode()) % (vocab_size - 2) for w in t.lower().split()][: length - 2] + [eos]
            out[i, : len(ids)] = ids
        return out

    return tokenize


def paired(first: Callable, second: Callable) -> Callable[[list[str]], np.ndarray]:
    """SDXL's two tokenizers as one: ids `[n, 2, L]` (the step's `input_ids`: first, second)."""
    return lambda texts: np.stack([first(texts), second(texts)], axis=1)


def make_tokenizer(config, trainer) -> Callable[[list[str]], np.ndarray]:
    """`data.tokenizer`: "hash" (toy), a CLIP tokenizer folder, or "" for the pretrained folder's.
    An SDXL base takes two (`paired`): the second is `data.tokenizer_2` ("" = the pretrained
    folder's `tokenizer_2`; with "hash", hashing into the second tower's vocabulary)."""
    models = trainer.models
    if models.family == "sdxl":
        if config.data.tokenizer == "hash":
            if models.text_config is None or models.text_config_2 is None:
                raise ValueError("data.tokenizer='hash' needs the text encoders' configs (model.text_encoder=True)")
            return paired(hash_tokenizer(models.text_config.vocab_size), hash_tokenizer(models.text_config_2.vocab_size))
        from animatediff_jax.text import Tokenizer

        folders = (config.data.tokenizer or models.tokenizer_path, config.data.get("tokenizer_2") or models.tokenizer_2_path)
        if not all(folders):
            raise ValueError("data.tokenizer / data.tokenizer_2: no CLIP tokenizer folders for SDXL's two text encoders "
                             "(set them, or 'hash' for toy runs)")
        return paired(Tokenizer(folders[0]), Tokenizer(folders[1]))
    if config.data.tokenizer == "hash":
        if trainer.models.text_config is None:
            raise ValueError("data.tokenizer='hash' needs the text encoder's config (model.text_encoder=True)")
        return hash_tokenizer(trainer.models.text_config.vocab_size)
    from animatediff_jax.text import Tokenizer

    folder = config.data.tokenizer or trainer.models.tokenizer_path
    if not folder:
        raise ValueError("data.tokenizer: no CLIP tokenizer folder (set it, or 'hash' for toy runs)")
    return Tokenizer(folder)


def make_data(config, trainer):
    """The grain pipeline of `config.data` for this process (its rows of every global batch)."""
    from animatediff_jax import data as data_lib

    d, t = config.data, config.train
    stage = trainer.stage
    n_frames = 1 if stage.single_frame else int(t.num_frames)
    clip = dict(n_frames=n_frames, stride=int(d.stride), size=int(t.resolution), is_image=stage.single_frame,
                flip=bool(d.flip), caption_dropout=float(d.caption_dropout), seed=int(d.seed))
    if d.source == "synthetic":
        source = data_lib.SyntheticVideoSource(int(d.synthetic_clips), n_frames=n_frames, size=int(t.resolution),
                                               seed=int(d.seed), caption_dropout=float(d.caption_dropout),
                                               is_image=stage.single_frame)
    elif d.source == "webvid":
        source = data_lib.WebVidSource(d.csv, d.video_folder, **clip)
    elif d.source == "tfds":
        source = data_lib.TFDSSource(d.tfds_name, d.tfds_split, data_dir=d.tfds_data_dir or None, **clip)
    elif d.source == "cache":
        source = data_lib.CachedLatentSource(d.cache_dir, caption_dropout=float(d.caption_dropout), seed=int(d.seed))
    else:
        raise ValueError(f"data.source {d.source!r}: expected webvid | tfds | cache | synthetic")
    tokenizer = make_tokenizer(config, trainer) if d.source != "cache" else None
    return data_lib.make_dataset(
        source, global_batch_size=trainer.global_batch, seed=int(d.seed), shuffle=bool(d.shuffle),
        worker_count=int(d.worker_count), worker_buffer_size=int(d.get("worker_buffer_size", 2)),
        read_threads=int(d.read_threads), prefetch=int(d.prefetch), pixels="uint8",  # scaled on the device
        tokenizer=tokenizer, max_skips_in_a_row=int(d.get("max_skips_in_a_row", 1000)))
