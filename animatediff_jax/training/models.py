"""The models a training stage runs on: loaded from the config's files (`load_models`), or as
abstract shapes from the config alone (`abstract_models`, what `animatediff-jax compile` builds a
pod's program from without reading a weight).

The base is SD1.5 or SDXL, told apart by its files (`checkpoints.sdxl.sdxl_folder_configs`: a
converted or diffusers SDXL folder), or by `model.size` for random weights and for a
`model.pretrained` folder this host does not have. An SDXL base brings its second text encoder
(`text_encoder_2`, whose pooled output and the clip's size make the UNet's added conditioning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.checkpoints.load import load_lora, load_motion
from animatediff_jax.checkpoints.sd15 import load_converted
from animatediff_jax.io import fs
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, SDXLTextEncoder
from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet, sdxl_unet, tiny_sdxl_unet, tiny_unet
from animatediff_jax.models.init import random_params
from animatediff_jax.models.shapes import clip_shapes, is_motion_path, sdxl_text_shapes, unet_shapes, vae_shapes
from animatediff_jax.models.unet import AddedCond, UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig
from animatediff_jax.training import stages
from animatediff_jax.training.config import SIZES, ConfigError

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
    continue from (None: fresh LoRA / the motion modules inside `unet`). An SDXL base (`family`)
    also has `text_encoder_2` (its pooling rule `eos_token_id_2`) and `tokenizer_2_path`.
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
    text_config_2: CLIPTextConfig | None = None
    text_encoder_2: Params | None = None
    eos_token_id_2: int = 2
    tokenizer_2_path: str | None = None

    @property
    def family(self) -> str:
        """"sdxl" or "sd15": the base's (`UNetConfig.family`)."""
        return self.unet_config.family

    def text_modules(self) -> tuple[nn.Module | None, nn.Module | None]:
        """The modules that encode the batch's token ids inside the step: SD1.5's `CLIPTextModel` (and
        None), or SDXL's two towers as its pipeline reads them (penultimate hidden states; the second's
        pooled, projected output). (None, None) without a text encoder."""
        if self.text_encoder is None:
            return None, None
        if self.family == "sdxl":
            return SDXLTextEncoder(self.text_config), SDXLTextEncoder(self.text_config_2, self.eos_token_id_2)
        return CLIPTextModel(self.text_config), None

    def frozen(self, unet: Params) -> dict[str, Params]:
        """The step's frozen weights: the stage's frozen UNet tree (`stages.init_stage`) and whichever of the
        VAE and the text encoders the step runs (those it has)."""
        parts = {"unet": unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in parts.items() if v is not None}


def tiny_sdxl_text() -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """Tiny SDXL text towers (the second with a projection) for `tiny_sdxl_unet(cross_attention_dim=64)`:
    hidden states 32 + 32 side by side, pooled text 16 (`text_embeds_dim`)."""
    return CLIPTextConfig.tiny(), CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2,
                                                 num_heads=4, hidden_act="gelu", projection_dim=16)


def unet_init_args(cfg: UNetConfig, frames: int) -> tuple[tuple, dict]:
    """`(args, kwargs)` that initialise `UNet3D(cfg)` (SDXL's needs its added conditioning)."""
    args = (jnp.zeros((1, frames, 8, 8, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.cross_attention_dim)))
    if cfg.family != "sdxl":
        return args, {}
    return args, {"added_cond": AddedCond(jnp.zeros((1, cfg.text_embeds_dim)), jnp.zeros((1, 6)))}


def _size_configs(size: str) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPTextConfig | None]:
    """`model.size`'s base: UNet, VAE, text encoder(s) (the second SDXL's only)."""
    if size == "tiny":
        text = CLIPTextConfig.tiny()
        return tiny_unet(None, cross_attention_dim=text.hidden_size), VAEConfig.tiny(), text, None
    if size == "sd15":
        return sd15_unet(), VAEConfig.sd15(), CLIPTextConfig.sd15(), None
    if size == "tiny_sdxl":
        text, text_2 = tiny_sdxl_text()
        return tiny_sdxl_unet(None, cross_attention_dim=text.hidden_size + text_2.hidden_size), VAEConfig.tiny(), \
            text, text_2
    if size == "sdxl":
        return sdxl_unet(), VAEConfig.sdxl(), CLIPTextConfig.sd15(), CLIPTextConfig.sdxl_g()
    raise ValueError(f"model.size {size!r}: expected one of {', '.join(SIZES)}")


