"""Control models: SD1.5 ControlNet (1.0 / 1.1) and AnimateDiff's SparseCtrl, as Flax modules.

Both are the UNet's encoder copied: `time_embedding`, `conv_in`, the down blocks and the mid block
(`models.unet`'s own modules, run through `unet.frame_conditioning` / `unet.down_path`), plus a
condition embedding added to `conv_in`'s output and one zero-initialised 1x1 conv per UNet skip
(`controlnet_down_blocks_{i}`) and for the mid block (`controlnet_mid_block`). Their outputs,
times the conditioning scale, are what `UNet3D(..., down_residuals, mid_residual)` adds.

SparseCtrl (`ControlNetConfig.sparse`) adds motion modules to the down blocks (none in the mid
block), takes a per-frame mask of the frames that hold a condition (concatenated to the condition
as one more channel), and replaces the noisy sample by zeros (its conv_in sees only its bias).
Its motion modules have one temporal self-attention per block (the original's
`attention_block_types: ["Temporal_Self"]`, diffusers' `temporal_double_self_attention=False`):
`models.motion_module.MotionModule` with `MotionConfig.self_attentions=1`. Their GroupNorm follows `MotionConfig.norm_per_frame` (per frame, as
the original trained them, by default; diffusers normalises across frames).

Param names follow diffusers' `ControlNetModel` / `SparseControlNetModel`, so their state dicts
convert with `checkpoints.torch_io.torch_to_flax` (`checkpoints.controlnet` reads every file format).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax.models import attention
from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet, tiny_unet
from animatediff_jax.models.layers import Dtype, conv
from animatediff_jax.models.unet import MidBlock, _Layers, down_path, frame_conditioning

_SPARSE_DOWN = {"CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A control model: the encoder layout it copies (`unet`) and how it reads its condition.

    `unet.motion` is set for SparseCtrl (its down-block motion modules; `mid_block` False).
    `conditioning_channels` counts the condition's own channels (3 for pixels, 4 for VAE latents),
    before the mask channel that `concat_conditioning_mask` adds. `simplified_condition_embedding`
    (SparseCtrl RGB) embeds the condition, given as VAE latents at the latent size, with one conv;
    otherwise a small conv net downsamples pixels (`2 ** (len(conditioning_embedding_out_channels) - 1)`
    times, 8 for SD1.5). `zero_sample`: the noisy sample input is replaced by zeros (SparseCtrl).
    `global_pool_conditions` (diffusers' flag, ControlNet 1.1 shuffle): residuals averaged over space.
    `channel_order` "bgr" flips the condition's channels first (a few diffusers configs).
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    concat_conditioning_mask: bool = False
    simplified_condition_embedding: bool = False
    zero_sample: bool = False
    global_pool_conditions: bool = False
    channel_order: Literal["rgb", "bgr"] = "rgb"

    @property
    def sparse(self) -> bool:
        """SparseCtrl (a control model with motion modules)."""
        return self.unet.motion is not None

    @property
    def latent_condition(self) -> bool:
        """The condition is VAE latents (x the scaling factor) at the latent size, not pixels."""
        return self.simplified_condition_embedding

    @property
    def condition_downscale(self) -> int:
        """Condition pixels per latent along each side (1 for a latent condition)."""
        return 1 if self.simplified_condition_embedding else 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def replace(self, **kw) -> "ControlNetConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "ControlNetConfig":
        """From a diffusers `ControlNetModel` or `SparseControlNetModel` `config.json` dict.

        A SparseControlNetModel's motion modules are read as the original's (per-frame GroupNorm):
        the released weights were trained so, and the file does not record it.
        """
        cfg = dict(cfg)
        name = cfg.get("_class_name", "ControlNetModel")
        if name not in ("ControlNetModel", "SparseControlNetModel"):
            raise ValueError(f"config describes a {name}, not a ControlNetModel or SparseControlNetModel")
        sparse = name == "SparseControlNetModel"
        unsupported = {
            "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
            "flip_sin_to_cos": True, "freq_shift": 0, "resnet_time_scale_shift": "default",
            "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "act_fn": "silu",
            "mid_block_scale_factor": 1, "downsample_padding": 1, "encoder_hid_dim": None,
        }
        for key, ok in unsupported.items():
            if key in cfg and cfg[key] != ok:
                raise ValueError(f"{name} config: {key}={cfg[key]!r} is not supported (only {ok!r})")
        if cfg.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
            raise ValueError(f"{name} config: controlnet_conditioning_channel_order "
                             f"{cfg['controlnet_conditioning_channel_order']!r}")
        if sparse:
            down = list(cfg.get("down_block_types", ["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"]))
            unknown = [t for t in down if t not in _SPARSE_DOWN]
            if unknown:
                raise ValueError(f"{name} config: unsupported down_block_types {unknown}")
            cfg["down_block_types"] = [_SPARSE_DOWN[t] for t in down]
        unet = UNetConfig.from_diffusers(cfg)
        mid_depth = cfg.get("transformer_layers_per_mid_block")
        if mid_depth is not None and mid_depth != unet.transformer_layers:
            raise ValueError(f"{name} config: transformer_layers_per_mid_block={mid_depth} differs from the down blocks'")
        if sparse:
            heads = cfg.get("motion_num_attention_heads", 8)
            layers = cfg.get("temporal_transformer_layers_per_block", 1)
            for what, v in (("motion_num_attention_heads", heads), ("temporal_transformer_layers_per_block", layers)):
                if isinstance(v, (list, tuple)) and len(set(v)) != 1:
                    raise ValueError(f"{name} config: per-block {what}={v} is not supported")
            motion = MotionConfig(
                heads=int(heads[0] if isinstance(heads, (list, tuple)) else heads),
                num_layers=int(layers[0] if isinstance(layers, (list, tuple)) else layers),
                max_positions=int(cfg.get("motion_max_seq_length", 32)),
                mid_block=False,
                norm_num_groups=unet.norm_num_groups,  # diffusers builds the motion norms with the resnets' groups
                self_attentions=1,  # SparseCtrl's temporal blocks: one self-attention ("Temporal_Self")
            )
            unet = unet.with_motion(motion)
        return cls(
            unet=unet,
            conditioning_channels=int(cfg.get("conditioning_channels", 4 if sparse else 3)),
            conditioning_embedding_out_channels=tuple(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
            concat_conditioning_mask=bool(cfg.get("concat_conditioning_mask", True)) if sparse else False,
            simplified_condition_embedding=bool(cfg.get("use_simplified_condition_embedding", True)) if sparse else False,
            zero_sample=sparse,  # diffusers' SparseControlNetModel always runs on torch.zeros_like(sample)
            global_pool_conditions=bool(cfg.get("global_pool_conditions", False)),
            channel_order=cfg.get("controlnet_conditioning_channel_order", "rgb"),
        )

    def to_diffusers(self) -> dict:
        """The diffusers `config.json` dict (`_class_name` ControlNetModel or SparseControlNetModel)."""
        u = self.unet
        spatial = u.to_diffusers()
        for key in ("out_channels", "up_block_types"):
            spatial.pop(key)
        out = dict(
            spatial,
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
            global_pool_conditions=self.global_pool_conditions,
            controlnet_conditioning_channel_order=self.channel_order,
        )
        if not self.sparse:
            if self.concat_conditioning_mask or self.simplified_condition_embedding or self.zero_sample:
                raise ValueError("a ControlNetModel has no conditioning mask, simplified embedding or zero sample")
            return {"_class_name": "ControlNetModel", **out}
        m = u.motion
        if m.mid_block:
            raise ValueError("diffusers' SparseControlNetModel has no mid-block motion module")
        if m.norm_num_groups != u.norm_num_groups:
            raise ValueError("diffusers' SparseControlNetModel gives its motion modules the resnets' GroupNorm groups")
        if not self.zero_sample:
            raise ValueError("diffusers' SparseControlNetModel always zeroes the sample (zero_sample=True)")
        out["down_block_types"] = ["CrossAttnDownBlockMotion" if a else "DownBlockMotion" for a in u.cross_attn_blocks]
        return {
            "_class_name": "SparseControlNetModel",
            **out,
            "motion_max_seq_length": m.max_positions,
            "motion_num_attention_heads": m.heads,
            "temporal_transformer_layers_per_block": m.num_layers,
            "concat_conditioning_mask": self.concat_conditioning_mask,
            "use_simplified_condition_embedding": self.simplified_condition_embedding,
        }


def _one_attention(unet: UNetConfig) -> UNetConfig:
    """`unet` with SparseCtrl's motion modules: one temporal self-attention per block."""
    return unet.replace(motion=unet.motion.replace(self_attentions=1))


