"""The models a training stage runs on: loaded from the config's files (`load_models`), or as
abstract shapes from the config alone (`abstract_models`, what `animatediff-jax compile` builds a
pod's program from without reading a weight).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.checkpoints.load import load_lora, load_motion
from animatediff_jax.checkpoints.sd15 import load_converted
from animatediff_jax.io import fs
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet, tiny_unet
from animatediff_jax.models.init import random_params
from animatediff_jax.models.shapes import clip_shapes, is_motion_path, unet_shapes, vae_shapes
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig
from animatediff_jax.training import stages
from animatediff_jax.training.config import ConfigError

Params = dict[str, Any]

# ------------------------------------------------------------------------- models


def _flax_init(module, seed: int, *args) -> Params:
    params = jax.jit(module.init)(jax.random.key(seed), *args)["params"]
    return jax.tree.map(np.asarray, params)


@dataclasses.dataclass
class Models:
    """The stage's model configs and host params, before sharding.

    `unet` is the full UNet of the stage (base + motion modules when the stage has them);
    `attached` the adapters merged into the frozen base; `trainable_init` trained params to
    continue from (None: fresh LoRA / the motion modules inside `unet`).
    """

    unet_config: UNetConfig
    unet: Params
    vae_config: VAEConfig | None = None
    vae: Params | None = None
    text_config: CLIPTextConfig | None = None
    text_encoder: Params | None = None
    attached: dict[str, tuple[Params, float]] = dataclasses.field(default_factory=dict)
    trainable_init: Params | None = None
    tokenizer_path: str | None = None


def _random_base(config) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, Callable[[str], Params]]:
    m = config.model
    if m.size == "tiny":
        text = CLIPTextConfig.tiny()
        unet, vae = tiny_unet(None, cross_attention_dim=text.hidden_size), VAEConfig.tiny()
    elif m.size == "sd15":
        unet, vae, text = sd15_unet(), VAEConfig.sd15(), CLIPTextConfig.sd15()
    else:
        raise ValueError(f"model.size {m.size!r}: expected 'sd15' or 'tiny'")

    def init(which: str) -> Params:
        seed = m.init_seed + {"unet": 0, "vae": 1, "text_encoder": 2}[which]
        if m.random_init == "fast":
            shapes = {"unet": lambda: unet_shapes(unet), "vae": lambda: vae_shapes(vae),
                      "text_encoder": lambda: clip_shapes(text)}[which]()
            return random_params(shapes, seed, like_init=True)
        if which == "unet":
            return _flax_init(UNet3D(unet), seed, jnp.zeros((1, 1, 8, 8, unet.in_channels)), jnp.zeros((1,)),
                              jnp.zeros((1, 1, unet.cross_attention_dim)))
        if which == "vae":
            return _flax_init(AutoencoderKL(vae), seed, jnp.zeros((1, 16, 16, vae.in_channels)))
        return _flax_init(CLIPTextModel(text), seed, jnp.zeros((1, text.max_positions), jnp.int32))

    return unet, vae, text, init


def _motion_init(config, unet_config: UNetConfig) -> Params:
    """Fresh motion modules (the motion-module subtrees of a randomly initialised inflated UNet)."""
    m = config.model
    if m.random_init == "fast":
        full = random_params(unet_shapes(unet_config), m.init_seed + 3, like_init=True)
    else:
        full = _flax_init(UNet3D(unet_config), m.init_seed + 3, jnp.zeros((1, 2, 8, 8, unet_config.in_channels)),
                          jnp.zeros((1,)), jnp.zeros((1, 1, unet_config.cross_attention_dim)))
    return stages.partition(full, is_motion_path)[0]


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """A weight file that cannot serve as config field `name`: one line naming the field (rc 2)."""
    from animatediff_jax.checkpoints.torch_io import CheckpointError

    try:
        yield
    except CheckpointError as e:
        raise ConfigError(f"{name}: {' '.join(line.strip() for line in str(e).splitlines())}") from None


def load_models(config, stage: stages.Stage | None = None) -> Models:
    """The stage's models from the config: a converted SD1.5 folder (or random weights), plus the
    motion modules / adapters named by `config.model`. `stage`: the config's, when the caller has
    resolved it already (`config.Validated`).
    """
    stage = stages.get_stage(config.stage) if stage is None else stage
    m = config.model
    if m.pretrained:
        with _field("model.pretrained"):
            sd = load_converted(m.pretrained)
        unet_config, vae_config, text_config = sd.unet_config, sd.vae_config, sd.text_config
        unet = stages.partition(sd.params["unet"], is_motion_path)[1]
        vae = sd.params.get("vae") if m.vae else None
        text = sd.params.get("text_encoder") if m.text_encoder else None
        tokenizer = sd.tokenizer_path
    else:
        unet_config, vae_config, text_config, init = _random_base(config)
        unet = init("unet")
        vae = init("vae") if m.vae else None
        text = init("text_encoder") if m.text_encoder else None
        tokenizer = None
    unet_config = unet_config.replace(motion=None)
    if stage.motion_modules:
        unet_config = unet_config.with_motion(
            MotionConfig.for_version(m.motion_version, norm_per_frame=bool(m.motion_norm_per_frame)))
        if m.motion_module:  # a stage-2 export or a PyTorch motion module; its layout must be this one
            with _field("model.motion_module"):
                motion, unet_config = load_motion(m.motion_module, unet_config)
        else:
            motion = _motion_init(config, unet_config)
        unet = stages.union(unet, motion)
    attached = {}
    if m.domain_adapter and "domain_adapter" in stage.attach:
        with _field("model.domain_adapter"):
            adapter = load_lora(m.domain_adapter, "domain_adapter", base=unet_config).unet
        attached["domain_adapter"] = (adapter, float(m.domain_adapter_scale))
    with _field("model.init_lora"):
        trainable_init = (load_lora(m.init_lora, stage.name, base=unet_config).unet
                          if m.init_lora and stage.kind == "lora" else None)
    return Models(unet_config, unet, vae_config if vae is not None else None, vae,
                  text_config if text is not None else None, text, attached, trainable_init, tokenizer)


def _pretrained_configs(folder: str) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig] | None:
    """The configs a converted folder's params file names in its header (no weight read), or None."""
    from animatediff_jax.checkpoints.params_io import PARAMS_FILE, config_from_dict
    from animatediff_jax.checkpoints.torch_io import safetensors_metadata

    path = f"{folder.rstrip('/')}/{PARAMS_FILE}"
    if not fs.isfile(path):
        return None
    with _field("model.pretrained"):
        meta = safetensors_metadata(path)
        if not all(k in meta for k in ("unet_config", "vae_config", "text_config")):
            return None
        return (config_from_dict(UNetConfig, json.loads(meta["unet_config"])),
                config_from_dict(VAEConfig, json.loads(meta["vae_config"])),
                config_from_dict(CLIPTextConfig, json.loads(meta["text_config"])))


