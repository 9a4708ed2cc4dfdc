"""PyTorch reference models for parity tests, and the patches that give diffusers the original's numerics.

diffusers' `UNetMotionModel` differs from the original AnimateDiff in GroupNorm semantics only
(see shared/README.md): its motion modules normalise across frames (the original: per frame),
and for v1 the original's resnet/output GroupNorms span all frames (diffusers: per frame).
The wrappers below reshape around the very same `nn.GroupNorm` so the weights are untouched.
"""

from __future__ import annotations

from torch import nn

from animatediff_jax.models.config import UNetConfig
from animatediff_jax.parity import randomize  # noqa: F401  (seeded random torch weights, one definition)


class PerFrameNorm(nn.Module):
    """Wraps a GroupNorm fed `(B, C, F, H, W)` so it normalises each frame on its own."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.inner = norm

    def forward(self, x):
        b, c, f, h, w = x.shape
        y = self.inner(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


class AcrossFramesNorm(nn.Module):
    """Wraps a GroupNorm fed `(B*F, C, H, W)` so it normalises across all `num_frames` of a video."""

    def __init__(self, norm: nn.GroupNorm, num_frames: int):
        super().__init__()
        self.inner, self.f = norm, num_frames

    def forward(self, x):
        bf, c, h, w = x.shape
        b = bf // self.f
        y = self.inner(x.reshape(b, self.f, c, h, w).permute(0, 2, 1, 3, 4))
        return y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


def patch_to_original(model, cfg: UNetConfig, num_frames: int):
    """Gives a diffusers `UNetMotionModel` the original AnimateDiff's GroupNorm semantics for `cfg`."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    for mod in list(model.modules()):
        if isinstance(mod, AnimateDiffTransformer3D) and cfg.motion.norm_per_frame:
            mod.norm = PerFrameNorm(mod.norm)
        if isinstance(mod, ResnetBlock2D) and not cfg.spatial_norm_per_frame:
            mod.norm1 = AcrossFramesNorm(mod.norm1, num_frames)
            mod.norm2 = AcrossFramesNorm(mod.norm2, num_frames)
    if not cfg.spatial_norm_per_frame:
        model.conv_norm_out = AcrossFramesNorm(model.conv_norm_out, num_frames)
    return model


def unet2d_kwargs(cfg: UNetConfig) -> dict:
    return dict(cfg.to_diffusers(), sample_size=8)


def motion_adapter_kwargs(cfg: UNetConfig) -> dict:
    mm = cfg.motion
    return dict(
        block_out_channels=cfg.block_out_channels,
        motion_layers_per_block=cfg.layers_per_block,
        motion_transformer_layers_per_block=mm.num_layers,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=mm.heads,
        motion_norm_num_groups=mm.norm_num_groups,
        motion_max_seq_length=mm.max_positions,
        use_motion_mid_block=mm.mid_block,
    )


def torch_motion_unet(cfg: UNetConfig, seed: int = 0):
    """diffusers' `UNetMotionModel.from_unet2d(UNet2DConditionModel, MotionAdapter)` for `cfg`, random weights."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet2d = UNet2DConditionModel(**unet2d_kwargs(cfg))
    adapter = MotionAdapter(**motion_adapter_kwargs(cfg))
    model = UNetMotionModel.from_unet2d(unet2d, adapter)
    return randomize(model, seed)
