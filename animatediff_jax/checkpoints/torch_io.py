"""Reading PyTorch weight files and mapping state dicts onto Flax param trees.

Our Flax modules are named after the diffusers / transformers modules they mirror
(`down_blocks.0.resnets.1.conv1` becomes `down_blocks_0/resnets_1/conv1`), so one generic
rule converts every model: split the key on dots, glue list indices onto the name before
them, rename the leaf (`weight` -> `kernel`/`scale`/`embedding`) and transpose the layout
(linear `OI -> IO`, conv `OIHW -> HWIO`). The target tree (from `jax.eval_shape` of
`init`) decides the leaf names, so there is no per-model table to keep in sync, and a
checkpoint that does not fit is reported key by key instead of being silently skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from animatediff_jax.io import fs

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

_SAFETENSORS = (".safetensors",)
_PICKLES = (".ckpt", ".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A weight file that cannot be used: names the file, the format, and the bad keys."""


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    more = f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})"
    return shown + more


def report_mismatch(
    what: str,
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[str] = (),
) -> None:
    """Raise a `CheckpointError` naming a few of each kind of bad key, with counts."""
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not fit the model:"]
    if missing:
        lines.append(f"  missing keys: {_few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_few(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches: {_few(mismatched)}")
    raise CheckpointError("\n".join(lines))


def check_tree(what: str, got: Mapping[tuple, Any], expected: Mapping[tuple, Any]) -> None:
    """`report_mismatch` for flat `{path: array}` params against flat `{path: shape-carrier}` expectations."""
    report_mismatch(
        what,
        missing=["/".join(p) for p in expected if p not in got],
        unexpected=["/".join(p) for p in got if p not in expected],
        mismatched=[
            f"{'/'.join(p)} {tuple(np.shape(v))} vs model {tuple(expected[p].shape)}"
            for p, v in got.items()
            if p in expected and tuple(np.shape(v)) != tuple(expected[p].shape)
        ],
    )


_NONFINITE = threading.local()


@contextlib.contextmanager
def nonfinite_allowed() -> Iterator[None]:
    """Inside, weight files holding NaN/Inf load with a warning instead of a `CheckpointError`
    (the `--allow-nonfinite` flags of `convert` / `export`, `allow_nonfinite` of a sample config)."""
    prev = getattr(_NONFINITE, "allowed", False)
    _NONFINITE.allowed = True
    try:
        yield
    finally:
        _NONFINITE.allowed = prev


def check_finite(arrays: Mapping[Any, Any], what: str) -> None:
    """Refuses weights holding NaN/Inf (they give black videos, or a diverged run's export): names a
    few tensors and the count; inside `nonfinite_allowed()` it only warns."""
    bad = []
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad.append("/".join(k) if isinstance(k, tuple) else str(k))
        elif a.dtype.kind == "V" or a.dtype.name == "bfloat16":
            if not np.isfinite(a.astype(np.float32)).all():
                bad.append("/".join(k) if isinstance(k, tuple) else str(k))
    if not bad:
        return
    msg = f"{what}: holds NaN/Inf in {_few(bad)} (a diverged or damaged model)"
    if getattr(_NONFINITE, "allowed", False):
        print(f"warning: {msg}; loading it anyway (allowed)", file=sys.stderr)
        return
    raise CheckpointError(f"{msg}; pass --allow-nonfinite (sample: allow_nonfinite=True) to load it anyway")


