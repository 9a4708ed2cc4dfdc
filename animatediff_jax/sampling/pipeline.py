"""The models a sampler runs, as a value: `AnimationPipeline` (configs, params, tokenizer, compute
dtype, attention kernel). It holds nothing per call: the motion strength, windows and callbacks
travel in the `Request`, compiled programs live in `compiled.Programs`. A new UNet (a training run's
validation) is a new pipeline: `dataclasses.replace(pipe, params={**pipe.params, "unet": unet})`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from animatediff_jax.models import quantize
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, SDXLTextEncoder
from animatediff_jax.models.config import UNetConfig, size_multiple
from animatediff_jax.models.layers import TemporalWindows
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig
from animatediff_jax.sampling.options import Motion

Params = dict[str, Any]


def cast_floating(params: Params, dtype: Any) -> Params:
    """Floating leaves of `params` cast to `dtype` (once, so a compiled loop does not re-cast them); int8
    kernels (`models.quantize`) keep their float32 scales. Leaves may be `ShapeDtypeStruct`s (`compile`)."""
    if jnp.dtype(dtype) == jnp.float32:
        return params

    def cast(p):
        if quantize.is_quantized(p) or not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return jax.ShapeDtypeStruct(p.shape, dtype) if isinstance(p, jax.ShapeDtypeStruct) else p.astype(dtype)

    return jax.tree.map(cast, params, is_leaf=quantize.is_quantized)


@dataclasses.dataclass(frozen=True, eq=False)
class AnimationPipeline:
    """Configs + params of the UNet (with motion modules), VAE and CLIP text encoder.

    `params` has "unet", "vae" and "text_encoder". `dtype` is the compute dtype of all three
    models; latents and the scheduler update stay float32 whatever it is. `attention` is the
    UNet's `models.attention` implementation ("auto": flash kernels on GPU/TPU, blockwise on
    CPU); the VAE and text encoder keep "auto" (one 512-wide head and 77 tokens, which no
    flash kernel takes). `quantize` is the UNet's `models.quantize` mode; its params hold the
    int8 kernels already (`from_base` makes them: a new UNet needs `quantize_unet`).

    SDXL (`unet_config.family == "sdxl"`): `text_config` / `tokenizer` are the first text encoder's
    (ViT-L), `text_config_2` / `tokenizer_2` / `params["text_encoder_2"]` the second's (bigG, with the
    pooled projection; `eos_token_id_2` its pooling rule), and `force_zeros_for_empty_prompt` the
    pipeline's (no negative prompt under guidance: zero embeddings, as diffusers' SDXL pipelines).
    """

    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    params: Params
    tokenizer: Any = None
    dtype: Any = jnp.float32
    attention: str = "auto"
    quantize: str = "none"
    text_config_2: CLIPTextConfig | None = None
    tokenizer_2: Any = None
    eos_token_id_2: int = 2
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def from_base(cls, model, tokenizer=None, dtype=jnp.float32, attention: str = "auto",
                  quantize: str = "none", tokenizer_2=None) -> "AnimationPipeline":
        """From a loaded base, `checkpoints.sd15.SD15` or `checkpoints.sdxl.SDXL` (its second text encoder,
        pooling rule and `force_zeros_for_empty_prompt` too); the tokenizers default to its tokenizer paths.
        The UNet's kernels are quantized by `quantize` (from float32) and then, for a half-precision
        `dtype`, the floating params cast, once here."""
        from animatediff_jax.text import Tokenizer

        if tokenizer is None and model.tokenizer_path:
            tokenizer = Tokenizer(model.tokenizer_path)
        xl = {}
        if getattr(model, "text_config_2", None) is not None:
            if tokenizer_2 is None and model.tokenizer_2_path:
                tokenizer_2 = Tokenizer(model.tokenizer_2_path)
            xl = dict(text_config_2=model.text_config_2, tokenizer_2=tokenizer_2, eos_token_id_2=model.eos_token_id_2,
                      force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)
        params = {**model.params, "unet": quantize_unet(model.unet_config, model.params["unet"], quantize)}
        return cls(model.unet_config, model.vae_config, model.text_config, cast_floating(params, dtype), tokenizer,
                   dtype, attention, quantize, **xl)

    @property
    def unet(self) -> UNet3D:
        """The UNet as trained (motion at full strength)."""
        return self.unet_for(Motion())

    def unet_for(self, motion: Motion, motion_windows: TemporalWindows | None = None) -> UNet3D:
        """The UNet with `motion`'s strength and PE stretch, and (FreeNoise) windows in its motion modules."""
        unet = UNet3D(self.unet_config, dtype=self.dtype, attention=self.attention, motion_scale=motion.scale,
                      motion_block_scales=motion.block_scales, position_stretch=motion.pe_stretch,
                      motion_windows=motion_windows)
        return quantize.quantized(unet, self.quantize)

    @property
    def sdxl(self) -> bool:
        """An SDXL base: two text encoders, and the UNet takes `AddedCond` (pooled text + size ids)."""
        return self.unet_config is not None and self.unet_config.family == "sdxl"

    @property
    def vae(self) -> AutoencoderKL:
        """The VAE; SDXL's in float32 when the compute dtype is float16 and its config says `force_upcast`
        (SDXL's VAE overflows in float16: diffusers' SDXL pipelines upcast it to decode)."""
        upcast = self.sdxl and jnp.dtype(self.dtype) == jnp.float16 and self.vae_config.force_upcast
        return AutoencoderKL(self.vae_config, dtype=jnp.float32 if upcast else self.dtype)

    @property
    def text_encoder(self) -> CLIPTextModel:
        return CLIPTextModel(self.text_config, dtype=self.dtype)

    @property
    def text_encoders(self) -> tuple[SDXLTextEncoder, SDXLTextEncoder]:
        """SDXL's two text encoders (hidden states without the final norm; the second also pooled)."""
        if self.text_config_2 is None:
            raise ValueError("the pipeline has no second text encoder (text_config_2): SDXL needs both")
        return (SDXLTextEncoder(self.text_config, dtype=self.dtype),
                SDXLTextEncoder(self.text_config_2, self.eos_token_id_2, dtype=self.dtype))

    @property
    def context_dim(self) -> int:
        """Width of the text embeddings the UNet attends to (SDXL: both encoders' side by side)."""
        return self.text_config.hidden_size + (self.text_config_2.hidden_size if self.sdxl else 0)

    def with_embeddings(self, embeddings) -> "AnimationPipeline":
        """A new pipeline with textual-inversion `embeddings` (`checkpoints.embeddings.load_embeddings`)
        added to its tokenizer and text encoder, as diffusers' `load_textual_inversion` (this one unchanged)."""
        from animatediff_jax.checkpoints.embeddings import add_embeddings

        if self.sdxl:
            raise ValueError("textual-inversion embeddings are not supported on SDXL yet (they need both encoders)")
        if self.tokenizer is None or not hasattr(self.tokenizer, "with_tokens"):
            raise ValueError("textual-inversion embeddings need the pipeline's CLIP tokenizer (text.Tokenizer)")
        tokenizer, text = add_embeddings(self.tokenizer, self.params["text_encoder"], embeddings)
        rows = int(text["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[0])
        return dataclasses.replace(self, text_config=dataclasses.replace(self.text_config, vocab_size=rows),
                                   params={**self.params, "text_encoder": text}, tokenizer=tokenizer)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE downscale x UNet downsampling."""
        return size_multiple(len(self.unet_config.block_out_channels), len(self.vae_config.block_out_channels))

    def on(self, mesh: Mesh) -> "AnimationPipeline":
        """This pipeline with the UNet's and VAE's params replicated over `mesh`, placed once (`generate`
        then moves nothing); the text encoder runs before the sharded programs, where its params are."""
        rep = NamedSharding(mesh, P())
        return dataclasses.replace(self, params={**self.params, **{k: jax.device_put(self.params[k], rep)
                                                                   for k in ("unet", "vae")}})


def quantize_unet(config: UNetConfig, params: Params, mode: str) -> Params:
    """A UNet's params with its spatial kernels quantized by `mode` (`models.quantize`; "none": unchanged).
    Leaves may be `ShapeDtypeStruct`s (`compile`)."""
    from animatediff_jax.models.shapes import unet_example_inputs

    args, kwargs = unet_example_inputs(config)
    return quantize.quantize_params(UNet3D(config), params, mode, *args, **kwargs)