def sd15_controlnet(**kw) -> ControlNetConfig:
    """An SD1.5 ControlNet (1.0 / 1.1: pixels in [0, 1], 3 channels); `kw`: ControlNetConfig fields."""
    return ControlNetConfig(unet=kw.pop("unet", sd15_unet()), **kw)


def sparsectrl_config(kind: Literal["rgb", "scribble"]) -> ControlNetConfig:
    """SparseCtrl for SD1.5 (`v3_sd15_sparsectrl_{rgb,scribble}.ckpt`): v3-like motion modules (8 heads,
    32 positions, no mid block); RGB takes VAE latents (+ mask) through one conv, scribble pixels."""
    if kind not in ("rgb", "scribble"):
        raise ValueError(f"SparseCtrl kind {kind!r}: expected 'rgb' or 'scribble'")
    rgb = kind == "rgb"
    return ControlNetConfig(
        unet=_one_attention(sd15_unet("v3")),
        conditioning_channels=4 if rgb else 3,
        concat_conditioning_mask=True,
        simplified_condition_embedding=rgb,
        zero_sample=True,
    )


def tiny_controlnet(sparse: bool | Literal["rgb", "scribble"] = False, **kw) -> ControlNetConfig:
    """A control model for `config.tiny_unet` (channels 32/64, condition embedding 8/16: pixels at 2x the
    latent size, like `VAEConfig.tiny`). `sparse`: True or "scribble" (pixels), "rgb" (latents).
    `kw`: ControlNetConfig fields; anything else goes to `tiny_unet` (e.g. `cross_attention_dim`)."""
    fields = {f.name for f in dataclasses.fields(ControlNetConfig)}
    own = {k: v for k, v in kw.items() if k in fields}
    unet_kw = {k: v for k, v in kw.items() if k not in fields}
    kind = ("scribble" if sparse is True else sparse) if sparse else None
    if kind not in (None, "rgb", "scribble"):
        raise ValueError(f"tiny_controlnet: sparse={sparse!r}")
    base = dict(conditioning_embedding_out_channels=(8, 16))
    if kind:
        base.update(conditioning_channels=4 if kind == "rgb" else 3, concat_conditioning_mask=True,
                    simplified_condition_embedding=kind == "rgb", zero_sample=True)
    base.update(own)
    unet = base.pop("unet", None) or tiny_unet("v3" if kind else None, **unet_kw)
    if kind and unet.motion is not None:
        unet = _one_attention(unet)
    return ControlNetConfig(unet=unet, **base)


