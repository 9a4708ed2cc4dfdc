"""Textual-inversion embeddings: files -> `Embedding`s (a trigger word and its vectors), and added to
a tokenizer and the text encoder's token-embedding table (`add_embeddings`), as diffusers'
`load_textual_inversion` adds them.

The layouts users have (every one read weights-only):

- AUTOMATIC1111 `.pt` / `.bin`: `{"string_to_param": {"*": [N, 768]}, "string_to_token": ..., "name": ...}`;
- AUTOMATIC1111 `.safetensors`: `{"emb_params": [N, 768]}`;
- diffusers `learned_embeds.bin` / `.safetensors` (its textual-inversion training script, the
  sd-concepts-library folders): `{token: [768] or [N, 768]}`; any other file of one tensor reads alike.

The trigger word is the file name without its extension (the web UI's rule: `EasyNegative.safetensors`
is "EasyNegative"), except for diffusers' `learned_embeds.*`, whose name says nothing: there it is the
token the file holds ("<cat-toy>"); an entry may give its own (`{"path": ..., "token": ...}`). A folder
stands for every embedding file under it. SDXL embeddings (`clip_l` / `clip_g`) are refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from animatediff_jax.checkpoints.torch_io import CheckpointError, load_weights
from animatediff_jax.io import fs

EXTENSIONS = (".pt", ".bin", ".safetensors")
_DIFFUSERS_NAME = "learned_embeds"


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """A trigger word and its `vectors` (`[N, D]` float32, one row per token it stands for); `path` is
    the file it came from (what errors name)."""

    token: str
    vectors: np.ndarray
    path: str


def embedding_files(path: str) -> list[str]:
    """`path` if it is a file, else every `.pt` / `.bin` / `.safetensors` file under the folder: its
    own, then each subfolder's, each sorted (none there is an error)."""
    path = os.fspath(path)
    if fs.isfile(path):
        return [path]
    if not fs.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder")
    found = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    if not found:
        raise CheckpointError(f"{path}: no embedding files in this folder (looked for {', '.join(EXTENSIONS)})")
    return found


def _vectors(obj: Any, path: str) -> tuple[np.ndarray, str | None]:
    """The `[N, D]` vectors of a loaded file and the token it names (None: the web UI's layouts)."""
    if isinstance(obj, np.ndarray):
        return obj, None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a textual-inversion embedding (found a {type(obj).__name__})")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        tensors = [v for v in params.values() if isinstance(v, np.ndarray)] if isinstance(params, Mapping) else []
        if len(tensors) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold one tensor (an AUTOMATIC1111 embedding), "
                                  f"found {len(tensors)}")
        return tensors[0], None
    if "clip_l" in obj or "clip_g" in obj:
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l / clip_g); SD1.5 takes one [N, 768] tensor")
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if len(tensors) == 1 and len(obj) == 1:
        key, value = next(iter(tensors.items()))
        return value, None if key == "emb_params" else str(key)
    raise CheckpointError(f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params or "
                          f"one {{token: vector}}; found keys {sorted(map(str, obj))[:6]})")


def read_embedding(path: str, token: str | None = None) -> Embedding:
    """One embedding file (see the module docstring for the layouts and the trigger word)."""
    path = os.fspath(path)
    vectors, stored = _vectors(load_weights(path), path)
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.shape[0]:
        raise CheckpointError(f"{path}: embedding vectors of shape {list(vectors.shape)}; expected [N, width] or "
                              "[width]")
    stem = os.path.splitext(os.path.basename(path))[0]
    if token is None:
        token = stored if stored is not None and stem == _DIFFUSERS_NAME else stem
    if not isinstance(token, str) or not token.strip():
        raise CheckpointError(f"{path}: token {token!r}: expected a word (the trigger word of this embedding)")
    return Embedding(token, vectors, path)


def load_embeddings(entries: Sequence[str | Mapping[str, str]]) -> tuple[Embedding, ...]:
    """Every embedding `entries` name: paths (a file, or a folder of them) or `{"path": ..., "token":
    ...}` (a token for one file). A `CheckpointError` names the file that fails."""
    out = []
    for entry in entries:
        path, token = (entry, None) if isinstance(entry, str) else (entry["path"], entry.get("token") or None)
        files = embedding_files(path)
        if token is not None and len(files) != 1:
            raise CheckpointError(f"{path}: a token ({token!r}) is for one embedding file; this folder has "
                                  f"{len(files)}")
        out += [read_embedding(f, token) for f in files]
    return tuple(out)


def add_embeddings(tokenizer: Any, text_params: Mapping[str, Any], embeddings: Sequence[Embedding]
                   ) -> tuple[Any, dict[str, Any]]:
    """`(tokenizer, text_params)` with `embeddings` added, as diffusers' `load_textual_inversion`: each
    embedding's tokens (`tok`, and `tok_1` ... for a multi-vector one) added to a new `text.Tokenizer`,
    the token-embedding table grown by their rows (ids after the tokenizer's vocabulary) and set to the
    vectors (in the table's dtype). A token the tokenizer already has (or another embedding took), or
    vectors of another width than the table's, is a `CheckpointError` naming the file."""
    emb = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    width = int(emb.shape[-1])
    vocab = set(tokenizer.vocab())
    groups = []
    for e in embeddings:
        n = e.vectors.shape[0]
        tokens = [e.token] + [f"{e.token}_{i}" for i in range(1, n)]
        if e.vectors.shape[1] != width:
            raise CheckpointError(f"{e.path}: vectors {e.vectors.shape[1]} wide; this text encoder's tokens are "
                                  f"{width} wide (an embedding for another model)")
        if n > tokenizer.max_length - 2:
            raise CheckpointError(f"{e.path}: {n} vectors; a prompt chunk holds {tokenizer.max_length - 2}")
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise CheckpointError(f"{e.path}: token {taken[0]!r} is already the tokenizer's (a word of its vocabulary "
                                  "or another embedding's); give this file another token: {'path': ..., 'token': ...}")
        vocab.update(tokens)
        groups.append(tokens)
    tokenizer, ids = tokenizer.with_tokens(groups)
    flat = [i for g in ids for i in g]
    rows = max(int(emb.shape[0]), max(flat, default=-1) + 1)
    table = jnp.asarray(emb)
    if rows > table.shape[0]:
        table = jnp.concatenate([table, jnp.zeros((rows - table.shape[0], width), table.dtype)])
    if flat:
        vectors = np.concatenate([e.vectors for e in embeddings])
        table = table.at[jnp.asarray(flat)].set(jnp.asarray(vectors).astype(table.dtype))
    params = dict(text_params)
    params["text_model"] = {**params["text_model"], "embeddings": {
        **params["text_model"]["embeddings"], "token_embedding": {"embedding": table}}}
    return tokenizer, params