def _random_base(config) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPTextConfig | None,
                                  Callable[[str], Params]]:
    m = config.model
    unet, vae, text, text_2 = _size_configs(m.size)

    def init(which: str) -> Params:
        seed = m.init_seed + {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 5}[which]
        if m.random_init == "fast":
            text_shapes = clip_shapes if text_2 is None else sdxl_text_shapes
            shapes = {"unet": lambda: unet_shapes(unet), "vae": lambda: vae_shapes(vae),
                      "text_encoder": lambda: text_shapes(text),
                      "text_encoder_2": lambda: sdxl_text_shapes(text_2)}[which]()
            return random_params(shapes, seed, like_init=True)
        if which == "unet":
            args, kwargs = unet_init_args(unet, 1)
            return _flax_init(UNet3D(unet), seed, *args, **kwargs)
        if which == "vae":
            return _flax_init(AutoencoderKL(vae), seed, jnp.zeros((1, 16, 16, vae.in_channels)))
        if text_2 is not None:
            cfg = text if which == "text_encoder" else text_2
            return _flax_init(SDXLTextEncoder(cfg), seed, jnp.zeros((1, cfg.max_positions), jnp.int32))
        return _flax_init(CLIPTextModel(text), seed, jnp.zeros((1, text.max_positions), jnp.int32))

    return unet, vae, text, text_2, init


def _motion_init(config, unet_config: UNetConfig) -> Params:
    """Fresh motion modules (the motion-module subtrees of a randomly initialised inflated UNet)."""
    m = config.model
    if m.random_init == "fast":
        full = random_params(unet_shapes(unet_config), m.init_seed + 3, like_init=True)
    else:
        args, kwargs = unet_init_args(unet_config, 2)
        full = _flax_init(UNet3D(unet_config), m.init_seed + 3, *args, **kwargs)
    return stages.partition(full, is_motion_path)[0]


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """A weight file that cannot serve as config field `name`: one line naming the field (rc 2)."""
    from animatediff_jax.checkpoints.torch_io import CheckpointError

    try:
        yield
    except CheckpointError as e:
        raise ConfigError(f"{name}: {' '.join(line.strip() for line in str(e).splitlines())}") from None


def motion_config(config) -> MotionConfig:
    """The motion layout `model.motion_version` names; `model.motion_norm_per_frame` unset (None) keeps
    that release's own norms (v1-v3 and HotshotXL per frame, the SDXL beta across frames)."""
    m = config.model
    per_frame = m.get("motion_norm_per_frame")
    return MotionConfig.for_version(m.motion_version, **({} if per_frame is None else
                                                         {"norm_per_frame": bool(per_frame)}))


def with_motion(config, unet_config: UNetConfig) -> UNetConfig:
    """The base UNet inflated with the config's motion layout; an SD1.5 layout on an SDXL base (or the
    reverse) is a one-line `ConfigError` naming `model.motion_version`."""
    try:
        return unet_config.replace(motion=None).with_motion(motion_config(config))
    except ValueError as e:
        raise ConfigError(f"model.motion_version={config.model.motion_version!r}: {e}") from None


def _load_pretrained(folder: str, m) -> dict[str, Any]:
    """`Models` fields of the base in `folder`: SDXL (converted or diffusers folder) or converted SD1.5."""
    from animatediff_jax.checkpoints.sdxl import load_sdxl, sdxl_folder_configs

    with _field("model.pretrained"):
        if sdxl_folder_configs(folder) is None:
            sd = load_converted(folder)
            extra = {}
        else:
            sd = load_sdxl(folder)
            extra = dict(text_config_2=sd.text_config_2, eos_token_id_2=sd.eos_token_id_2,
                         tokenizer_2_path=sd.tokenizer_2_path,
                         text_encoder_2=sd.params["text_encoder_2"] if m.text_encoder else None)
    return dict(unet_config=sd.unet_config, unet=stages.partition(sd.params["unet"], is_motion_path)[1],
                vae_config=sd.vae_config, vae=sd.params.get("vae") if m.vae else None, text_config=sd.text_config,
                text_encoder=sd.params.get("text_encoder") if m.text_encoder else None,
                tokenizer_path=sd.tokenizer_path, **extra)


