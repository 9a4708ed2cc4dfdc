"""A sample config: `base_config()` (every field, its default, what it means) and `validate`, the
checks only a config has (field names and types, files, formats, output folder, memory), run before
anything loads. What `generate` also checks (windows, scheduler, per-prompt counts) is its check,
called from here, not a second copy.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from animatediff_jax.errors import ConfigError
from animatediff_jax.io import fs

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("gif", "mp4", "png")
GROUPS = ("output", "context_windows", "evaluate")  # fixed groups of fields
_OPEN = ("scheduler_options", "prompt_map", "motion_block_scales", "free_init", "sparsectrl")  # free-form: any key may be set


def base_config() -> ConfigDict:
    """Every field of a sample config with its default (the original AnimateDiff's names).

    `configs/sample/*.py` start from this and set what differs. Type-safe: a tuple field takes
    tuples (`--config.seed=42` is `(42,)`), a number field numbers.
    """
    c = ConfigDict()
    c.base_model = "models/sd15"  # SD1.5: converted folder, diffusers folder or LDM single file
    # JAX's persistent compilation cache: "auto" = ~/.cache/animatediff-jax/jax (the same config again
    # starts in seconds), a folder, or "" (off).
    c.compilation_cache = "auto"
    c.tokenizer = ""  # CLIP tokenizer folder; "" = <base_model>/tokenizer
    c.dreambooth_path = ""  # personalised model over the base (single file or folder); "" = none
    c.lora_model_path = ""  # personalised LoRA (kohya / diffusers; text-encoder layers too); "" = none
    c.lora_alpha = 0.8  # its scale (the original's default)
    c.motion_module = ""  # motion module (original .ckpt/.safetensors, MotionAdapter folder, converted)
    c.motion_module_lora_configs = ()  # MotionLoRAs: ({"path": ..., "alpha": 1.0}, ...), all merged
    c.adapter_lora_path = ""  # v3 domain adapter; "" = none
    c.adapter_lora_scale = 1.0  # its scale (alpha)
    c.seed = (-1,)  # one for all prompts, or one per prompt; -1 = random (saved resolved)
    c.steps = 25
    c.guidance_scale = 7.5
    c.prompt = ()  # the prompts: one video each
    c.n_prompt = ("",)  # negative prompts: one (broadcast) or one per prompt
    # Prompt travel, instead of `prompt`: {"0": text, "8": text, ...} (frame: prompt, from frame 0), one video
    # per seed whose every frame is conditioned on its own text embedding, interpolated between keyframes.
    c.prompt_map = {}
    c.head_prompt = ""  # prompt travel: put before every keyframe's text ("masterpiece, a girl")
    c.tail_prompt = ""  # ... and after it
    c.prompt_interpolation = "linear"  # between keyframes: linear (diffusers' FreeNoise) | slerp
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
    # Motion strength: what every motion module adds to its input is scaled (1: as trained, 0: no motion);
    # per block on top: {"mid_block": 0.5, "up_blocks_1": 1.2} (down_blocks_i, mid_block, up_blocks_i).
    c.motion_scale = 1.0
    c.motion_block_scales = {}
    # PE stretch (AnimateDiff-Evolved's): (n, m) spreads the motion modules' first n positions over m frames
    # (linear interpolation), e.g. (16, 24) for a 16-frame sweet spot over 24 frames, (32, 40) for 40 frames
    # with a 32-position table. () = off (the table as trained).
    c.pe_stretch = ()
    # FreeInit (diffusers' enable_free_init): {"num_iters": 3, "method": "butterworth" | "gaussian" | "ideal",
    # "order": 4, "spatial_stop_frequency": 0.25, "temporal_stop_frequency": 0.25, "use_fast_sampling": False};
    # {} = off. Denoises num_iters times, each from the last video's low frequencies (ddim / pndm).
    c.free_init = {}
    # Video to video: a GIF / MP4 / folder of frames (its first L, resized to W x H) noised to `strength`
    # (0..1: the share of the steps that run) and denoised with the prompts; "" = text to video (ddim / pndm).
    c.init_video = ""
    c.strength = 0.8
    # ControlNets (SD1.5, diffusers folder or control_v11*.pth single file), each conditioning every frame:
    # ({"path": ..., "video": GIF/MP4/frames folder | "images": (one PNG/JPG per frame, ...), "scale": 1.0,
    #   "start": 0.0, "end": 1.0}, ...); start/end: the share of the steps it acts in. () = none.
    c.controlnet = ()
    # SparseCtrl (v3_sd15_sparsectrl_rgb/scribble.ckpt or a diffusers folder): a few keyframes steer the video,
    # {"path": ..., "images": (PNG/JPG, ...), "frame_indices": (0, ...), "scale": 1.0}; one RGB image at frame 0
    # is image-to-video. {} = none.
    c.sparsectrl = {}
    # Videos longer than the motion module's position table: overlapping windows of `length` frames over
    # the temporal attention, predictions averaged; length 0 = off (one pass over all frames).
    # weighting where windows overlap: flat | pyramid | delayed_reverse_sawtooth (diffusers' FreeNoise weights);
    # noise: random | shuffle_context | repeat_context (FreeNoise's initial noise); schedule: uniform |
    # looped_uniform (windows wrap around the end: a seamless loop). scope: unet (the whole UNet per window,
    # AnimateDiff-Evolved's) | motion (one UNet pass, only the motion modules' attentions per window:
    # diffusers' FreeNoise, `enable_free_noise(context_length=length, context_stride=length - overlap)`).
    c.context_windows = ConfigDict(dict(length=0, overlap=4, weighting="flat", noise="random", schedule="uniform",
                                        scope="unet"))
    # SD's safety checker (SD1.5's safety_checker/ folder, or the pipeline folder holding it): every decoded
    # frame is checked, a video with a flagged frame is written black, the flags go to timings.json; "" = off.
    c.safety_checker = ""
    # CLIP metrics of the videos made (animatediff_jax.evaluation), written to metrics.json: clip = a transformers
    # CLIP folder (e.g. openai/clip-vit-large-patch14), "" = off; reference = True also samples the motion-free
    # videos (motion_scale 0, same seeds: the T2I model's own images) for domain similarity.
    c.evaluate = ConfigDict(dict(clip="", reference=False))
    c.devices = -1  # devices to spread the videos over; -1 = all
    c.batch_size = 0  # videos per compiled call; 0 = auto: up to VIDEOS_PER_DEVICE per device (`videos_per_call`)
    c.decode_chunk = 4  # frames per VAE decode step (bounds memory)
    c.output = o = ConfigDict()
    o.dir = "samples/sample-{time}"  # {time}: the start time
    o.formats = ("gif",)  # any of gif, mp4, png (PNG frames, lossless)
    o.fps = 8.0
    o.grid = True  # also sample.gif (and sample.mp4 with mp4): all videos tiled, 4 per row
    return c


# ----------------------------------------------------------------------------------------------
# Plain values, YAML.
# ----------------------------------------------------------------------------------------------


def plain(config: Any) -> Any:
    """A ConfigDict / Mapping as nested plain dicts (tuples and lists kept)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {k: plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(plain(v) for v in config)
    return config


def _yamlable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _yamlable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_yamlable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def to_yaml(config: Any) -> str:
    """The config as YAML (what `--print_config` shows and a run saves as `config.yaml`)."""
    import yaml

    return yaml.safe_dump(_yamlable(plain(config)), sort_keys=False, allow_unicode=True)


def _set(c: ConfigDict, values: Mapping, prefix: str = "") -> None:
    for k, v in values.items():
        if isinstance(c[k], ConfigDict) and k not in _OPEN and isinstance(v, Mapping):
            _set(c[k], v, f"{prefix}{k}.")
            continue
        try:
            c[k] = tuple(v) if isinstance(c[k], tuple) and isinstance(v, list) else v
        except TypeError:
            raise ConfigError(f"{prefix}{k}={v!r}: expected {_kind(c[k])}") from None


def from_yaml(path: str) -> ConfigDict:
    """A saved run's `config.yaml` as a config on `base_config()` (YAML lists back to tuples), so
    `configs/sample/replay.py:RUN/config.yaml` reproduces the run (its seeds are saved resolved)."""
    import yaml

    try:
        with fs.open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(e).split())})") from None
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{path}: not a mapping of config fields")
    c = base_config()
    _check_fields(saved, plain(c))
    _set(c, saved)
    return c


