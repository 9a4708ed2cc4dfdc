"""FreeInit and video to video: where the denoising starts from other than fresh noise.

FreeInit (diffusers' `enable_free_init`) re-noises each finished video to the last timestep, keeps
its low frequencies and draws the high ones afresh; video to video starts from a video's latents
noised to the start step's timestep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.sampling.keys import FREE_INIT_SALT, sample_keys
from animatediff_jax.sampling.options import FREE_INIT_METHODS, FreeInit


def free_init_filter(frames: int, height: int, width: int, method: str = "butterworth", order: float = 4,
                     spatial_stop_frequency: float = 0.25, temporal_stop_frequency: float = 0.25) -> np.ndarray:
    """FreeInit's low-pass filter `[F, h, w]` over the centred (fftshift-ed) frequencies, as diffusers'
    `_get_free_init_freq_filter` (the same for every channel)."""
    if spatial_stop_frequency == 0 or temporal_stop_frequency == 0:
        return np.zeros((frames, height, width), np.float32)
    t = (spatial_stop_frequency / temporal_stop_frequency) * (2 * np.arange(frames) / frames - 1)
    h, w = 2 * np.arange(height) / height - 1, 2 * np.arange(width) / width - 1
    d2 = t[:, None, None] ** 2 + h[None, :, None] ** 2 + w[None, None, :] ** 2
    if method == "butterworth":
        mask = 1 / (1 + (d2 / spatial_stop_frequency**2) ** order)
    elif method == "gaussian":
        mask = np.exp(-1 / (2 * spatial_stop_frequency**2) * d2)
    elif method == "ideal":
        mask = (d2 <= spatial_stop_frequency * 2).astype(np.float64)
    else:
        raise ValueError(f"free_init method {method!r}: expected one of {FREE_INIT_METHODS}")
    return mask.astype(np.float32)


def low_pass(fi: FreeInit, shape: tuple[int, ...]) -> np.ndarray:
    """`free_init_filter` of `fi`'s options for latents `[N, F, h, w, C]`."""
    return free_init_filter(shape[1], shape[2], shape[3], fi.method, fi.order, fi.spatial_stop_frequency,
                            fi.temporal_stop_frequency)


def freq_mix(x: jax.Array, noise: jax.Array, low_pass: jax.Array) -> jax.Array:
    """`x`'s low frequencies and `noise`'s high ones, over (frames, height, width) of `[B, F, h, w, C]`
    videos (diffusers' `_apply_freq_filter`)."""
    axes = (1, 2, 3)
    lp = jnp.asarray(low_pass, jnp.float32)[None, :, :, :, None]
    xf = jnp.fft.fftshift(jnp.fft.fftn(x.astype(jnp.float32), axes=axes), axes=axes)
    nf = jnp.fft.fftshift(jnp.fft.fftn(noise.astype(jnp.float32), axes=axes), axes=axes)
    mixed = jnp.fft.ifftshift(xf * lp + nf * (1 - lp), axes=axes)
    return jnp.fft.ifftn(mixed, axes=axes).real


def free_init_noise(key_data: jax.Array, iteration: int, shape: tuple[int, ...]) -> jax.Array:
    """The fresh standard-normal noise iteration `iteration` of FreeInit mixes in, per video from its key."""
    keys = sample_keys(key_data, shape[0])
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, FREE_INIT_SALT + iteration), shape[1:],
                                                jnp.float32))(keys)


def video_pixels(video: np.ndarray) -> np.ndarray:
    """Frames `[..., H, W, 3]` as float32 in [-1, 1] (uint8 0..255 as diffusers' video processor maps them)."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 127.5 - 1.0
    return video.astype(np.float32)
