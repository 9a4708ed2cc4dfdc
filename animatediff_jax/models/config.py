"""Model configurations as frozen dataclasses: SD1.5 and SDXL, the v1/v2/v3, SDXL-beta and HotshotXL motion
layouts, and tiny test sizes."""

from __future__ import annotations

import dataclasses
from typing import Literal

MotionVersion = Literal["v1", "v2", "v3", "sdxl_beta", "hotshot_xl"]
Family = Literal["sd15", "sdxl"]
Origin = Literal["animatediff", "hotshot_xl"]


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
    # The base model the modules were made for: "sd15" (4 levels) or "sdxl" (AnimateDiff-SDXL: 3 levels).
    # The SDXL beta's layout is v3's (no mid block, 32 positions), so only this field tells them apart.
    family: Family = "sd15"
    # Whose temporal layers: AnimateDiff's, or Hotshot-XL's (hotshotco/Hotshot-XL `TransformerTemporal`:
    # the same block as AnimateDiff's, but trained in a UNet whose resnet norms span all frames, and
    # named `temporal_attentions.J` in its files). Explicit, so neither file is ever read as the other.
    origin: Origin = "animatediff"

    @property
    def version(self) -> MotionVersion:
        """The release whose layout this is: HotshotXL by origin; the SDXL beta by family; else v2 has a
        mid-block module, v1 a 24-frame table, else v3."""
        if self.origin == "hotshot_xl":
            return "hotshot_xl"
        if self.family == "sdxl":
            return "sdxl_beta"
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
    # mm_sdxl_v10_beta (the original's `sdxl` branch; diffusers' MotionAdapter sdxl-beta): no mid block,
    # 32 positions, and its motion-module GroupNorms span all frames of a video.
    "sdxl_beta": dict(max_positions=32, mid_block=False, norm_per_frame=False, family="sdxl"),
    # Hotshot-XL (`hsxl_temporal_layers.safetensors`): 8 heads, one block of two temporal self-attentions,
    # a 24-position table, GroupNorm per frame (transformer_temporal.py: `(b f) c h w` before `self.norm`),
    # no mid-block module (unet_blocks.py: `UNetMidBlock3DCrossAttn` has none).
    "hotshot_xl": dict(max_positions=24, mid_block=False, norm_per_frame=True, family="sdxl", origin="hotshot_xl"),
}

# Releases whose UNet GroupNorms its resnets (and the output norm) across all frames: AnimateDiff v1
# (no `use_inflated_groupnorm`) and Hotshot-XL (resnet.py's `ResnetBlock3D` and unet.py's `conv_norm_out`
# are `nn.GroupNorm` on `(b, c, f, h, w)`). The others per frame.
_SPATIAL_ACROSS_FRAMES = frozenset({"v1", "hotshot_xl"})

_FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _per_level(value: int | tuple[int, ...], levels: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * levels


def _uniform(value):
    """A per-level list from a config file as an int when all levels agree (SD1.5's `[8, 8, 8, 8]`), else a tuple."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(set(value)) == 1 else tuple(int(v) for v in value)
    return int(value)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The SD1.5 or SDXL UNet inflated to video, optionally with motion modules.

    `spatial_norm_per_frame` is the original's `use_inflated_groupnorm`: v2/v3 normalise the
    resnets' (and the output) GroupNorms per frame, v1 across all frames of a video.

    `attention_heads` / `transformer_layers`: one value for every level, or one per level (SDXL:
    heads (5, 10, 20) of 64 channels, depths (1, 2, 10)); the mid block takes the last level's, as
    diffusers does. `attention_heads` is diffusers' `attention_head_dim`, which (a naming bug kept for
    compatibility) is the number of heads. `addition_embed_type="text_time"` is SDXL's added
    conditioning: the pooled text embedding and 6 size/crop `time_ids` (each embedded sinusoidally at
    `addition_time_embed_dim`), through `add_embedding`, added to the time embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # True: CrossAttnDownBlock / CrossAttnUpBlock; False: plain Down/Up blocks (up blocks reversed).
    cross_attn_blocks: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    attention_heads: int | tuple[int, ...] = 8
    transformer_layers: int | tuple[int, ...] = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    spatial_norm_per_frame: bool = True
    motion: MotionConfig | None = None
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("attention_heads", "transformer_layers"):
            v = getattr(self, name)
            if isinstance(v, (tuple, list)) and len(v) != n:
                raise ValueError(f"UNetConfig.{name}={v}: expected one value or one per level ({n})")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r}: expected None or 'text_time'")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def family(self) -> Family:
        """"sdxl" for a UNet with SDXL's added (text_time) conditioning, else "sd15"."""
        return "sdxl" if self.addition_embed_type == "text_time" else "sd15"

    @property
    def text_embeds_dim(self) -> int | None:
        """The width of the pooled text embedding the added conditioning takes (SDXL: 1280), or None."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    def level_heads(self, level: int) -> int:
        """Attention heads of the spatial transformers at `level` (-1: the last level and the mid block)."""
        return _per_level(self.attention_heads, len(self.block_out_channels))[level]

    def level_depth(self, level: int) -> int:
        """Transformer blocks per spatial transformer at `level` (-1: the last level and the mid block)."""
        return _per_level(self.transformer_layers, len(self.block_out_channels))[level]

    def describe(self) -> str:
        """E.g. "SDXL (3 levels, 320/640/1280)": for messages about what a file does not fit."""
        chans = self.block_out_channels
        return f"{_FAMILY_NAMES[self.family]} ({len(chans)} levels, {'/'.join(map(str, chans))})"

    def replace(self, **kw) -> "UNetConfig":
        return dataclasses.replace(self, **kw)

    def with_motion(self, motion: MotionConfig | None) -> "UNetConfig":
        """This UNet with `motion`'s modules and that release's spatial GroupNorm semantics (v1 across
        frames, v2/v3 per frame: the original's `use_inflated_groupnorm`; the SDXL beta per frame, as its
        UNet and diffusers' `UNetMotionModel` fold frames into the batch; HotshotXL across frames); None
        removes them."""
        if motion is None:
            return self.replace(motion=None)
        if motion.family != self.family:
            raise ValueError(f"motion modules for {_FAMILY_NAMES[motion.family]} ({motion.version}) "
                             f"but the base is {self.describe()}")
        return self.replace(motion=motion, spatial_norm_per_frame=motion.version not in _SPATIAL_ACROSS_FRAMES)

    @classmethod
    def from_diffusers(cls, cfg: dict, motion: MotionConfig | None = None) -> "UNetConfig":
        """From a diffusers `UNet2DConditionModel` `config.json` dict (SD1.5- and SDXL-family layouts).

        Heads as diffusers reads them (`num_attention_heads or attention_head_dim`); per-level lists
        kept as tuples unless uniform."""
        down = list(cfg.get("down_block_types", ()))
        known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        if not down or any(t not in known for t in down):
            raise ValueError(f"unet config: unsupported down_block_types {down}")
        heads = _uniform(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8))
        depth = _uniform(cfg.get("transformer_layers_per_block", 1))
        last = _per_level(depth, len(down))[-1]
        if cfg.get("transformer_layers_per_mid_block") not in (None, last):
            raise ValueError(f"unet config: transformer_layers_per_mid_block={cfg['transformer_layers_per_mid_block']} "
                             f"is not the last level's depth ({last})")
        reverse = cfg.get("reverse_transformer_layers_per_block")
        if reverse is not None and _per_level(_uniform(reverse), len(down)) != _per_level(depth, len(down))[::-1]:
            raise ValueError(f"unet config: asymmetric reverse_transformer_layers_per_block={reverse} is not supported")
        added = cfg.get("addition_embed_type")
        if added not in (None, "text_time"):
            raise ValueError(f"unet config: addition_embed_type={added!r} is not supported (only 'text_time')")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg["block_out_channels"]),
            cross_attn_blocks=tuple(known[t] for t in down),
            layers_per_block=cfg.get("layers_per_block", 2),
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            attention_heads=heads,
            transformer_layers=depth,
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            use_linear_projection=cfg.get("use_linear_projection", False),
            motion=motion,
            addition_embed_type=added,
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") if added else None,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") if added else None,
        )

    def to_diffusers(self) -> dict:
        """The diffusers `UNet2DConditionModel` config of the spatial part (for export and LDM conversion)."""
        listed = lambda v: list(v) if isinstance(v, (tuple, list)) else v
        added = {}
        if self.addition_embed_type:
            added = dict(addition_embed_type=self.addition_embed_type, addition_time_embed_dim=self.addition_time_embed_dim,
                         projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=list(self.block_out_channels),
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attn_blocks],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.cross_attn_blocks)],
            layers_per_block=self.layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=listed(self.attention_heads),
            transformer_layers_per_block=listed(self.transformer_layers),
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            use_linear_projection=self.use_linear_projection,
            **added,
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


_SDXL = dict(
    block_out_channels=(320, 640, 1280),
    cross_attn_blocks=(False, True, True),
    cross_attention_dim=2048,
    attention_heads=(5, 10, 20),  # diffusers' attention_head_dim: heads of 64 channels
    transformer_layers=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled text (1280) + 6 time ids x 256
)


def sdxl_unet(motion: MotionVersion | None = None, **overrides) -> UNetConfig:
    """SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`); with `motion`
    ("sdxl_beta" or "hotshot_xl"), inflated with AnimateDiff-SDXL's or Hotshot-XL's motion modules."""
    base = UNetConfig(**{**_SDXL, **overrides})
    return base.with_motion(MotionConfig.for_version(motion)) if motion else base


def tiny_sdxl_unet(motion: MotionVersion | None = "sdxl_beta", **overrides) -> UNetConfig:
    """A three-level SDXL-shaped UNet for CPU tests: channels 32/64/128, the first level without
    attention, heads and depths per level (2/2/4, 1/1/2: the mid block takes 4 heads, depth 2), linear
    projections, text_time conditioning (pooled text 16 + 6 time ids x 8)."""
    base = dict(
        block_out_channels=(32, 64, 128),
        cross_attn_blocks=(False, True, True),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_heads=(2, 2, 4),
        transformer_layers=(1, 1, 2),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    base.update(overrides)
    config = UNetConfig(**base)
    return config.with_motion(MotionConfig.for_version(motion, heads=2, norm_num_groups=8)) if motion else config


def size_multiple(unet_levels: int, vae_levels: int = 4) -> int:
    """What a video's height and width must divide by: the VAE's downscale (2 per level after the
    first) times the UNet's (2 per level after the first) — 64 for SD1.5. The one size rule."""
    return 2 ** (vae_levels - 1) * 2 ** (unet_levels - 1)
