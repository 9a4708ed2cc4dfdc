"""Stable Diffusion's safety checker, as diffusers' `StableDiffusionSafetyChecker.forward`.

The model is CLIP ViT-L/14's vision tower and projection (`vision_model`, `visual_projection`) plus
17 concept and 3 "special care" embeddings with one threshold each (`concept_embeds[_weights]`,
`special_care_embeds[_weights]`). An image is flagged when, for some concept,
`round(cos(image, concept) - threshold + adjustment, 3) > 0`, where `adjustment` is 0.01 once any
special-care score of that image is positive (the special-care scores are taken in order, each with
the adjustment reached so far, exactly as diffusers' loop does) and 0 otherwise. The arithmetic is
diffusers' (numpy float32 scalars: `float32(cos) - threshold + adjustment`, then `round(x, 3)` =
`rint(x * 1000) / 1000` in float32), so scores and flags are the same, not only close. Flagged images
are replaced by black (zeros). diffusers' `forward_onnx` (no rounding) is not what pipelines run.

The input is what `StableDiffusionPipeline.run_safety_checker` feeds it: the decoded images as uint8
(`round(x * 255)` of the [0, 1] images, `numpy_to_pil`), through the folder's `feature_extractor/`
(`CLIPImageProcessor`, 224 bicubic; `image_preprocess.preprocess`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax.models.clip_vision import CLIPVision, CLIPVisionConfig
from animatediff_jax.models.image_preprocess import ImageProcessing, preprocess
from animatediff_jax.models.layers import dense

Dtype = Any
Params = dict[str, Any]

NUM_CONCEPTS = 17
NUM_SPECIAL = 3
SPECIAL_CARE_ADJUSTMENT = 0.01


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """diffusers' `cosine_distance`: rows L2-normalised (`F.normalize`, eps 1e-12), then `a @ b.T`; float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return norm(a) @ norm(b).T


def _round3(x: jax.Array) -> jax.Array:
    """Python's `round(np.float32, 3)`: `rint(x * 1000) / 1000` in float32 (half to even)."""
    return jnp.round(x.astype(jnp.float32) * 1000.0) / 1000.0


def safety_scores(
    special_cos: jax.Array, concept_cos: jax.Array, special_weights: jax.Array, concept_weights: jax.Array
) -> dict[str, jax.Array]:
    """diffusers' per-image loop, vectorised over images: `special_scores [N, 3]`, `special_care [N, 3]`,
    `concept_scores [N, 17]` (rounded to 3 decimals, as diffusers reports them), `bad_concepts [N, 17]`,
    `has_nsfw [N]`."""
    special_cos = special_cos.astype(jnp.float32)
    concept_cos = concept_cos.astype(jnp.float32)
    sw, cw = special_weights.astype(jnp.float32), concept_weights.astype(jnp.float32)
    adjustment = jnp.zeros(special_cos.shape[:1], jnp.float32)
    special = []
    for j in range(special_cos.shape[1]):  # in order: a positive score raises the adjustment for the next ones
        s = _round3(special_cos[:, j] - sw[j] + adjustment)
        special.append(s)
        adjustment = jnp.where(s > 0, jnp.float32(SPECIAL_CARE_ADJUSTMENT), adjustment)
    special_scores = jnp.stack(special, axis=1) if special else special_cos
    concept_scores = _round3(concept_cos - cw[None, :] + adjustment[:, None])
    bad = concept_scores > 0
    return dict(
        special_scores=special_scores,
        special_care=special_scores > 0,
        concept_scores=concept_scores,
        bad_concepts=bad,
        has_nsfw=bad.any(axis=-1),
    )


class SafetyChecker(nn.Module):
    """`pixels [N, 224, 224, 3]` (CLIP-preprocessed, channels last) -> `safety_scores(...)` dict
    plus `image_embeds [N, P]`.

    `config.projection_dim` is the checkpoint's `CLIPConfig.projection_dim` (768 for SD1.5's).
    Params: `vision_model/...` (a `CLIPVision` tree), `visual_projection/kernel`, `concept_embeds`
    `[17, P]`, `special_care_embeds` `[3, P]`, `concept_embeds_weights` `[17]`, `special_care_embeds_weights` `[3]`.
    """

    config: CLIPVisionConfig
    num_concepts: int = NUM_CONCEPTS
    num_special: int = NUM_SPECIAL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        p, ones = self.config.projection_dim, nn.initializers.ones
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, pooled = CLIPVision(self.config, attention=self.attention, name="vision_model", **kw)(pixels)
        embeds = dense(p, "visual_projection", use_bias=False, **kw)(pooled)
        concept = self.param("concept_embeds", ones, (self.num_concepts, p), self.param_dtype)
        special = self.param("special_care_embeds", ones, (self.num_special, p), self.param_dtype)
        concept_w = self.param("concept_embeds_weights", ones, (self.num_concepts,), self.param_dtype)
        special_w = self.param("special_care_embeds_weights", ones, (self.num_special,), self.param_dtype)
        out = safety_scores(cosine_distance(embeds, special), cosine_distance(embeds, concept), special_w, concept_w)
        out["image_embeds"] = embeds
        return out


@functools.partial(jax.jit, static_argnames=("model", "processing"))
def _scores(model: SafetyChecker, params: Params, images: jax.Array, processing: ImageProcessing):
    return model.apply({"params": params}, preprocess(images, processing))


def safety_result(
    params: Params,
    images: Any,
    *,
    config: CLIPVisionConfig | None = None,
    processing: ImageProcessing | None = None,
) -> dict[str, jax.Array]:
    """The scores of `safety_scores` (+ `image_embeds`) for images `[N, H, W, 3]` (uint8, or float in [0, 1])."""
    config = config or CLIPVisionConfig.vit_l14()
    processing = processing or ImageProcessing.for_image_size(config.image_size)
    return _scores(SafetyChecker(config), params, jnp.asarray(images), processing)


def check_images(
    params: Params,
    images: Any,
    *,
    config: CLIPVisionConfig | None = None,
    processing: ImageProcessing | None = None,
) -> tuple[jax.Array, jax.Array]:
    """diffusers' `safety_checker(images=..., clip_input=feature_extractor(pil(images)))`:
    `(images with the flagged ones replaced by zeros, same dtype; flags bool [N])`.

    `images` `[N, H, W, 3]`: uint8, or float in [0, 1] (made uint8 by `round(x * 255)` for the
    checker, as diffusers does; the returned images keep the input's values and dtype). `params`,
    `config`, `processing`: `checkpoints.clip.load_safety_checker(...)`'s (defaults: SD1.5's, ViT-L/14
    with CLIP's 224 preprocessing). Frames of a video are checked one by one, as images.
    """
    x = jnp.asarray(images)
    flags = safety_result(params, x, config=config, processing=processing)["has_nsfw"]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return jnp.where(flags.reshape(shape), jnp.zeros((), x.dtype), x), flags