# --------------------------------------------------------------------------- files


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Loads a `.safetensors` or pickled (`.ckpt`/`.bin`/`.pt`) state dict as numpy arrays.

    Pickles are untrusted input: they are only read with `torch.load(weights_only=True)`.
    A `state_dict` wrapper (as in `mm_sd_v15.ckpt` and LDM checkpoints) is unwrapped.
    """
    path = os.fspath(path)
    if not fs.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    lower = path.lower()
    if not lower.endswith(_SAFETENSORS + _PICKLES):
        raise CheckpointError(
            f"{path}: unknown weight file extension (expected one of {_SAFETENSORS + _PICKLES})"
        )
    try:
        with fs.local_file(path) as local:  # a bucket object: through a temporary local copy
            if lower.endswith(_SAFETENSORS):
                from safetensors.numpy import load_file

                try:
                    sd = dict(load_file(local))
                except Exception:  # dtypes numpy cannot hold (without ml_dtypes): go through torch.
                    from safetensors.torch import load_file as load_torch

                    sd = {k: _to_numpy(v) for k, v in load_torch(local).items()}
            else:
                import torch

                import pickle

                try:
                    obj = torch.load(local, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError:
                    raise CheckpointError(
                        f"{path}: refused: unsafe or not a checkpoint (a pickle holding more than tensors; "
                        "only weights-only loading is allowed)"
                    ) from None
                if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
                    obj = obj["state_dict"]
                if not isinstance(obj, Mapping):
                    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
                sd = {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}
    except CheckpointError:
        raise
    except Exception as e:  # truncated / corrupt / not a checkpoint at all
        raise CheckpointError(f"{path}: cannot be read as a weight file ({type(e).__name__}: {e})") from e
    check_finite(sd, path)
    return sd


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a `.safetensors` file, read from its header only (also in a bucket:
    the first bytes of the object, not the whole file). Unreadable: the reader's exception."""
    path = os.fspath(path)
    if not fs.is_remote(path):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    import json

    with fs.open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (header size {n})")
        header = json.loads(f.read(n))
    return dict(header.get("__metadata__") or {})


_DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    # The fp16 variant (`from_pretrained(..., variant="fp16")`), for folders that hold only it.
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)


def find_weights_file(folder: str | os.PathLike) -> str:
    """The weight file of one diffusers/transformers component folder.

    Full precision before the fp16 variant (as `from_pretrained` without `variant`), safetensors
    before `.bin`; an fp16-only folder loads its fp16 file (weights are upcast on conversion).
    """
    folder = os.fspath(folder)
    if not fs.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    for name in _DIFFUSERS_WEIGHT_NAMES:
        p = os.path.join(folder, name)
        if fs.isfile(p):
            return p
    names = sorted(fs.listdir(folder))
    if any(n.endswith(".index.json") for n in names):
        raise CheckpointError(f"{folder}: sharded checkpoints are not supported yet (found {names})")
    raise CheckpointError(f"{folder}: no weight file (looked for {', '.join(_DIFFUSERS_WEIGHT_NAMES)}; found {names})")


def load_component(folder: str | os.PathLike) -> StateDict:
    return load_state_dict(find_weights_file(folder))


# ----------------------------------------------------------------- torch <-> flax


_INDEX = re.compile(r"^\d+$")


def torch_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """`a.b.0.c.weight` -> (("a", "b_0", "c"), "weight")."""
    parts = key.split(".")
    out: list[str] = []
    for p in parts[:-1]:
        if _INDEX.match(p) and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out), parts[-1]


