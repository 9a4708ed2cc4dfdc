"""The SD1.5 / SDXL UNet inflated to video, with AnimateDiff motion modules (one implementation, its
layout from `UNetConfig`: per-level heads and depths, SDXL's added text_time conditioning).

Video latents `(B, F, H, W, C)` are folded to `(B*F, H, W, C)`: every spatial layer runs per
frame exactly as in the image model, and only the motion modules (and, for v1, the resnets'
GroupNorms) look across frames. Param names follow diffusers' `UNetMotionModel`, so its
state dict (and `UNet2DConditionModel`'s for the spatial part) converts without a key table.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax import parallel
from animatediff_jax.models import attention
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.layers import (
    BasicTransformerBlock,
    Dtype,
    GroupNorm,
    TemporalWindows,
    TimestepEmbedding,
    conv,
    dense,
    group_norm_frames,
    timestep_embedding,
)
from animatediff_jax.models.motion_module import MotionModule


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` (time-conditioned); GroupNorms per frame or across frames."""

    out_channels: int
    groups: int
    eps: float
    per_frame: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, num_frames: int) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(h, name):
            bf = h.shape[0]
            h5 = h.reshape((bf // num_frames, num_frames) + h.shape[1:])
            out = group_norm_frames(GroupNorm(self.groups, self.eps, name=name, **kw), h5, self.per_frame)
            return out.reshape(h.shape)

        h = conv(self.out_channels, "conv1", **kw)(nn.silu(norm(x, "norm1")))
        h = h + dense(self.out_channels, "time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
        h = conv(self.out_channels, "conv2", **kw)(nn.silu(norm(h, "norm2")))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", kernel=1, **kw)(x)
        return x + h


class Transformer2D(nn.Module):
    """The spatial transformer of SD1.5 (`Transformer2DModel`): per-frame self + cross attention."""

    heads: int
    num_layers: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, images: tuple[jax.Array, ...] | None = None,
                 image_scales: jax.Array | None = None) -> jax.Array:
        """`images`: IP-Adapter tokens (one `[N, T_j, D]` per adapter) for every block's cross-attention,
        `image_scales` `[adapters, num_layers]` (block i: column i)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, h, w, c = x.shape
        hs = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        # A 1x1 conv (SD1.5) and a linear projection (SD2) are the same map on channels-last data.
        hs = dense(c, "proj_in", **kw)(hs.reshape(n, h * w, c))
        for i in range(self.num_layers):
            block = BasicTransformerBlock(self.heads, c // self.heads, name=f"transformer_blocks_{i}", **kw)
            hs = block(hs, context) if images is None else block(hs, context, images, image_scales[:, i])
        hs = dense(c, "proj_out", **kw)(hs)
        return hs.reshape(n, h, w, c) + x


class Downsample(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.out_channels, "conv", stride=2, dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return conv(self.out_channels, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable", "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


def _remat(cls: type, policy: str, static_argnums: tuple[int, ...] = ()) -> type:
    """`cls` rematerialised per call (each block is its own checkpoint region) under a named policy."""
    if policy == "none":
        return cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {REMAT_POLICIES}")
    named = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return nn.remat(cls, policy=named, static_argnums=static_argnums)


class AddedCond(NamedTuple):
    """SDXL's added conditioning (`UNet3D`'s `added_cond`; diffusers' `added_cond_kwargs`): `text_embeds`
    `[B, P]` (the second text encoder's pooled, projected output; SDXL: 1280), or `[B, F, P]` one per frame
    (prompt travel, as the context may be `[B, F, L, D]`), and `time_ids` `[B, 6]` per video (original
    size, crop top-left, target size: (h, w) each). Under CFG the batch carries the unconditional and
    conditional halves, as the latents do."""

    text_embeds: jax.Array
    time_ids: jax.Array


class ImageContext(NamedTuple):
    """IP-Adapter image prompts for the UNet's spatial cross-attentions (`UNet3D`'s `image_context`).

    `tokens`: per adapter, its image tokens `[B, T, D]` (one set per video) or `[B, F, T, D]` (one per
    frame: image travel); `scales` `[adapters, cross-attentions]`: each adapter's scale at each
    cross-attention, in `cross_attentions`' order (traced: another scale is not another compile).
    """

    tokens: tuple[jax.Array, ...]
    scales: jax.Array


def cross_attentions(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """The spatial cross-attentions as `(block, attention, transformer block)` module names, in the order of
    diffusers' attention processors (`unet.attn_processors`, motion modules left out): the down blocks, the
    up blocks, then the mid block (UNet2DConditionModel registers `up_blocks` before `mid_block`). IP-Adapter
    files number their `ip_adapter.{1, 3, 5, ...}` weights in this order."""
    n = len(cfg.block_out_channels)
    out = []

    def add(block: str, count: int) -> None:
        depth = cfg.level_depth(block_level(cfg, block))
        for j in range(count):
            out.extend((block, f"attentions_{j}", f"transformer_blocks_{t}") for t in range(depth))

    for i in range(n):
        if cfg.cross_attn_blocks[i]:
            add(f"down_blocks_{i}", cfg.layers_per_block)
    for i in range(n):
        if cfg.cross_attn_blocks[n - 1 - i]:
            add(f"up_blocks_{i}", cfg.layers_per_block + 1)
    add("mid_block", 1)
    return out


def block_level(cfg: UNetConfig, block: str) -> int:
    """The resolution level of a block by its module name: `down_blocks_{i}` is level i, `up_blocks_{i}`
    level n-1-i, the mid block the last level (whose heads and depth diffusers gives it)."""
    n = len(cfg.block_out_channels)
    if block == "mid_block":
        return n - 1
    kind, _, index = block.rpartition("_")
    return int(index) if kind == "down_blocks" else n - 1 - int(index)


class _Layers:
    """The per-call context every block needs: config, time embedding, text context, frames (and the
    IP-Adapter image tokens, `ImageContext` with frames folded into the batch, or None)."""

    def __init__(self, cfg: UNetConfig, temb, context, num_frames: int, kw: dict, remat: str = "none",
                 motion_scales: dict[str, float] | None = None, motion_module: type = MotionModule,
                 position_stretch: tuple[int, int] | None = None, motion_windows: TemporalWindows | None = None,
                 images: ImageContext | None = None):
        self.cfg, self.temb, self.context, self.f, self.kw = cfg, temb, context, num_frames, kw
        self.images = images
        # (block, attention) -> its first column of `images.scales`
        self.image_columns = {}
        for k, (block, attn, _) in enumerate(cross_attentions(cfg) if images is not None else ()):
            self.image_columns.setdefault((block, attn), k)
        self.motion_scales = motion_scales or {}
        self.motion_kw = {"position_stretch": tuple(position_stretch)} if position_stretch else {}
        if motion_windows is not None:
            self.motion_kw["windows"] = motion_windows
        # argnums count `self`: num_frames is static for resnets (3) and motion modules (2).
        self.Resnet = _remat(ResnetBlock, remat, (3,))
        self.Transformer = _remat(Transformer2D, remat)
        # `motion_module(config, name=, scale=, dtype=, param_dtype=)(x, num_frames)`: AnimateDiff's by
        # default; SparseCtrl's control model has its own (one temporal self-attention per block).
        self.Motion = _remat(motion_module, remat, (2,))

    def resnet(self, x, out: int, name: str):
        c = self.cfg
        block = self.Resnet(out, c.norm_num_groups, c.norm_eps, c.spatial_norm_per_frame, name=name, **self.kw)
        return block(x, self.temb, self.f)

    def attention(self, x, name: str, parent: str):
        c = self.cfg
        level = block_level(c, parent)
        depth = c.level_depth(level)
        block = self.Transformer(c.level_heads(level), depth, c.norm_num_groups, name=name, **self.kw)
        if self.images is None:
            return block(x, self.context)
        k = self.image_columns[(parent, name)]
        return block(x, self.context, self.images.tokens, self.images.scales[:, k:k + depth])

    def motion(self, x, name: str, block: str):
        mm = self.cfg.motion
        if not mm:
            return x
        return self.Motion(mm, name=name, scale=self.motion_scales.get(block, 1.0), **self.motion_kw, **self.kw)(x, self.f)


class DownBlock(nn.Module):
    """resnet (+ spatial attention) (+ motion module) x layers, then a strided conv unless last."""

    out_channels: int
    has_attention: bool
    is_last: bool
    num_layers: int

    @nn.compact
    def __call__(self, x, ctx: _Layers):
        skips = []
        for j in range(self.num_layers):
            x = ctx.resnet(x, self.out_channels, f"resnets_{j}")
            if self.has_attention:
                x = ctx.attention(x, f"attentions_{j}", self.name)
            x = ctx.motion(x, f"motion_modules_{j}", self.name)
            skips.append(x)
        if not self.is_last:
            x = Downsample(self.out_channels, name="downsamplers_0", **ctx.kw)(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet -> spatial attention (-> motion module, v2) -> resnet."""

    channels: int

    @nn.compact
    def __call__(self, x, ctx: _Layers):
        x = ctx.resnet(x, self.channels, "resnets_0")
        x = ctx.attention(x, "attentions_0", self.name)
        if ctx.cfg.motion and ctx.cfg.motion.mid_block:
            x = ctx.motion(x, "motion_modules_0", self.name)
        return ctx.resnet(x, self.channels, "resnets_1")


class UpBlock(nn.Module):
    """Per skip: concat -> resnet (+ attention) (+ motion module); then nearest-x2 + conv unless last."""

    out_channels: int
    has_attention: bool
    is_last: bool

    @nn.compact
    def __call__(self, x, skips: list, ctx: _Layers):
        for j, skip in enumerate(skips):
            x = jnp.concatenate([x, skip], axis=-1)
            x = ctx.resnet(x, self.out_channels, f"resnets_{j}")
            if self.has_attention:
                x = ctx.attention(x, f"attentions_{j}", self.name)
            x = ctx.motion(x, f"motion_modules_{j}", self.name)
        if not self.is_last:
            x = Upsample(self.out_channels, name="upsamplers_0", **ctx.kw)(x)
        return x


def added_embedding(cfg: UNetConfig, added_cond: AddedCond | None, batch: int, num_frames: int,
                    kw: dict) -> jax.Array | None:
    """SDXL's added embedding (module `add_embedding` of the calling model): `[B, T]` for a pooled text
    per video, `[B*F, T]` for one per frame (frames folded into the batch, each with its video's time
    ids); None for a UNet without one (`cfg.addition_embed_type` None: then `added_cond` must be None too).

    diffusers' `text_time`: each time id through the sinusoidal timestep features at
    `addition_time_embed_dim` (`add_time_proj`: flip_sin_to_cos, no shift), flattened per sample, after
    the pooled text embedding, then `linear_1 -> SiLU -> linear_2`."""
    if cfg.addition_embed_type is None:
        if added_cond is not None:
            raise ValueError("added_cond (SDXL's text_embeds / time_ids) given to a UNet without addition_embed_type")
        return None
    if added_cond is None:
        raise ValueError("this UNet (addition_embed_type='text_time') needs added_cond: AddedCond(text_embeds, time_ids)")
    text, ids = jnp.asarray(added_cond.text_embeds), jnp.asarray(added_cond.time_ids)
    per_frame = text.ndim == 3
    if (text.shape not in ((batch, cfg.text_embeds_dim), (batch, num_frames, cfg.text_embeds_dim))
            or ids.ndim != 2 or ids.shape[0] != batch):
        raise ValueError(f"added_cond: text_embeds {tuple(text.shape)} and time_ids {tuple(ids.shape)} for {batch} "
                         f"videos of {num_frames} frames (expected [{batch}, {cfg.text_embeds_dim}] or [{batch}, "
                         f"{num_frames}, {cfg.text_embeds_dim}], and [{batch}, 6])")
    if text.shape[-1] + ids.shape[1] * cfg.addition_time_embed_dim != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"added_cond: {ids.shape[1]} time ids x {cfg.addition_time_embed_dim} + {text.shape[-1]} "
                         f"do not make projection_class_embeddings_input_dim {cfg.projection_class_embeddings_input_dim}")
    if per_frame:
        text, ids = text.reshape(batch * num_frames, -1), jnp.repeat(ids, num_frames, axis=0)
    time_embeds = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim).reshape(text.shape[0], -1)
    features = jnp.concatenate([text.astype(jnp.float32), time_embeds], axis=-1)
    return TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(features)


