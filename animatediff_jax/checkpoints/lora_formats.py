"""LoRA files <-> LoRA trees (`animatediff_jax.lora`): original AnimateDiff, diffusers/PEFT, kohya.

Three namings of the same thing, each read and written here (the writers are exact inverses):

- original AnimateDiff (MotionLoRA `v2_lora_*.ckpt`, v3 domain adapter `v3_sd15_adapter.ckpt`):
  `<module>.processor.to_q_lora.down.weight` / `.up.weight` (`to_out_lora` for `to_out.0`),
  motion modules in the original naming (`temporal_transformer`, `attention_blocks.{0,1}`).
  No alpha: the original merges `W += scale * up @ down`.
- diffusers / PEFT (`AnimateDiffPipeline.load_lora_weights`): `unet.<module>.lora_A.weight`
  (down) / `.lora_B.weight` (up), `text_encoder.<module>...`; also the older
  `unet.<module>.processor.to_q_lora.down.weight` and `.lora.down.weight` spellings of the hub's
  motion LoRAs. Alpha from `<module>.alpha` keys or the `lora_adapter_metadata` header
  (`lora_alpha`, `alpha_pattern`), else alpha = rank: `W += scale * alpha / r * B @ A`.
- kohya (`.safetensors` personalised LoRAs): `lora_unet_<module_with_underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_text_model_encoder_layers_0_self_attn_q_proj...` for the
  text encoder (`lora_te1_` / `lora_te2_`: SDXL's two). Underscore-joined names are resolved against the
  target params tree, in diffusers' module names (SD1.5's kohya files) or in the SGM UNet's
  (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1_...`, `output_blocks_...`,
  resnets' `in_layers_2` / `out_layers_3` / `emb_layers_1` / `skip_connection`: SDXL's kohya files).
  Conv LoRAs: 1x1 (`proj_in`/`proj_out`, Dense kernels here) and kxk (LoCon on resnets).

Every key of a file must be understood and land on a kernel of the target tree: anything
else raises `CheckpointError` naming the file, the format and the keys.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np
from flax.traverse_util import unflatten_dict

from animatediff_jax.checkpoints.motion import diffusers_to_original_key, original_to_diffusers_key
from animatediff_jax.checkpoints.torch_io import (
    CheckpointError,
    Misfit,
    ModelSizeError,
    StateDict,
    _few,
    fit_error,
    flax_to_torch_name,
    load_state_dict,
    save_state_dict,
    size_difference,
    torch_module_path,
    torch_shape,
)
from animatediff_jax.lora import LoraTree, kernel_paths, lora_layers, lora_rank
from animatediff_jax.models.shapes import is_motion_path

Path = tuple[str, ...]
ANIMATEDIFF, DIFFUSERS, KOHYA = "original AnimateDiff", "diffusers", "kohya"
_ATTN_OUT = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry for LoraConfig kwargs


def sd15_conv1x1(path: Path) -> bool:
    """Layers that SD1.5 (`use_linear_projection=False`) holds as 1x1 convs and we as Dense kernels."""
    return (
        path[-1] in ("proj_in", "proj_out")
        and not is_motion_path(path)
        and any(p.startswith("attentions_") for p in path)
    )


# ------------------------------------------------------------------ layouts


def _from_torch(down: np.ndarray, up: np.ndarray, target: tuple[int, ...]) -> dict[str, np.ndarray] | str | Misfit:
    """torch factors (`down` (r, in[, kh, kw]), `up` (out, r[, 1, 1])) -> ours, or why they do not fit
    (a `Misfit`, unnamed: the update they make and the model's weight, in PyTorch's layout)."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    factors = f"down {down.shape} / up {up.shape}"
    if up.ndim == 4:
        if up.shape[2:] != (1, 1):
            return f"up factor {up.shape} is not (out, r, 1, 1)"
        up = up[:, :, 0, 0]
    if up.ndim != 2 or down.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
        return f"factors {factors} are not a rank-r pair"
    misfit = Misfit("", (up.shape[0], down.shape[1]) + down.shape[2:], torch_shape("kernel", target, down.ndim),
                    f"{factors} make")
    if len(target) == 2:
        if down.ndim == 4:
            if down.shape[2:] != (1, 1):
                return misfit
            down = down[:, :, 0, 0]
        ours = {"down": down.T, "up": up.T}
    elif len(target) == 4 and down.ndim == 4:
        ours = {"down": down.transpose(2, 3, 1, 0), "up": up.T}
    else:
        return misfit
    shape = ours["down"].shape[:-1] + ours["up"].shape[-1:]
    if shape != tuple(target):
        return misfit
    return ours


