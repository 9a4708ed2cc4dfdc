"""The one owner of sampling's compiled programs: a bounded cache of executables.

Keyed by the program's name, its static settings (the models, windows, ...) and its arguments'
shapes, dtypes and shardings, never by which params it was given: new params of the same shapes
(a training run's validation, another LoRA) reuse the executable, and the cache holds no arrays.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


class Programs:
    """An LRU of at most `max_entries` compiled programs, and the progress hook they call."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = int(max_entries)
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._on_step: Callable[[int], None] | None = None
        self.compiles = 0  # programs compiled so far (a test of "no new compile" counts these)

    def __len__(self) -> int:
        return len(self._entries)

    def compiled(self, name: str, fn: Callable, static: tuple, args: tuple, out_shardings: Any = None
                 ) -> tuple[Any, float]:
        """`jit(fn)` compiled ahead of time for `args`' shapes and shardings (cached); also the compile seconds."""
        leaves, tree = jax.tree.flatten(args)
        sig = tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves)
        key = (name, static, tree, sig)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key], 0.0
        t0 = time.perf_counter()
        meshes = {s.mesh for s in jax.tree.leaves([getattr(x, "sharding", None) for x in leaves])
                  if isinstance(s, NamedSharding)}
        # Under the args' mesh, so kernels that need it (splash attention's shard_map) see it.
        with jax.set_mesh(meshes.pop()) if len(meshes) == 1 else contextlib.nullcontext():
            compiled = jax.jit(fn, out_shardings=out_shardings).lower(*args).compile()
        self._entries[key] = compiled
        self.compiles += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return compiled, time.perf_counter() - t0

    def executables(self) -> list[Any]:
        """The compiled programs held now, least recently used first."""
        return list(self._entries.values())

    def emit(self, step: int) -> None:
        """The progress hook compiled into the denoising loop: forwards to the running call's callback."""
        cb = self._on_step
        if cb is not None:
            cb(int(step))

    @contextlib.contextmanager
    def reporting(self, callback: Callable[[int], None] | None) -> Iterator[None]:
        """`callback(step)` receives the steps of the programs run inside this block."""
        self._on_step = callback
        try:
            yield
        finally:
            self._on_step = None

    def clear(self) -> None:
        self._entries.clear()


PROGRAMS = Programs()  # the default owner: what `generate` compiles, unless given another
