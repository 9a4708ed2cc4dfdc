"""What a sample config describes, loaded: `AnimationPipeline` (three models, their params, a
tokenizer, compiled executables) and `load_pipeline(config)`, which merges the base, the
personalised model, the motion module and every LoRA into it, as the original's `load_weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig
from animatediff_jax.sampling.config import ConfigError, plain

Params = dict[str, Any]


@dataclasses.dataclass
class AnimationPipeline:
    """Configs + params of the UNet (with motion modules), VAE and CLIP text encoder.

    `params` has "unet", "vae" and "text_encoder". `dtype` is the compute dtype of all three
    models; latents and the scheduler update stay float32 whatever it is. `attention` is the
    UNet's `models.attention` implementation ("auto": flash kernels on GPU/TPU, blockwise on
    CPU); the VAE and text encoder keep "auto" (one 512-wide head and 77 tokens, which no
    flash kernel takes). Compiled executables are cached on the instance (one per shape,
    sharding and static option).
    """

    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    params: Params
    tokenizer: Any = None
    dtype: Any = jnp.float32
    attention: str = "auto"
    motion_scale: float = 1.0  # the UNet's motion strength (`UNet3D.motion_scale`, `motion_block_scales`)
    motion_block_scales: tuple[tuple[str, float], ...] = ()
    position_stretch: tuple[int, int] | None = None  # `UNet3D.position_stretch` (PE stretch); None: off
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _placed: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _on_step: list = dataclasses.field(default_factory=lambda: [None], init=False, repr=False, compare=False)

    @classmethod
    def from_sd15(cls, sd15, tokenizer=None, dtype=jnp.float32, attention: str = "auto") -> "AnimationPipeline":
        """From a loaded `checkpoints.sd15.SD15`; the tokenizer defaults to its `tokenizer_path`.

        For a half-precision `dtype` the floating params are cast once here, so the compiled
        loop does not re-cast a gigabyte of weights every step.
        """
        if tokenizer is None and sd15.tokenizer_path:
            from animatediff_jax.text import Tokenizer

            tokenizer = Tokenizer(sd15.tokenizer_path)
        params = sd15.params
        if jnp.dtype(dtype) != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        return cls(sd15.unet_config, sd15.vae_config, sd15.text_config, params, tokenizer, dtype, attention)

    @property
    def unet(self) -> UNet3D:
        return UNet3D(self.unet_config, dtype=self.dtype, attention=self.attention, motion_scale=self.motion_scale,
                      motion_block_scales=self.motion_block_scales, position_stretch=self.position_stretch)

    @property
    def vae(self) -> AutoencoderKL:
        return AutoencoderKL(self.vae_config, dtype=self.dtype)

    @property
    def text_encoder(self) -> CLIPTextModel:
        return CLIPTextModel(self.text_config, dtype=self.dtype)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE downscale x UNet downsampling."""
        return self.vae_config.downscale * 2 ** (len(self.unet_config.block_out_channels) - 1)

    def _compiled(self, name: str, fn: Callable, static: tuple, args: tuple, out_shardings=None) -> tuple[Any, float]:
        """`jit(fn)` compiled ahead of time for `args`' shapes and shardings (cached); also the compile seconds."""
        leaves, tree = jax.tree.flatten(args)
        sig = tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves)
        key = (name, static, tree, sig)
        if key in self._cache:
            return self._cache[key], 0.0
        t0 = time.perf_counter()
        meshes = {s.mesh for s in jax.tree.leaves([getattr(x, "sharding", None) for x in leaves])
                  if isinstance(s, NamedSharding)}
        # Under the args' mesh, so kernels that need it (splash attention's shard_map) see it.
        with jax.set_mesh(meshes.pop()) if len(meshes) == 1 else contextlib.nullcontext():
            compiled = jax.jit(fn, out_shardings=out_shardings).lower(*args).compile()
        self._cache[key] = compiled
        return compiled, time.perf_counter() - t0

    def _emit(self, step: int) -> None:
        """The progress hook compiled into the loop; forwards to this call's callback, if any."""
        cb = self._on_step[0]
        if cb is not None:
            cb(int(step))

    def replicated(self, mesh: Mesh, name: str) -> Params:
        """`params[name]` replicated over `mesh`; kept while `params[name]` is the same object."""
        return self.placed(mesh, self.params[name])

    def placed(self, mesh: Mesh, params: Params) -> Params:
        """Any params tree (a control model's too) replicated over `mesh`, kept while it is alive."""
        key = (id(params), mesh)
        held = self._placed.get(key)
        if held is None or held[0] is not params:
            self._placed[key] = (params, jax.device_put(params, NamedSharding(mesh, P())))
        return self._placed[key][1]


