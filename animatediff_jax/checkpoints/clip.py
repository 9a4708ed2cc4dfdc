"""CLIP models with projections and SD1.5's safety checker: transformers / diffusers folders -> params.

`load_clip` reads a transformers `CLIPModel`, `CLIPVisionModelWithProjection` or
`CLIPTextModelWithProjection` folder (`config.json` + `model.safetensors` / `pytorch_model.bin`,
optional `preprocessor_config.json` and tokenizer files). `load_safety_checker` reads an SD1.5
`safety_checker/` folder (a `CLIPConfig` with a vision tower) and the pipeline's `feature_extractor/`.

Our modules are named after transformers 5's, so the mapping is `torch_to_flax` plus the key
normalisations released files need: persistent `embeddings.position_ids` buffers (transformers < 5)
are dropped once checked to be `arange`, and the released safety checker's
`vision_model.vision_model.*` (a `CLIPVisionModel` that wrapped a `CLIPVisionTransformer`) is read
as transformers 5's `vision_model.*`. Anything else that does not fit is a `CheckpointError` naming
the file's keys; a folder of another kind is a one-line error saying what it is.

From frames and prompts to CLIP embeddings (what the metrics use):

    clip = load_clip(folder, require=("vision", "text"))
    img = clip_vision.image_embeddings(clip.vision_model(), clip.params["vision"], frames_uint8, clip.processor)
    txt = clip_text.text_embeddings(clip.text_model(), clip.params["text"], text.Tokenizer(clip.tokenizer_path)(prompts))
    cos = img @ txt.T  # both L2-normalised

"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    Params,
    StateDict,
    find_weights_file,
    load_state_dict,
    torch_to_flax,
)
from animatediff_jax.io import fs
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextWithProjection
from animatediff_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionWithProjection
from animatediff_jax.models.image_preprocess import ImageProcessing
from animatediff_jax.models.safety import SafetyChecker
from animatediff_jax.models.shapes import clip_text_projection_shapes, clip_vision_shapes, safety_checker_shapes

CLIP_MODEL = "CLIPModel"
CLIP_VISION = "CLIPVisionModelWithProjection"
CLIP_TEXT = "CLIPTextModelWithProjection"
SAFETY_CHECKER = "StableDiffusionSafetyChecker"

# transformers' CLIPTextConfig defaults (fields a CLIPModel's text_config may leave out).
_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=512,
    eos_token_id=49407,
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclasses.dataclass(frozen=True, eq=False)
class CLIP:
    """A CLIP model read by `load_clip`. `params["vision"]` (`vision_model`, `visual_projection`) is
    for `vision_model()`, `params["text"]` (`text_model`, `text_projection`) for `text_model()`; a
    tower the folder does not hold has config None and no params entry.

    `processor`: the folder's `preprocessor_config.json` (CLIP's defaults at the model's resolution
    when absent). `logit_scale`: a `CLIPModel`'s learned log temperature (`logits = exp(logit_scale)
    * cos`). `tokenizer_path`: the folder when it holds tokenizer files (for `text.Tokenizer`).
    """

    kind: str
    vision_config: CLIPVisionConfig | None
    text_config: CLIPTextConfig | None
    params: dict[str, Params]
    processor: ImageProcessing | None = None
    text_projection_dim: int | None = None
    eos_token_id: int | None = None
    logit_scale: float | None = None
    tokenizer_path: str | None = None
    path: str | None = None

    def vision_model(self, **kwargs: Any) -> CLIPVisionWithProjection:
        """The module for `params["vision"]` (`kwargs`: dtype, param_dtype, attention)."""
        if self.vision_config is None:
            raise ValueError(f"{self.path}: a {self.kind} folder has no vision tower")
        return CLIPVisionWithProjection(self.vision_config, **kwargs)

    def text_model(self, **kwargs: Any) -> CLIPTextWithProjection:
        """The module for `params["text"]` (`kwargs`: dtype, param_dtype, attention)."""
        if self.text_config is None:
            raise ValueError(f"{self.path}: a {self.kind} folder has no text tower")
        return CLIPTextWithProjection(self.text_config, self.text_projection_dim, self.eos_token_id, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class SafetyCheckerWeights:
    """`load_safety_checker`'s result: `models.safety.check_images(params, images, config=config,
    processing=processor)`."""

    config: CLIPVisionConfig
    params: Params
    processor: ImageProcessing
    path: str | None = None

    def model(self, **kwargs: Any) -> SafetyChecker:
        return SafetyChecker(self.config, **kwargs)


# ----------------------------------------------------------------------------- folders and kinds


def _read_json(path: str) -> dict:
    try:
        with fs.open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _folder_config(folder: str, wanted: str) -> dict:
    """`folder/config.json`, or a one-line error saying what the folder is instead of `wanted`."""
    if not fs.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder (expected {wanted})")
    path = os.path.join(folder, "config.json")
    if not fs.isfile(path):
        if fs.isfile(os.path.join(folder, "model_index.json")):
            raise CheckpointError(f"{folder}: a diffusers pipeline folder (model_index.json), not {wanted}")
        raise CheckpointError(f"{folder}: no config.json, so not {wanted}")
    return _read_json(path)


def folder_kind(cfg: Mapping[str, Any]) -> str:
    """What a component's `config.json` describes: one of the CLIP kinds above, or what it is instead
    (a transformers architecture, a diffusers class name, a model type)."""
    if "_class_name" in cfg:  # a diffusers component (UNet, VAE, scheduler, ...)
        return f"diffusers {cfg['_class_name']}"
    arch = list(cfg.get("architectures") or [])
    if arch:
        return str(arch[0])
    return {"clip": CLIP_MODEL, "clip_vision_model": CLIP_VISION, "clip_text_model": CLIP_TEXT}.get(
        cfg.get("model_type"), str(cfg.get("model_type") or "unknown model")
    )


_DESCRIBE = {
    CLIP_VISION: "a CLIPVisionModelWithProjection folder (vision tower only)",
    CLIP_TEXT: "a CLIPTextModelWithProjection folder (text tower only)",
    "CLIPTextModel": "a CLIPTextModel folder (a text tower without projection, e.g. SD1.5's text_encoder/)",
    "CLIPVisionModel": "a CLIPVisionModel folder (a vision tower without projection)",
    SAFETY_CHECKER: "an SD safety checker folder (StableDiffusionSafetyChecker; read it with load_safety_checker)",
}


def _describe(kind: str) -> str:
    return _DESCRIBE.get(kind, f"a {kind} folder")


def _tokenizer_path(folder: str) -> str | None:
    for d in (folder, os.path.join(folder, "tokenizer")):
        if any(fs.isfile(os.path.join(d, n)) for n in _TOKENIZER_FILES):
            return d
    return None


# ----------------------------------------------------------------------------- configs


def _text_config(cfg: Mapping[str, Any], *, top: Mapping[str, Any] | None, where: str):
    """(CLIPTextConfig, projection_dim, eos_token_id) of a CLIPTextConfig dict, or of a CLIPConfig's
    `text_config` (+ legacy `text_config_dict`) with the CLIPConfig's `projection_dim` (`top`)."""
    t = {**_TEXT_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if top is not None:
        t["projection_dim"] = top.get("projection_dim", 512)
    try:
        config = CLIPTextConfig.from_transformers(t)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: unsupported text config ({e})") from None
    return config, int(t["projection_dim"]), int(t["eos_token_id"])


def _vision_config(cfg: Mapping[str, Any], where: str) -> CLIPVisionConfig:
    try:
        return CLIPVisionConfig.from_transformers(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: unsupported vision config ({e})") from None


def _processor(folder: str, vision: CLIPVisionConfig) -> ImageProcessing:
    path = os.path.join(folder, "preprocessor_config.json")
    if not fs.isfile(path):
        return ImageProcessing.for_image_size(vision.image_size)
    try:
        return ImageProcessing.from_preprocessor_config(_read_json(path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unsupported image processor settings ({e})") from None


# ----------------------------------------------------------------------------- state dicts


def _drop_position_ids(sd: Mapping[str, np.ndarray], positions: Mapping[str, int], what: str) -> StateDict:
    """Drops `<prefix>embeddings.position_ids` buffers, each checked to be `arange(positions[prefix])`."""
    out = {}
    for k, v in sd.items():
        if not k.endswith("embeddings.position_ids"):
            out[k] = v
            continue
        prefix = k[: -len("embeddings.position_ids")]
        n = positions.get(prefix)
        if n is None:
            out[k] = v  # not a buffer of a tower we read: reported as unexpected
        elif not np.array_equal(np.reshape(v, -1), np.arange(n)):
            raise CheckpointError(f"{what}: {k} {tuple(np.shape(v))} is not arange({n}), the positions the model uses")
    return out


def convert_clip(
    sd: Mapping[str, np.ndarray],
    *,
    vision: CLIPVisionConfig | None = None,
    text: CLIPTextConfig | None = None,
    text_projection_dim: int | None = None,
    what: str = "CLIP checkpoint",
) -> tuple[dict[str, Params], float | None]:
    """A transformers `CLIPModel` / `CLIPVisionModelWithProjection` / `CLIPTextModelWithProjection`
    state dict -> (`{"vision": ..., "text": ...}` for the towers given, `logit_scale` or None).
    Every key must be used and every parameter filled (`CheckpointError` naming the others)."""
    positions = {}
    if vision is not None:
        positions["vision_model."] = vision.num_positions
    if text is not None:
        positions["text_model."] = text.max_positions
    sd = _drop_position_ids(sd, positions, what)
    logit_scale = None
    if vision is not None and text is not None and "logit_scale" in sd:
        logit_scale = float(np.reshape(sd.pop("logit_scale"), -1)[0])
    target: Params = {}
    if vision is not None:
        target.update(clip_vision_shapes(vision))
    if text is not None:
        if text_projection_dim is None:
            raise ValueError("text_projection_dim is needed with a text tower")
        target.update(clip_text_projection_shapes(text, text_projection_dim))
    flat = torch_to_flax(sd, target, what=what)
    params = {}
    if vision is not None:
        params["vision"] = {k: flat[k] for k in ("vision_model", "visual_projection")}
    if text is not None:
        params["text"] = {k: flat[k] for k in ("text_model", "text_projection")}
    return params, logit_scale


def load_clip(path: str | os.PathLike, *, require: str | Iterable[str] = ()) -> CLIP:
    """A transformers CLIP folder with projections -> `CLIP` (float32 params).

    `require`: "vision" and/or "text", the towers the caller needs; a folder without one is a
    one-line `CheckpointError` naming the folder and what it holds.
    """
    folder = os.fspath(path)
    require = {require} if isinstance(require, str) else set(require)
    unknown = require - {"vision", "text"}
    if unknown:
        raise ValueError(f"require: unknown towers {sorted(unknown)} (use 'vision' and/or 'text')")
    wanted = "a CLIP model folder (CLIPModel, CLIPVisionModelWithProjection or CLIPTextModelWithProjection)"
    cfg = _folder_config(folder, wanted)
    kind = folder_kind(cfg)
    if kind not in (CLIP_MODEL, CLIP_VISION, CLIP_TEXT):
        raise CheckpointError(f"{folder}: {_describe(kind)}, not {wanted}")
    has = {"vision"} if kind == CLIP_VISION else {"text"} if kind == CLIP_TEXT else {"vision", "text"}
    if require - has:
        need = " and ".join(sorted(require - has))
        raise CheckpointError(f"{folder}: {_describe(kind)}, but a {need} tower is needed")

    where = os.path.join(folder, "config.json")
    vision = text = None
    proj_dim = eos = None
    if kind == CLIP_MODEL:
        vision = _vision_config(cfg, where)
        text_dict = {**(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
        text, proj_dim, eos = _text_config(text_dict, top=cfg, where=where)
    elif kind == CLIP_VISION:
        vision = _vision_config(cfg, where)
    else:
        text, proj_dim, eos = _text_config(cfg, top=None, where=where)

    file = find_weights_file(folder)
    params, logit_scale = convert_clip(
        load_state_dict(file), vision=vision, text=text, text_projection_dim=proj_dim,
        what=f"{file} (transformers {kind})",
    )
    return CLIP(
        kind=kind,
        vision_config=vision,
        text_config=text,
        params=params,
        processor=_processor(folder, vision) if vision is not None else None,
        text_projection_dim=proj_dim,
        eos_token_id=eos,
        logit_scale=logit_scale,
        tokenizer_path=_tokenizer_path(folder) if text is not None else None,
        path=folder,
    )


_RELEASED_SAFETY_PREFIX = "vision_model.vision_model."


def convert_safety_checker(sd: Mapping[str, np.ndarray], config: CLIPVisionConfig, *, what: str) -> Params:
    """A `StableDiffusionSafetyChecker` state dict (released `vision_model.vision_model.*` naming,
    or transformers 5's `vision_model.*`) -> `SafetyChecker(config)` params. Errors name the file's keys."""
    target = safety_checker_shapes(config)
    released = any(k.startswith(_RELEASED_SAFETY_PREFIX) for k in sd)
    prefix = _RELEASED_SAFETY_PREFIX if released else "vision_model."
    sd = _drop_position_ids(sd, {prefix: config.num_positions}, what)
    if released:  # match the file's nesting, so every key reported is the file's own
        target = {**target, "vision_model": {"vision_model": target["vision_model"]}}
    params = torch_to_flax(sd, target, what=what)
    if released:
        params["vision_model"] = params["vision_model"]["vision_model"]
    return params


def load_safety_checker(path: str | os.PathLike) -> SafetyCheckerWeights:
    """SD1.5's safety checker: its `safety_checker/` folder (or the pipeline folder holding it) ->
    `SafetyCheckerWeights`. The image processing is the pipeline's `feature_extractor/` (the sibling
    folder) when present, else CLIP's default at the tower's resolution (which is SD1.5's)."""
    folder = os.fspath(path)
    if fs.isfile(os.path.join(folder, "model_index.json")) and fs.isdir(os.path.join(folder, "safety_checker")):
        folder = os.path.join(folder, "safety_checker")
    wanted = "an SD safety checker folder (StableDiffusionSafetyChecker)"
    cfg = _folder_config(folder, wanted)
    kind = folder_kind(cfg)
    if kind != SAFETY_CHECKER and not (kind == CLIP_MODEL and not cfg.get("architectures")):
        raise CheckpointError(f"{folder}: {_describe(kind)}, not {wanted}")
    config = _vision_config(cfg, os.path.join(folder, "config.json"))
    file = find_weights_file(folder)
    params = convert_safety_checker(load_state_dict(file), config, what=f"{file} (diffusers {SAFETY_CHECKER})")
    fe = os.path.join(os.path.dirname(fs.abspath(folder)), "feature_extractor")
    processor = _processor(fe, config) if fs.isdir(fe) else ImageProcessing.for_image_size(config.image_size)
    return SafetyCheckerWeights(config=config, params=params, processor=processor, path=folder)
