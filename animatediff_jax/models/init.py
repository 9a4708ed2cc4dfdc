"""Random initialisation of a params tree from its shapes (`models.shapes`), on the host, in numpy.

What training from scratch (`training.models`) and the toy world's base model (`toy.base`) start
from; tests and benchmarks build their random models with it too. Flax `init` of a whole UNet takes
a minute to compile on CPU; this takes a fraction of a second.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flax import traverse_util

from animatediff_jax.models.shapes import is_motion_path

Params = dict[str, Any]


def random_params(shapes: Params, seed: int, dtype: Any = np.float32, *, like_init: bool = False) -> Params:
    """Random weights from a shape tree, cast leaf by leaf to `dtype` (a full-size model never exists
    in float32 when bf16 is asked for). Kernels ~ N(0, 1/fan_in), embeddings N(0, 0.02).

    `like_init=False` (conversion tests: every tensor distinct): norm scales 1 + N(0, 0.1), biases
    N(0, 0.02). `like_init=True` (training from scratch): scales 1, biases 0, and the motion modules'
    `proj_out` zero as `init` makes it, so fresh motion modules start as the identity.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        shape, leaf = tuple(s.shape), path[-1]
        if leaf == "kernel" and like_init and is_motion_path(path) and "proj_out" in path:
            v = np.zeros(shape, np.float32)
        elif leaf == "kernel":
            v = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(max(1, math.prod(shape[:-1]))))
        elif leaf == "scale":
            v = np.ones(shape, np.float32) if like_init else 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        elif like_init and leaf != "embedding":
            v = np.zeros(shape, np.float32)
        else:
            v = 0.02 * rng.standard_normal(shape, np.float32)
        out[path] = np.asarray(v, np.float32).astype(dtype)
    return traverse_util.unflatten_dict(out)