def _to_torch(layer: Mapping[str, Any], conv1x1: bool, dtype) -> tuple[np.ndarray, np.ndarray]:
    down, up = np.asarray(layer["down"]), np.asarray(layer["up"])
    if down.ndim == 4:  # (kh, kw, in, r) -> (r, in, kh, kw)
        d, u = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
    else:
        d, u = down.T, up.T
        if conv1x1:
            d, u = d[:, :, None, None], u[:, :, None, None]
    return np.ascontiguousarray(d).astype(dtype), np.ascontiguousarray(u).astype(dtype)


def _with_alpha(layer: dict[str, np.ndarray], alpha: float | None) -> dict[str, np.ndarray]:
    """Adds `alpha` unless it equals the rank (the default: scale 1), so trees stay canonical."""
    if alpha is not None and float(alpha) != float(lora_rank(layer)):
        layer["alpha"] = np.asarray(alpha, np.float32)
    return layer


def _kernels(target: Mapping[str, Any] | None) -> dict[Path, tuple[int, ...]]:
    return {p: tuple(k.shape) for p, k in kernel_paths(target)} if target else {}


# ------------------------------------------------------------------ reading


def _file_metadata(path: str) -> dict:
    if not path.lower().endswith(".safetensors"):
        return {}
    from animatediff_jax.checkpoints.torch_io import safetensors_metadata

    return safetensors_metadata(path)


class _Builder:
    """Collects down/up/alpha per (component, module path), then checks and assembles the trees."""

    def __init__(self, path: str, fmt: str, targets: dict[str, Mapping[str, Any] | None]):
        self.path, self.fmt = path, fmt
        self.kernels = {name: _kernels(t) for name, t in targets.items()}
        self.no_model = {name for name, t in targets.items() if not t}  # components without a target model
        self.parts: dict[tuple[str, Path], dict[str, Any]] = collections.defaultdict(dict)
        self.keys: dict[tuple[str, Path], list[str]] = collections.defaultdict(list)
        self.unknown: list[str] = []
        self.unmatched: list[str] = []
        self.without_model: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, key: str, component: str, path: Path | None, part: str, value) -> None:
        if component in self.no_model:
            self.without_model[component].append(key)
            return
        if path is None or path not in self.kernels.get(component, {}):
            self.unmatched.append(key)
            return
        self.parts[(component, path)][part] = value
        self.keys[(component, path)].append(key)

    def build(self, alphas: Callable[[str, Path], float | None] | None = None) -> "LoraFile":
        """The trees; a file that does not fit is one error naming its keys and shapes as it holds them."""
        what = f"{self.path} ({self.fmt} LoRA)"
        problems = [
            ("keys of no LoRA layout this reader knows", _few(self.unknown)),
            ("keys naming no layer of the target model", _few(self.unmatched)),
        ]
        for component, keys in sorted(self.without_model.items()):
            name = component.replace("_", "-")
            problems.append((f"{name} layers, but no {name} model was given to load them into", _few(keys)))
        trees: dict[str, dict[Path, dict]] = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
        bad, misfits = [], []
        for (component, path), parts in self.parts.items():
            keys = ", ".join(self.keys[(component, path)])
            if "down" not in parts or "up" not in parts:
                bad.append(f"{keys} (no {'up' if 'down' in parts else 'down'} factor)")
                continue
            layer = _from_torch(parts["down"], parts["up"], self.kernels[component][path])
            if isinstance(layer, Misfit):
                misfits.append(dataclasses.replace(layer, name=keys))
                bad.append(str(misfits[-1]))
                continue
            if isinstance(layer, str):
                bad.append(f"{keys}: {layer}")
                continue
            alpha = parts.get("alpha")
            if alpha is not None and np.size(alpha) != 1:
                bad.append(f"{keys}: alpha of shape {np.shape(alpha)}")
                continue
            if alpha is None and alphas is not None:
                alpha = alphas(component, path)
            trees[component][path] = _with_alpha(layer, None if alpha is None else float(np.asarray(alpha).reshape(())))
        size = size_difference(misfits, len(self.parts))
        if size is not None:
            raise ModelSizeError(f"{what} does not fit the model: shape mismatches in {len(misfits)} of "
                                 f"{len(self.parts)} layers: this file is for another model size (e.g. {size})")
        problems.append(("layers that do not fit", _few(bad, 4, "; ")))
        if any(text for _, text in problems):
            raise fit_error(what, problems)
        if not any(trees.values()):
            raise CheckpointError(f"{what}: no LoRA layers in the file")
        return LoraFile(*(unflatten_dict(trees[c]) for c in ("unet", "text_encoder", "text_encoder_2")), self.fmt)


