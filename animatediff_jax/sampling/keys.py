"""Randomness per video: a seed's key, the keys of a batch, and the salts each use of a video's key
folds in, so a seed gives the same video whatever else is in the batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VIDEO_SALT = 0x56494456  # a video-to-video input's VAE posterior sample ("VIDV")
CONTROL_SALT = 0x53504354  # an RGB SparseCtrl's keyframes ("SPCT", + the control's index)
FREE_INIT_SALT = 0x46524545  # each FreeInit iteration's fresh noise ("FREE", + the iteration)


def seed_key(seed: int) -> jax.Array:
    """`jax.random.key(seed)`, also for the 64-bit seeds of AnimateDiff's configs.

    Seeds below 2**32 give exactly `jax.random.key(seed)`; larger ones the threefry key that
    `jax.random.key` gives with x64 enabled (high and low 32-bit words).
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside [0, 2**64)")
    if seed < 2**31:
        return jax.random.key(seed)
    return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32), impl="threefry2x32")


def sample_keys(key: jax.Array, batch: int) -> jax.Array:
    """One typed key per sample: `key` itself when it is already `[B]`, else `fold_in(key, b)`."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 1:
        if key.shape[0] != batch:
            raise ValueError(f"{key.shape[0]} keys for a batch of {batch}")
        return key
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def salted(keys: jax.Array, salt: int) -> jax.Array:
    """Each of `keys` with `salt` folded in."""
    return jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)
