"""A sample config, made into what the sampler takes: the only module that reads config fields.

`validate(config)` checks the config before anything loads (its fields and files, and every
sampling setting by building the `Request`: one check each, in `options`, its errors renamed to the
config's fields); `request(c, ...)` is the `Request` a validated config describes; `load_pipeline(c)`
merges the models it names; `read_conditions` / `load_controls` its control images and models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from animatediff_jax import dtypes
from animatediff_jax.checkpoints.motion import motion_version_of
from animatediff_jax.checkpoints.sd15 import sd15_size_multiple
from animatediff_jax.errors import ConfigError, FieldError
from animatediff_jax.io import fs
from animatediff_jax.models import quantize
from animatediff_jax.models.config import MotionConfig, size_multiple
from animatediff_jax.sampling.config import FORMATS, GROUPS, base_config, check_fields, plain
from animatediff_jax.sampling.options import (
    Control,
    IPAdapter,
    Request,
    check_size,
    integer,
    keyframes,
    number,
    per_prompt,
)
from animatediff_jax.sampling.pipeline import AnimationPipeline

# A Request's setting -> the sample config field that sets it (where the names differ).
CONFIG_NAMES = {"prompts": "prompt", "negative_prompts": "n_prompt", "seeds": "seed", "num_frames": "L",
                "height": "H", "width": "W"}

# Videos per device in one compiled call when `batch_size` is 0: what fits a 16 GB TPU v5e at 16x512², 25
# steps, CFG, bf16 (`animatediff-jax compile sample --topology v5e-1`: 9.2 GiB for 4; BENCHMARKS.md).
VIDEOS_PER_DEVICE = 4

# Measured with bench/memory_bench.py (BENCHMARKS.md), bf16, SD1.5 + v2 at 512x512: one CFG UNet
# call holds ~7.9 GiB of temporaries for 2 x 16 frames (blockwise attention), the VAE decode ~0.8 GiB
# per frame of a chunk; both scale about linearly with the pixels. An order-of-magnitude guard.
_UNET_BYTES_PER_FRAME_512 = 0.25 * 2**30
_VAE_BYTES_PER_FRAME_512 = 0.8 * 2**30


@contextlib.contextmanager
def config_names(c: Mapping) -> Iterator[None]:
    """A `FieldError` raised inside, renamed to the config's field (`num_frames` -> `L`) as a `ConfigError`."""
    try:
        yield
    except FieldError as e:
        if c.get("prompt_map") and e.field.startswith("prompts"):
            raise ConfigError(f"prompt_map{e.problem}") from None
        raise ConfigError(str(e.renamed(CONFIG_NAMES))) from None


def video_prompts(c: Mapping) -> list:
    """One prompt per video of a validated config: its `prompt`s, or with `prompt_map` the travelling
    prompt `{frame: head, text, tail}` once per seed (what `generate` takes)."""
    if not c["prompt_map"]:
        return list(c["prompt"])
    join = lambda text: ", ".join(p for p in (c["head_prompt"], text, c["tail_prompt"]) if p)  # noqa: E731
    travel = {int(k): join(v) for k, v in c["prompt_map"].items()}
    return [travel] * len(c["seed"])


