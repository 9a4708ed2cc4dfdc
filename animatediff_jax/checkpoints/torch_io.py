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
import dataclasses
import errno
import functools
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


class ModelSizeError(CheckpointError):
    """A file made for another model size (other channels or layer counts than the model it was
    loaded for): commands whose base model is a default say which option names another."""


def _few(keys: Iterable[str], n: int = 5, sep: str = ", ") -> str:
    """A few of `keys` (sorted) and how many more: `a, b, c and 4 more`."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return sep.join(keys[:n]) + more


@dataclasses.dataclass(frozen=True)
class Misfit:
    """A tensor whose shape is not the model's: its name and both shapes, in one layout (the file's)."""

    name: str
    found: tuple[int, ...]
    needed: tuple[int, ...]
    holder: str = "the file has"

    def __str__(self) -> str:
        return f"{self.name}: {self.holder} {self.found}, the model needs {self.needed}"


def size_difference(misfits: Iterable[Misfit], common: int) -> str | None:
    """`"channels 32 vs 320"` when `misfits` say the tensors were made for another model size (two or
    more, at least half of the `common` tensors both sides have, each the same rank both sides): the
    first differing dimension of the first (by name). None for a few odd tensors."""
    misfits = sorted(misfits, key=lambda m: m.name)
    if len(misfits) < 2 or 2 * len(misfits) < common or any(len(m.found) != len(m.needed) for m in misfits):
        return None
    found, needed = next((f, n) for f, n in zip(misfits[0].found, misfits[0].needed) if f != n)
    return f"channels {found} vs {needed}"


def report_mismatch(
    what: str,
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[str | Misfit] = (),
    common: int | None = None,
    noun: str = "this file",
) -> None:
    """Raise a `CheckpointError` naming a few of each kind of bad key (one line per kind; one line in
    all for one kind). With `common` (how many tensors both sides have), shape mismatches in most of
    them are one `ModelSizeError` line: `noun` is for another model size."""
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    if not (missing or unexpected or mismatched):
        return
    misfits = [m for m in mismatched if isinstance(m, Misfit)]
    size = size_difference(misfits, common) if common is not None else None
    if size is not None:
        raise ModelSizeError(f"{what} does not fit the model: shape mismatches in {len(misfits)} of {common} "
                             f"tensors: {noun} is for another model size (e.g. {size})")
    raise fit_error(what, [
        ("missing keys", _few(missing)),
        ("unexpected keys", _few(unexpected)),
        ("shape mismatches", _few(map(str, mismatched), 4, "; ")),
    ])


def fit_error(what: str, parts: Iterable[tuple[str, str]]) -> CheckpointError:
    """`{what} does not fit the model: <label>: <text>`, one line per non-empty part (one in all for one)."""
    parts = [(label, text) for label, text in parts if text]
    if len(parts) == 1:
        return CheckpointError(f"{what} does not fit the model: {parts[0][0]}: {parts[0][1]}")
    return CheckpointError("\n".join([f"{what} does not fit the model:"] + [f"  {k}: {v}" for k, v in parts]))


def check_tree(what: str, got: Mapping[tuple, Any], expected: Mapping[tuple, Any], noun: str = "this file") -> None:
    """`report_mismatch` for flat `{path: array}` params against flat `{path: shape-carrier}` expectations
    (params files: their own naming and layout are ours)."""
    report_mismatch(
        what,
        missing=["/".join(p) for p in expected if p not in got],
        unexpected=["/".join(p) for p in got if p not in expected],
        mismatched=[
            Misfit("/".join(p), tuple(np.shape(v)), tuple(expected[p].shape), "has")
            for p, v in got.items()
            if p in expected and tuple(np.shape(v)) != tuple(expected[p].shape)
        ],
        common=sum(p in expected for p in got),
        noun=noun,
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
                obj = _torch_load(local, path)
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


def _torch_load(local: str, path: str) -> Any:
    """A pickled file's object, read with `torch.load(weights_only=True)` only (tensors, containers,
    numbers and strings; anything else is refused)."""
    import pickle

    import torch

    try:
        return torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: unsafe or not a checkpoint (a pickle holding more than tensors; "
            "only weights-only loading is allowed)"
        ) from None


def load_weights(path: str | os.PathLike) -> Any:
    """A weight file as it is stored: a `.safetensors` file's `{name: array}`, or a pickle's object
    (nested dicts and lists, tensors as `np.ndarray`, numbers, strings) read weights-only. For files
    that are not flat state dicts (textual-inversion embeddings); `load_state_dict` is the usual reader."""
    path = os.fspath(path)
    if path.lower().endswith(_SAFETENSORS):
        return load_state_dict(path)
    if not fs.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if not path.lower().endswith(_PICKLES):
        raise CheckpointError(f"{path}: unknown weight file extension (expected one of {_SAFETENSORS + _PICKLES})")

    def numpy(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: numpy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(numpy(v) for v in x)
        return _to_numpy(x) if hasattr(x, "detach") else x

    try:
        with fs.local_file(path) as local:
            obj = numpy(_torch_load(local, path))
    except CheckpointError:
        raise
    except Exception as e:  # truncated / corrupt / not a checkpoint at all
        raise CheckpointError(f"{path}: cannot be read as a weight file ({type(e).__name__}: {e})") from e
    arrays: dict[str, np.ndarray] = {}

    def gather(x: Any, key: str) -> None:
        if isinstance(x, np.ndarray):
            arrays[key] = x
        elif isinstance(x, Mapping):
            for k, v in x.items():
                gather(v, f"{key}.{k}" if key else str(k))

    gather(obj, "")
    check_finite(arrays, path)
    return obj


def _safetensors_header(path: str) -> dict:
    """A `.safetensors` file's JSON header, read alone (also in a bucket: the first bytes of the object)."""
    import json

    with fs.open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (header size {n})")
        return json.loads(f.read(n))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a `.safetensors` file, read from its header only (also in a bucket:
    the first bytes of the object, not the whole file). Unreadable: the reader's exception."""
    path = os.fspath(path)
    if not fs.is_remote(path):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    return dict(_safetensors_header(path).get("__metadata__") or {})


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a `.safetensors` file, from its header only (no tensor is read)."""
    return [k for k in _safetensors_header(os.fspath(path)) if k != "__metadata__"]


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
        if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):  # 1x1 conv used as a Dense
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


def torch_shape(flax_leaf: str, shape: tuple[int, ...], ndim: int | None = None) -> tuple[int, ...]:
    """A Flax param's shape in PyTorch's layout (conv `HWIO -> OIHW`, linear `IO -> OI`); `ndim=4` for
    a Dense kernel that the file holds as a 1x1 conv (`(O, I, 1, 1)`)."""
    s = tuple(int(d) for d in shape)
    if flax_leaf == "kernel":
        if len(s) == 4:
            return (s[3], s[2], s[0], s[1])
        if len(s) == 2:
            return (s[1], s[0]) + ((1, 1) if ndim == 4 else ())
    return s


def torch_key(path: tuple[str, ...]) -> str:
    """A Flax param path's diffusers key: `("a", "b_0", "kernel")` -> `"a.b.0.weight"`."""
    leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
    return f"{flax_to_torch_name(path[:-1])}.{leaf}" if len(path) > 1 else leaf