def abstract_models(config) -> Models:
    """`load_models(config)` as `jax.ShapeDtypeStruct`s, from the config alone: no weight is read.

    The layouts are those `load_models` would build: a `model.pretrained` folder that exists here
    gives its configs (read from the file header), one that does not is taken to be SD1.5 (the
    only base a pretrained folder holds); `model.size` otherwise. Attached adapters merge into the
    frozen base without changing a shape, so they are left out; a LoRA to continue from has the
    fresh LoRA's shapes (`model.lora_rank`).
    """
    stage = stages.get_stage(config.stage)
    m = config.model
    configs = _pretrained_configs(m.pretrained) if m.pretrained else None
    if configs is None:
        unet_config, vae_config, text_config, _ = _random_base(config) if not m.pretrained else (
            sd15_unet(), VAEConfig.sd15(), CLIPTextConfig.sd15(), None)
    else:
        unet_config, vae_config, text_config = configs
    unet_config = unet_config.replace(motion=None)
    if stage.motion_modules:
        unet_config = unet_config.with_motion(
            MotionConfig.for_version(m.motion_version, norm_per_frame=bool(m.motion_norm_per_frame)))
    return Models(unet_config, unet_shapes(unet_config),
                  vae_config if m.vae else None, vae_shapes(vae_config) if m.vae else None,
                  text_config if m.text_encoder else None, clip_shapes(text_config) if m.text_encoder else None)
