"""Sampling: prompts to videos.

`generate.py` is the sampler (text encoding, one `lax.scan` of denoising steps with CFG and
context windows, VAE decode) and the one check of its arguments; `pipeline.py` the models it runs
(`AnimationPipeline`) and `load_pipeline(config)`, which merges what a sample config names;
`config.py` that config (`base_config`, `validate`); `outputs.py` the files a run writes. The
`sample` command (`animatediff_jax/sample.py`) strings them together.
"""

from animatediff_jax.sampling.config import base_config
from animatediff_jax.sampling.generate import (
    DATA,
    GenerateResult,
    context_windows,
    denoise,
    encode_text,
    generate,
    make_mesh,
    predict_noise,
    seed_key,
)
from animatediff_jax.sampling.pipeline import AnimationPipeline, load_pipeline

__all__ = [
    "DATA",
    "AnimationPipeline",
    "GenerateResult",
    "base_config",
    "context_windows",
    "denoise",
    "encode_text",
    "generate",
    "load_pipeline",
    "make_mesh",
    "predict_noise",
    "seed_key",
]