def frame_conditioning(cfg: UNetConfig, timesteps, context, batch: int, num_frames: int, kw: dict,
                       added_cond: AddedCond | None = None):
    """The time embedding (module `time_embedding` of the calling model, plus `add_embedding`'s for SDXL)
    and the text context, one per frame (spatial layers see frames as batch): `(temb [B*F, T], context
    [B*F, L, D])`.

    `timesteps` is `[B]` or a scalar; `context` is `[B, L, D]` (one per video) or `[B, F, L, D]`
    (one per frame: prompt travel); `added_cond` (SDXL) with its pooled text per video or per frame.
    Called inside a model's compact `__call__` (UNet3D, ControlNet).
    """
    b, f = batch, num_frames
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    chans = cfg.block_out_channels
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(timestep_embedding(timesteps, chans[0]))
    extra = added_embedding(cfg, added_cond, b, f, kw)
    per_frame = extra is not None and jnp.ndim(added_cond.text_embeds) == 3
    if extra is not None and not per_frame:  # (one per video: added before the frames are repeated, as before)
        temb = temb + extra
    context = context.astype(kw["dtype"])
    if context.ndim == 4:
        if context.shape[:2] != (b, f):
            raise ValueError(f"per-frame context {context.shape} for {b} videos of {f} frames")
        frame_context = context.reshape((b * f,) + context.shape[2:])
    else:
        frame_context = jnp.repeat(context, f, axis=0)
    temb = jnp.repeat(temb, f, axis=0)
    if per_frame:
        temb = temb + extra
    return temb, frame_context


