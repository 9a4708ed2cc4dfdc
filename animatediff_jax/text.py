"""Prompts to CLIP token ids to prompt embeddings, as diffusers' SD1.5 pipelines do it.

Tokenisation is transformers' own `CLIPTokenizer` (read from a local folder; a bucket folder is
copied to this host once, `io.fs.local_copy`), called
the way `StableDiffusionPipeline.encode_prompt` calls it: pad to 77 with the pad token,
truncate longer prompts (keeping the end-of-text token last).

`Tokenizer.chunks` reads a prompt as AUTOMATIC1111's web UI does (`prompt_syntax.parse`: weights, BREAK)
into chunks of 75 tokens, each its own 77-token row (`sampling/prompts.py` encodes them and joins the
rows); `Tokenizer.with_tokens` adds textual-inversion tokens (`checkpoints/embeddings.py`).

SDXL: `encode_prompts_sdxl` is `StableDiffusionXLPipeline.encode_prompt` (two tokenizers and encoders;
the second tokenizer pads with its own pad token, "!" in the released `tokenizer_2/`).
"""

from __future__ import annotations

import copy
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax import prompt_syntax
from animatediff_jax.io import fs
from animatediff_jax.models.clip_text import CLIPTextModel, SDXLTextEncoder

SYNTAXES = prompt_syntax.SYNTAXES
COMMA_BACKTRACK = 20  # the web UI's `comma_padding_backtrack` default: a chunk ends at a comma this near its end

Params = dict[str, Any]


