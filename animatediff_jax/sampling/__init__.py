"""Sampling: prompts to videos, a one-way chain.

`options` (the typed `Request` and its parts, each checked once) -> one feature per module
(`windows`, `prompts`, `free_init`, `control`, `ip_adapter`, `keys`) -> `denoise` (the scan) -> `programs` (the two
compiled programs) -> `generate(pipe, request)`. `pipeline` holds the models (`AnimationPipeline`, a
value), `compiled` the one bounded cache of executables; `assemble` turns a sample config into a
pipeline and a request, `config` is that config's fields, `outputs` the files a run writes. The
`sample` command (`animatediff_jax/sample.py`) strings them together.
"""

from animatediff_jax.sampling.assemble import load_pipeline
from animatediff_jax.sampling.compiled import PROGRAMS, Programs
from animatediff_jax.sampling.config import base_config
from animatediff_jax.sampling.denoise import denoise, predict_noise
from animatediff_jax.sampling.generate import GenerateResult, check_fits, generate, sampling_mesh
from animatediff_jax.sampling.keys import seed_key
from animatediff_jax.sampling.options import Control, FreeInit, IPAdapter, Motion, Request, VideoInput, Windows
from animatediff_jax.sampling.pipeline import AnimationPipeline
from animatediff_jax.sampling.programs import DATA
from animatediff_jax.sampling.prompts import encode_text
from animatediff_jax.sampling.windows import context_windows

__all__ = [
    "DATA",
    "PROGRAMS",
    "AnimationPipeline",
    "Control",
    "FreeInit",
    "GenerateResult",
    "IPAdapter",
    "Motion",
    "Programs",
    "Request",
    "VideoInput",
    "Windows",
    "base_config",
    "check_fits",
    "context_windows",
    "denoise",
    "encode_text",
    "generate",
    "load_pipeline",
    "predict_noise",
    "sampling_mesh",
    "seed_key",
]