def _detect_format(sd: Mapping[str, Any], path: str) -> str:
    keys = list(sd)
    if not keys:
        raise CheckpointError(f"{path}: no tensors (not a LoRA file)")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return KOHYA  # (any other key of such a file is reported as unknown)
    if not any("lora" in k for k in keys):
        raise CheckpointError(
            f"{path}: not a LoRA file (no `lora` keys; found {len(keys)} keys, e.g. {', '.join(sorted(keys)[:4])})"
        )
    if any(k.startswith(("unet.", "text_encoder.")) or ".lora_A." in k for k in keys):
        return DIFFUSERS
    return ANIMATEDIFF


_SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
               "conv_shortcut": "skip_connection"}
_SGM_TOP = {("conv_in",): "input_blocks_0_0", ("time_embedding", "linear_1"): "time_embed_0",
            ("time_embedding", "linear_2"): "time_embed_2", ("add_embedding", "linear_1"): "label_emb_0_0",
            ("add_embedding", "linear_2"): "label_emb_0_2", ("conv_out",): "out_2"}


def sgm_names(paths: Iterable[Path]) -> dict[Path, str]:
    """The SGM (original Stability `UNetModel`) module name, underscore-joined as kohya writes it, of each
    UNet module path (diffusers' names) that has one: `input_blocks_{1 + level x (layers + 1) + j}_{0 resnet,
    1 attention}`, the downsampler `..._0_op`, `middle_block_{0,1,2}`, `output_blocks_{level x (layers + 1) + j}`
    with the upsampler after the attention (`_2_conv`, or `_1_conv` in a level without attention). The block
    layout (levels, layers per block, which up levels attend) is read off the paths themselves."""
    paths = list(paths)
    layers = 1 + max((int(m.group(1)) for p in paths if p[0] == "down_blocks_0"
                      for m in [re.fullmatch(r"resnets_(\d+)", p[1])] if m), default=0)
    up_attends = {p[0] for p in paths if p[0].startswith("up_blocks_") and p[1].startswith("attentions_")}
    out = {}
    for p in paths:
        if p[:2] in _SGM_TOP or p[:1] in _SGM_TOP:
            key = p[:2] if p[:2] in _SGM_TOP else p[:1]
            out[p] = "_".join((_SGM_TOP[key],) + p[len(key):])
            continue
        block = re.fullmatch(r"(down|up)_blocks_(\d+)|mid_block", p[0])
        sub = re.fullmatch(r"(resnets|attentions|downsamplers|upsamplers)_(\d+)", p[1]) if block and len(p) > 1 else None
        if sub is None:
            continue  # (motion modules: no SGM name)
        kind, j = sub.group(1), int(sub.group(2))
        inner = tuple(_SGM_RESNET.get(n, n) for n in p[2:]) if kind == "resnets" else p[2:]
        if p[0] == "mid_block":
            head = {("resnets", 0): "middle_block_0", ("attentions", 0): "middle_block_1",
                    ("resnets", 1): "middle_block_2"}[(kind, j)]
        elif block.group(1) == "down":
            i = int(block.group(2))
            if kind == "downsamplers":
                head, inner = f"input_blocks_{1 + i * (layers + 1) + layers}_0", ("op",)
            else:
                head = f"input_blocks_{1 + i * (layers + 1) + j}_{0 if kind == 'resnets' else 1}"
        else:
            i = int(block.group(2))
            if kind == "upsamplers":
                head = f"output_blocks_{i * (layers + 1) + layers}_{2 if p[0] in up_attends else 1}"
            else:
                head = f"output_blocks_{i * (layers + 1) + j}_{0 if kind == 'resnets' else 1}"
        out[p] = "_".join((head,) + inner)
    return out


