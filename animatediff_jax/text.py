"""Prompts to CLIP token ids to prompt embeddings, as diffusers' SD1.5 pipelines do it.

Tokenisation is transformers' own `CLIPTokenizer` (read from a local folder; a bucket folder is
copied to this host once, `io.fs.local_copy`), called
the way `StableDiffusionPipeline.encode_prompt` calls it: pad to 77 with the pad token,
truncate longer prompts (keeping the end-of-text token last).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from animatediff_jax.models.clip_text import CLIPTextModel
from animatediff_jax.io import fs

Params = dict[str, Any]


class Tokenizer:
    """transformers' `CLIPTokenizer` from a local folder (`vocab.json` + `merges.txt`, ...).

    Calling it returns `np.int32` ids of shape `(len(prompts), max_length)`.
    """

    def __init__(self, folder: str | os.PathLike, max_length: int = 77):
        from transformers import CLIPTokenizer

        folder = os.fspath(folder)
        if not fs.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such tokenizer folder")
        self.tokenizer = CLIPTokenizer.from_pretrained(fs.local_copy(folder), local_files_only=True)
        self.max_length = max_length

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True
        ).input_ids
        return np.asarray(ids, dtype=np.int32)


def _apply(model: CLIPTextModel, params: Params, ids: jax.Array, clip_skip: int) -> jax.Array:
    return model.apply({"params": params}, ids, clip_skip)


# Modules are hashable dataclasses, so one compiled function serves each (model, clip_skip).
_apply_jit = jax.jit(_apply, static_argnames=("model", "clip_skip"))


def encode_prompts(
    model: CLIPTextModel,
    params: Params,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    clip_skip: int | None = 0,
) -> jax.Array:
    """Prompt embeddings `(len(prompts), 77, hidden_size)`; `clip_skip` as in diffusers (see CLIPTextModel).

    To reproduce diffusers' SD/AnimateDiff pipelines, pass `clip_skip` for the prompts only:
    `encode_prompt` embeds negative prompts from the last layer whatever `clip_skip` is.
    """
    ids = tokenizer(prompts)
    return _apply_jit(model=model, params=params, ids=ids, clip_skip=0 if clip_skip is None else int(clip_skip))


