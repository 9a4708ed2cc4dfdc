"""`animatediff-jax sample --config configs/sample/<name>.py [--config.<field>=<value> ...]`

Text to video from a prompt config, as the original AnimateDiff's `scripts/animate.py` does
it: an SD1.5 base (converted folder, diffusers folder or single file), optionally a
personalised model over it (`dreambooth_path`) and a personalised LoRA (`lora_model_path`,
`lora_alpha`), a motion module, MotionLoRAs (`motion_module_lora_configs`, each with its alpha)
and a v3 domain adapter (`adapter_lora_path`, `adapter_lora_scale`), all merged into the
weights once; then one compiled sampler over all devices. Every field can be overridden:

    animatediff-jax sample --config configs/sample/v2_motion_lora_zoom_in.py \\
        --config.prompt="['a lighthouse at dusk, waves']" --config.seed=42 --config.steps=30

Values are Python literals (`--config.W=768`, `--config.output.formats="('gif', 'mp4')"`,
`--config.context_windows="{'length': 16, 'overlap': 4}"`); string fields take the text as is.
`--config FILE:ARG` passes ARG to the file's `get_config(ARG)`; a saved `config.yaml` is a
config file too (re-running it reproduces its videos: random seeds are saved resolved).
`--print_config` prints the resolved config and exits.

Outputs in `output.dir` (`{time}` is replaced by the start time): `sample/<i>-<prompt>.gif`
(and/or `.mp4`, `<i>-<prompt>/0000.png` frames), `sample.gif` (a grid of all videos),
`config.yaml` (the resolved config) and `timings.json`. Everything that can be checked is
checked before any weights are loaded or anything is compiled; a bad value is a one-line error.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Params = dict[str, Any]

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("gif", "mp4", "png")
# Fields whose value may change type on override (beyond int -> float): name -> accepted types.
_FLEXIBLE = {"seed": (int, list, tuple), "context_windows": (type(None), dict)}  # by dotted name
_OPEN = ("scheduler_options",)  # free-form dicts: any key may be set
_SUBKEYS = {"context_windows": ("length", "overlap")}


class ConfigError(ValueError):
    """A bad config or command line: the message is the one line the user sees."""


# ----------------------------------------------------------------------------------------------
# The config: every field, its default, and what it means.
# ----------------------------------------------------------------------------------------------


def base_config():
    """Every field of a sample config with its default (the original AnimateDiff's names).

    `configs/sample/*.py` start from this and set what differs.
    """
    from ml_collections import ConfigDict

    c = ConfigDict(type_safe=False)  # seed may be an int or a list, context_windows None or a dict
    c.base_model = "models/sd15"  # SD1.5: converted folder, diffusers folder or LDM single file
    c.tokenizer = ""  # CLIP tokenizer folder; "" = <base_model>/tokenizer
    c.dreambooth_path = ""  # personalised model over the base (single file or folder); "" = none
    c.lora_model_path = ""  # personalised LoRA (kohya / diffusers; text-encoder layers too); "" = none
    c.lora_alpha = 0.8  # its scale (the original's default)
    c.motion_module = ""  # motion module (original .ckpt/.safetensors, MotionAdapter folder, converted)
    c.motion_module_lora_configs = []  # MotionLoRAs: [{"path": ..., "alpha": 1.0}, ...], all merged
    c.adapter_lora_path = ""  # v3 domain adapter; "" = none
    c.adapter_lora_scale = 1.0  # its scale (alpha)
    c.seed = -1  # one int for all prompts, or one per prompt; -1 = random (saved resolved)
    c.steps = 25
    c.guidance_scale = 7.5
    c.prompt = []  # list of prompts: one video each
    c.n_prompt = [""]  # negative prompts: one (broadcast) or one per prompt
    c.W = 512
    c.H = 512
    c.L = 16  # frames
    c.scheduler = "ddim"  # ddim | euler | euler_ancestral | dpmpp_2m | pndm | lcm
    # diffusers config names, e.g. {"use_karras_sigmas": True}, {"eta": 0.0}; the defaults are the original
    # AnimateDiff's DDIM (set_alpha_to_one True); {"preset": "diffusers_sd15"} is SD1.5's scheduler_config.json.
    c.scheduler_options = {}
    c.clip_skip = 0  # diffusers' clip_skip (prompts only)
    c.dtype = "bfloat16"  # compute dtype: float32 | bfloat16 | float16 (latents stay float32)
    # UNet attention kernel (models.attention): auto (cuDNN flash on GPU, Pallas splash on TPU, blockwise
    # on CPU, for long sequences; XLA for short ones) | xla | chunked | cudnn | splash
    c.attention = "auto"
    c.allow_nonfinite = False  # load weight files holding NaN/Inf (with a warning) instead of refusing them
    c.context_windows = None  # None, or {"length": 16, "overlap": 4} for videos longer than the motion module's table
    c.devices = -1  # devices to spread the videos over; -1 = all
    c.batch_size = 0  # videos per compiled call; 0 = one per device
    c.decode_chunk = 4  # frames per VAE decode step (bounds memory)
    c.output = o = ConfigDict(type_safe=False)
    o.dir = "samples/sample-{time}"  # {time}: the start time
    o.formats = ("gif",)  # any of gif, mp4, png (PNG frames, lossless)
    o.fps = 8.0
    o.grid = True  # also sample.gif (and sample.mp4 with mp4): all videos tiled, 4 per row
    return c


def _plain(config: Any) -> dict:
    """A ConfigDict / Mapping as nested plain dicts (tuples kept)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {k: _plain(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_plain(v) for v in config]
    return config


def _yamlable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _yamlable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_yamlable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def load_config(spec: str) -> dict:
    """The plain-dict config of `spec`: `file.py` (its `get_config()`), `file.py:ARG`
    (`get_config(ARG)`), or a saved `config.yaml` / `.json`."""
    path, arg = spec, None
    if not os.path.isfile(path) and ":" in spec:
        path, arg = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: no such file")
    if path.endswith((".yaml", ".yml", ".json")):
        import yaml

        with open(path) as f:
            loaded = yaml.safe_load(f)
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: not a mapping of fields")
        return loaded
    name = "sample_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"--config {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {path}: defines no get_config()")
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except Exception as e:
        raise ConfigError(f"--config {spec}: get_config failed: {type(e).__name__}: {e}") from e
    return _plain(config)


def _check_fields(config: Mapping, schema: Mapping, prefix: str = "") -> None:
    """Unknown field names (at any depth) are an error naming the field and the valid ones."""
    for k, v in config.items():
        name = prefix + k
        if k not in schema:
            raise ConfigError(f"unknown config field {name!r} (valid: {', '.join(sorted(schema))})")
        if isinstance(schema[k], Mapping) and isinstance(v, Mapping) and k not in _OPEN:
            _check_fields(v, schema[k], name + ".")


def _kind(x: Any) -> str:
    kinds = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
             ((list, tuple), "a list"), (dict, "a dict"), (type(None), "None"))
    return next((name for t, name in kinds if isinstance(x, t)), type(x).__name__)


def _literal(raw: str, current: Any, name: str) -> Any:
    """The override's value, given the field's current value (its type)."""
    if isinstance(current, str):
        return raw
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{name}={raw}: expected true or false")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ConfigError(f"--config.{name}={raw}: not a valid value (expected {_kind(current)})") from None
    allowed = _FLEXIBLE.get(name)
    ok = isinstance(value, allowed) if allowed else (
        current is None
        or (isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)))
        or (isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(current, dict) and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(f"--config.{name}={raw}: expected {_kind(current)}, got {_kind(value)}")
    return float(value) if isinstance(current, float) and isinstance(value, int) else value


def apply_overrides(config: dict, overrides: Sequence[tuple[str, str]]) -> dict:
    """`config` (plain dict) with `(dotted.field, raw value)` overrides applied; unknown fields are errors."""
    schema = _plain(base_config())
    for dotted, raw in overrides:
        *groups, leaf = dotted.split(".")
        node, spec, is_open = config, schema, False
        for depth, group in enumerate(groups):
            if is_open or group not in spec or not (isinstance(spec[group], dict) or group in _SUBKEYS):
                parent = ".".join(groups[:depth])
                has = f" ({parent} has: {', '.join(sorted(spec))})" if parent else ""
                raise ConfigError(f"unknown config field {'.'.join(groups[: depth + 1])!r}{has}")
            if node.get(group) is None:
                node[group] = {}
            if not isinstance(node[group], dict):
                raise ConfigError(f"--config.{dotted}: {'.'.join(groups[: depth + 1])} is not a group of fields")
            node, is_open = node[group], group in _OPEN
            spec = spec[group] or dict.fromkeys(_SUBKEYS.get(group, ()))
        if not (is_open or leaf in spec):
            has = f" ({'.'.join(groups)} has: {', '.join(sorted(spec))})" if groups else ""
            raise ConfigError(f"unknown config field {dotted!r}{has}")
        node[leaf] = _literal(raw, node.get(leaf, spec.get(leaf)), dotted)
    return config


def parse_args(argv: Sequence[str]) -> tuple[dict, bool]:
    """`(config, print_only)` from the command line (without the command name)."""
    spec, overrides, print_only = None, [], False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--print_config":
            print_only = True
        elif a.startswith("--config") and a[len("--config"):len("--config") + 1] in ("", "=", "."):
            key, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{a}: missing value")
                i, value = i + 1, args[i + 1]
            if key == "config":
                spec = value
            else:
                overrides.append((key[len("config."):], value))
        else:
            raise ConfigError(f"unexpected argument {a!r} (expected --config FILE and --config.FIELD=VALUE)")
        i += 1
    if spec is None:
        raise ConfigError("--config is required (e.g. --config configs/sample/tiny.py)")
    config = load_config(spec)
    schema = _plain(base_config())
    _check_fields(config, schema)
    merged = {**schema, **config}
    merged["output"] = {**schema["output"], **(config.get("output") or {})}
    return apply_overrides(merged, overrides), print_only


# ----------------------------------------------------------------------------------------------
# Validation (before loading anything).
# ----------------------------------------------------------------------------------------------


def _int(c: Mapping, name: str, lo: int | None = None) -> int:
    v = c[name]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (lo is not None and v < lo):
        raise ConfigError(f"{name}={v!r}: expected an integer{f' >= {lo}' if lo is not None else ''}")
    return int(v)


def _number(c: Mapping, name: str) -> float:
    v = c[name]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{name}={v!r}: expected a number")
    return float(v)


def _existing(name: str, path: Any, required: bool = False) -> str:
    if not isinstance(path, str):
        raise ConfigError(f"{name}={path!r}: expected a path")
    if not path:
        if required:
            raise ConfigError(f"{name}: required")
        return ""
    if not os.path.exists(path):
        raise ConfigError(f"{name}: {path}: no such file or folder")
    return path


def _size_multiple(base_model: str) -> int:
    """What H and W must divide by for this base model (VAE factor x UNet downsampling), read
    from its configs without loading weights (converted and diffusers folders; 64 for a single
    file). A folder whose configs cannot be read is the error here, not a wrong multiple later."""
    from animatediff_jax.checkpoints import params_io

    blocks, vae_blocks = 4, 4
    converted = os.path.join(base_model, params_io.PARAMS_FILE)
    source = converted
    try:
        if os.path.isfile(converted):
            from safetensors import safe_open

            with safe_open(converted, framework="numpy") as f:
                meta = f.metadata() or {}
            blocks = len(json.loads(meta["unet_config"])["block_out_channels"])
            vae_blocks = len(json.loads(meta["vae_config"])["block_out_channels"])
        elif os.path.isdir(base_model):
            for name in ("unet", "vae"):
                source = os.path.join(base_model, name, "config.json")
                with open(source) as f:
                    n = len(json.load(f)["block_out_channels"])
                blocks, vae_blocks = (n, vae_blocks) if name == "unet" else (blocks, n)
    except FileNotFoundError:
        raise ConfigError(f"base_model: {source}: missing (not a converted or diffusers SD1.5 folder)") from None
    except Exception as e:  # truncated / not safetensors / bad JSON / no such field
        raise ConfigError(f"base_model: {source}: cannot be read ({type(e).__name__}: {e})") from None
    return 2 ** (vae_blocks - 1) * 2 ** (blocks - 1)


# Measured with bench/memory_bench.py (BENCHMARKS.md), bf16, SD1.5 + v2 at 512x512: one CFG UNet
# call holds ~7.9 GiB of temporaries for 2 x 16 frames (blockwise attention), the VAE decode ~0.8 GiB
# per frame of a chunk; both scale about linearly with the pixels. An order-of-magnitude guard.
_UNET_BYTES_PER_FRAME_512 = 0.25 * 2**30
_VAE_BYTES_PER_FRAME_512 = 0.8 * 2**30


def _available_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(c: Mapping) -> None:
    """Refuses sizes whose activations cannot fit one device (e.g. W=H=100000), before anything loads."""
    scale = int(c["W"]) * int(c["H"]) / 512**2 * (2 if c["dtype"] == "float32" else 1)
    videos = int(c["batch_size"]) or 1
    windows, frames = c["context_windows"], int(c["L"])
    if isinstance(windows, Mapping) and "length" in windows:  # (malformed windows are _check_windows' error)
        frames = min(frames, int(windows["length"]))
    need = scale * (_UNET_BYTES_PER_FRAME_512 * 2 * videos * frames + _VAE_BYTES_PER_FRAME_512 * int(c["decode_chunk"]))
    have = _available_bytes()
    if have is not None and need > have:
        raise ConfigError(
            f"W={c['W']}, H={c['H']}, L={c['L']}: needs about {need / 2**30:.0f} GiB of device memory, "
            f"{have / 2**30:.0f} GiB available; lower W/H/L, decode_chunk or batch_size"
        )


def _attention_note(c: Mapping) -> str:
    """`auto (chunked at 4096 tokens)`: what runs the first UNet level's self-attention. A forced
    kernel that cannot run that shape, dtype or platform here is a `ConfigError` (checked in `validate`)."""
    import jax.numpy as jnp

    from animatediff_jax.models import attention

    tokens = -(-int(c["H"]) // 8) * -(-int(c["W"]) // 8)
    try:
        kernel = attention.resolve(c["attention"], (1, tokens, 8, 40), (1, tokens, 8, 40), jnp.dtype(c["dtype"]))
    except attention.AttentionError as e:
        raise ConfigError(f"attention={c['attention']!r}: {e}") from None
    return f"{c['attention']} ({kernel} at {tokens} tokens)"


def validate(config: Mapping) -> dict:
    """The config checked field by field (types, ranges, paths, scheduler); returns it with
    `prompt`, `n_prompt` and `seed` as per-prompt lists (random seeds drawn)."""
    from animatediff_jax import schedulers as S
    from animatediff_jax.sampling import _check_windows

    schema = _plain(base_config())
    c = _plain(config)
    _check_fields(c, schema)
    c = {**schema, **c, "output": {**schema["output"], **(c.get("output") or {})}}
    prompts = c["prompt"]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompt={prompts!r}: expected a non-empty list of strings")
    n = len(prompts)
    neg = c["n_prompt"]
    neg = [neg] if isinstance(neg, str) else list(neg or [""])
    if not all(isinstance(p, str) for p in neg) or len(neg) not in (1, n):
        raise ConfigError(f"n_prompt: expected 1 or {n} strings (one per prompt), got {neg!r}")
    neg = neg * n if len(neg) == 1 else neg
    seeds = c["seed"]
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, (list, tuple)) or len(seeds) not in (1, n) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and -1 <= s < 2**64 for s in seeds
    ):
        raise ConfigError(f"seed={c['seed']!r}: expected an integer in [0, 2**64) or -1 (random), or 1 or {n} of them")
    seeds = list(seeds) * n if len(seeds) == 1 else list(seeds)
    seeds = [secrets.randbits(63) if s == -1 else int(s) for s in seeds]

    steps = _int(c, "steps", 1)
    _number(c, "guidance_scale")
    for name in ("W", "H", "L"):
        _int(c, name, 1)
    _int(c, "clip_skip", 0)
    _int(c, "batch_size", 0)
    _int(c, "decode_chunk", 1)
    devices = _int(c, "devices", -1)
    if devices == 0:
        raise ConfigError("devices=0: expected -1 (all) or a positive count")
    for name in ("lora_alpha", "adapter_lora_scale"):
        _number(c, name)
    if c["dtype"] not in DTYPES:
        raise ConfigError(f"dtype={c['dtype']!r}: expected one of {', '.join(DTYPES)}")
    _attention_note(c)
    if not isinstance(c["allow_nonfinite"], bool):
        raise ConfigError(f"allow_nonfinite={c['allow_nonfinite']!r}: expected True or False")
    _check_memory(c)
    if not isinstance(c["scheduler_options"], Mapping):
        raise ConfigError(f"scheduler_options={c['scheduler_options']!r}: expected a dict")
    try:
        S.make_scheduler(c["scheduler"], steps, **c["scheduler_options"])
        _check_windows(c["context_windows"])
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None

    base = _existing("base_model", c["base_model"], required=True)
    m = _size_multiple(base)
    for name in ("W", "H"):
        if c[name] % m:
            raise ConfigError(f"{name}={c[name]} must be a multiple of {m} for this base model "
                              "(VAE factor x UNet downsampling)")
    for name in ("tokenizer", "dreambooth_path", "lora_model_path", "motion_module", "adapter_lora_path"):
        _existing(name, c[name])
    loras = c["motion_module_lora_configs"]
    if not isinstance(loras, (list, tuple)):
        raise ConfigError(f"motion_module_lora_configs={loras!r}: expected a list of {{path, alpha}}")
    for i, entry in enumerate(loras):
        if not isinstance(entry, Mapping) or set(entry) - {"path", "alpha"} or "path" not in entry:
            raise ConfigError(f"motion_module_lora_configs[{i}]={entry!r}: expected {{'path': ..., 'alpha': ...}}")
        _existing(f"motion_module_lora_configs[{i}].path", entry["path"], required=True)
        _number({"alpha": entry.get("alpha", 1.0)}, "alpha")

    out = c["output"]
    formats = [out["formats"]] if isinstance(out["formats"], str) else list(out["formats"])
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise ConfigError(f"output.formats={out['formats']!r}: expected some of {', '.join(FORMATS)}")
    if not isinstance(out["fps"], (int, float)) or out["fps"] <= 0:
        raise ConfigError(f"output.fps={out['fps']!r}: expected a positive number")
    if not isinstance(out["dir"], str) or not out["dir"]:
        raise ConfigError(f"output.dir={out['dir']!r}: expected a folder")
    return dict(c, prompt=list(prompts), n_prompt=neg, seed=seeds, output=dict(out, formats=formats))


# ----------------------------------------------------------------------------------------------
# Loading and merging.
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


def load_pipeline(config: Any):
    """The `AnimationPipeline` a sample config describes, every adapter merged into the weights.

    As the original's `load_weights`: base SD1.5; the personalised model over it (parts it
    lacks come from the base); the motion module (or the base's own); the personalised LoRA at
    `lora_alpha` (UNet and text encoder); the domain adapter at `adapter_lora_scale`; each
    MotionLoRA at its alpha. Merging is `lora.merge` in float32, before the cast to `dtype`.
    """
    import jax.numpy as jnp

    from animatediff_jax.checkpoints.load import load_lora, load_motion
    from animatediff_jax.checkpoints.motion import merge_motion
    from animatediff_jax.checkpoints.sd15 import SD15, load_sd15
    from animatediff_jax.lora import merge, merge_many
    from animatediff_jax.models.shapes import motion_subtree
    from animatediff_jax.sampling import AnimationPipeline
    from animatediff_jax.text import Tokenizer

    c = _plain(config)
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
    return AnimationPipeline.from_sd15(merged, Tokenizer(tok_path), dtype=jnp.dtype(c["dtype"]),
                                       attention=c["attention"])


# ----------------------------------------------------------------------------------------------
# Sampling and writing.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleResult:
    """What `sample` made: the output folder, files written, uint8 frames `[N, F, H, W, 3]`,
    the resolved config (seeds drawn), timings in seconds, and the pipeline (compiled, reusable)."""

    folder: str
    files: list[str]
    frames: np.ndarray
    config: dict
    timings: dict[str, float]
    pipeline: Any


def slug(prompt: str, words: int = 10, limit: int = 80) -> str:
    """A file-name piece from a prompt: its first words joined by '-' (as the original names files)."""
    s = "-".join(prompt.replace("/", "").split()[:words])
    s = re.sub(r"[^\w,.+-]", "", s)[:limit]
    return s or "prompt"


def _batches(n: int, size: int) -> list[list[int]]:
    """Index batches of exactly `size` (the last one padded by repeating its last index)."""
    out = []
    for start in range(0, n, size):
        idx = list(range(start, min(n, start + size)))
        out.append(idx + [idx[-1]] * (size - len(idx)))
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_outputs(folder: str, frames: np.ndarray, prompts: Sequence[str], config: Mapping) -> list[str]:
    """Per-video GIF/MP4/PNG files, the grid, the resolved config; returns the paths written."""
    import yaml

    from animatediff_jax.io.video import write_gif, write_grid, write_mp4, write_pngs

    out = config["output"]
    fps = float(out["fps"])
    files = []
    for i, (video, prompt) in enumerate(zip(frames, prompts)):
        stem = os.path.join(folder, "sample", f"{i}-{slug(prompt)}")
        if "gif" in out["formats"]:
            write_gif(stem + ".gif", video, fps)
            files.append(stem + ".gif")
        if "mp4" in out["formats"]:
            write_mp4(stem + ".mp4", video, fps)
            files.append(stem + ".mp4")
        if "png" in out["formats"]:
            files += write_pngs(stem, video)
    if out["grid"]:
        cols = min(4, len(frames))
        for ext in ("gif", "mp4"):
            if ext in out["formats"] or (ext == "gif" and "mp4" not in out["formats"]):
                write_grid(os.path.join(folder, f"sample.{ext}"), frames, fps, cols=cols)
                files.append(os.path.join(folder, f"sample.{ext}"))
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(_yamlable(config), f, sort_keys=False, allow_unicode=True)
    files.append(path)
    return files


def timing_summary(t: Mapping[str, float], n: int) -> str:
    return (
        f"timing: load {t['load_s']:.1f}s | compile {t['compile_s']:.1f}s (text {t['compile_text_s']:.1f}, "
        f"denoise {t['compile_denoise_s']:.1f}, decode {t['compile_decode_s']:.1f}) | run {t['run_s']:.2f}s "
        f"(text {t['text_s']:.2f}, denoise {t['denoise_s']:.2f}, decode {t['decode_s']:.2f}) = "
        f"{t['run_s'] / n:.2f} s/video | write {t['write_s']:.1f}s"
    )


def output_folder(folder: str) -> str:
    """The folder this run writes, checked before anything loads: never a file, never an unwritable
    place, and never an existing non-empty folder (old videos beside a new config.yaml): then the first
    free `<folder>-2`, `-3`, ... is used, and said."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"output.dir={folder!r}: is a file, not a folder")
    chosen, i = folder, 1
    while os.path.isdir(chosen) and os.listdir(chosen):
        i += 1
        chosen = f"{folder.rstrip(os.sep)}-{i}"
    if chosen != folder:
        _log(f"output.dir {folder} is not empty: writing {chosen} instead")
    parent = os.path.abspath(chosen)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir={folder!r}: cannot be created ({parent} is not a writable folder)")
    return chosen


def sample(config: Any, pipeline: Any = None) -> SampleResult:
    """Validates `config`, loads the pipeline (unless given), generates every prompt's video on
    all devices (batches of one compiled shape), writes the outputs and the timing summary."""
    from animatediff_jax.sampling import generate, make_mesh

    c = validate(config)
    try:
        mesh = make_mesh(None if c["devices"] == -1 else c["devices"])
    except ValueError as e:
        raise ConfigError(f"devices: {e}") from None
    folder = output_folder(c["output"]["dir"].replace("{time}", time.strftime("%Y-%m-%dT%H-%M-%S")))
    t0 = time.perf_counter()
    from animatediff_jax.checkpoints.torch_io import nonfinite_allowed

    with nonfinite_allowed() if c["allow_nonfinite"] else contextlib.nullcontext():
        pipe = pipeline if pipeline is not None else load_pipeline(c)
    timings = {"load_s": time.perf_counter() - t0}
    if c["clip_skip"] > pipe.text_config.num_layers:
        raise ConfigError(f"clip_skip={c['clip_skip']}: the text encoder has {pipe.text_config.num_layers} layers")
    motion = pipe.unet_config.motion
    windows = c["context_windows"]
    if motion is not None and windows is not None and int(windows["length"]) > motion.max_positions:
        raise ConfigError(f"context_windows.length={windows['length']} exceeds the motion module's position table "
                          f"({motion.max_positions} frames)")
    if motion is not None and c["L"] > motion.max_positions and c["context_windows"] is None:
        raise ConfigError(
            f"L={c['L']} exceeds the motion module's position table ({motion.max_positions} frames); sample it "
            f"in overlapping windows: --config.context_windows=\"{{'length': {motion.max_positions}, 'overlap': 4}}\""
        )
    size = c["batch_size"] or mesh.shape["data"]
    n = len(c["prompt"])
    batches = _batches(n, size)
    _log(f"sampling {n} video(s) of {c['L']} frames {c['H']}x{c['W']}, {c['scheduler']} {c['steps']} steps, "
         f"guidance {c['guidance_scale']}, {c['dtype']}, attention {_attention_note(c)}, "
         f"on {mesh.shape['data']} device(s), "
         f"{len(batches)} batch(es) of {size}")
    frames = []
    for b, idx in enumerate(batches):
        if len(batches) > 1:
            _log(f"batch {b + 1}/{len(batches)}")
        res = generate(
            pipe, [c["prompt"][i] for i in idx], [c["n_prompt"][i] for i in idx], [c["seed"][i] for i in idx],
            num_frames=c["L"], height=c["H"], width=c["W"], steps=c["steps"], guidance_scale=c["guidance_scale"],
            scheduler=c["scheduler"], scheduler_options=c["scheduler_options"], clip_skip=c["clip_skip"],
            decode_chunk=c["decode_chunk"], mesh=mesh, progress=True, context_windows=c["context_windows"],
        )
        keep = len(dict.fromkeys(idx))
        frames.append(res.frames[:keep])
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    frames_np = np.concatenate(frames)

    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    files = write_outputs(folder, frames_np, c["prompt"], c)
    timings["write_s"] = time.perf_counter() - t0
    with open(os.path.join(folder, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    files.append(os.path.join(folder, "timings.json"))
    _log(timing_summary(timings, n))
    _log(f"wrote {folder}/ ({len(files)} files)")
    return SampleResult(folder, files, frames_np, c, timings, pipe)


# ----------------------------------------------------------------------------------------------
# Tiny random models (tests, newcomers): every file format the sampler reads, in seconds.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg if isinstance(e, ConfigError) else f"{type(e).__name__}: {msg}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from animatediff_jax.checkpoints.torch_io import CheckpointError

    try:
        config, print_only = parse_args(argv)
        if print_only:
            import yaml

            print(yaml.safe_dump(_yamlable(config), sort_keys=False, allow_unicode=True), end="")
            return 0
        sample(config)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # generate's checks (e.g. frames beyond the motion module's table)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