# ----------------------------------------------------------------------------------------------
# load_pipeline: a sample config's files, merged.
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _blame(field: str):
    """Loading errors as one-line `ConfigError`s naming the config field whose file failed."""
    from animatediff_jax.checkpoints.torch_io import CheckpointError

    try:
        yield
    except (CheckpointError, ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{field}: {' '.join(str(e).split())}") from e


def load_pipeline(config: Mapping[str, Any]) -> AnimationPipeline:
    """The `AnimationPipeline` a sample config describes, every adapter merged into the weights.

    As the original's `load_weights`: base SD1.5; the personalised model over it (parts it
    lacks come from the base); the motion module (or the base's own); the personalised LoRA at
    `lora_alpha` (UNet and text encoder); the domain adapter at `adapter_lora_scale`; each
    MotionLoRA at its alpha. Merging is `lora.merge` in float32, before the cast to `dtype`.
    A file that fails is a `ConfigError` naming its field.
    """
    from animatediff_jax.checkpoints.load import load_lora, load_motion
    from animatediff_jax.checkpoints.motion import merge_motion
    from animatediff_jax.checkpoints.sd15 import SD15, load_sd15
    from animatediff_jax.lora import merge, merge_many
    from animatediff_jax.models.shapes import motion_subtree
    from animatediff_jax.text import Tokenizer

    c = plain(config)
    with _blame("base_model"):
        base = load_sd15(c["base_model"])
    model = base
    if c["dreambooth_path"]:
        spatial_base = dataclasses.replace(base, unet_config=base.unet_config.replace(motion=None))
        with _blame("dreambooth_path"):
            model = load_sd15(c["dreambooth_path"], base=spatial_base, unet_config=spatial_base.unet_config)
    spatial = model.unet_config.replace(motion=None)
    unet = model.params["unet"]
    if c["motion_module"]:
        with _blame("motion_module"):
            motion, unet_config = load_motion(c["motion_module"], spatial)
    elif model.unet_config.motion is not None:
        motion, unet_config = motion_subtree(unet), model.unet_config
    elif base.unet_config.motion is not None:
        motion = motion_subtree(base.params["unet"])
        unet_config = spatial.replace(motion=base.unet_config.motion,
                                      spatial_norm_per_frame=base.unet_config.spatial_norm_per_frame)
    else:
        raise ConfigError("motion_module: required (the base model has no motion modules)")
    with _blame("motion_module"):
        unet = merge_motion(unet, motion, unet_config)  # (replaces motion modules the model had)
    text = model.params["text_encoder"]

    if c["lora_model_path"]:
        with _blame("lora_model_path"):
            personal = load_lora(c["lora_model_path"], "lora", base=unet_config, text_config=model.text_config)
        if personal.unet:
            unet = merge(unet, personal.unet, c["lora_alpha"])
        if personal.text_encoder:
            text = merge(text, personal.text_encoder, c["lora_alpha"])
    if c["adapter_lora_path"]:
        with _blame("adapter_lora_path"):
            adapter = load_lora(c["adapter_lora_path"], "domain_adapter", base=unet_config).unet
        unet = merge(unet, adapter, c["adapter_lora_scale"])
    motion_loras = []
    for i, e in enumerate(c["motion_module_lora_configs"]):
        with _blame(f"motion_module_lora_configs[{i}]"):
            motion_loras.append((load_lora(e["path"], "motion_lora", base=unet_config).unet,
                                 float(e.get("alpha", 1.0))))
    unet = merge_many(unet, motion_loras)

    tok_path = c["tokenizer"] or model.tokenizer_path or base.tokenizer_path
    if not tok_path:
        raise ConfigError(f"tokenizer: {c['base_model']} has no tokenizer/ folder; set tokenizer to a CLIP tokenizer folder")
    merged = SD15(unet_config, model.vae_config, model.text_config,
                  dict(model.params, unet=unet, text_encoder=text), tok_path)
    pipe = AnimationPipeline.from_sd15(merged, Tokenizer(tok_path), dtype=jnp.dtype(c["dtype"]),
                                       attention=c["attention"])
    block_scales = tuple(sorted((k, float(v)) for k, v in dict(c.get("motion_block_scales") or {}).items()))
    stretch = tuple(int(v) for v in c.get("pe_stretch") or ()) or None
    return dataclasses.replace(pipe, motion_scale=float(c.get("motion_scale", 1.0)), motion_block_scales=block_scales,
                               position_stretch=stretch)