class Tokenizer:
    """transformers' `CLIPTokenizer` from a local folder (`vocab.json` + `merges.txt`, ...).

    Calling it returns `np.int32` ids of shape `(len(prompts), max_length)`: diffusers' `encode_prompt`
    tokenisation (cut after `max_length - 2` tokens). `chunks` reads a prompt in the web UI's syntax, of any
    length. A tokenizer is not changed once made: `with_tokens` returns a new one.
    """

    def __init__(self, folder: str | os.PathLike, max_length: int = 77):
        from transformers import CLIPTokenizer

        folder = os.fspath(folder)
        if not fs.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such tokenizer folder")
        self.tokenizer = CLIPTokenizer.from_pretrained(fs.local_copy(folder), local_files_only=True)
        self.max_length = max_length
        # A multi-vector textual-inversion token's id -> the ids of all its vectors (`with_tokens`).
        self.vectors: dict[int, tuple[int, ...]] = {}
        self.comma = self.tokenizer.get_vocab().get(",</w>")  # where a full chunk may end early (`chunks`)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.vectors:  # (a multi-vector token expands before the cut, as diffusers' maybe_convert_prompt)
            return np.stack([self._row(self.ids(p)[: self.max_length - 2]) for p in prompts])
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True
        ).input_ids
        return np.asarray(ids, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def vocab(self) -> dict[str, int]:
        """Every token the tokenizer has (its added tokens too) -> id."""
        return self.tokenizer.get_vocab()

    def _units(self, text: str) -> list[tuple[int, ...]]:
        """The tokens of `text` (no start/end token, no cut), a multi-vector token as one unit of its ids."""
        ids = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        return [self.vectors.get(i, (i,)) for i in ids]

    def ids(self, text: str) -> list[int]:
        """The token ids of `text`, without the start and end tokens, however many."""
        return [i for unit in self._units(text) for i in unit]

    def _row(self, ids: Sequence[int]) -> np.ndarray:
        """`[start, ids..., end, pad...]`, `max_length` long (`ids` at most `max_length - 2`)."""
        t = self.tokenizer
        pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
        row = [t.bos_token_id, *ids, t.eos_token_id]
        return np.asarray(row + [pad] * (self.max_length - len(row)), np.int32)

    def chunks(self, prompt: str, syntax: str = "a1111") -> tuple[np.ndarray, np.ndarray]:
        """`(ids, weights)`, each `[K, max_length]`: the prompt in chunks of `max_length - 2` tokens, each
        with its start and end token and padding (weight 1), as the web UI's `tokenize_line`.

        "a1111": `prompt_syntax.parse(strict=True)` (a `PromptSyntaxError` for a malformed prompt); each
        fragment tokenised on its own with its weight; a chunk is full at 75 tokens, and ends after its last
        comma instead when that comma is among its last `COMMA_BACKTRACK` tokens (the tokens after it move
        to the next chunk); a BREAK ends a chunk; a multi-vector embedding is never split across chunks.
        "plain": one chunk, diffusers' (`__call__`), every weight 1.
        """
        if syntax == "plain":
            ids = self(prompt)
            return ids, np.ones(ids.shape, np.float32)
        if syntax not in SYNTAXES:
            raise ValueError(f"prompt syntax {syntax!r}: expected one of {', '.join(SYNTAXES)}")
        size = self.max_length - 2
        rows: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        ids: list[int] = []
        mults: list[float] = []
        last_comma = -1

        def close(ids_: list[int], mults_: list[float]) -> None:
            nonlocal last_comma
            rows.append(self._row(ids_))
            weights.append(np.asarray([1.0, *mults_] + [1.0] * (self.max_length - 1 - len(mults_)), np.float32))
            last_comma = -1

        for fragment in prompt_syntax.parse(prompt, strict=True):
            if prompt_syntax.is_break(fragment):
                close(ids, mults)
                ids, mults = [], []
                continue
            text, weight = fragment
            for unit in self._units(text) if text else []:
                if unit == (self.comma,):
                    last_comma = len(ids)
                elif len(ids) == size and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1  # this chunk ends after the comma; what follows it moves on
                    moved, moved_w = ids[cut:], mults[cut:]
                    close(ids[:cut], mults[:cut])
                    ids, mults = moved, moved_w
                if len(ids) + len(unit) > size:
                    close(ids, mults)
                    ids, mults = [], []
                ids.extend(unit)
                mults.extend([weight] * len(unit))
        if ids or not rows:
            close(ids, mults)
        return np.stack(rows), np.stack(weights)

    def with_tokens(self, tokens: Sequence[Sequence[str]]) -> tuple["Tokenizer", list[list[int]]]:
        """A new tokenizer with textual-inversion `tokens` added (this one unchanged), and their ids.

        Each entry is one embedding's tokens, `[tok, tok_1, ...]` for a multi-vector one, added one by one
        as diffusers' `load_textual_inversion` adds them (ids after the vocabulary's, in order); `tok` in a
        prompt then stands for all of them (`vectors`). The caller checks for collisions
        (`checkpoints.embeddings.add_embeddings`)."""
        new = copy.copy(self)
        new.tokenizer = copy.deepcopy(self.tokenizer)
        new.vectors = dict(self.vectors)
        out = []
        for group in tokens:
            for tok in group:
                new.tokenizer.add_tokens(tok)
            ids = [int(i) for i in new.tokenizer.convert_tokens_to_ids(list(group))]
            if len(ids) > 1:
                new.vectors[ids[0]] = tuple(ids)
            out.append(ids)
        return new, out


def _apply(model: CLIPTextModel | SDXLTextEncoder, params: Params, ids: jax.Array, clip_skip: int) -> jax.Array:
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




# ----------------------------------------------------------------------------- SDXL


class SDXLPromptEmbeds(NamedTuple):
    """`encode_prompts_sdxl`'s result, in the order of diffusers' `encode_prompt`'s: `(N, T, 768 + 1280)`
    prompt embeddings (both towers' hidden states side by side) and `(N, 1280)` pooled embeddings
    (`text_encoder_2`'s `text_embeds`), for the prompts and the negative prompts."""

    prompt_embeds: jax.Array
    negative_prompt_embeds: jax.Array
    pooled_prompt_embeds: jax.Array
    negative_pooled_prompt_embeds: jax.Array


def _as_list(prompts: str | Sequence[str], n: int, what: str) -> list[str]:
    """A prompt for each of `n` rows: one string repeated, or a list of exactly `n`."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{what}: {len(prompts)} prompts for a batch of {n}")
    return prompts


def _encode_sdxl(models, params, tokenizers, prompts: list[str], prompts_2: list[str], clip_skip: int):
    """`(N, T, sum of hidden sizes)` hidden states of both towers side by side, and the pooled
    `text_embeds` of the tower with a projection (diffusers: the first whose output is 2-D)."""
    hidden, pooled = [], None
    for model, p, tok, texts in zip(models, params, tokenizers, (prompts, prompts_2)):
        h, embeds = _apply_jit(model=model, params=p, ids=tok(texts), clip_skip=clip_skip)
        hidden.append(h)
        if pooled is None:
            pooled = embeds
    if pooled is None:
        raise ValueError("neither SDXL text encoder has a projection (config.projection_dim): no pooled embeddings")
    return jnp.concatenate(hidden, axis=-1), pooled


def encode_prompts_sdxl(
    models: tuple[SDXLTextEncoder, SDXLTextEncoder],
    params: tuple[Params, Params],
    tokenizers: tuple[Tokenizer, Tokenizer],
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    *,
    prompts_2: str | Sequence[str] | None = None,
    negative_prompts_2: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
    force_zeros_for_empty_prompt: bool = True,
) -> SDXLPromptEmbeds:
    """SDXL's prompt embeddings, as `StableDiffusionXLPipeline.encode_prompt` (with classifier-free
    guidance, one image per prompt) computes them from `text_encoder`/`tokenizer` (first of each pair)
    and `text_encoder_2`/`tokenizer_2` (second).

    - `prompts_2` / `negative_prompts_2` go to the second tokenizer and encoder; when not given (or
      empty) the first ones are used for both, as diffusers does.
    - `clip_skip` (diffusers': None or 0 is the penultimate layer, k the output `k` layers before it) is
      applied to the prompts only; the negative prompts always use the penultimate layer, and both pooled
      embeddings always come from the last layer (diffusers does the same).
    - `negative_prompts=None` with `force_zeros_for_empty_prompt` (SDXL base's pipeline config) gives
      zeros for the negative embeddings and pooled embeddings; otherwise the negative prompts (None:
      "") are encoded. An explicit "" is encoded, not zeroed: diffusers zeroes only for None.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    prompts_2 = _as_list(prompts_2 or prompts, n, "prompts_2")
    skip = 0 if clip_skip is None else int(clip_skip)
    embeds, pooled = _encode_sdxl(models, params, tokenizers, prompts, prompts_2, skip)
    if negative_prompts is None and force_zeros_for_empty_prompt:
        return SDXLPromptEmbeds(embeds, jnp.zeros_like(embeds), pooled, jnp.zeros_like(pooled))
    negative = _as_list(negative_prompts or "", n, "negative_prompts")
    negative_2 = _as_list(negative_prompts_2 or negative, n, "negative_prompts_2")
    neg_embeds, neg_pooled = _encode_sdxl(models, params, tokenizers, negative, negative_2, 0)
    return SDXLPromptEmbeds(embeds, neg_embeds, pooled, neg_pooled)