def load_models(config, stage: stages.Stage | None = None) -> Models:
    """The stage's models from the config: a converted SD1.5 folder, an SDXL one (converted or
    diffusers), or random weights, plus the motion modules / adapters named by `config.model`.
    `stage`: the config's, when the caller has resolved it already (`config.Validated`).
    """
    stage = stages.get_stage(config.stage) if stage is None else stage
    m = config.model
    if m.pretrained:
        base = _load_pretrained(m.pretrained, m)
    else:
        unet_config, vae_config, text_config, text_config_2, init = _random_base(config)
        sdxl = text_config_2 is not None
        base = dict(unet_config=unet_config, unet=init("unet"), vae_config=vae_config,
                    vae=init("vae") if m.vae else None, text_config=text_config,
                    text_encoder=init("text_encoder") if m.text_encoder else None, tokenizer_path=None)
        if sdxl:
            base.update(text_config_2=text_config_2,
                        text_encoder_2=init("text_encoder_2") if m.text_encoder else None)
    unet_config, unet = base.pop("unet_config").replace(motion=None), base.pop("unet")
    if stage.motion_modules:
        unet_config = with_motion(config, unet_config)
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
    if base["vae"] is None:
        base["vae_config"] = None
    if base["text_encoder"] is None:
        base["text_config"] = base["text_config_2"] = None
    return Models(unet_config=unet_config, unet=unet, attached=attached, trainable_init=trainable_init, **base)


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


def base_configs(config) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPTextConfig | None]:
    """The base's configs without a weight: a `model.pretrained` folder that exists here gives its own
    (file headers / config.json), one that does not is `model.size`'s base ("sd15" unless the config
    says "sdxl"); `model.size` for random weights."""
    from animatediff_jax.checkpoints.sdxl import sdxl_folder_configs

    m = config.model
    if m.pretrained:
        with _field("model.pretrained"):
            xl = sdxl_folder_configs(m.pretrained)
        if xl is not None:
            return xl
        sd = _pretrained_configs(m.pretrained)
        if sd is not None:
            return (*sd, None)
    if m.pretrained and m.size not in ("sd15", "sdxl"):
        return _size_configs("sd15")  # (a pretrained base is never tiny)
    return _size_configs(m.size)


def abstract_models(config) -> Models:
    """`load_models(config)` as `jax.ShapeDtypeStruct`s, from the config alone: no weight is read.

    The layouts are those `load_models` would build (`base_configs`: a `model.pretrained` folder
    that is not here is `model.size`'s base, SD1.5 by default). Attached adapters merge into the
    frozen base without changing a shape, so they are left out; a LoRA to continue from has the
    fresh LoRA's shapes (`model.lora_rank`).
    """
    stage = stages.get_stage(config.stage)
    m = config.model
    unet_config, vae_config, text_config, text_config_2 = base_configs(config)
    unet_config = unet_config.replace(motion=None)
    if stage.motion_modules:
        unet_config = with_motion(config, unet_config)
    sdxl = text_config_2 is not None
    text_shapes = sdxl_text_shapes if sdxl else clip_shapes
    return Models(unet_config, unet_shapes(unet_config),
                  vae_config if m.vae else None, vae_shapes(vae_config) if m.vae else None,
                  text_config if m.text_encoder else None, text_shapes(text_config) if m.text_encoder else None,
                  text_config_2=text_config_2 if sdxl and m.text_encoder else None,
                  text_encoder_2=sdxl_text_shapes(text_config_2) if sdxl and m.text_encoder else None)