def videos_per_call(batch_size: int, videos: int, devices: int) -> int:
    """Videos in one compiled call: `batch_size`, or (0) as many of `videos` as fit, up to
    `VIDEOS_PER_DEVICE` per device, a multiple of the devices (fewer videos pad no more than that)."""
    if batch_size:
        return int(batch_size)
    per_device = min(VIDEOS_PER_DEVICE, -(-int(videos) // int(devices)))
    return max(1, per_device) * int(devices)


def control_entries(c: Mapping) -> list[tuple[str, dict]]:
    """`(name, entry)` of every control a validated config names: its ControlNets, then SparseCtrl."""
    out = [(f"controlnet[{i}]", dict(e)) for i, e in enumerate(c["controlnet"])]
    return out + ([("sparsectrl", dict(c["sparsectrl"]))] if c["sparsectrl"] else [])


def _blank(shape: tuple[int, ...]) -> np.ndarray:
    """Images of `shape` that take no memory: what a check sees before the files are read."""
    return np.broadcast_to(np.zeros((), np.uint8), shape)


def request(c: Mapping, video: np.ndarray | None = None, images: Sequence[np.ndarray] | None = None,
            models: Sequence[tuple[Any, Any]] | None = None, ip_images: Sequence[Sequence[np.ndarray]] | None = None,
            ip_models: Sequence[tuple[Any, Any, Any]] | None = None) -> Request:
    """The `Request` of a validated config `c`, for all its videos. `video` (`[1, F, H, W, 3]`) and the
    control `images` (one array per `control_entries`) once read, `models` (`(config, params)` each) once
    loaded; before that, blanks of the sizes the config says stand in (so every check runs early). The same
    for the IP-Adapters: `ip_images` (per entry its images, `read_ip_images`), `ip_models` (`(config, params,
    encoder)` per entry, `load_ip_adapters`)."""
    controls = []
    for j, (name, e) in enumerate(control_entries(c)):
        sparse = name == "sparsectrl"
        paths = [e["images"]] if isinstance(e.get("images"), str) else list(e.get("images") or ())
        count = len(paths) if paths else c["L"]  # (a video gives L frames)
        imgs = images[j] if images is not None else _blank((count, c["H"], c["W"], 3))
        cfg, params = models[j] if models is not None else (None, None)
        idx = e.get("frame_indices", ())
        if sparse and not isinstance(idx, (list, tuple)):
            raise ConfigError(f"{name}.frame_indices={idx!r}: expected a tuple of frame numbers")
        controls.append(Control(cfg, params, imgs, tuple(idx) if sparse else None,
                                e.get("scale", 1.0), e.get("start", 0.0), e.get("end", 1.0), name))
    if video is None and c["init_video"]:
        video = _blank((1, c["L"], c["H"], c["W"], 3))
    with config_names(c):
        ip_adapters = _ip_adapters(c, ip_images, ip_models)
        return Request.create(
            video_prompts(c), c["n_prompt"], c["seed"], num_frames=c["L"], height=c["H"], width=c["W"],
            steps=c["steps"], guidance_scale=c["guidance_scale"], scheduler=c["scheduler"],
            scheduler_options=c["scheduler_options"], clip_skip=c["clip_skip"], decode_chunk=c["decode_chunk"],
            context_windows=c["context_windows"], prompt_interpolation=c["prompt_interpolation"],
            free_init=c["free_init"], init_video=video, strength=c["strength"], motion_scale=c["motion_scale"],
            motion_block_scales=c["motion_block_scales"], pe_stretch=c["pe_stretch"], controls=controls,
            prompt_syntax=c["prompt_syntax"], ip_adapters=ip_adapters,
            original_size=_size(c["original_size"]), crops_coords_top_left=tuple(c["crops_coords_top_left"]),
            target_size=_size(c["target_size"]))


def _size(value: Any) -> tuple | None:
    """An SDXL size field: () is None (the video's own), else the pair as given (checked by `Request`)."""
    return (tuple(value) or None) if isinstance(value, (list, tuple)) else value


def _ip_adapters(c: Mapping, images: Sequence[Sequence[np.ndarray]] | None,
                 models: Sequence[tuple[Any, Any, Any]] | None) -> list[IPAdapter]:
    """The config's `ip_adapter` entries as `IPAdapter`s (blank 1x1 images before the files are read); an image
    map's keys (image travel) are checked as prompt travel's keyframes are, named `ip_adapter[i].image`."""
    out = []
    for j, (name, e) in enumerate(ip_entries(c)):
        paths, frames = _ip_images(e["image"], name)
        if frames is not None:
            if 0 not in frames:
                raise ConfigError(f"{name}.image: no image at frame 0 (keyframes {frames}): image travel starts "
                                  "from one")
            frames = tuple(f for f, _ in keyframes(e["image"], integer("num_frames", c["L"], 1), f"{name}.image"))
        imgs = tuple(images[j]) if images is not None else (_blank((1, 1, 3)),) * len(paths)
        cfg, params, encoder = models[j] if models is not None else (None, None, None)
        out.append(IPAdapter(cfg, params, imgs, frames, scale=e.get("scale", 1.0),
                             interpolation=e.get("interpolation", "linear"), encoder=encoder, name=name))
    return out


# ----------------------------------------------------------------------------------------------
# validate: every check before loading anything.
# ----------------------------------------------------------------------------------------------


class _Paths:
    """The files a config names, gathered field by field and checked together: every missing one is
    listed in one message (not one download at a time)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def add(self, name: str, path: Any, required: bool = False) -> str:
        if not isinstance(path, str):
            raise ConfigError(f"{name}={path!r}: expected a path")
        if not path and required:
            raise ConfigError(f"{name}: required")
        if path:
            self.entries.append((name, path))
        return path

    def check(self, extra: Sequence[str] = ()) -> None:
        """Raises one `ConfigError` naming every field whose file is not there (and `extra` problems)."""
        missing = [f"{name}: {path}" for name, path in self.entries if not fs.exists(path)] + list(extra)
        if len(missing) == 1:
            raise ConfigError(missing[0] if extra else f"{missing[0]}: no such file or folder")
        if missing:
            raise ConfigError(f"{len(missing)} files the config names are not there: {'; '.join(missing)}")


def _tokenizer_problem(c: Mapping) -> list[str]:
    """The tokenizer a run would use is not there: `tokenizer`, or the personalised model's or the base
    model's `tokenizer/` folder (a single-file model has none)."""
    if c["tokenizer"]:
        return []
    folders = [p for p in (c["dreambooth_path"], c["base_model"]) if p and fs.isdir(p)]
    if any(fs.isdir(os.path.join(p, "tokenizer")) for p in folders) or not fs.exists(c["base_model"]):
        return []
    return [f"tokenizer: {c['base_model']} has no tokenizer/ folder; set tokenizer to a CLIP tokenizer folder"]


def _available_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(c: Mapping, req: Request) -> None:
    """Refuses sizes whose activations cannot fit one device (e.g. W=H=100000), before anything loads."""
    scale = req.width * req.height / 512**2 * (2 if c["dtype"] == "float32" else 1)
    videos = int(c["batch_size"]) or min(VIDEOS_PER_DEVICE, len(req.prompts))  # (per device)
    frames = req.num_frames
    if req.windows is not None and req.windows.scope == "unet":
        frames = min(frames, req.windows.length)  # (scope "motion": the UNet sees every frame)
    frames = -(-frames // int(c["context_parallel"]))  # (each device holds its share of a video's frames)
    need = scale * (_UNET_BYTES_PER_FRAME_512 * 2 * videos * frames + _VAE_BYTES_PER_FRAME_512 * req.decode_chunk)
    have = _available_bytes()
    if have is not None and need > have:
        raise ConfigError(
            f"W={c['W']}, H={c['H']}, L={c['L']}: needs about {need / 2**30:.0f} GiB of device memory, "
            f"{have / 2**30:.0f} GiB available; lower W/H/L, decode_chunk or batch_size, or spread each video "
            "over devices (context_parallel)"
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


def _prompts(c: dict) -> tuple[list, list, list]:
    """`prompt`, `n_prompt`, `seed` as one per video (a string is one prompt; -1 seeds drawn)."""
    prompts = [c["prompt"]] if isinstance(c["prompt"], str) else c["prompt"]
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
    n = len(prompts) if prompts else len(c["seed"]) if isinstance(c["seed"], (list, tuple)) else 1
    neg = [c["n_prompt"]] if isinstance(c["n_prompt"], str) else c["n_prompt"]
    if not isinstance(neg, (list, tuple)):
        raise ConfigError(f"n_prompt={c['n_prompt']!r}: expected a tuple of strings")
    seeds = c["seed"]
    if not isinstance(seeds, (list, tuple)):
        raise ConfigError(f"seed={seeds!r}: expected a tuple of integers in [0, 2**64) or -1 (random)")
    with config_names(c):  # (one for all prompts, or one each; -1 seeds drawn per prompt, saved resolved)
        neg, seeds = per_prompt("negative_prompts", list(neg) or [""], n), per_prompt("seeds", seeds, n)
    return list(prompts), list(neg), [secrets.randbits(63) if s == -1 else s for s in seeds]


def validate(config: Any, files: bool = True) -> dict:
    """The config (a ConfigDict or a dict of some fields) checked before anything loads: field names
    and types, files, formats, output, memory, and every sampling setting (`request`). Returns it as
    plain dicts with `prompt`, `n_prompt` and `seed` one per prompt (random seeds drawn), `dtype` by its
    full name and `output.formats` a list. `files=False` leaves out the files and this host's memory
    (`compile` builds the program for another machine from the config alone)."""
    schema = plain(base_config())
    c = plain(config)
    if not isinstance(c, Mapping):
        raise ConfigError(f"config: expected a mapping of fields, got {type(c).__name__}")
    check_fields(c, schema)
    for group in GROUPS:
        if not isinstance(c.get(group, {}), Mapping):
            raise ConfigError(f"{group}={c[group]!r}: expected a group of fields ({', '.join(schema[group])})")
    c = {**schema, **c, **{g: {**schema[g], **c.get(g, {})} for g in GROUPS}}
    prompts, neg, seeds = _prompts(c)
    c.update(prompt=prompts, n_prompt=neg, seed=seeds)
    with config_names(c):
        c["dtype"] = dtypes.canonical(c["dtype"])
        integer("batch_size", c["batch_size"], 0)
        if integer("devices", c["devices"], -1) == 0:
            raise ConfigError("devices=0: expected -1 (all) or a positive count")
        integer("context_parallel", c["context_parallel"], 1)
        quantize.check_mode(c["quantize"])
        for name in ("lora_alpha", "adapter_lora_scale"):
            number(name, c[name])
    if not isinstance(c["compilation_cache"], str):
        raise ConfigError(f"compilation_cache={c['compilation_cache']!r}: expected a folder, 'auto' or '' (off)")
    for name in ("free_init", "motion_block_scales"):
        if not isinstance(c[name], Mapping):
            raise ConfigError(f"{name}={c[name]!r}: expected a dict ({{}}: off)")
    if not isinstance(c["allow_nonfinite"], bool):
        raise ConfigError(f"allow_nonfinite={c['allow_nonfinite']!r}: expected True or False")
    _check_files(c, files)
    req = request(c)  # every sampling setting, checked once (options)
    attention_note(c)
    if files:
        _check_memory(c, req)
    base = c["base_model"]  # the size rule of the base model the config names (if it is not here: SDXL's for an
    with _blame("base_model"):  # SDXL motion module's file name, else SD1.5's)
        if files or fs.exists(base):
            multiple = sd15_size_multiple(base)
        else:
            guessed = MotionConfig.for_version(motion_version_of(c["motion_module"] or ""))
            multiple = size_multiple(3 if guessed.family == "sdxl" else 4)
    with config_names(c):
        check_size(req.height, req.width, multiple)
    out = c["output"]
    formats = [out["formats"]] if isinstance(out["formats"], str) else list(out["formats"])
    if not formats or [f for f in formats if f not in FORMATS]:
        raise ConfigError(f"output.formats={out['formats']!r}: expected some of {', '.join(FORMATS)}")
    if not isinstance(out["fps"], (int, float)) or out["fps"] <= 0:
        raise ConfigError(f"output.fps={out['fps']!r}: expected a positive number")
    if not isinstance(out["dir"], str) or not out["dir"]:
        raise ConfigError(f"output.dir={out['dir']!r}: expected a folder")
    return dict(c, motion_module_lora_configs=[dict(e) for e in c["motion_module_lora_configs"]],
                output=dict(out, formats=formats))


def _check_files(c: dict, files: bool) -> None:
    """The files a config names (all there, when `files`), the base model's size rule, the LoRA entries,
    the evaluation fields."""
    paths = _Paths()
    paths.add("base_model", c["base_model"], required=True)
    for name in ("tokenizer", "dreambooth_path", "lora_model_path", "motion_module", "adapter_lora_path", "init_video",
                 "safety_checker"):
        paths.add(name, c[name])
    paths.add("evaluate.clip", c["evaluate"]["clip"])
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
        paths.add(f"motion_module_lora_configs[{i}].path", entry["path"], required=True)
        with config_names(c):
            number(f"motion_module_lora_configs[{i}].alpha", entry.get("alpha", 1.0))
    _check_controls(c, paths)
    _check_ip_adapters(c, paths)
    for i, (path, _) in enumerate(embedding_entries(c)):
        paths.add(f"embeddings[{i}]", path, required=True)
    if files:
        paths.check(_tokenizer_problem(c))


_CONTROL_FIELDS = {"controlnet": ("path", "video", "images", "scale", "start", "end"),
                   "sparsectrl": ("path", "images", "frame_indices", "scale", "start", "end")}


def _check_controls(c: dict, paths: _Paths) -> None:
    """`controlnet` entries and `sparsectrl`: their fields, and their files into `paths` (counts, indices,
    scales and start/end are the `Control`'s own checks, run when `request` builds it)."""
    if not isinstance(c["controlnet"], (list, tuple)):
        raise ConfigError(f"controlnet={c['controlnet']!r}: expected a tuple of {{path, video | images, scale, ...}}")
    if not isinstance(c["sparsectrl"], Mapping):
        raise ConfigError(f"sparsectrl={c['sparsectrl']!r}: expected a dict {{path, images, frame_indices, scale}}")
    for name, e in [(f"controlnet[{i}]", e) for i, e in enumerate(c["controlnet"])] + (
            [("sparsectrl", c["sparsectrl"])] if c["sparsectrl"] else []):
        fields = _CONTROL_FIELDS[name.split("[")[0]]
        if not isinstance(e, Mapping) or set(e) - set(fields):
            raise ConfigError(f"{name}={e!r}: expected a dict of {', '.join(fields)}")
        paths.add(f"{name}.path", e.get("path", ""), required=True)
        if len([k for k in ("video", "images") if e.get(k)]) != 1:
            raise ConfigError(f"{name}: give {'video or images' if 'video' in fields else 'images'} (the condition), "
                              "exactly one")
        if e.get("video"):
            paths.add(f"{name}.video", e["video"], required=True)
        images = [e["images"]] if isinstance(e.get("images"), str) else e.get("images") or ()
        if not isinstance(images, (list, tuple)):
            raise ConfigError(f"{name}.images={images!r}: expected a tuple of image files")
        for j, path in enumerate(images):
            paths.add(f"{name}.images[{j}]", path, required=True)


# ----------------------------------------------------------------------------------------------
# Loading what a config names.
# ----------------------------------------------------------------------------------------------


def read_conditions(c: dict) -> list[np.ndarray]:
    """The condition images of a validated config's controls (`control_entries`), read and resized to
    W x H before any weights load: uint8 `[K, H, W, 3]` each. One that cannot be read is a `ConfigError`."""
    from animatediff_jax.io.video import VideoReadError, read_frames, read_image

    out = []
    for name, e in control_entries(c):
        try:
            if e.get("video"):
                out.append(read_frames(e["video"], c["L"], (c["H"], c["W"])))
            else:
                paths = [e["images"]] if isinstance(e["images"], str) else list(e["images"])
                fit = "crop" if name == "sparsectrl" else "stretch"  # (the original's keyframes; diffusers' images)
                out.append(np.stack([read_image(p, (c["H"], c["W"]), fit) for p in paths]))
        except (VideoReadError, ValueError) as err:
            raise ConfigError(f"{name}: {err}") from None
    return out


def load_controls(c: dict, unet_config: Any, dtype: Any) -> list[tuple[Any, Any]]:
    """`(config, params)` of each control model a validated config names (`checkpoints.controlnet`),
    checked to be of the kind its entry says, params cast to `dtype`."""
    from animatediff_jax.checkpoints.controlnet import load_controlnet
    from animatediff_jax.checkpoints.torch_io import CheckpointError
    from animatediff_jax.sampling.pipeline import cast_floating

    out = []
    for name, e in control_entries(c):
        try:
            config, params = load_controlnet(e["path"], base=unet_config)
        except (CheckpointError, ValueError, OSError) as err:
            raise ConfigError(f"{name}.path: {' '.join(str(err).split())}") from err
        if config.sparse != (name == "sparsectrl"):
            what = "a SparseCtrl model" if config.sparse else "a ControlNet"
            raise ConfigError(f"{name}.path: {e['path']} is {what}; put it under "
                              f"{'sparsectrl' if config.sparse else 'controlnet'}")
        out.append((config, cast_floating(params, dtype)))
    return out


# ----------------------------------------------------------------------------------------------
# IP-Adapter entries.
# ----------------------------------------------------------------------------------------------

_IP_FIELDS = ("path", "image", "scale", "encoder", "interpolation")


def ip_entries(c: Mapping) -> list[tuple[str, dict]]:
    """`(name, entry)` of every `ip_adapter` entry of a validated config (`ip_adapter[i]`)."""
    return [(f"ip_adapter[{i}]", dict(e)) for i, e in enumerate(c["ip_adapter"])]


def ip_encoder_path(entry: Mapping) -> str:
    """The image encoder folder of an `ip_adapter` entry: its `encoder`, or `image_encoder/` beside the
    adapter file (h94/IP-Adapter's `models/` layout)."""
    return entry.get("encoder") or os.path.join(os.path.dirname(entry["path"]), "image_encoder")


def _ip_images(image: Any, name: str) -> tuple[list[str], list[int] | None]:
    """An entry's image paths (a map: in frame order) and, for a `{frame: image}` map, their frames."""
    if isinstance(image, str) and image:
        return [image], None
    if isinstance(image, (list, tuple)) and image and all(isinstance(p, str) and p for p in image):
        return list(image), None
    if isinstance(image, Mapping) and image:
        items = []
        for k, v in image.items():
            frame = isinstance(k, (int, np.integer)) or (isinstance(k, str) and k.strip().isdigit())
            if isinstance(k, bool) or not frame:
                raise ConfigError(f"{name}.image: key {k!r} is not a frame number")
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{name}.image[{k}]={v!r}: expected an image file")
            items.append((int(k), v))
        items.sort()
        return [p for _, p in items], [f for f, _ in items]
    raise ConfigError(f"{name}.image={image!r}: expected an image file, a tuple of them, or a {{frame: image}} map "
                      "(image travel)")


def _check_ip_adapters(c: dict, paths: _Paths) -> None:
    """`ip_adapter` entries: their fields, and their files into `paths` (the adapter, its encoder folder, the
    images); scale, interpolation and the image map's frames are the `IPAdapter`'s own checks (`request`)."""
    entries = c["ip_adapter"]
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"ip_adapter={entries!r}: expected a tuple of {{path, image, scale, encoder}}")
    for i, e in enumerate(entries):
        name = f"ip_adapter[{i}]"
        if not isinstance(e, Mapping) or set(e) - set(_IP_FIELDS):
            raise ConfigError(f"{name}={e!r}: expected a dict of {', '.join(_IP_FIELDS)}")
        paths.add(f"{name}.path", e.get("path", ""), required=True)
        if "image" not in e:
            raise ConfigError(f"{name}.image: required (an image file, a tuple of them, or a {{frame: image}} map)")
        for j, p in enumerate(_ip_images(e["image"], name)[0]):
            paths.add(f"{name}.image[{j}]", p, required=True)
        if not isinstance(e.get("encoder", ""), str):
            raise ConfigError(f"{name}.encoder={e['encoder']!r}: expected a folder ('': image_encoder/ beside "
                              "the file)")
        paths.add(f"{name}.encoder", ip_encoder_path(e), required=True)


def read_ip_images(c: dict) -> list[list[np.ndarray]]:
    """The images of a validated config's IP-Adapters (`ip_entries`), read at their own size (the encoder's
    processor resizes and crops them), before any weights load; uint8 `[H, W, 3]` each."""
    from animatediff_jax.io.video import VideoReadError, read_image

    out = []
    for name, e in ip_entries(c):
        try:
            out.append([read_image(p) for p in _ip_images(e["image"], name)[0]])
        except (VideoReadError, ValueError) as err:
            raise ConfigError(f"{name}.image: {err}") from None
    return out


def load_ip_adapters(c: dict, unet_config: Any, dtype: Any) -> list[tuple[Any, Any, Any]]:
    """`(config, params, encoder)` of each IP-Adapter a validated config names (`checkpoints.ip_adapter`, and its
    CLIP image encoder, `checkpoints.clip.load_clip`, loaded once per folder), params cast to `dtype`."""
    from animatediff_jax.checkpoints.clip import load_clip
    from animatediff_jax.checkpoints.ip_adapter import load_ip_adapter
    from animatediff_jax.sampling.pipeline import cast_floating

    encoders: dict[str, Any] = {}
    out = []
    for name, e in ip_entries(c):
        with _blame(f"{name}.path"):
            config, params = load_ip_adapter(e["path"], unet_config)
        folder = ip_encoder_path(e)
        if folder not in encoders:
            with _blame(f"{name}.encoder"):
                clip = load_clip(folder, require="vision")
            encoders[folder] = dataclasses.replace(clip, params={"vision": cast_floating(clip.params["vision"], dtype)})
        out.append((config, cast_floating(params, dtype), encoders[folder]))
    return out


@contextlib.contextmanager
def _blame(field: str) -> Iterator[None]:
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

    As the original's `load_weights`: the base (SD1.5 or SDXL, `checkpoints.family.base_family`); the
    personalised model over it (parts it lacks come from the base); the motion module (or the base's
    own); the personalised LoRA at `lora_alpha` (UNet and text encoders); the domain adapter at
    `adapter_lora_scale`; each MotionLoRA at its alpha. Merging is `lora.merge` in float32, before the
    cast to `dtype`. A file that fails is a `ConfigError` naming its field.
    """
    from animatediff_jax.checkpoints.load import load_lora, load_motion
    from animatediff_jax.checkpoints.motion import merge_motion
    from animatediff_jax.checkpoints.sdxl import load_base
    from animatediff_jax.lora import merge, merge_many
    from animatediff_jax.models.shapes import motion_subtree
    from animatediff_jax.text import Tokenizer

    c = plain(config)
    with _blame("base_model"):
        base = load_base(c["base_model"])
    model = base
    if c["dreambooth_path"]:
        spatial_base = dataclasses.replace(base, unet_config=base.unet_config.replace(motion=None))
        with _blame("dreambooth_path"):
            model = load_base(c["dreambooth_path"], base=spatial_base, unet_config=spatial_base.unet_config)
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
    text = {k: v for k, v in model.params.items() if k.startswith("text_encoder")}  # (SDXL: text_encoder_2 too)

    if c["lora_model_path"]:
        with _blame("lora_model_path"):
            personal = load_lora(c["lora_model_path"], "lora", base=unet_config, text_config=model.text_config,
                                 text_config_2=getattr(model, "text_config_2", None))
        if personal.unet:
            unet = merge(unet, personal.unet, c["lora_alpha"])
        for name, layers in (("text_encoder", personal.text_encoder), ("text_encoder_2", personal.text_encoder_2)):
            if layers:
                text[name] = merge(text[name], layers, c["lora_alpha"])
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
        raise ConfigError(f"tokenizer: {c['base_model']} has no tokenizer/ folder; set tokenizer to a CLIP tokenizer "
                          "folder")
    merged = dataclasses.replace(model, unet_config=unet_config, params=dict(model.params, unet=unet, **text),
                                 tokenizer_path=tok_path)
    if getattr(merged, "text_config_2", None) is not None and not merged.tokenizer_2_path:
        merged = dataclasses.replace(merged, tokenizer_2_path=base.tokenizer_2_path)
    pipe = AnimationPipeline.from_base(merged, Tokenizer(tok_path), dtype=dtypes.to_jnp(c["dtype"]),
                                       attention=c["attention"], quantize=c["quantize"])
    return _with_embeddings(pipe, c)


def embedding_entries(c: Mapping) -> list[tuple[str, str | None]]:
    """`(path, token or None)` of each `embeddings` entry of a config (a path, or `{path, token}`)."""
    entries = c["embeddings"]
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"embeddings={entries!r}: expected a tuple of embedding files or folders")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            out.append((e, None))
        elif (isinstance(e, Mapping) and "path" in e and not set(e) - {"path", "token"}
              and isinstance(e["path"], str) and isinstance(e.get("token") or "", str)):
            out.append((e["path"], e.get("token") or None))
        else:
            raise ConfigError(f"embeddings[{i}]={e!r}: expected a file or folder, or {{'path': ..., 'token': ...}}")
    return out


def _with_embeddings(pipe: AnimationPipeline, c: Mapping) -> AnimationPipeline:
    """The pipeline with the config's textual-inversion `embeddings` added (a file that fails: its entry named)."""
    from animatediff_jax.checkpoints.embeddings import load_embeddings

    entries = embedding_entries(c)
    if not entries:
        return pipe
    loaded = []
    for i, (path, token) in enumerate(entries):
        with _blame(f"embeddings[{i}]"):
            loaded += load_embeddings([path if token is None else {"path": path, "token": token}])
    with _blame("embeddings"):
        return pipe.with_embeddings(loaded)