def zero_conv(features: int, name: str, *, kernel: int = 1, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    """A conv whose kernel and bias start at zero (ControlNet's "zero convolutions")."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), kernel_init=nn.initializers.zeros,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ConditioningEmbedding(nn.Module):
    """diffusers' `ControlNetConditioningEmbedding`: conv_in, (conv, strided conv) per level, zero conv_out,
    SiLU between (the same module in SparseCtrl)."""

    channels: tuple[int, ...]
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(conv(self.channels[0], "conv_in", **kw)(x))
        for i in range(len(self.channels) - 1):
            x = nn.silu(conv(self.channels[i], f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(conv(self.channels[i + 1], f"blocks_{2 * i + 1}", stride=2, **kw)(x))
        return zero_conv(self.out_channels, "conv_out", kernel=3, **kw)(x)


class ControlNet(nn.Module):
    """`__call__(sample, timesteps, context, cond, mask=None, scale=1.0) -> (down residuals, mid residual)`.

    sample `[B, F, h, w, C]` (the UNet's latent input); timesteps `[B]` or scalar; context `[B, L, D]` or
    `[B, F, L, D]`; cond `[B or 1, F, H, W, Cc]` channels-last: pixels in [0, 1] (H = h x
    `config.condition_downscale`) or, for `config.latent_condition`, VAE latents at `h, w`; mask
    `[B or 1, F]` (1: the frame holds a condition), needed when `config.concat_conditioning_mask`.
    `scale` (may be traced) multiplies every output. Outputs are frames folded into batch,
    `[B*F, h_i, w_i, c_i]`, one per UNet skip in order, then the mid block's. Guess mode is not supported.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, sample, timesteps, context, cond, mask=None, scale=1.0):
        with attention.using(self.attention):
            return self._forward(sample, timesteps, context, cond, mask, scale)

    def _condition(self, cond, mask, b: int, f: int, size: tuple[int, int]) -> jax.Array:
        """The condition (+ mask channel), `[B*F, H, W, Cc(+1)]`."""
        cfg = self.config
        if cond.ndim != 5 or cond.shape[1] != f or cond.shape[0] not in (1, b):
            raise ValueError(f"condition {tuple(cond.shape)}: expected [{b} or 1, {f}, H, W, C] for {b} videos of {f} frames")
        if cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"condition has {cond.shape[-1]} channels, the control model takes {cfg.conditioning_channels}")
        want = (size[0] * cfg.condition_downscale, size[1] * cfg.condition_downscale)
        if tuple(cond.shape[2:4]) != want:
            what = "VAE latents" if cfg.latent_condition else "pixels"
            raise ValueError(f"condition {tuple(cond.shape[2:4])}: this control model takes {what} of {want} "
                             f"for latents of {tuple(size)}")
        cond = cond.astype(self.dtype)
        if cfg.channel_order == "bgr":
            cond = cond[..., ::-1]
        if cfg.concat_conditioning_mask:
            if mask is None:
                raise ValueError("this control model needs a mask of the conditioned frames ([B or 1, F])")
            mask = jnp.asarray(mask, self.dtype)
            if mask.ndim != 2 or mask.shape[1] != f or mask.shape[0] not in (1, b):
                raise ValueError(f"mask {tuple(mask.shape)}: expected [{b} or 1, {f}]")
            n = max(cond.shape[0], mask.shape[0])
            cond = jnp.broadcast_to(cond, (n,) + cond.shape[1:])
            m = jnp.broadcast_to(mask[:, :, None, None, None], (n,) + cond.shape[1:4] + (1,))
            cond = jnp.concatenate([cond, m], axis=-1)
        return cond

    def _forward(self, sample, timesteps, context, cond, mask, scale):
        cfg, u = self.config, self.config.unet
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, f, hh, ww, _ = sample.shape
        c0 = u.block_out_channels[0]

        temb, frame_context = frame_conditioning(u, timesteps, context, b, f, kw)
        ctx = _Layers(u, temb, frame_context, f, kw)

        x = sample.reshape((b * f, hh, ww, -1)).astype(self.dtype)
        if cfg.zero_sample:
            x = jnp.zeros_like(x)
        x = conv(c0, "conv_in", **kw)(x)

        c = self._condition(cond, mask, b, f, (hh, ww))
        n = c.shape[0]
        c = c.reshape((n * f,) + c.shape[2:])
        if cfg.simplified_condition_embedding:
            emb = zero_conv(c0, "controlnet_cond_embedding", kernel=3, **kw)(c)
        else:
            emb = ConditioningEmbedding(cfg.conditioning_embedding_out_channels, c0, name="controlnet_cond_embedding", **kw)(c)
        emb = emb.reshape((n, f) + emb.shape[1:])
        x = (x.reshape((b, f) + x.shape[1:]) + emb).reshape(x.shape)  # a condition batch of 1 broadcasts

        x, skips = down_path(x, ctx)
        x = MidBlock(u.block_out_channels[-1], name="mid_block")(x, ctx)

        scale = jnp.asarray(scale, self.dtype)
        outs = [zero_conv(s.shape[-1], f"controlnet_down_blocks_{i}", **kw)(s) for i, s in enumerate(skips)]
        outs.append(zero_conv(x.shape[-1], "controlnet_mid_block", **kw)(x))
        if cfg.global_pool_conditions:
            outs = [o.mean(axis=(1, 2), keepdims=True) for o in outs]
        outs = [o * scale for o in outs]
        return tuple(outs[:-1]), outs[-1]