def _per_frame(x: jax.Array, b: int, f: int, what: str) -> jax.Array:
    """`[B, L, D]` (one per video: repeated over its frames) or `[B, F, L, D]` (one per frame) -> `[B*F, L, D]`."""
    if x.ndim == 4:
        if x.shape[:2] != (b, f):
            raise ValueError(f"per-frame {what} {x.shape} for {b} videos of {f} frames")
        return x.reshape((b * f,) + x.shape[2:])
    if x.shape[0] != b:
        raise ValueError(f"{what} {x.shape} for {b} videos")
    return jnp.repeat(x, f, axis=0)


def down_path(x: jax.Array, ctx: _Layers) -> tuple[jax.Array, list[jax.Array]]:
    """The down blocks (`down_blocks_{i}` of the calling model) from the `conv_in` output `x`.

    Returns the deepest features and every skip in the UNet's order: `conv_in`'s output, then per
    level one per layer and the downsampler's (but the last level) -- what a control model's
    residuals line up with (`num_skips`).
    """
    cfg = ctx.cfg
    chans = cfg.block_out_channels
    n = len(chans)
    skips = [x]
    for i in range(n):
        block = DownBlock(chans[i], cfg.cross_attn_blocks[i], i == n - 1, cfg.layers_per_block, name=f"down_blocks_{i}")
        x, s = block(x, ctx)
        skips += s
    return x, skips


