"""IP-Adapter in the sampler: image prompts beside the text (diffusers' `AnimateDiffPipeline` with
`load_ip_adapter`, `ip_adapter_image` / `ip_adapter_image_embeds`, `set_ip_adapter_scale`).

Once per call, before the denoising program (as the text is encoded): each adapter's images are
preprocessed as its encoder's `CLIPImageProcessor` does, encoded (the image embedding for "base", the
penultimate hidden states for "plus" / "full"), travelled over the frames when they are keyframes (each
frame's embedding interpolated between its two keyframes, `prompts.interpolate`), and projected to image
tokens; the unconditional branch gets diffusers' negative (zeros for "base", the encoder on an all-zero
input for "plus" / "full"). Inside the compiled scan the tokens are only read: every step's UNet call
(both CFG halves, every window) attends to them in its cross-attentions, with each adapter's scale per
cross-attention (a traced `[adapters, cross-attentions]` table: another scale is not another compile).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.errors import FieldError
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.image_preprocess import ImageProcessing, preprocess
from animatediff_jax.models.ip_adapter import image_projection
from animatediff_jax.models.unet import ImageContext, cross_attentions
from animatediff_jax.sampling.compiled import PROGRAMS, Programs
from animatediff_jax.sampling.options import IPAdapter
from animatediff_jax.sampling.prompts import interpolate, travel_rows


class ImagePrompts(NamedTuple):
    """What the denoising program takes (replicated, no batch axis: every video sees the same images).

    `layers`: per adapter, its `to_k_ip` / `to_v_ip` per cross-attention (`models.ip_adapter.with_ip_layers`);
    `cond` / `uncond`: per adapter its image tokens, `[T, D]` (every frame) or `[F, T, D]` (image travel);
    `uncond` None without guidance; `scales` `[adapters, cross-attentions]` float32.
    """

    layers: tuple
    cond: tuple
    uncond: tuple | None
    scales: jax.Array


# ----------------------------------------------------------------------------------------------
# Scales per cross-attention.
# ----------------------------------------------------------------------------------------------


def layer_scales(unet: UNetConfig, scale: float | Mapping[str, Any], name: str = "ip_adapter.scale") -> list[float]:
    """An adapter's scale at each cross-attention of `unet` (`cross_attentions` order): a number everywhere,
    or diffusers' `set_ip_adapter_scale` dict (`_maybe_expand_lora_scales`, default 0): `"down"` / `"up"` a
    number for all their blocks with attentions or `{"block_i": number | [one per attention]}`, `"mid"` a
    number. A block without attentions, or a list of the wrong length, is a `FieldError` naming `name`."""
    layers = cross_attentions(unet)
    if not isinstance(scale, Mapping):
        return [float(scale)] * len(layers)
    n = len(unet.block_out_channels)
    with_attn = {"down": [i for i in range(n) if unet.cross_attn_blocks[i]],
                 "up": [i for i in range(n) if unet.cross_attn_blocks[n - 1 - i]]}
    per_block = {"down": unet.layers_per_block, "up": unet.layers_per_block + 1}
    value: dict[tuple[str, str], float] = {}  # (block, attention) -> scale
    mid = scale.get("mid", 0.0)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise FieldError(f"{name}.mid", f"={list(mid)}: expected one scale (the mid block has one attention)")
        mid = mid[0]
    value[("mid_block", "attentions_0")] = float(mid)
    for group in ("down", "up"):
        spec = scale.get(group, 0.0)
        blocks = spec if isinstance(spec, Mapping) else {f"block_{i}": spec for i in with_attn[group]}
        for block, v in blocks.items():
            i = int(str(block).split("_")[1])
            if i not in with_attn[group]:
                raise FieldError(f"{name}.{group}", f": {block} has no attentions (blocks with attentions: "
                                 f"{', '.join(f'block_{b}' for b in with_attn[group]) or 'none'})")
            vs = list(v) if isinstance(v, (list, tuple)) else [v]
            if len(vs) == 1:
                vs = vs * per_block[group]
            if len(vs) != per_block[group]:
                raise FieldError(f"{name}.{group}.{block}", f"={list(v)}: expected {per_block[group]} scales (one "
                                 "per attention of the block) or one")
            for j, x in enumerate(vs):
                value[(f"{group}_blocks_{i}", f"attentions_{j}")] = float(x)
    return [value.get((block, attn), 0.0) for block, attn, _ in layers]


# ----------------------------------------------------------------------------------------------
# Checks against the models.
# ----------------------------------------------------------------------------------------------


def _encoder_dim(a: IPAdapter) -> int:
    v = a.encoder.vision_config
    return v.hidden_size if a.config.hidden_states else v.projection_dim


def check_ip_adapters(adapters: Sequence[IPAdapter], unet: UNetConfig) -> None:
    """Every adapter against the UNet and its encoder (its own settings are `IPAdapter.check`'s): loaded,
    for this UNet's cross-attentions, an encoder whose output the projection reads, embeds of that size,
    a per-block scale this UNet has the blocks for."""
    n_layers = len(cross_attentions(unet))
    for a in adapters:
        if a.config is None or a.params is None:
            raise FieldError(a.name, ": its model is not loaded (an IPAdapter needs the adapter's config and params)")
        if a.config.cross_attention_dim != unet.cross_attention_dim or len(a.params["layers"]) != n_layers:
            raise FieldError(a.name, f": an adapter for another UNet (cross-attention width "
                             f"{a.config.cross_attention_dim}, {len(a.params['layers'])} cross-attentions; this UNet: "
                             f"{unet.cross_attention_dim}, {n_layers})")
        want = "hidden states" if a.config.hidden_states else "image embeddings"
        if a.embeds is None:
            if a.encoder is None or getattr(a.encoder, "vision_config", None) is None:
                raise FieldError(f"{a.name}.encoder", ": an image encoder (a CLIP vision model) is needed to encode "
                                 "the images")
            if _encoder_dim(a) != a.config.image_embed_dim:
                raise FieldError(f"{a.name}.encoder", f": gives {want} of width {_encoder_dim(a)}, the adapter reads "
                                 f"{a.config.image_embed_dim} (its image encoder is another model)")
        else:
            shape = tuple(np.shape(a.embeds))
            rank = 3 if a.config.hidden_states else 2
            if len(shape) != rank or shape[-1] != a.config.image_embed_dim:
                need = "[K, S, D]" if rank == 3 else "[K, D]"
                raise FieldError(f"{a.name}.embeds", f": this adapter reads {want} {need} with D = "
                                 f"{a.config.image_embed_dim}, got {shape}")
        layer_scales(unet, a.scale, f"{a.name}.scale")


# ----------------------------------------------------------------------------------------------
# Encoding, once per call.
# ----------------------------------------------------------------------------------------------


def _pixels(images: Sequence[Any], processing: ImageProcessing) -> jax.Array:
    """Each image through the encoder's processor (one compile per image size), stacked `[K, S, S, 3]`."""
    return jnp.concatenate([preprocess(np.asarray(im)[None], processing) for im in images])


def _program(encoder: Any, hidden: bool, projection: Any, method: str, travel: bool, cfg: bool):
    """The per-adapter program: (encode) -> (travel) -> project, for both branches."""

    def fn(enc_params, proj_params, pixels, embeds, negative, ix):
        if pixels is not None:
            k = pixels.shape[0]
            if hidden:  # plus / full: the penultimate hidden states, and (negative) those of an all-zero input
                x = jnp.concatenate([pixels, jnp.zeros_like(pixels[:1])]) if cfg else pixels
                h = encoder.apply({"params": enc_params}, x, -2)
                embeds = h[:k]
                negative = jnp.broadcast_to(h[k:], embeds.shape) if cfg else None
            else:
                embeds = encoder.apply({"params": enc_params}, pixels)
                negative = jnp.zeros_like(embeds) if cfg else None
        elif cfg and negative is None:
            negative = jnp.zeros_like(embeds)

        def tokens(e):
            if travel:  # one embedding per frame, between its keyframes
                flat = e.reshape(e.shape[0], -1, e.shape[-1])
                e = interpolate(flat, *ix, method).astype(e.dtype).reshape((ix[0].shape[0],) + e.shape[1:])
            t = projection.apply({"params": proj_params}, e)  # [K or F, T, D]
            return t if travel else t.reshape((-1, t.shape[-1]))  # several images: their tokens side by side

        return tokens(embeds), None if negative is None else tokens(negative)

    return fn


def encode_ip_adapters(pipe: Any, adapters: Sequence[IPAdapter], num_frames: int, guidance: bool,
                       programs: Programs = PROGRAMS) -> tuple[ImagePrompts | None, float]:
    """(the `ImagePrompts` of checked adapters, or None without any; compile seconds). `guidance`: the
    unconditional tokens are made too. Runs in `pipe.dtype`."""
    if not adapters:
        return None, 0.0
    cond, uncond, layers, scales, compile_s = [], [], [], [], 0.0
    for a in adapters:
        travel = a.frames is not None
        ix = None
        if travel:
            keys = sorted((int(f), str(k)) for k, f in enumerate(a.frames))
            ix = tuple(jnp.asarray(v) for v in travel_rows(keys, num_frames, {str(k): k for k in range(a.count)}))
        encoder = pixels = enc_params = None
        if a.embeds is None:
            encoder = a.encoder.vision_model(dtype=pipe.dtype)
            enc_params = a.encoder.params["vision"]
            processing = a.encoder.processor or ImageProcessing.for_image_size(a.encoder.vision_config.image_size)
            pixels = _pixels(a.images, processing)
        embeds = None if a.embeds is None else jnp.asarray(a.embeds, pipe.dtype)
        negative = None if a.negative_embeds is None else jnp.asarray(a.negative_embeds, pipe.dtype)
        projection = image_projection(a.config, pipe.dtype)
        fn = _program(encoder, a.config.hidden_states, projection, a.interpolation, travel, guidance)
        static = (encoder, a.config.hidden_states, projection, a.interpolation, travel, guidance)
        args = (enc_params, a.params["image_proj"], pixels, embeds, negative, ix)
        compiled, secs = programs.compiled("ip_adapter", fn, static, args)
        c, u = compiled(*args)
        cond.append(c)
        uncond.append(u)
        layers.append(a.params["layers"])
        scales.append(layer_scales(pipe.unet_config, a.scale, f"{a.name}.scale"))
        compile_s += secs
    return ImagePrompts(tuple(layers), tuple(cond), tuple(uncond) if guidance else None,
                        jnp.asarray(scales, jnp.float32)), compile_s


def abstract_image_prompts(adapters: Sequence[IPAdapter], unet: UNetConfig, num_frames: int, guidance: bool,
                           dtype: Any, encoder_tokens: int = 257) -> ImagePrompts:
    """`encode_ip_adapters`' result as `ShapeDtypeStruct`s, from the adapters' configs alone (`compile`);
    a "full" adapter without its encoder is taken to see `encoder_tokens` tokens (ViT-H/14 at 224²)."""
    from animatediff_jax.models.ip_adapter import layer_shapes

    cond, layers = [], []
    for a in adapters:
        if a.config is None:
            raise FieldError(a.name, ": its model's layout is not known (an IPAdapter needs the adapter's config)")
        tokens = a.config.num_tokens
        if a.config.kind == "full":
            tokens = a.encoder.vision_config.num_positions if a.encoder is not None else encoder_tokens
        shape = (num_frames, tokens) if a.frames is not None else (a.count * tokens,)
        cond.append(jax.ShapeDtypeStruct(shape + (a.config.cross_attention_dim,), jnp.dtype(dtype)))
        layers.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                                   layer_shapes(a.config, unet)))
    scales = jax.ShapeDtypeStruct((len(adapters), len(cross_attentions(unet))), jnp.float32)
    return ImagePrompts(tuple(layers), tuple(cond), tuple(cond) if guidance else None, scales)


# ----------------------------------------------------------------------------------------------
# In the denoising loop.
# ----------------------------------------------------------------------------------------------


def image_context(prompts: ImagePrompts, videos: int, frames: jax.Array | None, pairs: bool) -> ImageContext:
    """The UNet's `ImageContext` for `videos` videos (each twice with `pairs`: the CFG batch, its unconditional
    copy first) over the frames `frames` (a window's indices; None: all)."""
    tokens = []
    for j, c in enumerate(prompts.cond):
        if frames is not None and c.ndim == 3:
            c = jnp.take(c, frames, axis=0)
        if pairs and prompts.uncond is not None:
            u = prompts.uncond[j]
            if frames is not None and u.ndim == 3:
                u = jnp.take(u, frames, axis=0)
            shape = c.shape if c.ndim >= u.ndim else u.shape
            pair = jnp.stack([jnp.broadcast_to(u, shape), jnp.broadcast_to(c, shape)])
            tokens.append(jnp.broadcast_to(pair[None], (videos, 2) + shape).reshape((2 * videos,) + shape))
        else:
            tokens.append(jnp.broadcast_to(c[None], (videos,) + c.shape))
    return ImageContext(tuple(tokens), prompts.scales)