@dataclasses.dataclass(frozen=True)
class FileNames:
    """How a weight file names (and shapes) the keys a conversion reads, so that a file that does not
    fit is reported in its own words: the keys as in the file, the shapes in its (PyTorch) layout.

    `origin`: converted (diffusers) key -> the file's key it was read from, for renamed keys;
    `rename`: the renaming rule backwards (converted key -> the file's name), for keys the file lacks.
    Without a rule a missing key is named after a renamed sibling (`...in_layers.2.bias` was read as
    `...conv1.bias`, so `...conv1.weight` is `...in_layers.2.weight`), else by its converted name,
    said to be diffusers'. `shapes`: file key -> its shape in the file, where the conversion reshaped
    it (LDM's 1x1 convs read as linear weights).
    """

    origin: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rename: Callable[[str], str] | None = None
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def _modules(self) -> dict[str, str | None]:
        """Converted module -> the file's, from the renamed keys (None: read two ways)."""
        out: dict[str, str | None] = {}
        for conv, file in self.origin.items():
            a, b = conv.split("."), file.split(".")
            n = len(a)
            while len(a) > 1 and len(b) > 1 and a[-1] == b[-1]:
                a, b = a[:-1], b[:-1]
            if a == b or len(a) == n:
                continue  # not renamed, or the leaves differ
            ca, fb = ".".join(a), ".".join(b)
            out[ca] = fb if out.get(ca, fb) == fb else None
        return out

    def present(self, converted: str) -> str:
        """The file's name of a converted key read from it."""
        return self.origin.get(converted, converted)

    def missing(self, converted: str) -> str:
        """The file's name of a converted key the file lacks (the name it would have there)."""
        if self.rename is not None:
            return self.rename(converted)
        if not self.origin:
            return converted
        mod = converted
        while "." in mod:
            mod = mod.rsplit(".", 1)[0]
            if self._modules.get(mod):
                return self._modules[mod] + converted[len(mod):]
        return f"{converted} (diffusers' name)"

    def shape(self, converted: str, value: Any) -> tuple[int, ...]:
        """The shape in the file of a converted key read from it (`value`: as converted)."""
        return tuple(self.shapes.get(self.present(converted), np.shape(value)))

    def after(self, renamed: Mapping[str, str], back: Callable[[str], str] | None = None) -> "FileNames":
        """These names after one more renaming step: `renamed` (new key -> the key before it), `back`
        (the step's rule backwards, for keys the file lacks)."""
        origin = {**self.origin, **{new: self.present(old) for new, old in renamed.items()}}
        if back is not None:
            return FileNames(origin, lambda k: self.missing(back(k)), self.shapes)
        return FileNames(origin, self.rename, self.shapes)


