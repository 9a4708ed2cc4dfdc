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


def motion_layout(version: MotionVersion, **overrides) -> MotionConfig:
    """The motion-module layout of an AnimateDiff release (see `shared/README.md`'s table)."""
    layouts = {
        "v1": MotionConfig(max_positions=24, mid_block=False),
        "v2": MotionConfig(max_positions=32, mid_block=True),
        "v3": MotionConfig(max_positions=32, mid_block=False),
    }
    if version not in layouts:
        raise ValueError(f"unknown motion module version {version!r}: expected one of {sorted(layouts)}")
    return dataclasses.replace(layouts[version], **overrides)


def sd15_unet(motion: MotionVersion | None = None, **overrides) -> UNetConfig:
    """SD1.5's UNet; with `motion`, inflated with that release's motion modules and GroupNorm semantics."""
    mm = motion_layout(motion) if motion else None
    return UNetConfig(motion=mm, spatial_norm_per_frame=motion != "v1", **overrides)


def tiny_unet(motion: MotionVersion | None = "v2", **overrides) -> UNetConfig:
    """A two-level UNet small enough for CPU tests (channels 32/64, 8 groups, 2 heads)."""
    mm = motion_layout(motion, heads=2, norm_num_groups=8) if motion else None
    base = dict(
        block_out_channels=(32, 64),
        cross_attn_blocks=(True, False),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_heads=2,
        norm_num_groups=8,
        spatial_norm_per_frame=motion != "v1",
        motion=mm,
    )
    base.update(overrides)
    return UNetConfig(**base)
