"""SDXL's two text encoders: diffusers folders and single-file (SGM) checkpoints -> params.

A diffusers SDXL folder holds `text_encoder/` (OpenAI CLIP ViT-L/14's text tower, a transformers
`CLIPTextModel`) and `text_encoder_2/` (OpenCLIP ViT-bigG/14's, a `CLIPTextModelWithProjection`), each
`config.json` + `model.safetensors` (or only the `model.fp16.safetensors` variant), read as
`checkpoints.sd15.convert_clip_text` reads SD1.5's.

A single-file SDXL checkpoint (Stability's `sd_xl_base_1.0.safetensors`, CivitAI models) names them
as Stability's `sgm` code held them:
- `conditioner.embedders.0.transformer.text_model.*`: ViT-L in transformers' names (+ `position_ids`);
- `conditioner.embedders.1.model.*`: bigG in OpenCLIP's names: `token_embedding.weight`,
  `positional_embedding` (a bare tensor), `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc,
  mlp.c_proj}` with q/k/v fused in `attn.in_proj_weight` / `in_proj_bias` (rows q, k, v), `ln_final`,
  `text_projection` as `x @ P` (`[width, projection]`: transposed against transformers' Linear) and
  `logit_scale` (CLIP's contrastive temperature, unused here: dropped, as diffusers drops it).
`open_clip_to_transformers` renames the latter (diffusers' `convert_open_clip_checkpoint`), after
checking the file's keys and shapes against `open_clip_text_shapes(config)`, so a file that does
not fit is reported in its own names.

The whole model (`SDXL`: UNet, VAE, both text encoders, tokenizers) comes from `load_sdxl`: a diffusers
folder, or a single file whose UNet (`model.diffusion_model.*`, the added embedding as
`label_emb.0.{0,2}`) and VAE (`first_stage_model.*`) are renamed by diffusers' own converters, as
SD1.5's are (`sd15._ldm_to_diffusers_traced`: errors name the file's keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from animatediff_jax.checkpoints.family import SGM_CLIP_G_PREFIX, base_family, is_sdxl_checkpoint
from animatediff_jax.checkpoints.params_io import PARAMS_FILE, config_from_dict, load_params, save_params
from animatediff_jax.checkpoints.sd15 import (
    LDM_UNET_PREFIX,
    _ldm_to_diffusers_traced,
    _read_config,
    convert_clip_text,
    convert_unet_state_dict,
    convert_vae,
    is_ldm_checkpoint,
)
from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    FileNames,
    Misfit,
    Params,
    StateDict,
    check_tree,
    find_weights_file,
    load_state_dict,
    report_mismatch,
    torch_to_flax,
)
from animatediff_jax.io import fs
from animatediff_jax.models.clip_text import CLIPTextConfig, SDXLTextEncoder
from animatediff_jax.models.config import UNetConfig, sdxl_unet
from animatediff_jax.models.shapes import sdxl_text_shapes, unet_shapes, vae_shapes
from animatediff_jax.models.vae import VAEConfig

SGM_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
# The released `text_encoder_2/config.json`'s eos_token_id: the legacy value, so the pooled output is
# taken at the largest id of each row (`clip_text.pool_eos`). What a single file is read with.
SDXL_EOS_TOKEN_ID = 2
_TRANSFORMERS_EOS_DEFAULT = 49407  # transformers' CLIPTextConfig default, for a config.json without one

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclasses.dataclass
class SDXLText:
    """SDXL's text side: both towers' configs and params (`params["text_encoder"]`,
    `params["text_encoder_2"]`), the second tower's `eos_token_id` (its pooling rule), the tokenizer
    folders when known, and the pipeline's `force_zeros_for_empty_prompt` (model_index.json; True, the
    `StableDiffusionXLPipeline` default, without one). For `text.encode_prompts_sdxl`:

        sdxl = load_sdxl_text(path)
        toks = (Tokenizer(sdxl.tokenizer_path), Tokenizer(sdxl.tokenizer_2_path))
        out = encode_prompts_sdxl(sdxl.models(), sdxl.param_pair(), toks, prompts, negatives,
                                  force_zeros_for_empty_prompt=sdxl.force_zeros_for_empty_prompt)
    """

    text_config: CLIPTextConfig
    text_config_2: CLIPTextConfig
    params: dict[str, Params]
    eos_token_id_2: int = SDXL_EOS_TOKEN_ID
    tokenizer_path: str | None = None
    tokenizer_2_path: str | None = None
    force_zeros_for_empty_prompt: bool = True

    def models(self, **kwargs: Any) -> tuple[SDXLTextEncoder, SDXLTextEncoder]:
        """The two modules (`kwargs`: dtype, param_dtype, attention)."""
        return (SDXLTextEncoder(self.text_config, **kwargs),
                SDXLTextEncoder(self.text_config_2, self.eos_token_id_2, **kwargs))

    def param_pair(self) -> tuple[Params, Params]:
        return self.params["text_encoder"], self.params["text_encoder_2"]


# ----------------------------------------------------------------------------- OpenCLIP naming

# An OpenCLIP resblock's modules -> transformers' encoder layer's (`attn.in_proj_*` is split apart).
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_UNUSED = ("logit_scale",)


def open_clip_text_shapes(config: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    """The keys (without prefix) and shapes of an OpenCLIP text tower with `config`'s sizes, as the
    released SDXL files hold bigG (`logit_scale`, optional, aside)."""
    if config.projection_dim is None:
        raise ValueError("an OpenCLIP text tower has a text_projection: config.projection_dim is needed")
    d, f = config.hidden_size, config.intermediate_size
    out = {
        "token_embedding.weight": (config.vocab_size, d),
        "positional_embedding": (config.max_positions, d),
        "ln_final.weight": (d,), "ln_final.bias": (d,),
        "text_projection": (d, config.projection_dim),
    }
    for i in range(config.num_layers):
        b = f"transformer.resblocks.{i}."
        out.update({
            b + "ln_1.weight": (d,), b + "ln_1.bias": (d,),
            b + "attn.in_proj_weight": (3 * d, d), b + "attn.in_proj_bias": (3 * d,),
            b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,),
            b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
            b + "mlp.c_fc.weight": (f, d), b + "mlp.c_fc.bias": (f,),
            b + "mlp.c_proj.weight": (d, f), b + "mlp.c_proj.bias": (d,),
        })
    return out


def _transformers_name(key: str) -> str | tuple[str, str, str]:
    """An OpenCLIP text key (no prefix) -> its transformers name, or the q/k/v names it is split into."""
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key]
    if key == "text_projection":
        return "text_projection.weight"
    _, _, i, rest = key.split(".", 3)  # transformer.resblocks.N.<rest>
    layer = f"text_model.encoder.layers.{i}."
    if rest.startswith("attn.in_proj_"):
        leaf = rest.removeprefix("attn.in_proj_")
        return tuple(f"{layer}self_attn.{p}_proj.{leaf}" for p in "qkv")
    module, leaf = rest.rsplit(".", 1)
    return f"{layer}{_OPEN_CLIP_LAYER[module]}.{leaf}"


def open_clip_to_transformers(
    state_dict: Mapping[str, np.ndarray], config: CLIPTextConfig, *, prefix: str = SGM_CLIP_G_PREFIX,
    what: str = "OpenCLIP text tower",
) -> tuple[StateDict, FileNames]:
    """The OpenCLIP text tower under `prefix` in `state_dict` (other keys are ignored) -> a transformers
    `CLIPTextModelWithProjection` state dict (q/k/v split, `text_projection` transposed), and how the
    file names each of its keys (for `torch_to_flax`'s messages).

    The tower's keys must be exactly `open_clip_text_shapes(config)` (plus an optional `logit_scale`):
    else a `CheckpointError` naming the file's keys, with their shapes in the file."""
    part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for k in _OPEN_CLIP_UNUSED:
        part.pop(k, None)
    want = open_clip_text_shapes(config)
    report_mismatch(
        what,
        missing=[f"{prefix}{k} {s}" for k, s in want.items() if k not in part],
        unexpected=[f"{prefix}{k} {tuple(np.shape(v))}" for k, v in part.items() if k not in want],
        mismatched=[Misfit(prefix + k, tuple(np.shape(v)), want[k]) for k, v in part.items()
                    if k in want and tuple(np.shape(v)) != want[k]],
        common=sum(k in want for k in part),
    )
    d = config.hidden_size
    out: StateDict = {}
    origin: dict[str, str] = {}
    for k, v in part.items():
        name = _transformers_name(k)
        if isinstance(name, tuple):  # fused q, k, v rows
            for j, n in enumerate(name):
                out[n], origin[n] = v[j * d:(j + 1) * d], prefix + k
        else:
            out[name], origin[name] = (np.transpose(v) if k == "text_projection" else v), prefix + k
    return out, FileNames(origin)


# ----------------------------------------------------------------------------- diffusers folders


def _read_json(path: str) -> dict:
    try:
        with fs.open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is this a diffusers SDXL folder?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _text_config(folder: str, name: str) -> tuple[CLIPTextConfig, int]:
    """(config, eos_token_id) of `folder/name/config.json`: a CLIPTextModel for `text_encoder`, a
    CLIPTextModelWithProjection for `text_encoder_2`."""
    path = os.path.join(folder, name, "config.json")
    cfg = _read_json(path)
    projection = name == "text_encoder_2"
    want = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    arch = list(cfg.get("architectures") or [want])
    if arch[0] != want:
        raise CheckpointError(f"{path}: a {arch[0]}, but SDXL's {name} is a {want}")
    try:
        config = CLIPTextConfig.from_transformers(cfg, projection=projection)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unsupported text config ({type(e).__name__}: {e})") from None
    return config, int(cfg.get("eos_token_id", _TRANSFORMERS_EOS_DEFAULT))


def load_diffusers_text_encoders(folder: str | os.PathLike) -> SDXLText:
    """`text_encoder/`, `text_encoder_2/` (+ `tokenizer/`, `tokenizer_2/`, `model_index.json`) of a
    diffusers SDXL folder, as published or saved: safetensors or `.bin`, full precision or only the
    fp16 variant, with or without `position_ids` buffers (float32 params)."""
    folder = os.fspath(folder)
    if not fs.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    configs = {name: _text_config(folder, name) for name in TEXT_ENCODERS}
    params = {}
    for name in TEXT_ENCODERS:
        file = find_weights_file(os.path.join(folder, name))
        kind = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
        params[name] = convert_clip_text(load_state_dict(file), sdxl_text_shapes(configs[name][0]),
                                         what=f"{file} (transformers {kind})", names=FileNames())
    index = os.path.join(folder, "model_index.json")
    force_zeros = bool(_read_json(index).get("force_zeros_for_empty_prompt", True)) if fs.isfile(index) else True
    toks = [os.path.join(folder, t) for t in ("tokenizer", "tokenizer_2")]
    return SDXLText(
        configs["text_encoder"][0], configs["text_encoder_2"][0], params, configs["text_encoder_2"][1],
        *(t if fs.isdir(t) else None for t in toks), force_zeros_for_empty_prompt=force_zeros,
    )


# ----------------------------------------------------------------------------- single files


def convert_sgm_text_encoders(
    state_dict: Mapping[str, np.ndarray],
    text_config: CLIPTextConfig | None = None,
    text_config_2: CLIPTextConfig | None = None,
    *,
    what: str = "SDXL single file",
) -> dict[str, Params]:
    """The text encoders of a single-file SDXL state dict (`conditioner.embedders.0.transformer.*`,
    `conditioner.embedders.1.model.*`; other keys ignored) -> `{"text_encoder": ..., "text_encoder_2":
    ...}` params for those it holds (configs: SDXL's by default). Errors name the file's keys."""
    text_config = text_config or CLIPTextConfig.sd15()
    text_config_2 = text_config_2 or CLIPTextConfig.sdxl_g()
    params = {}
    part = {k[len(SGM_CLIP_L_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SGM_CLIP_L_PREFIX)}
    if part:
        names = FileNames({k: SGM_CLIP_L_PREFIX + k for k in part}, rename=lambda k: SGM_CLIP_L_PREFIX + k)
        params["text_encoder"] = convert_clip_text(part, sdxl_text_shapes(text_config),
                                                   what=f"{what}: text encoder (ViT-L)", names=names)
    if any(k.startswith(SGM_CLIP_G_PREFIX) for k in state_dict):
        w = f"{what}: text encoder 2 (OpenCLIP bigG)"
        sd, names = open_clip_to_transformers(state_dict, text_config_2, what=w)
        params["text_encoder_2"] = torch_to_flax(sd, sdxl_text_shapes(text_config_2), what=w, names=names)
    return params


def load_single_file_text_encoders(
    path: str | os.PathLike,
    *,
    base: SDXLText | None = None,
    text_config: CLIPTextConfig | None = None,
    text_config_2: CLIPTextConfig | None = None,
) -> SDXLText:
    """Both text encoders of a single-file SDXL checkpoint (`.safetensors` / `.ckpt`), read with SDXL's
    configs (and the released `eos_token_id`) unless given. A file without one (e.g. a UNet-only file)
    takes it from `base`, whose tokenizer folders and `force_zeros_for_empty_prompt` are kept too;
    without a base that is an error."""
    path = os.fspath(path)
    text_config = text_config or (base.text_config if base else CLIPTextConfig.sd15())
    text_config_2 = text_config_2 or (base.text_config_2 if base else CLIPTextConfig.sdxl_g())
    what = f"{path} (SDXL single file)"
    params = convert_sgm_text_encoders(load_state_dict(path), text_config, text_config_2, what=what)
    prefixes = {"text_encoder": SGM_CLIP_L_PREFIX, "text_encoder_2": SGM_CLIP_G_PREFIX}
    for name in TEXT_ENCODERS:
        if name not in params:
            if base is None:
                raise CheckpointError(f"{what}: has no {name} weights ({prefixes[name]}*) and no base SDXL "
                                      "model was given for them")
            params[name] = base.params[name]
    return SDXLText(
        text_config, text_config_2, params, base.eos_token_id_2 if base else SDXL_EOS_TOKEN_ID,
        base.tokenizer_path if base else None, base.tokenizer_2_path if base else None,
        base.force_zeros_for_empty_prompt if base else True,
    )


def load_sdxl_text(path: str | os.PathLike, *, base: SDXLText | None = None) -> SDXLText:
    """SDXL's text encoders from a diffusers folder or a single file (see the loaders above)."""
    path = os.fspath(path)
    if fs.isdir(path):
        return load_diffusers_text_encoders(path)
    return load_single_file_text_encoders(path, base=base)


# ----------------------------------------------------------------------------- the whole model

SDXL_PARTS = ("unet", "vae") + TEXT_ENCODERS
def load_base(path: str | os.PathLike, *, base: Any = None, **configs: Any) -> Any:
    """The base model at `path`, `checkpoints.sd15.SD15` or `SDXL` by `base_family` (`base`, `configs`: as
    `load_sd15` / `load_sdxl` take them: parts a single file lacks, its configs)."""
    if base_family(path) == "sdxl":
        return load_sdxl(path, base=base, **configs)
    from animatediff_jax.checkpoints.sd15 import load_sd15

    return load_sd15(path, base=base, **configs)


@dataclasses.dataclass(frozen=True)
class SDXL:
    """A whole SDXL base: the UNet's and VAE's configs, the text side as in `SDXLText`, and
    `params[name]` for "unet", "vae", "text_encoder", "text_encoder_2"."""

    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    text_config_2: CLIPTextConfig
    params: dict[str, Params]
    eos_token_id_2: int = SDXL_EOS_TOKEN_ID
    tokenizer_path: str | None = None
    tokenizer_2_path: str | None = None
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def from_parts(cls, unet_config: UNetConfig, vae_config: VAEConfig, text: SDXLText,
                   params: Mapping[str, Params]) -> "SDXL":
        """`params` holds "unet" and "vae"; the text encoders' come from `text`."""
        return cls(unet_config, vae_config, text.text_config, text.text_config_2,
                   {"unet": params["unet"], "vae": params["vae"], **{n: text.params[n] for n in TEXT_ENCODERS}},
                   text.eos_token_id_2, text.tokenizer_path, text.tokenizer_2_path, text.force_zeros_for_empty_prompt)

    @property
    def text(self) -> SDXLText:
        """The text side (same params, not copies), for `text.encode_prompts_sdxl`."""
        return SDXLText(self.text_config, self.text_config_2, {n: self.params[n] for n in TEXT_ENCODERS},
                        self.eos_token_id_2, self.tokenizer_path, self.tokenizer_2_path,
                        self.force_zeros_for_empty_prompt)


def load_diffusers_sdxl(folder: str | os.PathLike) -> SDXL:
    """A diffusers SDXL folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`,
    `tokenizer_2/`, `model_index.json`), as published or saved: each component in safetensors or `.bin`,
    full precision or only the `fp16` variant (float32 params). An SD1.5 folder is one clear error."""
    folder = os.fspath(folder)
    if not fs.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    unet_json = os.path.join(folder, "unet", "config.json")
    unet_cfg = _read_config(unet_json, UNetConfig.from_diffusers)
    if unet_cfg.family != "sdxl":
        raise CheckpointError(f"{folder} is an SD1.5 folder ({unet_json}: no addition_embed_type 'text_time'): "
                              "load it with an SD1.5 config (checkpoints.sd15.load_sd15), not SDXL's")
    vae_cfg = _read_config(os.path.join(folder, "vae", "config.json"), VAEConfig.from_diffusers)
    files = {name: find_weights_file(os.path.join(folder, name)) for name in ("unet", "vae")}
    text = load_diffusers_text_encoders(folder)
    params = {
        "unet": convert_unet_state_dict(load_state_dict(files["unet"]), unet_cfg,
                                        what=f"{files['unet']} (diffusers UNet)", names=FileNames()),
        "vae": convert_vae(load_state_dict(files["vae"]), vae_cfg, what=f"{files['vae']} (diffusers VAE)",
                           names=FileNames()),
    }
    return SDXL.from_parts(unet_cfg, vae_cfg, text, params)


def load_single_file_sdxl(
    path: str | os.PathLike,
    *,
    base: SDXL | None = None,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: CLIPTextConfig | None = None,
    text_config_2: CLIPTextConfig | None = None,
) -> SDXL:
    """A single-file SDXL checkpoint (`sd_xl_base_1.0.safetensors` layout, `.safetensors` / `.ckpt`),
    read with SDXL base's configs unless given (or `base`'s). Components the file lacks (a UNet-only
    file, say) come from `base`, with its tokenizers; without one that is an error. An SD1.5 file is
    one clear error."""
    path = os.fspath(path)
    sd = load_state_dict(path)
    what = f"{path} (SDXL single file)"
    if not is_ldm_checkpoint(sd):
        raise CheckpointError(f"{path}: not a single-file SDXL checkpoint (no '{LDM_UNET_PREFIX}*' keys; "
                              f"found e.g. {sorted(sd)[:3]})")
    if not is_sdxl_checkpoint(sd):
        sd15_key = next((k for k in sorted(sd) if k.startswith("cond_stage_model.")), None)
        found = f"{sd15_key} ..., " if sd15_key else ""
        raise CheckpointError(f"{path} is an SD1.5 checkpoint ({found}no {LDM_UNET_PREFIX}label_emb.* or "
                              "conditioner.embedders.* keys): load it with an SD1.5 config "
                              "(checkpoints.sd15.load_sd15), not SDXL's")
    unet_cfg = unet_config or (base.unet_config if base else sdxl_unet())
    vae_cfg = vae_config or (base.vae_config if base else VAEConfig.sdxl())
    text_config = text_config or (base.text_config if base else CLIPTextConfig.sd15())
    text_config_2 = text_config_2 or (base.text_config_2 if base else CLIPTextConfig.sdxl_g())
    parts, origins = _ldm_to_diffusers_traced(sd, unet_cfg, vae_cfg, what, parts=("unet", "vae"))
    params: dict[str, Params] = {}
    if "unet" in parts:
        params["unet"] = convert_unet_state_dict(parts["unet"], unet_cfg, what=f"{what}: UNet", names=origins["unet"])
    if "vae" in parts:
        params["vae"] = convert_vae(parts["vae"], vae_cfg, what=f"{what}: VAE", names=origins["vae"])
    params.update(convert_sgm_text_encoders(sd, text_config, text_config_2, what=what))
    for name in SDXL_PARTS:
        if name not in params:
            if base is None:
                raise CheckpointError(f"{what}: has no {name} weights and no base SDXL model was given for them")
            params[name] = base.params[name]
    text = SDXLText(
        text_config, text_config_2, {n: params[n] for n in TEXT_ENCODERS},
        base.eos_token_id_2 if base else SDXL_EOS_TOKEN_ID, base.tokenizer_path if base else None,
        base.tokenizer_2_path if base else None, base.force_zeros_for_empty_prompt if base else True,
    )
    return SDXL.from_parts(unet_cfg, vae_cfg, text, params)


_CONVERTED_CONFIGS = {"unet_config": UNetConfig, "vae_config": VAEConfig, "text_config": CLIPTextConfig,
                      "text_config_2": CLIPTextConfig}


def save_converted_sdxl(folder: str | os.PathLike, model: SDXL) -> None:
    """Writes an `SDXL` as `folder/params.safetensors` (+ `tokenizer/`, `tokenizer_2/` when known), read
    back without torch by `load_sdxl`."""
    folder = os.fspath(folder)
    fs.makedirs(folder, exist_ok=True)
    meta = {k: getattr(model, k) for k in _CONVERTED_CONFIGS}
    meta["sdxl_text"] = {"eos_token_id_2": model.eos_token_id_2,
                         "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt}
    save_params(os.path.join(folder, PARAMS_FILE), model.params, meta)
    for src, name in ((model.tokenizer_path, "tokenizer"), (model.tokenizer_2_path, "tokenizer_2")):
        if src:
            fs.copytree(src, os.path.join(folder, name))


def load_converted_sdxl(folder: str | os.PathLike) -> SDXL:
    """Reads a folder written by `save_converted_sdxl`, its params checked against the configs it names."""
    folder = os.fspath(folder)
    path = os.path.join(folder, PARAMS_FILE)
    params, meta = load_params(path)
    if "text_config_2" not in meta and "unet_config" in meta:
        raise CheckpointError(f"{path} is a converted SD1.5 model (no text_config_2): load it with an SD1.5 "
                              "config (checkpoints.sd15.load_sd15), not SDXL's")
    missing = [k for k in (*_CONVERTED_CONFIGS, "sdxl_text") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing}: not a converted SDXL model")
    configs = {k: config_from_dict(cls, meta[k]) for k, cls in _CONVERTED_CONFIGS.items()}
    shapes = {"unet": unet_shapes(configs["unet_config"]), "vae": vae_shapes(configs["vae_config"]),
              "text_encoder": sdxl_text_shapes(configs["text_config"]),
              "text_encoder_2": sdxl_text_shapes(configs["text_config_2"])}
    for name, want in shapes.items():
        check_tree(f"{path} ({name})", flatten_dict(params.get(name, {})), flatten_dict(want))
    toks = [os.path.join(folder, t) for t in ("tokenizer", "tokenizer_2")]
    return SDXL(**configs, params=params, eos_token_id_2=int(meta["sdxl_text"]["eos_token_id_2"]),
                tokenizer_path=toks[0] if fs.isdir(toks[0]) else None,
                tokenizer_2_path=toks[1] if fs.isdir(toks[1]) else None,
                force_zeros_for_empty_prompt=bool(meta["sdxl_text"]["force_zeros_for_empty_prompt"]))


def sdxl_folder_configs(folder: str | os.PathLike) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPTextConfig] | None:
    """The configs of the SDXL base in `folder` (converted: its params file's header; diffusers: the
    `config.json`s), read without a weight; None when `folder` holds no SDXL base (an SD1.5 folder, a
    file, nothing). What training tells an SDXL base from an SD1.5 one by, and builds abstract models from."""
    from animatediff_jax.checkpoints.torch_io import safetensors_metadata

    folder = os.fspath(folder)
    converted = os.path.join(folder, PARAMS_FILE)
    if fs.isfile(converted):
        meta = safetensors_metadata(converted)
        if not all(k in meta for k in _CONVERTED_CONFIGS):
            return None
        return tuple(config_from_dict(cls, json.loads(meta[k])) for k, cls in _CONVERTED_CONFIGS.items())
    if not (fs.isdir(folder) and fs.isfile(os.path.join(folder, "unet", "config.json"))):
        return None
    unet_cfg = _read_config(os.path.join(folder, "unet", "config.json"), UNetConfig.from_diffusers)
    if unet_cfg.family != "sdxl":
        return None
    vae_cfg = _read_config(os.path.join(folder, "vae", "config.json"), VAEConfig.from_diffusers)
    return (unet_cfg, vae_cfg, _text_config(folder, "text_encoder")[0], _text_config(folder, "text_encoder_2")[0])


def load_sdxl(path: str | os.PathLike, *, base: SDXL | None = None, **configs: Any) -> SDXL:
    """A whole SDXL base from a converted folder (`save_converted_sdxl`), a diffusers folder or a single
    file (`configs`: the single file's `unet_config`, `vae_config`, `text_config`, `text_config_2`)."""
    path = os.fspath(path)
    if fs.isfile(os.path.join(path, PARAMS_FILE)):
        return load_converted_sdxl(path)
    if fs.isdir(path):
        return load_diffusers_sdxl(path)
    return load_single_file_sdxl(path, base=base, **configs)