def _kind(mod: tuple[str, ...]) -> tuple[str, ...]:
    """A module path without its indices: `down_blocks_0/attentions_1/proj_in` -> `down_blocks/attentions/proj_in`."""
    return tuple(re.sub(r"_\d+$", "", p) for p in mod)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    what: str = "checkpoint",
    dtype: Any = np.float32,
    strict: bool = True,
    names: FileNames | None = None,
) -> Params:
    """Maps a (diffusers-named) torch state dict onto the Flax tree shaped like `target`.

    `target` is a params tree of arrays or `ShapeDtypeStruct`s (e.g. `jax.eval_shape(init)`).
    With `strict`, every target leaf must be filled and every source key used; otherwise the
    error names the missing, unexpected and mismatched keys, each as a PyTorch key with its shape
    in PyTorch's layout; a file made for another model size is one `ModelSizeError` line. `names`
    says how the file names the keys (when the state dict was renamed from it), so errors use the
    file's own words; without it the state dict's keys are the file's. Non-strict returns a
    partial tree (for deltas such as motion modules alone).
    """
    flat_target = traverse_util.flatten_dict(target)
    file = names or FileNames()
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
    conv1x1 = set()  # kinds of module (`_kind`) the file holds as 1x1 convs where ours are Dense kernels
    for key, value in state_dict.items():
        value = np.asarray(value)
        name, shape = file.present(key), file.shape(key, value)
        mod, leaf = torch_module_path(key)
        for cand in _leaf_candidates(leaf):
            if mod + (cand,) in flat_target:
                path = mod + (cand,)
                break
        else:
            unexpected.append(f"{name} {shape}")
            continue
        seen.add(path)
        tshape = tuple(flat_target[path].shape)
        if len(shape) == 4 and len(tshape) == 2 and path[-1] == "kernel":
            conv1x1.add(_kind(mod))
        if value.dtype.kind in "biu" and np.dtype(getattr(flat_target[path], "dtype", np.float32)).kind == "f":
            mismatched.append(f"{name} is an integer tensor ({value.dtype}) vs model {'/'.join(path)} (float)")
            continue
        v = _torch_to_flax_value(leaf, path[-1], value, tshape)
        if tuple(v.shape) != tshape:
            mismatched.append(Misfit(name, shape, torch_shape(path[-1], tshape, len(shape))))
            continue
        out[path] = v.astype(dtype)
    missing = []
    if strict:
        for p, t in flat_target.items():
            if p in seen:
                continue
            ndim = 4 if _kind(p[:-1]) in conv1x1 else None
            missing.append(f"{file.missing(torch_key(p))} {torch_shape(p[-1], tuple(t.shape), ndim)}")
    report_mismatch(what, missing=missing, unexpected=unexpected, mismatched=mismatched, common=len(seen))
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