def _read_kohya(sd: Mapping[str, np.ndarray], b: _Builder) -> None:
    index: dict[str, dict[str, Path | None]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        kernels = b.kernels.get(component, {})
        names: dict[str, Path | None] = {}
        aliases = sgm_names(kernels) if component == "unet" else {}
        for p in kernels:
            for name in {"_".join(p), aliases.get(p, "_".join(p))}:
                names[name] = None if name in names else p  # None: two layers join to one name
        index[component] = names
    prefixes = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}
    parts = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
    for key, v in sd.items():
        name, _, suffix = key.partition(".")
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None or suffix not in parts:
            b.unknown.append(key)
            continue
        component = prefixes[prefix]
        rest = name[len(prefix) :]
        path = index[component].get(rest)
        if rest in index[component] and path is None:
            b.unknown.append(f"{key} (ambiguous: several layers join to this name)")
            continue
        if parts[suffix] == "alpha" and np.size(v) == 1 and float(np.asarray(v).reshape(())) == 0:
            continue  # kohya: alpha 0 (or none) means alpha = rank
        b.add(key, component, path, parts[suffix], v)


_OLD_ATTN = re.compile(
    r"^(?P<mod>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_LORA = re.compile(r"^(?P<mod>.+)\.lora(?:_linear_layer)?\.(?P<part>down|up)\.weight$")
_PEFT = re.compile(r"^(?P<mod>.+)\.lora_(?P<part>A|B)\.weight$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_TEXT_OLD = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj"}


def _module_path(module: str) -> Path:
    return torch_module_path(original_to_diffusers_key(module) + ".weight")[0]


def _read_named(sd: Mapping[str, np.ndarray], b: _Builder) -> None:
    """The original AnimateDiff and the diffusers spellings: module name + a LoRA suffix."""
    # transformers 5 names CLIP's modules without `text_model.` in memory, so newer files may lack it.
    text_root = any(p[0] == "text_model" for p in b.kernels.get("text_encoder", {}))
    for key, v in sd.items():
        component, k = "unet", key
        if key.startswith("unet."):
            k = key[len("unet.") :]
        elif key.startswith("text_encoder."):
            component, k = "text_encoder", key[len("text_encoder.") :]
        m = _OLD_ATTN.match(k)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            if component == "text_encoder":
                proj = _TEXT_OLD[proj]
            module, part = f"{m['mod']}.{proj}", m["part"]
        elif m := _LORA.match(k) or _PEFT.match(k):
            module, part = m["mod"], {"A": "down", "B": "up"}.get(m["part"], m["part"])
        elif m := _ALPHA.match(k):
            module, part = m["mod"], "alpha"
        else:
            b.unknown.append(key)
            continue
        if component == "text_encoder" and text_root and not module.startswith("text_model."):
            module = f"text_model.{module}"
        b.add(key, component, _module_path(module), part, v)


def _metadata_alphas(meta: Mapping[str, str], path: str) -> Callable[[str, Path], float | None] | None:
    """Per-layer alphas from diffusers' `lora_adapter_metadata` (PEFT `LoraConfig` kwargs per component)."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable {METADATA_KEY} header ({e})") from e

    flags = ("use_rslora", "use_dora", "lora_bias")
    unsupported = [f for f in flags if any(key.endswith(f".{f}") and value for key, value in cfg.items())]
    if unsupported:
        raise CheckpointError(
            f"{path}: {METADATA_KEY} asks for {', '.join(unsupported)}, which plain LoRA merging lacks"
        )

    def alpha(component: str, p: Path) -> float | None:
        module = flax_to_torch_name(p)
        names = {module, module.removeprefix("text_model.")}  # (transformers 5 in-memory CLIP names)
        for pattern, value in (cfg.get(f"{component}.alpha_pattern") or {}).items():
            pat = pattern.lstrip("^")
            if pat in names or (not pattern.startswith("^") and module.endswith("." + pat)):
                return float(value)
        value = cfg.get(f"{component}.lora_alpha")
        return None if value is None else float(value)

    return alpha


class LoraFile(NamedTuple):
    """What a LoRA file holds, per model (empty trees where it holds nothing), and its naming."""

    unet: LoraTree
    text_encoder: LoraTree
    text_encoder_2: LoraTree  # SDXL's second text encoder (kohya `lora_te2_`)
    naming: str


def read_lora_file(
    path: str | os.PathLike,
    unet_target: Mapping[str, Any] | None,
    text_target: Mapping[str, Any] | None = None,
    text2_target: Mapping[str, Any] | None = None,
) -> LoraFile:
    """The LoRA trees of a file of any of the three namings (detected from its keys). `unet_target` /
    `text_target` / `text2_target` (SDXL's second text encoder) are the models' params (arrays or
    `ShapeDtypeStruct`s): every layer of the file must name one of their kernels, with fitting
    shapes. Which kind of LoRA it is is `checkpoints.load.load_lora`'s check.
    """
    path = os.fspath(path)
    sd = load_state_dict(path)
    fmt = _detect_format(sd, path)
    b = _Builder(path, fmt, {"unet": unet_target, "text_encoder": text_target, "text_encoder_2": text2_target})
    if fmt == KOHYA:
        _read_kohya(sd, b)
        return b.build()
    _read_named(sd, b)
    return b.build(_metadata_alphas(_file_metadata(path), path) if fmt == DIFFUSERS else None)


# ------------------------------------------------------------------ writing


def save_lora_original(path: str | os.PathLike, lora: LoraTree, dtype: Any = np.float32) -> None:
    """Writes a MotionLoRA / domain adapter in the original AnimateDiff naming (`.ckpt` or `.safetensors`).

    The format has attention projections only and no alpha: a layer's `alpha / r` is folded
    into its `up` factor (exact in value, so trees without alpha round-trip bit for bit).
    """
    sd: StateDict = {}
    for p, layer in lora_layers(lora).items():
        if p[-1] not in _ATTN_OUT or np.ndim(layer["down"]) != 2:
            raise ValueError(f"{'/'.join(p)}: the original AnimateDiff LoRA format holds only attention to_q/k/v/out")
        base = diffusers_to_original_key(flax_to_torch_name(p[:-1]))
        if "alpha" in layer:
            layer = {"down": layer["down"], "up": np.asarray(layer["up"]) * (float(layer["alpha"]) / lora_rank(layer))}
        down, up = _to_torch(layer, False, dtype)
        stem = f"{base}.processor.{_ATTN_OUT[p[-1]]}_lora"
        sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up
    save_state_dict(path, sd)


def _peft_metadata(component: str, layers: Mapping[Path, Mapping[str, Any]]) -> dict[str, Any]:
    ranks = {flax_to_torch_name(p): lora_rank(layer) for p, layer in layers.items()}
    alphas = {flax_to_torch_name(p): float(layer.get("alpha", lora_rank(layer))) for p, layer in layers.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    a = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        f"{component}.r": r,
        f"{component}.lora_alpha": a,
        f"{component}.rank_pattern": {f"^{m}": v for m, v in ranks.items() if v != r},
        f"{component}.alpha_pattern": {f"^{m}": v for m, v in alphas.items() if v != a},
        f"{component}.target_modules": sorted(ranks),
    }


def save_lora_diffusers(
    path: str | os.PathLike,
    unet: LoraTree | None,
    text_encoder: LoraTree | None = None,
    dtype: Any = np.float32,
    conv1x1: Callable[[Path], bool] = sd15_conv1x1,
) -> None:
    """Writes PEFT-named `.safetensors` that `AnimateDiffPipeline.load_lora_weights` reads.

    Alphas (when any layer has one) go into the `lora_adapter_metadata` header as PEFT
    `LoraConfig` kwargs per component (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`).
    """
    sd: StateDict = {}
    metadata: dict[str, Any] = {}
    for component, tree in (("unet", unet), ("text_encoder", text_encoder)):
        layers = lora_layers(tree or {})
        for p, layer in layers.items():
            down, up = _to_torch(layer, conv1x1(p) if component == "unet" else False, dtype)
            stem = f"{component}.{flax_to_torch_name(p)}"
            sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = down, up
        if any("alpha" in layer for layer in layers.values()):
            metadata.update(_peft_metadata(component, layers))
    if not str(path).lower().endswith(".safetensors"):
        raise ValueError(f"{path}: diffusers LoRA files are .safetensors")
    save_state_dict(path, sd, {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None)


def save_lora_kohya(
    path: str | os.PathLike,
    unet: LoraTree | None,
    text_encoder: LoraTree | None = None,
    dtype: Any = np.float32,
    conv1x1: Callable[[Path], bool] = sd15_conv1x1,
) -> None:
    """Writes a kohya-named LoRA (`lora_unet_*` / `lora_te_*`, `lora_down`/`lora_up`/`alpha`).

    Every layer gets an `.alpha` (the rank when the tree has none, i.e. scale 1), stored in
    `dtype` like the factors, as kohya's trainer saves it.
    """
    sd: StateDict = {}
    for prefix, tree, conv in (("lora_unet_", unet, conv1x1), ("lora_te_", text_encoder, lambda p: False)):
        for p, layer in lora_layers(tree or {}).items():
            down, up = _to_torch(layer, conv(p), dtype)
            name = prefix + "_".join(p)
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"] = np.asarray(layer.get("alpha", lora_rank(layer)), np.float32).astype(dtype)
    save_state_dict(path, sd)