# ----------------------------------------------------------------------------------------------
# Field checks.
# ----------------------------------------------------------------------------------------------


def _kind(x: Any) -> str:
    kinds = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
             ((list, tuple), "a tuple"), ((dict, ConfigDict), "a dict"), (type(None), "None"))
    return next((name for t, name in kinds if isinstance(x, t)), type(x).__name__)


def _check_fields(config: Mapping, schema: Mapping, prefix: str = "") -> None:
    """Unknown field names (at any depth) are an error naming the field and the valid ones."""
    for k, v in config.items():
        name = prefix + k
        if k not in schema:
            raise ConfigError(f"unknown config field {name!r} (valid: {', '.join(sorted(schema))})")
        if isinstance(schema[k], Mapping) and isinstance(v, Mapping) and k not in _OPEN:
            _check_fields(v, schema[k], name + ".")


def _int(name: str, v: Any, lo: int | None = None) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (lo is not None and v < lo):
        raise ConfigError(f"{name}={v!r}: expected an integer{f' >= {lo}' if lo is not None else ''}")
    return int(v)


def _number(name: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{name}={v!r}: expected a number")
    return float(v)


def _existing_path(name: str, path: Any, required: bool = False, files: bool = True) -> str:
    """A path field: a string, given when `required`, and (`files`) there."""
    if not isinstance(path, str):
        raise ConfigError(f"{name}={path!r}: expected a path")
    if not path:
        if required:
            raise ConfigError(f"{name}: required")
        return ""
    if files and not fs.exists(path):
        raise ConfigError(f"{name}: {path}: no such file or folder")
    return path


def size_multiple(base_model: str) -> int:
    """What H and W must divide by for this base model (VAE factor x UNet downsampling), read
    from its configs without loading weights (converted and diffusers folders; 64 for a single
    file). A folder whose configs cannot be read is the error here, not a wrong multiple later."""
    from animatediff_jax.checkpoints import params_io

    blocks, vae_blocks = 4, 4
    converted = os.path.join(base_model, params_io.PARAMS_FILE)
    source = converted
    try:
        if fs.isfile(converted):
            from animatediff_jax.checkpoints.torch_io import safetensors_metadata

            meta = safetensors_metadata(converted)
            blocks = len(json.loads(meta["unet_config"])["block_out_channels"])
            vae_blocks = len(json.loads(meta["vae_config"])["block_out_channels"])
        elif fs.isdir(base_model):
            for name in ("unet", "vae"):
                source = os.path.join(base_model, name, "config.json")
                with fs.open(source) as f:
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


# Videos per device in one compiled call when `batch_size` is 0: what fits a 16 GB TPU v5e at 16x512², 25
# steps, CFG, bf16 (`animatediff-jax compile sample --topology v5e-1`: 9.2 GiB for 4; BENCHMARKS.md).
VIDEOS_PER_DEVICE = 4


def videos_per_call(batch_size: int, videos: int, devices: int) -> int:
    """Videos in one compiled call: `batch_size`, or (0) as many of `videos` as fit, up to
    `VIDEOS_PER_DEVICE` per device, a multiple of the devices (fewer videos pad no more than that)."""
    if batch_size:
        return int(batch_size)
    per_device = min(VIDEOS_PER_DEVICE, -(-int(videos) // int(devices)))
    return max(1, per_device) * int(devices)


def _available_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(c: Mapping, n: int) -> None:
    """Refuses sizes whose activations cannot fit one device (e.g. W=H=100000), before anything loads."""
    scale = int(c["W"]) * int(c["H"]) / 512**2 * (2 if c["dtype"] == "float32" else 1)
    videos = int(c["batch_size"]) or min(VIDEOS_PER_DEVICE, n)  # (per device)
    frames = int(c["L"])
    if c["context_windows"]["length"] and c["context_windows"].get("scope", "unet") == "unet":
        frames = min(frames, int(c["context_windows"]["length"]))  # (scope "motion": the UNet sees every frame)
    need = scale * (_UNET_BYTES_PER_FRAME_512 * 2 * videos * frames + _VAE_BYTES_PER_FRAME_512 * int(c["decode_chunk"]))
    have = _available_bytes()
    if have is not None and need > have:
        raise ConfigError(
            f"W={c['W']}, H={c['H']}, L={c['L']}: needs about {need / 2**30:.0f} GiB of device memory, "
            f"{have / 2**30:.0f} GiB available; lower W/H/L, decode_chunk or batch_size"
        )


def attention_note(c: Mapping) -> str:
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


def video_prompts(c: Mapping) -> list:
    """One prompt per video of a validated config: its `prompt`s, or with `prompt_map` the travelling
    prompt `{frame: head, text, tail}` once per seed (what `generate` takes)."""
    if not c["prompt_map"]:
        return list(c["prompt"])
    join = lambda text: ", ".join(p for p in (c["head_prompt"], text, c["tail_prompt"]) if p)  # noqa: E731
    travel = {int(k): join(v) for k, v in c["prompt_map"].items()}
    return [travel] * len(c["seed"])


# ----------------------------------------------------------------------------------------------
# validate: every check before loading anything.
# ----------------------------------------------------------------------------------------------


def validate(config: Any, files: bool = True) -> dict:
    """The config (a ConfigDict or a dict of some fields) checked field by field before anything
    loads: names, types, ranges, files, scheduler, windows, formats, memory. Returns it as plain
    dicts with `prompt`, `n_prompt` and `seed` one per prompt (random seeds drawn) and
    `output.formats` a list. `files=False` leaves out the files and this host's memory (`compile`
    builds the program for another machine from the config alone; a base model that is not here is SD1.5)."""
    from animatediff_jax import schedulers as S
    from animatediff_jax.sampling.generate import (
        INTERPOLATIONS,
        check_windows,
        check_free_init,
        check_video_options,
        keyframes,
        per_prompt,
    )

    schema = plain(base_config())
    c = plain(config)
    if not isinstance(c, Mapping):
        raise ConfigError(f"config: expected a mapping of fields, got {type(c).__name__}")
    _check_fields(c, schema)
    for group in GROUPS:
        if not isinstance(c.get(group, {}), Mapping):
            raise ConfigError(f"{group}={c[group]!r}: expected a group of fields ({', '.join(schema[group])})")
    c = {**schema, **c, **{g: {**schema[g], **c.get(g, {})} for g in GROUPS}}

    prompts = c["prompt"]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompt={prompts!r}: expected a tuple of strings")
    if not isinstance(c["prompt_map"], Mapping):
        raise ConfigError(f"prompt_map={c['prompt_map']!r}: expected a {{frame: prompt}} dict")
    for name in ("head_prompt", "tail_prompt"):
        if not isinstance(c[name], str):
            raise ConfigError(f"{name}={c[name]!r}: expected a string")
    if c["prompt_map"] and prompts:
        raise ConfigError("prompt and prompt_map: give one (prompt_map is one travelling prompt, a video per seed)")
    if not c["prompt_map"] and not prompts:
        raise ConfigError("prompt: required (a tuple of prompts, or prompt_map for prompt travel)")
    if c["prompt_interpolation"] not in INTERPOLATIONS:
        raise ConfigError(f"prompt_interpolation={c['prompt_interpolation']!r}: expected one of "
                          f"{', '.join(INTERPOLATIONS)}")
    n = len(prompts) if prompts else len(c["seed"]) if isinstance(c["seed"], (list, tuple)) else 1
    neg = [c["n_prompt"]] if isinstance(c["n_prompt"], str) else c["n_prompt"]
    if not isinstance(neg, (list, tuple)) or not all(isinstance(p, str) for p in neg):
        raise ConfigError(f"n_prompt={c['n_prompt']!r}: expected a tuple of strings")
    seeds = c["seed"]
    if not isinstance(seeds, (list, tuple)) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and -1 <= s < 2**64 for s in seeds
    ):
        raise ConfigError(f"seed={seeds!r}: expected a tuple of integers in [0, 2**64) or -1 (random)")
    try:
        neg, seeds = per_prompt("n_prompt", neg or [""], n), per_prompt("seed", seeds, n)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seeds = [secrets.randbits(63) if s == -1 else int(s) for s in seeds]

    if not isinstance(c["compilation_cache"], str):
        raise ConfigError(f"compilation_cache={c['compilation_cache']!r}: expected a folder, 'auto' or '' (off)")
    steps = _int("steps", c["steps"], 1)
    _number("guidance_scale", c["guidance_scale"])
    for name in ("W", "H", "L"):
        _int(name, c[name], 1)
    _int("clip_skip", c["clip_skip"], 0)
    _int("batch_size", c["batch_size"], 0)
    _int("decode_chunk", c["decode_chunk"], 1)
    if _int("devices", c["devices"], -1) == 0:
        raise ConfigError("devices=0: expected -1 (all) or a positive count")
    for name in ("lora_alpha", "adapter_lora_scale", "motion_scale"):
        _number(name, c[name])
    if not isinstance(c["motion_block_scales"], Mapping):
        raise ConfigError(f"motion_block_scales={c['motion_block_scales']!r}: expected a {{block: scale}} dict")
    for block, scale in c["motion_block_scales"].items():
        if not re.fullmatch(r"(down|up)_blocks_\d+|mid_block", str(block)):
            raise ConfigError(f"motion_block_scales: no block {block!r} (blocks: down_blocks_i, mid_block, up_blocks_i)")
        _number(f"motion_block_scales.{block}", scale)
    stretch = c["pe_stretch"]
    if not isinstance(stretch, (list, tuple)) or len(stretch) not in (0, 2) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in stretch):
        raise ConfigError(f"pe_stretch={stretch!r}: expected () (off) or (n, m): the first n positions over m frames")
    if c["prompt_map"]:
        try:
            keyframes(video_prompts(c)[0], int(c["L"]), "prompt_map")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not isinstance(c["free_init"], Mapping):
        raise ConfigError(f"free_init={c['free_init']!r}: expected a dict of FreeInit options ({{}}: off)")

    for name in ("length", "overlap"):
        _int(f"context_windows.{name}", c["context_windows"][name], 0)
    if c["dtype"] not in DTYPES:
        raise ConfigError(f"dtype={c['dtype']!r}: expected one of {', '.join(DTYPES)}")
    attention_note(c)
    if not isinstance(c["allow_nonfinite"], bool):
        raise ConfigError(f"allow_nonfinite={c['allow_nonfinite']!r}: expected True or False")
    if not isinstance(c["scheduler_options"], Mapping):
        raise ConfigError(f"scheduler_options={c['scheduler_options']!r}: expected a dict")
    try:  # generate's own checks of what a config also has
        sched = S.make_scheduler(c["scheduler"], steps, **c["scheduler_options"])
        check_windows(c["context_windows"])
        fi = check_free_init(dict(c["free_init"]) or None, sched)
        if c["init_video"]:
            check_video_options(c["strength"], sched, fi)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if files:
        _check_memory(c, n)
    _existing = functools.partial(_existing_path, files=files)

    base = _existing("base_model", c["base_model"], required=True)
    m = size_multiple(base) if files or fs.exists(base) else 64
    for name in ("W", "H"):
        if c[name] % m:
            raise ConfigError(f"{name}={c[name]} must be a multiple of {m} for this base model "
                              "(VAE factor x UNet downsampling)")
    for name in ("tokenizer", "dreambooth_path", "lora_model_path", "motion_module", "adapter_lora_path", "init_video",
                 "safety_checker"):
        _existing(name, c[name])
    _existing("evaluate.clip", c["evaluate"]["clip"])
    if not isinstance(c["evaluate"]["reference"], bool):
        raise ConfigError(f"evaluate.reference={c['evaluate']['reference']!r}: expected True or False")
    if c["evaluate"]["reference"] and not c["evaluate"]["clip"]:
        raise ConfigError("evaluate.reference: needs evaluate.clip (the CLIP model that measures domain similarity)")
    loras = c["motion_module_lora_configs"]
    if not isinstance(loras, (list, tuple)):
        raise ConfigError(f"motion_module_lora_configs={loras!r}: expected a tuple of {{path, alpha}}")
    for i, entry in enumerate(loras):
        if not isinstance(entry, Mapping) or set(entry) - {"path", "alpha"} or "path" not in entry:
            raise ConfigError(f"motion_module_lora_configs[{i}]={entry!r}: expected {{'path': ..., 'alpha': ...}}")
        _existing(f"motion_module_lora_configs[{i}].path", entry["path"], required=True)
        _number(f"motion_module_lora_configs[{i}].alpha", entry.get("alpha", 1.0))

    _check_controls(c, files)

    out = c["output"]
    formats = [out["formats"]] if isinstance(out["formats"], str) else list(out["formats"])
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise ConfigError(f"output.formats={out['formats']!r}: expected some of {', '.join(FORMATS)}")
    if not isinstance(out["fps"], (int, float)) or out["fps"] <= 0:
        raise ConfigError(f"output.fps={out['fps']!r}: expected a positive number")
    if not isinstance(out["dir"], str) or not out["dir"]:
        raise ConfigError(f"output.dir={out['dir']!r}: expected a folder")
    return dict(c, prompt=list(prompts), n_prompt=neg, seed=seeds, motion_module_lora_configs=[dict(e) for e in loras],
                output=dict(out, formats=formats))


_CONTROL_FIELDS = {"controlnet": ("path", "video", "images", "scale", "start", "end"),
                   "sparsectrl": ("path", "images", "frame_indices", "scale", "start", "end")}


def _check_controls(c: dict, files: bool = True) -> None:
    """`controlnet` entries and `sparsectrl`: their fields, files and numbers (counts and indices against
    the video are the sampler's check, `sampling.control.check_controls`, once the images are read)."""
    nets = c["controlnet"]
    if not isinstance(nets, (list, tuple)):
        raise ConfigError(f"controlnet={nets!r}: expected a tuple of {{path, video | images, scale, start, end}}")
    entries = [(f"controlnet[{i}]", e, "controlnet") for i, e in enumerate(nets)]
    if not isinstance(c["sparsectrl"], Mapping):
        raise ConfigError(f"sparsectrl={c['sparsectrl']!r}: expected a dict {{path, images, frame_indices, scale}}")
    if c["sparsectrl"]:
        entries.append(("sparsectrl", c["sparsectrl"], "sparsectrl"))
    _existing = functools.partial(_existing_path, files=files)
    for name, e, kind in entries:
        fields = _CONTROL_FIELDS[kind]
        if not isinstance(e, Mapping) or set(e) - set(fields):
            raise ConfigError(f"{name}={e!r}: expected a dict of {', '.join(fields)}")
        _existing(f"{name}.path", e.get("path", ""), required=True)
        sources = [k for k in ("video", "images") if e.get(k)]
        if len(sources) != 1:
            raise ConfigError(f"{name}: give {'video or images' if kind == 'controlnet' else 'images'} "
                              "(the condition), exactly one")
        if e.get("video"):
            _existing(f"{name}.video", e["video"], required=True)
        images = e.get("images") or ()
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, (list, tuple)):
            raise ConfigError(f"{name}.images={images!r}: expected a tuple of image files")
        for j, path in enumerate(images):
            _existing(f"{name}.images[{j}]", path, required=True)
        if kind == "sparsectrl":
            idx = e.get("frame_indices", ())
            if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise ConfigError(f"{name}.frame_indices={idx!r}: expected a tuple of frame numbers")
            if len(idx) != len(images):
                raise ConfigError(f"{name}: {len(images)} image(s) but {len(idx)} frame_indices: give one index per image")
            bad = [i for i in idx if not -c["L"] <= i < c["L"]]
            if bad:
                raise ConfigError(f"{name}.frame_indices {bad} outside the video (frames 0..{c['L'] - 1}, "
                                  "or negative from the end)")
        for k, default in (("scale", 1.0), ("start", 0.0), ("end", 1.0)):
            _number(f"{name}.{k}", e.get(k, default))
        if not 0.0 <= e.get("start", 0.0) < e.get("end", 1.0) <= 1.0:
            raise ConfigError(f"{name}: start={e.get('start', 0.0)}, end={e.get('end', 1.0)}: expected "
                              "0 <= start < end <= 1")


