"""Model configurations as frozen dataclasses: SD1.5, the v1/v2/v3 motion layouts, and tiny test sizes."""

from __future__ import annotations

import dataclasses
from typing import Literal

MotionVersion = Literal["v1", "v2", "v3"]


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """Where motion modules sit and how they compute.

    `norm_per_frame`: the original AnimateDiff motion module GroupNorms each frame on its own
    (its checkpoints were trained so); diffusers' `AnimateDiffTransformer3D` normalises across
    all frames of a video. True is the original and the default.
    """

    heads: int = 8
    num_layers: int = 1
    max_positions: int = 32
    mid_block: bool = True
    norm_per_frame: bool = True
    norm_num_groups: int = 32
    # Temporal self-attentions per transformer block: 2 in every AnimateDiff release ("Temporal_Self" x 2),
    # 1 in SparseCtrl's condition encoder (no attn2 / norm2).
    self_attentions: int = 2

    @property
    def version(self) -> MotionVersion:
        """The release whose layout this is: v2 has a mid-block module, v1 a 24-frame table, else v3."""
        return "v2" if self.mid_block else ("v1" if self.max_positions == 24 else "v3")

    @classmethod
    def for_version(cls, version: MotionVersion, **overrides) -> "MotionConfig":
        """The motion-module layout of an AnimateDiff release (the table in docs/reference.md)."""
        if version not in _LAYOUTS:
            raise ValueError(f"unknown motion module version {version!r}: expected one of {sorted(_LAYOUTS)}")
        return cls(**{**_LAYOUTS[version], **overrides})

    def replace(self, **kw) -> "MotionConfig":
        return dataclasses.replace(self, **kw)


_LAYOUTS = {
    "v1": dict(max_positions=24, mid_block=False),
    "v2": dict(max_positions=32, mid_block=True),
    "v3": dict(max_positions=32, mid_block=False),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The SD1.5 UNet inflated to video, optionally with motion modules.

    `spatial_norm_per_frame` is the original's `use_inflated_groupnorm`: v2/v3 normalise the
    resnets' (and the output) GroupNorms per frame, v1 across all frames of a video.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # True: CrossAttnDownBlock / CrossAttnUpBlock; False: plain Down/Up blocks (up blocks reversed).
    cross_attn_blocks: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    attention_heads: int = 8
    transformer_layers: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    spatial_norm_per_frame: bool = True
    motion: MotionConfig | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def replace(self, **kw) -> "UNetConfig":
        return dataclasses.replace(self, **kw)

    def with_motion(self, motion: MotionConfig | None) -> "UNetConfig":
        """This UNet with `motion`'s modules and that release's spatial GroupNorm semantics (v1 across
        frames, v2/v3 per frame: the original's `use_inflated_groupnorm`); None removes them."""
        if motion is None:
            return self.replace(motion=None)
        return self.replace(motion=motion, spatial_norm_per_frame=motion.version != "v1")

    @classmethod
    def from_diffusers(cls, cfg: dict, motion: MotionConfig | None = None) -> "UNetConfig":
        """From a diffusers `UNet2DConditionModel` `config.json` dict (only SD1.5-family layouts)."""
        down = list(cfg.get("down_block_types", ()))
        known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        if not down or any(t not in known for t in down):
            raise ValueError(f"unet config: unsupported down_block_types {down}")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError(f"unet config: per-block head counts {heads} are not supported")
            heads = heads[0]
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg["block_out_channels"]),
            cross_attn_blocks=tuple(known[t] for t in down),
            layers_per_block=cfg.get("layers_per_block", 2),
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            attention_heads=heads,
            transformer_layers=cfg.get("transformer_layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            use_linear_projection=cfg.get("use_linear_projection", False),
            motion=motion,
        )

    def to_diffusers(self) -> dict:
        """The diffusers `UNet2DConditionModel` config of the spatial part (for export and LDM conversion)."""
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=list(self.block_out_channels),
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attn_blocks],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.cross_attn_blocks)],
            layers_per_block=self.layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_heads,
            transformer_layers_per_block=self.transformer_layers,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            use_linear_projection=self.use_linear_projection,
        )


def sd15_unet(motion: MotionVersion | None = None, **overrides) -> UNetConfig:
    """SD1.5's UNet; with `motion`, inflated with that release's motion modules and GroupNorm semantics."""
    base = UNetConfig(**overrides)
    return base.with_motion(MotionConfig.for_version(motion)) if motion else base


def tiny_unet(motion: MotionVersion | None = "v2", **overrides) -> UNetConfig:
    """A two-level UNet small enough for CPU tests (channels 32/64, 8 groups, 2 heads)."""
    base = dict(
        block_out_channels=(32, 64),
        cross_attn_blocks=(True, False),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_heads=2,
        norm_num_groups=8,
    )
    base.update(overrides)
    config = UNetConfig(**base)
    return config.with_motion(MotionConfig.for_version(motion, heads=2, norm_num_groups=8)) if motion else config


def size_multiple(unet_levels: int, vae_levels: int = 4) -> int:
    """What a video's height and width must divide by: the VAE's downscale (2 per level after the
    first) times the UNet's (2 per level after the first) — 64 for SD1.5. The one size rule."""
    return 2 ** (vae_levels - 1) * 2 ** (unet_levels - 1)
