"""A sample config's fields: `base_config()` (every field, its default, what it means), plain values
and YAML (`to_yaml`, `from_yaml` for replays), and the check of field names. What the fields mean
to the sampler, and their checks, are `assemble`'s (which builds the `Request`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from animatediff_jax.errors import ConfigError
from animatediff_jax.io import fs

FORMATS = ("gif", "mp4", "png")
GROUPS = ("output", "context_windows", "evaluate")  # fixed groups of fields
_OPEN = ("scheduler_options", "prompt_map", "motion_block_scales", "free_init", "sparsectrl")  # free-form: any key may be set


def base_config() -> ConfigDict:
    """Every field of a sample config with its default (the original AnimateDiff's names).

    `configs/sample/*.py` start from this and set what differs. Type-safe: a tuple field takes
    tuples (`--config.seed=42` is `(42,)`), a number field numbers.
    """
    c = ConfigDict()
    for group in (_models, _prompts, _sampler, _steering, _outputs):
        group(c)
    return c


def _models(c: ConfigDict) -> None:
    """The files: base, personalised model, motion module, LoRAs, adapter."""
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
    # Textual-inversion embeddings: files (AUTOMATIC1111 .pt / .safetensors, diffusers learned_embeds.bin /
    # .safetensors) or folders of them, e.g. ("embeddings/",). Each trigger word (the file name without its
    # extension; diffusers' learned_embeds.*: the token it holds; or {"path": ..., "token": ...}) stands for the
    # embedding's vectors in every prompt and negative prompt. () = none.
    c.embeddings = ()


def _prompts(c: ConfigDict) -> None:
    """Seeds, steps, guidance, prompts and prompt travel."""
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
    # How prompts are read: "a1111" (AUTOMATIC1111's web UI: (word) x1.1, ((word)) x1.21, [word] /1.1, (word:1.3),
    # \( for a literal bracket, BREAK starts a new chunk; any length, in chunks of 75 tokens) | "plain" (diffusers':
    # the text as is, cut at 77 tokens). A plain prompt of up to 75 tokens gives the same embeddings either way.
    c.prompt_syntax = "a1111"


def _sampler(c: ConfigDict) -> None:
    """Size, scheduler, precision, attention."""
    c.W = 512
    c.H = 512
    c.L = 16  # frames
    c.scheduler = "ddim"  # ddim | euler | euler_ancestral | dpmpp_2m | pndm | lcm
    # diffusers config names, e.g. {"use_karras_sigmas": True}, {"eta": 0.0}; the defaults are the original
    # AnimateDiff's DDIM (set_alpha_to_one True); {"preset": "diffusers_sd15"} is SD1.5's scheduler_config.json.
    c.scheduler_options = {}
    c.clip_skip = 0  # diffusers' clip_skip (prompts only)
    # SDXL's size conditioning (its time ids, diffusers' argument names, each (height, width)): the size the
    # training image had, the crop's top-left corner, the size wanted; () = the video's (H, W). SD1.5: unused.
    c.original_size = ()
    c.crops_coords_top_left = (0, 0)
    c.target_size = ()
    c.dtype = "bfloat16"  # compute dtype: float32 | bfloat16 | float16, or fp32 | bf16 | fp16 (latents stay float32)
    # UNet attention kernel (models.attention): auto (cuDNN flash on GPU, Pallas splash on TPU, blockwise
    # on CPU, for long sequences; XLA for short ones) | xla | chunked | cudnn | splash
    c.attention = "auto"
    # UNet spatial layers in int8 (models.quantize; motion modules stay in dtype): none | int8_weights (linear
    # kernels int8, dequantized in the matmul) | int8 (kernels and activations: int8 products, v5e's 2x rate).
    # Not exact: latents after 25 steps differ from bf16's (docs/sampling.md has the measured change).
    c.quantize = "none"
    c.allow_nonfinite = False  # load weight files holding NaN/Inf (with a warning) instead of refusing them


def _steering(c: ConfigDict) -> None:
    """Motion strength, PE stretch, FreeInit, video to video, controls, context windows."""
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
    # IP-Adapter (h94/IP-Adapter models/ip-adapter[-plus|-plus-face|-full-face|_light]_sd15.bin / .safetensors): an
    # image prompt beside the text, every video: ({"path": ..., "image": PNG/JPG | (several: all on every frame) |
    # {frame: image, ...} (image travel: interpolated between keyframes, from frame 0), "scale": 1.0 (or per block,
    # diffusers' {"down": {"block_2": [0.0, 1.0]}, "up": {...}, "mid": 0.0}), "encoder": "" (the CLIP image encoder
    # folder; "" = image_encoder/ beside the file, as h94 lays them out), "interpolation": "linear" | "slerp"}, ...);
    # several at once. () = none.
    c.ip_adapter = ()
    # Videos longer than the motion module's position table: overlapping windows of `length` frames over
    # the temporal attention, predictions averaged; length 0 = off (one pass over all frames).
    # weighting where windows overlap: flat | pyramid | delayed_reverse_sawtooth (diffusers' FreeNoise weights);
    # noise: random | shuffle_context | repeat_context (FreeNoise's initial noise); schedule: uniform |
    # looped_uniform (windows wrap around the end: a seamless loop). scope: unet (the whole UNet per window,
    # AnimateDiff-Evolved's) | motion (one UNet pass, only the motion modules' attentions per window:
    # diffusers' FreeNoise, `enable_free_noise(context_length=length, context_stride=length - overlap)`).
    c.context_windows = ConfigDict(dict(length=0, overlap=4, weighting="flat", noise="random", schedule="uniform",
                                        scope="unet"))


def _outputs(c: ConfigDict) -> None:
    """Safety checker, CLIP metrics, devices, batching, the files written."""
    # SD's safety checker (SD1.5's safety_checker/ folder, or the pipeline folder holding it): every decoded
    # frame is checked, a video with a flagged frame is written black, the flags go to timings.json; "" = off.
    c.safety_checker = ""
    # CLIP metrics of the videos made (animatediff_jax.evaluation), written to metrics.json: clip = a transformers
    # CLIP folder (e.g. openai/clip-vit-large-patch14), "" = off; reference = True also samples the motion-free
    # videos (motion_scale 0, same seeds: the T2I model's own images) for domain similarity.
    c.evaluate = ConfigDict(dict(clip="", reference=False))
    c.devices = -1  # devices to spread the videos over; -1 = all
    # Devices per video (context parallelism): each video's frames are split over this many devices, the motion
    # modules exchange them with all-to-alls. For videos longer than one device holds (num_frames a multiple).
    c.context_parallel = 1
    c.batch_size = 0  # videos per compiled call; 0 = auto: up to VIDEOS_PER_DEVICE per device (`videos_per_call`)
    c.decode_chunk = 4  # frames per VAE decode step (bounds memory)
    c.output = o = ConfigDict()
    o.dir = "samples/sample-{time}"  # {time}: the start time
    o.formats = ("gif",)  # any of gif, mp4, png (PNG frames, lossless)
    o.fps = 8.0
    o.grid = True  # also sample.gif (and sample.mp4 with mp4): all videos tiled, 4 per row


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
    check_fields(saved, plain(c))
    _set(c, saved)
    return c


# ----------------------------------------------------------------------------------------------
# Field checks.
# ----------------------------------------------------------------------------------------------


def _kind(x: Any) -> str:
    kinds = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
             ((list, tuple), "a tuple"), ((dict, ConfigDict), "a dict"), (type(None), "None"))
    return next((name for t, name in kinds if isinstance(x, t)), type(x).__name__)


def check_fields(config: Mapping, schema: Mapping, prefix: str = "") -> None:
    """Unknown field names (at any depth) are an error naming the field and the valid ones."""
    for k, v in config.items():
        name = prefix + k
        if k not in schema:
            raise ConfigError(f"unknown config field {name!r} (valid: {', '.join(sorted(schema))})")
        if isinstance(schema[k], Mapping) and isinstance(v, Mapping) and k not in _OPEN:
            check_fields(v, schema[k], name + ".")