def output_folder(folder: str) -> str:
    """The folder this run writes, checked before anything loads: never a file, never an unwritable
    place, and never an existing non-empty folder (old videos beside a new config.yaml): then the first
    free `<folder>-2`, `-3`, ... is used, and said. A bucket folder (gs://...) is checked by writing
    and removing a probe object."""
    if fs.is_remote(folder):
        return _bucket_output_folder(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"output.dir={folder!r}: is a file, not a folder")
    chosen, i = folder, 1
    while os.path.isdir(chosen) and os.listdir(chosen):
        i += 1
        chosen = f"{folder.rstrip(os.sep)}-{i}"
    if chosen != folder:
        print(f"output.dir {folder} is not empty: writing {chosen} instead", file=sys.stderr, flush=True)
    parent = os.path.abspath(chosen)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir={folder!r}: cannot be created ({parent} is not a writable folder)")
    return chosen


def _bucket_output_folder(folder: str) -> str:
    import uuid

    folder = folder.rstrip("/")
    if fs.isfile(folder):
        raise ConfigError(f"output.dir={folder!r}: is a file, not a folder")
    chosen, i = folder, 1
    while fs.isdir(chosen) and fs.listdir(chosen):
        i += 1
        chosen = f"{folder}-{i}"
    if chosen != folder:
        print(f"output.dir {folder} is not empty: writing {chosen} instead", file=sys.stderr, flush=True)
    probe = f"{chosen}/.write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.write_bytes(probe, b"")
        fs.remove(probe)
    except Exception as e:  # no credentials, no such bucket, no permission
        raise ConfigError(f"output.dir={folder!r}: cannot be written ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    return chosen
