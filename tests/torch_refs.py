"""PyTorch reference models for parity tests, and the patches that give diffusers the original's numerics.

diffusers' `UNetMotionModel` differs from the original AnimateDiff in GroupNorm semantics only
(see docs/reference.md): its motion modules normalise across frames (the original: per frame),
and for v1 the original's resnet/output GroupNorms span all frames (diffusers: per frame).
The wrappers below reshape around the very same `nn.GroupNorm` so the weights are untouched.
"""

from __future__ import annotations

import contextlib

from torch import nn

from animatediff_jax.checkpoints.motion import motion_adapter_kwargs  # noqa: F401  (one definition, also export's)
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.parity import randomize


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


_INIT_FILLS = ("kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "uniform_", "normal_",
               "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def no_default_init():
    """Modules built without their default weight init (`torch.nn.init`'s fills do nothing): for models
    whose every parameter `randomize` overwrites right after, so only the time changes (buffers, such as
    the motion modules' position tables, are computed as always). A real-size UNetMotionModel: 32 s -> 11 s."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FILLS}
    for name in _INIT_FILLS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def torch_motion_unet(cfg: UNetConfig, seed: int = 0):
    """diffusers' `UNetMotionModel.from_unet2d(UNet2DConditionModel, MotionAdapter)` for `cfg`, random weights."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with no_default_init():
        unet2d = UNet2DConditionModel(**unet2d_kwargs(cfg))
        adapter = MotionAdapter(**motion_adapter_kwargs(cfg))
        model = UNetMotionModel.from_unet2d(unet2d, adapter)
    return randomize(model, seed)


_unet_apply: dict = {}


def run_unet3d(cfg: UNetConfig, params, x, t, ctx):
    """Our UNet3D on torch-layout tensors (`x` `[B, C, F, H, W]`), output in torch layout (numpy);
    one jitted apply per config."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from animatediff_jax.models.unet import UNet3D

    if cfg not in _unet_apply:
        _unet_apply[cfg] = jax.jit(UNet3D(cfg).apply)
    out = _unet_apply[cfg]({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()), t.numpy(), ctx.numpy())
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def tiny_text_encoder(folder: str, seed: int = 2):
    """`(model, tokenizer, pipe)`: transformers' tiny `CLIPTextModel` (random, eval, fp32), its tiny CLIP
    tokenizer (written to `folder`), and our text-only `AnimationPipeline` holding the same weights (no
    UNet or VAE: enough for `sampling.prompts`). For the prompt-weight and embedding tests."""
    import jax
    import jax.numpy as jnp
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel
    from transformers import CLIPTokenizer

    from animatediff_jax.checkpoints.sd15 import convert_clip_text
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.shapes import clip_shapes
    from animatediff_jax.parity import write_tiny_tokenizer
    from animatediff_jax.sampling import AnimationPipeline
    from animatediff_jax.text import Tokenizer

    vocab = write_tiny_tokenizer(folder)
    cfg = CLIPTextConfig.tiny()
    eos = vocab["<|endoftext|>"]
    hf_cfg = HFConfig(**cfg.transformers_kwargs(), bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos,
                      pad_token_id=eos)
    model = randomize(HFModel(hf_cfg), seed)
    params = convert_clip_text({k: v.detach().numpy() for k, v in model.state_dict().items()}, clip_shapes(cfg))
    pipe = AnimationPipeline(None, None, cfg, {"text_encoder": jax.tree.map(jnp.asarray, params)}, Tokenizer(folder))
    return model, CLIPTokenizer.from_pretrained(folder, local_files_only=True), pipe


# ------------------------------------------------------------------ Hotshot-XL's temporal layers
#
# A minimal re-implementation of hotshotco/Hotshot-XL's temporal layer (hotshot_xl/models/
# transformer_temporal.py at the fetched HEAD), module for module, so its `state_dict()` has the released
# file's names. Built, as the original is, on diffusers' `Attention` and `FeedForward`; the only
# liberty: heads and GroupNorm groups are arguments (the original fixes 8 heads, 32 groups) so tiny
# sizes can be tested. Not imported from the original: CI has no copy of it.


class HotshotPositionalEncoding(nn.Module):
    """transformer_temporal.py `PositionalEncoding` (L19-47): a `[1, 24, C]` sin/cos buffer added unscaled."""

    def __init__(self, dim: int, max_length: int = 24):
        super().__init__()
        import math

        import torch

        pe = torch.zeros(1, max_length, dim)
        position = torch.arange(max_length).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("positional_encoding", pe)

    def forward(self, x, length: int):
        return x + self.positional_encoding[:, :length]


def _hotshot_attention_class():
    from diffusers.models.attention import Attention

    class HotshotTemporalAttention(Attention):
        """transformer_temporal.py `TemporalAttention` (L50-67): `(b f) s c -> (b s) f c`, the position
        table added to the (already LayerNormed) input, self-attention over frames, back."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.pos_encoder = HotshotPositionalEncoding(kwargs["query_dim"])

        def forward(self, hidden_states, number_of_frames: int):
            bf, s, c = hidden_states.shape
            f = number_of_frames
            x = hidden_states.reshape(bf // f, f, s, c).permute(0, 2, 1, 3).reshape(-1, f, c)
            x = super().forward(self.pos_encoder(x, f))
            return x.reshape(bf // f, s, f, c).permute(0, 2, 1, 3).reshape(bf, s, c)

    return HotshotTemporalAttention


class HotshotTransformerBlock(nn.Module):
    """transformer_temporal.py `TransformerBlock` (L130-190): two pre-LayerNorm temporal self-attentions
    (`attention_blocks`/`norms`, depth=2, no q/k/v bias, cross_attention_dim None), then a GEGLU
    FeedForward after `ff_norm`, each added residually."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        from diffusers.models.attention import FeedForward

        attention = _hotshot_attention_class()
        self.attention_blocks = nn.ModuleList(
            [attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x, number_of_frames: int):
        for block, norm in zip(self.attention_blocks, self.norms):
            x = block(norm(x), number_of_frames=number_of_frames) + x
        return self.ff(self.ff_norm(x)) + x


class HotshotTransformerTemporal(nn.Module):
    """transformer_temporal.py `TransformerTemporal` (L75-127) on `(b, c, f, h, w)`: GroupNorm of each
    frame (`(b f) c h w`, eps 1e-6) -> proj_in (Linear) -> blocks -> proj_out (Linear) -> + input."""

    def __init__(self, channels: int, heads: int = 8, groups: int = 32, num_layers: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([HotshotTransformerBlock(channels, heads) for _ in range(num_layers)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x):
        b, c, f, h, w = x.shape
        skip = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        hs = self.norm(skip).permute(0, 2, 3, 1).reshape(b * f, h * w, c)
        hs = self.proj_in(hs)
        for block in self.transformer_blocks:
            hs = block(hs, number_of_frames=f)
        hs = self.proj_out(hs).reshape(b * f, h, w, c).permute(0, 3, 1, 2)
        return (hs + skip).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


class _TemporalList(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.temporal_attentions = nn.ModuleList(layers)


class HotshotTemporalLayers(nn.Module):
    """The module tree of `hsxl_temporal_layers.safetensors`: `down_blocks.I.temporal_attentions.J`
    (`layers_per_block` per level: after each resnet(+attention), unet_blocks.py CrossAttnDownBlock3D /
    DownBlock3D) and `up_blocks.I.temporal_attentions.J` (one more per level), none in the mid block
    (unet_blocks.py `UNetMidBlock3DCrossAttn.temporal_parameters` is empty); 8 heads of C/8 channels."""

    def __init__(self, channels=(320, 640, 1280), layers_per_block: int = 2, heads: int = 8, groups: int = 32):
        super().__init__()
        make = lambda c, n: _TemporalList([HotshotTransformerTemporal(c, heads, groups) for _ in range(n)])
        self.down_blocks = nn.ModuleList([make(c, layers_per_block) for c in channels])
        self.up_blocks = nn.ModuleList([make(c, layers_per_block + 1) for c in reversed(channels)])


class _FramesFolded(nn.Module):
    """A Hotshot temporal layer (`(b, c, f, h, w)`) where diffusers' `UNetMotionModel` calls its motion
    modules on `(b f, c, h, w)`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, *args, num_frames=None, **kwargs):
        f = num_frames if num_frames is not None else args[3]
        bf, c, h, w = x.shape
        y = self.inner(x.reshape(bf // f, f, c, h, w).permute(0, 2, 1, 3, 4))
        return y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


def torch_hotshot_unet(cfg: UNetConfig, num_frames: int, seed: int = 0):
    """`(unet, temporal_layers)`: Hotshot-XL's UNet3D for `cfg` (random weights) as diffusers' SDXL
    `UNetMotionModel` with its motion modules replaced by `HotshotTemporalLayers`' (the same module
    objects: `temporal_layers.state_dict()` is the released file's layout), and its resnet and output
    GroupNorms across all frames as Hotshot's `ResnetBlock3D` / `conv_norm_out` (nn.GroupNorm on 5-D)."""
    mm = cfg.motion
    unet = torch_motion_unet(cfg, seed)
    layers = randomize(HotshotTemporalLayers(cfg.block_out_channels, cfg.layers_per_block, mm.heads,
                                             mm.norm_num_groups), seed + 1)
    for kind in ("down_blocks", "up_blocks"):
        for block, temporal in zip(getattr(unet, kind), getattr(layers, kind)):
            for j, layer in enumerate(temporal.temporal_attentions):
                block.motion_modules[j] = _FramesFolded(layer)
    return patch_to_original(unet, cfg, num_frames), layers
