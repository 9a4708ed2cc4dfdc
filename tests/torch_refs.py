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
