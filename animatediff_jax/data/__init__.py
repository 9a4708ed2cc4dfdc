"""Training data: clip sources (WebVid CSV, TFDS, synthetic, cached latents) and the grain pipeline.

Sources are grain random-access sources (`len`, `[i]`) with `get(index, epoch, seed=...)`;
records are `{"video": float32 [F, H, W, 3] in [-1, 1], "text": str}` (with `pixels="uint8"`:
uint8 video, scaled on the device by the train step; cached latents: `{"latents", "context",
"input_ids", "text"}`). `make_dataset` batches them per process.

The cache module (which imports JAX and the models) loads on first use, so data-loading
worker processes, which import this package to unpickle their work, stay light.
"""

from animatediff_jax.data.pipeline import DataPipeline, NoReadableData, make_dataset
from animatediff_jax.data.synthetic import SyntheticVideoSource
from animatediff_jax.data.tfds_source import TFDSSource
from animatediff_jax.data.webvid import ClipOptions, ClipSource, Skipped, WebVidSource

__all__ = [
    "CachedLatentSource",
    "ClipOptions",
    "ClipSource",
    "DataPipeline",
    "NoReadableData",
    "Skipped",
    "SyntheticVideoSource",
    "TFDSSource",
    "WebVidSource",
    "make_dataset",
    "prepare_cache",
]


def __getattr__(name: str):
    if name in ("CachedLatentSource", "prepare_cache"):
        from animatediff_jax.data import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