def num_skips(cfg: UNetConfig) -> int:
    """How many skip connections (= control residuals) a UNet of `cfg` has."""
    n = len(cfg.block_out_channels)
    return 1 + n * cfg.layers_per_block + (n - 1)


class UNet3D(nn.Module):
    """`__call__(sample[B,F,H,W,C], timesteps[B] or scalar, context[B,L,D] or [B,F,L,D]) -> noise[B,F,H,W,C]`.

    A context per frame (`[B, F, L, D]`: prompt travel) conditions each frame's cross-attention on its
    own text, as diffusers' `UNetMotionModel` given `(B*F, L, D)` does; `[B, L, D]` is one per video.

    Without a motion config it is the image UNet run per frame (the base SD1.5 / SDXL model). An SDXL
    config (`addition_embed_type="text_time"`) also takes `added_cond` (`AddedCond`): its pooled text one
    per video or (prompt travel) one per frame, its time ids per video.
    `remat` names a `jax.checkpoint` policy applied to every resnet, spatial transformer and
    motion module on its own (training memory: activations inside a block are recomputed).
    `attention` picks the kernel of every attention inside (`models.attention`: "auto" is a
    flash kernel for long sequences on GPU/TPU, blockwise attention on CPU, XLA for short ones).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    attention: str = "auto"
    # Motion strength: each motion module adds `scale x` its output to its input (1: as trained, 0: none);
    # `motion_scale` for all, times `motion_block_scales` per block (("down_blocks_0", 1.2), ("mid_block", 0.5)).
    motion_scale: float = 1.0
    motion_block_scales: tuple[tuple[str, float], ...] = ()
    # (n, m): every motion module's first n positions stretched over m frames (`layers.position_table`;
    # AnimateDiff-Evolved's PE stretch), for more frames than the table holds. None: as trained.
    position_stretch: tuple[int, int] | None = None
    # diffusers' FreeNoise (`enable_free_noise`): every motion module's transformer blocks run their
    # attentions per window of frames, blended by position weights (`layers.TemporalWindows`). None: off.
    motion_windows: TemporalWindows | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 down_residuals: tuple[jax.Array, ...] | None = None, mid_residual: jax.Array | None = None,
                 image_context: ImageContext | None = None, added_cond: AddedCond | None = None) -> jax.Array:
        """`down_residuals` / `mid_residual`: a control model's outputs (`ControlNet`), frames folded into
        batch (`[B*F, h_i, w_i, c_i]`, one per skip in `down_path`'s order), added to the skips and to the
        mid block's output as diffusers' `UNetMotionModel` adds `down_block_additional_residuals` /
        `mid_block_additional_residual` (the mid block itself sees the skip without its residual).

        `image_context`: IP-Adapter image prompts (`ImageContext`), attended to by every spatial
        cross-attention beside the text (diffusers' `IPAdapterAttnProcessor2_0`); their `to_k_ip_{j}` /
        `to_v_ip_{j}` params sit in those attentions' `attn2` (`models.ip_adapter.with_ip_layers`).
        None: the UNet without them (its params and program unchanged).

        `added_cond`: SDXL's pooled text embedding and size/crop ids (`AddedCond`), needed by (and only
        by) a config with `addition_embed_type="text_time"`."""
        with attention.using(self.attention):
            return self._forward(sample, timesteps, context, down_residuals, mid_residual, image_context, added_cond)

    def _motion_scales(self) -> dict[str, float]:
        n = len(self.config.block_out_channels)
        names = [f"down_blocks_{i}" for i in range(n)] + ["mid_block"] + [f"up_blocks_{i}" for i in range(n)]
        per_block = dict(self.motion_block_scales)
        unknown = sorted(set(per_block) - set(names))
        if unknown:
            raise ValueError(f"motion_block_scales: no block {unknown} (blocks: {', '.join(names)})")
        return {name: float(self.motion_scale) * float(per_block.get(name, 1.0)) for name in names}

    def _forward(self, sample, timesteps, context, down_residuals, mid_residual, image_context,
                 added_cond) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, f, hh, ww, _ = sample.shape
        chans = cfg.block_out_channels
        n = len(chans)

        temb, frame_context = frame_conditioning(cfg, timesteps, context, b, f, kw, added_cond)
        images = None
        if image_context is not None:
            images = ImageContext(tuple(_per_frame(t.astype(self.dtype), b, f, "image tokens")
                                        for t in image_context.tokens),
                                  jnp.asarray(image_context.scales, jnp.float32))
            if images.scales.shape != (len(images.tokens), len(cross_attentions(cfg))):
                raise ValueError(f"image scales {images.scales.shape} for {len(images.tokens)} adapter(s) and "
                                 f"{len(cross_attentions(cfg))} cross-attentions")
        ctx = _Layers(cfg, temb, frame_context, f, kw, self.remat, self._motion_scales(),
                      position_stretch=self.position_stretch, motion_windows=self.motion_windows, images=images)

        # (Under context parallelism the frames' rows are laid out over the devices once, here: every
        # spatial layer then runs on its device's frames.)
        x = parallel.spread_rows(sample.reshape((b * f, hh, ww, -1)).astype(self.dtype))
        x = conv(chans[0], "conv_in", **kw)(x)
        x, skips = down_path(x, ctx)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for a UNet with {len(skips)} skips")
            for k, (s, r) in enumerate(zip(skips, down_residuals)):
                if r.shape[0] != s.shape[0] or r.shape[-1] != s.shape[-1]:
                    raise ValueError(f"down residual {k} {tuple(r.shape)} does not fit skip {tuple(s.shape)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        x = MidBlock(chans[-1], name="mid_block")(x, ctx)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)
        for i in range(n):
            k = n - 1 - i
            take = cfg.layers_per_block + 1
            mine, skips = skips[-take:][::-1], skips[:-take]
            x = UpBlock(chans[k], cfg.cross_attn_blocks[k], i == n - 1, name=f"up_blocks_{i}")(x, mine, ctx)

        norm = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)
        x = group_norm_frames(norm, x.reshape((b, f) + x.shape[1:]), cfg.spatial_norm_per_frame).reshape(x.shape)
        x = conv(cfg.out_channels, "conv_out", **kw)(nn.silu(x))
        return x.reshape((b, f) + x.shape[1:])


