"""Compiled programs saved to disk (`animatediff-jax compile ... --save DIR`) and loaded by the command
that runs them (`train --config.executables=DIR`) instead of compiling again: a pod's first step starts
without the minutes of compiling. maxdiffusion's `aot_cache.py` does the same for its pipelines.

A saved program is `<name>.bin` (`jax.experimental.serialize_executable`) beside `<name>.json`: what it
was compiled for (device kind and count, the config's program fingerprint, jax / jaxlib / libtpu
versions). A program is loaded only when all of these match; otherwise the command says why in one line
and compiles as usual. Executables are code: load only folders you wrote yourself.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from typing import Any, Mapping

from animatediff_jax.io import fs


def versions() -> dict[str, str]:
    """jax, jaxlib and (if installed) libtpu versions: an executable runs only under the ones that built it."""
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "libtpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def fingerprint(fields: Mapping[str, Any]) -> str:
    """A short hash of the config fields that decide a program (see `training.program.program_fields`)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_")


def target(devices: list) -> dict[str, Any]:
    """What the program runs on: the device kind and count."""
    return {"device_kind": str(devices[0].device_kind), "num_devices": len(devices)}


def save(folder: str, name: str, compiled, meta: Mapping[str, Any]) -> str:
    """`compiled` and `meta` (+ versions) to `folder/<name>.bin|.json`, each written atomically."""
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    fs.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, file_name(name))
    meta = dict(meta, versions=versions())
    for path, data in ((base + ".bin", pickle.dumps((payload, in_tree, out_tree))),
                       (base + ".json", json.dumps(meta, indent=2, sort_keys=True).encode())):
        with fs.atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    return base + ".bin"


def load(folder: str, name: str, expect: Mapping[str, Any]) -> tuple[Any, str]:
    """`(compiled, why)`: the saved program `name` if its record matches `expect` (+ this process's
    versions), else `(None, one line saying what differs)`."""
    base = os.path.join(folder, file_name(name))
    if not fs.isfile(base + ".bin") or not fs.isfile(base + ".json"):
        return None, f"{base}.bin: no saved program of that name"
    with fs.open(base + ".json") as f:
        meta = json.load(f)
    want = dict(expect, versions=versions())
    diff = [f"{k} {meta.get(k)!r} (here {v!r})" for k, v in want.items() if meta.get(k) != v]
    if diff:
        return None, f"{base}.bin was compiled for another setting: {'; '.join(diff)}"
    from jax.experimental import serialize_executable

    with fs.open(base + ".bin", "rb") as f:
        payload, in_tree, out_tree = pickle.load(f)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree), ""