def flax_to_torch_name(path: tuple[str, ...]) -> str:
    """("a", "b_0", "c") -> "a.b.0.c" (inverse of the module part of `torch_module_path`)."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def _torch_to_flax_value(leaf: str, target_leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if target_leaf == "kernel":
        if value.ndim == 4 and len(target_shape) == 4:  # conv OIHW -> HWIO
            return value.transpose(2, 3, 1, 0)
        if value.ndim == 4 and len(target_shape) == 2:  # 1x1 conv used as a Dense
            return value[:, :, 0, 0].T
        if value.ndim == 2:
            return value.T
    return value


def _flax_to_torch_value(flax_leaf: str, value: np.ndarray, torch_ndim: int | None) -> np.ndarray:
    if flax_leaf == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if value.ndim == 2:
            out = value.T
            if torch_ndim == 4:
                out = out[:, :, None, None]
            return out
    return value


def _leaf_candidates(leaf: str) -> tuple[str, ...]:
    if leaf == "weight":
        return ("kernel", "scale", "embedding")
    return (leaf,)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    what: str = "checkpoint",
    dtype: Any = np.float32,
    strict: bool = True,
) -> Params:
    """Maps a (diffusers-named) torch state dict onto the Flax tree shaped like `target`.

    `target` is a params tree of arrays or `ShapeDtypeStruct`s (e.g. `jax.eval_shape(init)`).
    With `strict`, every target leaf must be filled and every source key used; otherwise the
    error names the missing, unexpected and mismatched keys. Non-strict returns a partial tree
    (for deltas such as motion modules alone).
    """
    flat_target = traverse_util.flatten_dict(target)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
    for key, value in state_dict.items():
        mod, leaf = torch_module_path(key)
        for cand in _leaf_candidates(leaf):
            if mod + (cand,) in flat_target:
                path = mod + (cand,)
                break
        else:
            unexpected.append(key)
            continue
        seen.add(path)
        tshape = tuple(flat_target[path].shape)
        if np.asarray(value).dtype.kind in "biu" and np.dtype(getattr(flat_target[path], "dtype", np.float32)).kind == "f":
            mismatched.append(f"{key} is an integer tensor ({np.asarray(value).dtype}) vs model {'/'.join(path)} (float)")
            continue
        v = _torch_to_flax_value(leaf, path[-1], np.asarray(value), tshape)
        if tuple(v.shape) != tshape:
            mismatched.append(f"{key} {tuple(np.shape(value))} vs model {'/'.join(path)} {tshape}")
            continue
        out[path] = v.astype(dtype)
    missing = ["/".join(p) for p in flat_target if p not in seen] if strict else []
    report_mismatch(what, missing=missing, unexpected=unexpected, mismatched=mismatched)
    return traverse_util.unflatten_dict(out)


def flax_to_torch(
    params: Mapping[str, Any],
    *,
    conv1x1: Callable[[tuple[str, ...]], bool] = lambda path: False,
    dtype: Any = np.float32,
) -> StateDict:
    """Inverse of `torch_to_flax`: a diffusers-named state dict of numpy arrays.

    `conv1x1(module_path)` says which 2-D kernels were 1x1 convs in torch (SD1.5's spatial
    `proj_in`/`proj_out`), so they are written back as `(O, I, 1, 1)`.
    """
    out: StateDict = {}
    for path, v in traverse_util.flatten_dict(params).items():
        mod, leaf = path[:-1], path[-1]
        v = np.asarray(v)
        torch_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
        ndim = 4 if (leaf == "kernel" and v.ndim == 2 and conv1x1(mod)) else None
        out[f"{flax_to_torch_name(mod)}.{torch_leaf}"] = np.ascontiguousarray(
            _flax_to_torch_value(leaf, v, ndim)
        ).astype(dtype)
    return out


def save_state_dict(path: str | os.PathLike, sd: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """`.safetensors` (with optional string metadata) or a pickled `.ckpt`/`.pt`/`.pth`/`.bin` (torch.save).

    Written atomically (`io.fs.atomic_file`): a failed write leaves any previous file untouched.
    """
    from animatediff_jax.io.fs import atomic_file

    path = os.fspath(path)
    sd = {k: np.asarray(v, order="C") for k, v in sd.items()}  # (ascontiguousarray makes 0-d arrays 1-d)
    lower = path.lower()
    if not lower.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
        raise ValueError(f"{path}: unknown weight file extension (use .safetensors or .ckpt)")
    if metadata and not lower.endswith(".safetensors"):
        raise ValueError(f"{path}: metadata needs a .safetensors file")
    with atomic_file(path) as tmp:
        try:
            if lower.endswith(".safetensors"):
                from safetensors.numpy import save_file

                save_file(sd, tmp, metadata={"format": "pt", **(metadata or {})})
            else:
                import torch

                torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp)
        except OSError:
            raise
        except Exception as e:  # torch / safetensors report a failed write (disk full, file size limit) so
            raise OSError(errno.EIO, f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
