"""CLIP image preprocessing in JAX, as transformers' `CLIPImageProcessor` does it.

The steps are the processor's: resize so the shortest side is `size` (or to a fixed `(h, w)`),
center crop `crop_size`, rescale by `1/255`, normalise with CLIP's mean/std. Each one reproduces
the processor bit for bit on uint8 input:

- Resize is Pillow's `Image.resize` (what the processor's PIL backend calls, and what torch's
  uint8 antialiased resize of its torchvision backend mimics): separable, antialiased (the filter
  support grows with the downscale factor), Pillow's bicubic kernel (a = -0.5) or bilinear, with
  Pillow's 8-bit fixed-point arithmetic (22-bit integer coefficients, one pass rounded to uint8,
  then the other; Pillow 13's choice of which pass goes first, `pillow_vertical_first`). The coefficients are computed on the host in float64 exactly as
  Pillow computes them; the passes run in int32 in JAX, so results equal Pillow's.
- Crop offsets are the processor's (`(h - crop) // 2`; zero padding when the image is smaller).
- Rescale + normalise is a 256-entry table per channel computed with the PIL backend's own numpy
  arithmetic (`float32(float64(v) * 1/255)`, then `(x - mean) / std` in float32).

Images are `[N, H, W, C]` (C = 3, or 1 which is repeated to RGB), uint8, or float in [0, 1], which
is first made uint8 by `round(x * 255)` as diffusers' `numpy_to_pil` does before the safety checker's
feature extractor sees the images. Output: `[N, crop_h, crop_w, 3]` float32, channels last (our CLIP
vision tower's layout; transformers' `pixel_values` are the same transposed to `[N, 3, h, w]`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL.Image.Resampling values (the processor's `resample`).
BILINEAR = 2
BICUBIC = 3
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c for 8-bit images


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """The settings of a `CLIPImageProcessor` (`preprocessor_config.json`); defaults are CLIP's (224).

    `size`: an int is the shortest edge (aspect kept, the long side `int(size * long / short)`),
    a pair `(height, width)` a fixed size.
    """

    size: int | tuple[int, int] = 224
    crop_size: tuple[int, int] = (224, 224)
    resample: int = BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.do_resize and self.resample not in (BILINEAR, BICUBIC):
            raise ValueError(
                f"resample {self.resample} ({_RESAMPLE_NAMES.get(self.resample, '?')}) is not supported; "
                "only bicubic (3) and bilinear (2) are"
            )

    @classmethod
    def for_image_size(cls, image_size: int) -> "ImageProcessing":
        """CLIPImageProcessor's defaults at another resolution (a folder without `preprocessor_config.json`)."""
        return cls(size=int(image_size), crop_size=(int(image_size), int(image_size)))

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any]) -> "ImageProcessing":
        """From a `preprocessor_config.json` dict, old style (`"size": 224, "crop_size": 224`, as in
        SD1.5's `feature_extractor/`) or new (`{"shortest_edge": 224}`, `{"height": .., "width": ..}`)."""
        d = cls()

        def size_of(v, default_to_square: bool):
            if v is None:
                return None
            if isinstance(v, (int, float)):
                return (int(v), int(v)) if default_to_square else int(v)
            if isinstance(v, (list, tuple)):
                return (int(v[0]), int(v[1])) if len(v) == 2 else size_of(v[0], default_to_square)
            if "shortest_edge" in v:
                if v.get("longest_edge") is not None:
                    raise ValueError(f"size {dict(v)}: a longest_edge limit is not supported")
                return int(v["shortest_edge"])
            if "height" in v and "width" in v:
                return (int(v["height"]), int(v["width"]))
            raise ValueError(f"unsupported size {dict(v)} (expected shortest_edge or height/width)")

        size = size_of(cfg.get("size"), default_to_square=False)
        crop = size_of(cfg.get("crop_size"), default_to_square=True)
        if isinstance(crop, int):
            crop = (crop, crop)
        return cls(
            size=d.size if size is None else size,
            crop_size=d.crop_size if crop is None else crop,
            resample=int(cfg.get("resample", d.resample)),
            do_resize=bool(cfg.get("do_resize", d.do_resize)),
            do_center_crop=bool(cfg.get("do_center_crop", d.do_center_crop)),
            do_rescale=bool(cfg.get("do_rescale", d.do_rescale)),
            rescale_factor=float(cfg.get("rescale_factor", d.rescale_factor)),
            do_normalize=bool(cfg.get("do_normalize", d.do_normalize)),
            image_mean=tuple(float(x) for x in cfg.get("image_mean", d.image_mean)),
            image_std=tuple(float(x) for x in cfg.get("image_std", d.image_std)),
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` the resize step gives (transformers' `get_resize_output_image_size`)."""
        if not self.do_resize:
            return height, width
        if not isinstance(self.size, int):
            return tuple(self.size)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        return tuple(self.crop_size) if self.do_center_crop else self.resized_shape(height, width)


# ----------------------------------------------------------------------------- Pillow's resample


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {BICUBIC: (_bicubic, 2.0), BILINEAR: (_bilinear, 1.0)}


def pil_coefficients(in_size: int, out_size: int, resample: int = BICUBIC) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: `(first [out], k [out, ksize])`,
    the first input index each output reads and its int32 fixed-point weights (zero past its window)."""
    filt, support = _FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    w = filt(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss)
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    ww = np.zeros(out_size)
    for j in range(ksize):  # Pillow sums the taps in order
        ww = ww + w[:, j]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)), np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
    return xmin.astype(np.int32), fixed.astype(np.int32)


def _resample_axis(x: jax.Array, axis: int, out_size: int, resample: int) -> jax.Array:
    """One 8-bit pass of Pillow's resample along `axis` of an int32 image holding uint8 values."""
    in_size = x.shape[axis]
    first, k = pil_coefficients(in_size, out_size, resample)
    acc = jnp.full(x.shape[:axis] + (out_size,) + x.shape[axis + 1 :], 1 << (_PRECISION_BITS - 1), jnp.int32)
    bshape = [1] * x.ndim
    bshape[axis] = out_size
    for j in range(k.shape[1]):
        if not k[:, j].any():
            continue
        idx = np.minimum(first + j, in_size - 1)
        acc = acc + jnp.take(x, idx, axis=axis) * jnp.asarray(k[:, j]).reshape(bshape)
    return jnp.clip(acc >> _PRECISION_BITS, 0, 255)


def pillow_vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
    pixels as the width (`ImagingResampleInner`); Pillow <= 12 always ran the horizontal pass first.
    The two differ (by rounding of the uint8 intermediate) only for such images, e.g. frames more
    than twice as tall as wide being shrunk; landscape and square frames resize the same in both."""
    return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def pil_resize(
    images: jax.Array, height: int, width: int, resample: int = BICUBIC, *, vertical_first: bool | None = None
) -> jax.Array:
    """`[N, H, W, C]` uint8 -> `[N, height, width, C]` uint8, equal to Pillow's `Image.resize((width, height))`.

    `vertical_first`: the order of the two passes; None is Pillow 13's rule (`pillow_vertical_first`),
    False is Pillow <= 12's."""
    return _pil_resize(jnp.asarray(images), int(height), int(width), int(resample), vertical_first)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _pil_resize(images: jax.Array, height: int, width: int, resample: int, vertical_first: bool | None) -> jax.Array:
    x = images.astype(jnp.int32)
    if vertical_first is None:
        vertical_first = pillow_vertical_first(x.shape[1], x.shape[2], height, width)
    passes = [(1, height), (2, width)] if vertical_first else [(2, width), (1, height)]
    for axis, size in passes:
        if x.shape[axis] != size:
            x = _resample_axis(x, axis, size, resample)
    return x.astype(jnp.uint8)


# ----------------------------------------------------------------------------- the processor


def to_uint8(images: Any) -> jax.Array:
    """uint8 as is; float in [0, 1] -> `round(x * 255)` (diffusers' `numpy_to_pil`), clipped to [0, 255]."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        return x
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    return jnp.clip(jnp.round(x.astype(jnp.float32) * 255), 0, 255).astype(jnp.uint8)


def _center_crop(x: jax.Array, ch: int, cw: int) -> jax.Array:
    h, w = x.shape[1], x.shape[2]
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:  # the processor pads with zeros, `ceil(pad / 2)` before
        x = jnp.pad(x, ((0, 0), (-(-ph // 2), ph // 2), (-(-pw // 2), pw // 2), (0, 0)))
        h, w = x.shape[1], x.shape[2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top : top + ch, left : left + cw]


def _value_table(p: ImageProcessing) -> np.ndarray:
    """`[3, 256]` float32: what rescale + normalise make of each uint8 value, per channel."""
    v = np.arange(256, dtype=np.uint8)
    x = (v.astype(np.float64) * p.rescale_factor).astype(np.float32) if p.do_rescale else v.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if p.do_normalize:
        mean = np.asarray(p.image_mean, np.float32)[:, None]
        std = np.asarray(p.image_std, np.float32)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, np.float32)


def preprocess(images: Any, processing: ImageProcessing = ImageProcessing()) -> jax.Array:
    """`[N, H, W, C]` uint8 (or float in [0, 1]) -> CLIP pixel values `[N, crop_h, crop_w, 3]` float32.

    Equal to `CLIPImageProcessor(**settings)(pil_images).pixel_values` transposed to channels last
    (bit for bit against its PIL backend). Jitted: one compile per input shape and dtype.
    """
    return _preprocess(jnp.asarray(images), processing)


@functools.partial(jax.jit, static_argnames=("processing",))
def _preprocess(x: jax.Array, processing: ImageProcessing) -> jax.Array:
    if x.ndim == 3:  # one image
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] (or [N, H, W, 1]), got shape {tuple(x.shape)}")
    x = to_uint8(x)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    p = processing
    if p.do_resize:
        h, w = p.resized_shape(x.shape[1], x.shape[2])
        x = pil_resize(x, h, w, p.resample)
    if p.do_center_crop:
        x = _center_crop(x, *p.crop_size)
    table = jnp.asarray(_value_table(p))
    return table[jnp.arange(3), x.astype(jnp.int32)]
