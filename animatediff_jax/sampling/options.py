"""What one sampling call is asked to make: a typed, frozen `Request` and its parts.

Every setting is checked here, once, when its part is built (a `FieldError` naming the setting:
`num_frames=0: expected an integer >= 1`); what needs the loaded models (sizes against the UNet,
frames against the motion module's table) is `generate.check_fits`. A sample config becomes a
`Request` in `assemble.request`, which renames the fields to the config's (`num_frames` -> `L`).
A leaf of `sampling/`: it imports nothing from it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence, Union

import numpy as np

from animatediff_jax import schedulers as S
from animatediff_jax.errors import FieldError
from animatediff_jax.prompt_syntax import SYNTAXES, PromptSyntaxError, parse

Prompt = Union[str, Mapping[int, str]]  # one text, or prompt travel: {frame: text} from frame 0
INTERPOLATIONS = ("linear", "slerp")
WEIGHTINGS = ("flat", "pyramid", "delayed_reverse_sawtooth")
NOISE_TYPES = ("random", "shuffle_context", "repeat_context")
SCHEDULES = ("uniform", "looped_uniform")
SCOPES = ("unet", "motion")  # what runs per window: the whole UNet, or only the motion modules' attentions
FREE_INIT_METHODS = ("butterworth", "gaussian", "ideal")
RENOISING = ("ddim", "pndm")  # samplers whose add_noise is DDPM's (FreeInit, video to video)


# ----------------------------------------------------------------------------------------------
# Value checks.
# ----------------------------------------------------------------------------------------------


def integer(name: str, v: Any, lo: int | None = None) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (lo is not None and v < lo):
        raise FieldError(name, f"={v!r}: expected an integer{f' >= {lo}' if lo is not None else ''}")
    return int(v)


def number(name: str, v: Any) -> float:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) or not math.isfinite(v):
        raise FieldError(name, f"={v!r}: expected a number")
    return float(v)


def choice(name: str, v: Any, valid: Sequence[str]) -> str:
    if v not in valid:
        raise FieldError(name, f"={v!r}: expected one of {', '.join(valid)}")
    return v


def pair(name: str, v: Any) -> tuple[int, int]:
    """An `(a, b)` of non-negative integers (SDXL's sizes and crop corner)."""
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
        raise FieldError(name, f"={v!r}: expected two integers (height, width) or (top, left)")
    return integer(name, v[0], 0), integer(name, v[1], 0)


def per_prompt(name: str, values: Sequence[Any], n: int) -> tuple:
    """`values` for each of `n` prompts: one (broadcast to all) or `n` of them."""
    values = tuple(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise FieldError(name, f": {n} prompts but {len(values)} given: give 1 or {n}")
    return values


def keyframes(prompt: Prompt, num_frames: int, name: str) -> list[tuple[int, str]]:
    """The sorted `(frame, text)` keyframes of a prompt: a string is one keyframe at frame 0; a map
    `{frame: text}` (keys may be digit strings, as config files give them) must have frame 0 and
    stay inside the video."""
    if isinstance(prompt, str):
        return [(0, prompt)]
    if not isinstance(prompt, Mapping) or not prompt:
        raise FieldError(name, f"={prompt!r}: expected a string or a non-empty {{frame: prompt}} map")
    out = []
    for k, v in prompt.items():
        if isinstance(k, bool) or not (isinstance(k, (int, np.integer)) or (isinstance(k, str) and k.strip().isdigit())):
            raise FieldError(name, f": key {k!r} is not a frame number")
        if not isinstance(v, str):
            raise FieldError(name, f"[{k}]={v!r}: expected a string")
        out.append((int(k), v))
    out.sort()
    frames = [f for f, _ in out]
    if len(set(frames)) != len(frames):
        raise FieldError(name, f": frame {next(f for f in frames if frames.count(f) > 1)} is given twice")
    if frames[0] != 0:
        raise FieldError(name, f": no prompt at frame 0 (keyframes {frames}): the video must start from one")
    if frames[-1] >= num_frames:
        raise FieldError(name, f": frame {frames[-1]} is outside the video (frames 0 to {num_frames - 1})")
    return out


def check_syntax(name: str, text: str) -> None:
    """A prompt in the web UI's syntax parses (`prompt_syntax.parse`, strict): else a `FieldError` naming it."""
    try:
        parse(text, strict=True)
    except PromptSyntaxError as e:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise FieldError(name, f"={shown!r}: {e} (or prompt_syntax='plain': brackets as text)") from None


def check_size(height: int, width: int, multiple: int) -> None:
    """The one size rule: height and width multiples of `multiple` (`models.config.size_multiple`)."""
    for name, v in (("height", height), ("width", width)):
        if v % multiple:
            raise FieldError(name, f"={v} must be a positive multiple of {multiple} (VAE factor x UNet downsampling)")


def _seq(name: str, value: Any) -> tuple:
    if isinstance(value, (str, int, Mapping)) or value is None:
        raise FieldError(name, f" must be a list, got {value!r}")
    return tuple(value)


# ----------------------------------------------------------------------------------------------
# The parts.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Windows:
    """Context windows: overlapping windows of `length` frames starting every `length - overlap`
    (AnimateDiff-Evolved's "uniform", or "looped_uniform" wrapping around the end); `weighting` where
    they overlap; FreeNoise's initial `noise`; `scope` "unet" runs the whole UNet per window,
    "motion" only the motion modules' attentions (diffusers' FreeNoise)."""

    length: int
    overlap: int = -1  # -1: length // 4
    weighting: str = "flat"
    noise: str = "random"
    schedule: str = "uniform"
    scope: str = "unet"

    def __post_init__(self):
        length = integer("context_windows.length", self.length)
        if length < 1:
            raise FieldError("context_windows.length", f"={length}: expected an integer >= 1 (0: off)")
        overlap = length // 4 if self.overlap == -1 else integer("context_windows.overlap", self.overlap, 0)
        if overlap >= length:
            raise FieldError("context_windows.overlap", f"={overlap}: expected 0 <= overlap < length ({length})")
        object.__setattr__(self, "overlap", overlap)
        for name, valid in (("weighting", WEIGHTINGS), ("noise", NOISE_TYPES), ("schedule", SCHEDULES),
                            ("scope", SCOPES)):
            choice(f"context_windows.{name}", getattr(self, name), valid)

    @property
    def looped(self) -> bool:
        return self.schedule == "looped_uniform"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Windows | None":
        """From a `context_windows` dict (length required); None for off (None or length 0)."""
        if d is None:
            return None
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown or "length" not in d:
            raise FieldError("context_windows", f" takes length (required), {', '.join(names[1:])}; got {dict(d)}")
        return None if d["length"] == 0 else cls(**d)


@dataclasses.dataclass(frozen=True)
class FreeInit:
    """FreeInit (diffusers' `enable_free_init`, its defaults): after each full denoise the video is
    re-noised to the last timestep, its low frequencies kept, and denoised again (`num_iters` in all)."""

    num_iters: int = 3
    method: str = "butterworth"
    order: float = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25
    use_fast_sampling: bool = False

    def __post_init__(self):
        integer("free_init.num_iters", self.num_iters, 0)
        choice("free_init.method", self.method, FREE_INIT_METHODS)
        for name in ("order", "spatial_stop_frequency", "temporal_stop_frequency"):
            if number(f"free_init.{name}", getattr(self, name)) < 0:
                raise FieldError(f"free_init.{name}", f"={getattr(self, name)!r}: expected a number >= 0")
        if not isinstance(self.use_fast_sampling, bool):
            raise FieldError("free_init.use_fast_sampling", f"={self.use_fast_sampling!r}: expected True or False")

    def steps(self, steps: int) -> list[int]:
        """Denoising steps of each iteration: all of them, or coarse to fine with `use_fast_sampling`."""
        n = int(self.num_iters)
        if not self.use_fast_sampling:
            return [steps] * n
        return [max(1, int(steps / n * (k + 1))) for k in range(n)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FreeInit | None":
        """From a `free_init` dict of diffusers' option names; None for off (None, {} or num_iters <= 1)."""
        if not d:
            return None
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FieldError("free_init", f": unknown option(s) {unknown} (valid: {', '.join(names)})")
        fi = cls(**d)
        return fi if fi.num_iters > 1 else None


@dataclasses.dataclass(frozen=True, eq=False)
class VideoInput:
    """Video to video (diffusers' `AnimateDiffVideoToVideoPipeline`): `frames` `[N or 1, F', H, W, 3]`
    (uint8, or float in [-1, 1]; the first `num_frames` used) noised to `strength` (the share of the
    steps that run, from the end) and denoised."""

    frames: np.ndarray
    strength: float = 0.8

    def __post_init__(self):
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise FieldError("strength", f"={s!r}: expected a number in (0, 1]")

    def start(self, steps: int) -> int:
        """The first step that runs: the last `int(steps * strength)` run (diffusers' `get_timesteps`)."""
        return steps - min(int(steps * float(self.strength)), steps)


_BLOCK = re.compile(r"(down|up)_blocks_\d+|mid_block")


@dataclasses.dataclass(frozen=True)
class Motion:
    """How strongly the motion modules act: every module's output scaled by `scale` (0: none), per
    block on top (`block_scales`: `(("up_blocks_1", 1.2), ...)`); `pe_stretch` (n, m) spreads the
    first n positions of the position table over m frames (AnimateDiff-Evolved's PE stretch)."""

    scale: float = 1.0
    block_scales: tuple[tuple[str, float], ...] = ()
    pe_stretch: tuple[int, int] | None = None

    def __post_init__(self):
        number("motion_scale", self.scale)
        blocks = dict(self.block_scales)
        for block, v in blocks.items():
            if not _BLOCK.fullmatch(str(block)):
                raise FieldError("motion_block_scales", f": no block {block!r} (blocks: down_blocks_i, mid_block, "
                                 "up_blocks_i)")
            number(f"motion_block_scales.{block}", v)
        object.__setattr__(self, "block_scales", tuple(sorted((str(k), float(v)) for k, v in blocks.items())))
        st = self.pe_stretch
        if st is not None and (len(st) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                       and v >= 1 for v in st)):
            raise FieldError("pe_stretch", f"={st!r}: expected (n, m): the first n positions over m frames, or None")
        object.__setattr__(self, "pe_stretch", None if not st else (int(st[0]), int(st[1])))


@dataclasses.dataclass(frozen=True, eq=False)
class Control:
    """One control model and its condition (`sampling.control` runs it).

    `images` uint8 (or float in [0, 1]) `[K, H, W, 3]` at the video's size: for a ControlNet one per
    frame; for SparseCtrl the keyframes, `frame_indices[k]` the frame of image k (negative: from the
    end). `scale` multiplies its residuals while the step's share of the run lies in `[start, end]`.
    `config`/`params` (the model, `models.controlnet.ControlNetConfig` and its params) may be None
    while only the condition is checked, before the weights load.
    """

    config: Any
    params: Any
    images: np.ndarray
    frame_indices: tuple[int, ...] | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = "control"  # what errors call it ("controlnet[0]", "sparsectrl")

    @property
    def sparse(self) -> bool:
        """Keyframes (SparseCtrl) rather than one image per frame (ControlNet)."""
        return bool(self.config.sparse) if self.config is not None else self.frame_indices is not None

    def check(self, num_frames: int, height: int, width: int) -> None:
        """This control against the video: image size, counts, keyframe indices, scale, start/end."""
        shape = tuple(np.shape(self.images))
        if len(shape) != 4 or shape[1:] != (height, width, 3):
            raise FieldError(self.name, f": images must be [K, {height}, {width}, 3] (the video's size), got {shape}")
        if self.sparse:
            idx = list(self.frame_indices or ())
            if len(idx) != shape[0]:
                raise FieldError(self.name, f": {shape[0]} keyframe image(s) but {len(idx)} frame_indices: give one "
                                 "index per image")
            bad = [i for i in idx if not isinstance(i, (int, np.integer)) or not -num_frames <= i < num_frames]
            if bad:
                raise FieldError(f"{self.name}.frame_indices", f" {bad} outside the video (frames 0..{num_frames - 1}, "
                                 "or negative from the end)")
            if len({int(i) % num_frames for i in idx}) != len(idx):
                raise FieldError(self.name, f": frame_indices {idx} repeat a frame")
        else:
            if self.frame_indices is not None:
                raise FieldError(self.name, ": frame_indices are for SparseCtrl; a ControlNet takes one image per "
                                 "frame")
            if shape[0] != num_frames:
                raise FieldError(self.name, f": {shape[0]} control frame(s) for a video of {num_frames} frames "
                                 "(give one per frame)")
        number(f"{self.name}.scale", self.scale)
        if not (0.0 <= number(f"{self.name}.start", self.start) < number(f"{self.name}.end", self.end) <= 1.0):
            raise FieldError(self.name, f": start={self.start}, end={self.end}: expected 0 <= start < end <= 1")


_IP_GROUPS = ("down", "mid", "up")


def _ip_scale(name: str, scale: Any) -> None:
    """An IP-Adapter scale: a number, or diffusers' `set_ip_adapter_scale` dict (its shape only; the blocks
    and their attention counts are checked against the UNet in `sampling.ip_adapter.layer_scales`)."""
    if not isinstance(scale, Mapping):
        number(name, scale)
        return
    unknown = sorted(str(k) for k in scale if k not in _IP_GROUPS)
    if unknown:
        raise FieldError(name, f": unknown part(s) {unknown} (a number, or a dict of down, mid, up)")
    for group, v in scale.items():
        if isinstance(v, Mapping) and group != "mid":
            for block, w in v.items():
                if not re.fullmatch(r"block_\d+", str(block)):
                    raise FieldError(f"{name}.{group}", f": key {block!r}: expected block_<i>")
                for x in (w if isinstance(w, (list, tuple)) else [w]):
                    number(f"{name}.{group}.{block}", x)
        else:
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                number(f"{name}.{group}", x)


@dataclasses.dataclass(frozen=True, eq=False)
class IPAdapter:
    """One IP-Adapter and its image prompt (`sampling.ip_adapter` runs it); every video sees it.

    `images`: each `[H, W, 3]` uint8 (or float in [0, 1]), any size (the encoder's processor resizes and
    crops). Without `frames`, every frame sees all of them (their tokens side by side, as diffusers takes
    several images for one adapter). With `frames` (image travel), image k is the keyframe at frame
    `frames[k]` (frame 0 needed) and each frame's image embedding is interpolated between the keyframes it
    lies between (`interpolation`, as prompt travel interpolates text), the last one held to the end.
    `embeds` instead of images: the encoder's outputs `[K, D]` ("base") or `[K, S, D]` ("plus", "full"),
    diffusers' `ip_adapter_image_embeds`; `negative_embeds` the unconditional branch's (None: zeros; for
    images, as diffusers: zeros for "base", the encoder on an all-zero input for "plus" / "full").
    `scale`: a number, or diffusers' per-block dict (`{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0":
    1.0}, "mid": 0.5}`; the attentions of blocks it does not name get 0). `config` / `params` (the adapter,
    `checkpoints.ip_adapter.load_ip_adapter`'s) and `encoder` (a `checkpoints.clip.CLIP` image encoder)
    may be None while only these settings are checked.
    """

    config: Any
    params: Any
    images: tuple[Any, ...] = ()
    frames: tuple[int, ...] | None = None
    embeds: np.ndarray | None = None
    negative_embeds: np.ndarray | None = None
    scale: float | Mapping[str, Any] = 1.0
    interpolation: str = "linear"
    encoder: Any = None
    name: str = "ip_adapter"  # what errors call it ("ip_adapter[0]")

    @property
    def count(self) -> int:
        """Images (or embeddings) given."""
        return len(self.images) if self.embeds is None else int(np.shape(self.embeds)[0])

    def check(self, num_frames: int) -> None:
        """The image prompt's own settings (what needs the models: `sampling.ip_adapter.check_ip_adapters`)."""
        if self.embeds is None:
            images = self.images
            if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)) or not images:
                raise FieldError(f"{self.name}.image", ": expected one or more images (or embeds)")
            for k, im in enumerate(images):
                shape = tuple(np.shape(im))
                if len(shape) != 3 or shape[-1] != 3 or min(shape) < 1:
                    raise FieldError(f"{self.name}.image", f"[{k}]: expected an RGB image [H, W, 3], got {shape}")
        else:
            if self.images:
                raise FieldError(self.name, ": give images or embeds, not both")
            shape = tuple(np.shape(self.embeds))
            if len(shape) not in (2, 3) or shape[0] < 1:
                raise FieldError(f"{self.name}.embeds", f": expected [K, D] or [K, S, D] image embeddings, got {shape}")
            neg = self.negative_embeds
            if neg is not None and tuple(np.shape(neg)) != shape:
                raise FieldError(f"{self.name}.negative_embeds", f": shape {tuple(np.shape(neg))} is not the "
                                 f"embeds' {shape}")
        if self.frames is not None:
            frames = list(self.frames)
            if len(frames) != self.count:
                raise FieldError(f"{self.name}.frames", f": {len(frames)} frame(s) for {self.count} image(s): give "
                                 "one keyframe per image")
            for f in frames:
                integer(f"{self.name}.frames", f, 0)
            if len(set(frames)) != len(frames):
                raise FieldError(f"{self.name}.frames", f": frame {next(f for f in frames if frames.count(f) > 1)} "
                                 "is given twice")
            if 0 not in frames:
                raise FieldError(f"{self.name}.frames", f" {sorted(frames)}: no image at frame 0 (image travel "
                                 "starts from one)")
            if max(frames) >= num_frames:
                raise FieldError(f"{self.name}.frames", f": frame {max(frames)} is outside the video (frames 0 to "
                                 f"{num_frames - 1})")
        _ip_scale(f"{self.name}.scale", self.scale)
        choice(f"{self.name}.interpolation", self.interpolation, INTERPOLATIONS)


# ----------------------------------------------------------------------------------------------
# The request.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One video per (prompt, seed) pair, and how to make them; checked as a whole when built.

    `negative_prompts`: None (empty strings under guidance), one (broadcast) or one per prompt; a
    prompt may travel (`{frame: text}`, interpolated per frame by `prompt_interpolation`).
    `prompt_syntax`: "a1111" reads every text as AUTOMATIC1111's web UI does (`(word:1.3)` weights,
    `BREAK`, any length in 75-token chunks; a plain prompt of up to 75 tokens gives diffusers' embeddings
    exactly), "plain" as diffusers does (the text as is, cut at 77 tokens).
    `init_latents`: standard-normal noise `[N, F, h, w, C]` instead of the seeds'. `decode_chunk`:
    frames per VAE step (None: all). `sample_posterior`: VAE encodes (video, RGB keyframes) draw from
    the posterior (else its mean).
    `original_size`, `crops_coords_top_left`, `target_size`: SDXL's size conditioning (its time ids, as
    diffusers' `AnimateDiffSDXLPipeline`: default `(height, width)`, `(0, 0)`, `(height, width)`, the
    negative side the same); an SD1.5 base refuses them.
    """

    prompts: tuple[Prompt, ...]
    negative_prompts: tuple[Prompt, ...] | None
    seeds: tuple[int, ...]
    num_frames: int = 16
    height: int = 512
    width: int = 512
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    scheduler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    clip_skip: int = 0
    decode_chunk: int | None = 4
    windows: Windows | None = None
    prompt_interpolation: str = "linear"
    prompt_syntax: str = "a1111"
    free_init: FreeInit | None = None
    video: VideoInput | None = None
    controls: tuple[Control, ...] = ()
    ip_adapters: tuple[IPAdapter, ...] = ()
    motion: Motion = Motion()
    init_latents: np.ndarray | None = None
    sample_posterior: bool = True
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        prompts = _seq("prompts", self.prompts)
        if not prompts or not all(isinstance(p, (str, Mapping)) for p in prompts):
            raise FieldError("prompts", f" must be a non-empty list of strings (or {{frame: prompt}} maps), "
                             f"got {list(prompts)!r}")
        n = len(prompts)
        seeds = _seq("seeds", self.seeds)
        if len(seeds) != n:
            raise FieldError("seeds", f": {n} prompts but {len(seeds)} seeds: give one seed per prompt")
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s < 2**64 for s in seeds):
            raise FieldError("seeds", f" must be integers in [0, 2**64), got {list(seeds)!r}")
        neg = self.negative_prompts
        neg = None if neg is None else per_prompt("negative_prompts", _seq("negative_prompts", neg), n)
        set_("prompts", prompts), set_("seeds", tuple(int(s) for s in seeds)), set_("negative_prompts", neg)
        for name in ("num_frames", "height", "width", "steps"):
            integer(name, getattr(self, name), 1)
        number("guidance_scale", self.guidance_scale)
        for name in ("original_size", "crops_coords_top_left", "target_size"):
            if getattr(self, name) is not None:
                set_(name, pair(name, getattr(self, name)))
        integer("clip_skip", self.clip_skip, 0)
        if self.decode_chunk is not None:
            integer("decode_chunk", self.decode_chunk, 1)
        choice("prompt_syntax", self.prompt_syntax, SYNTAXES)
        for name, values in (("prompts", prompts), ("negative_prompts", neg or ())):
            for b, p in enumerate(values):
                for _, text in keyframes(p, self.num_frames, f"{name}[{b}]"):
                    if self.prompt_syntax == "a1111":
                        check_syntax(f"{name}[{b}]", text)
        choice("prompt_interpolation", self.prompt_interpolation, INTERPOLATIONS)
        if not isinstance(self.scheduler_options, Mapping):
            raise FieldError("scheduler_options", f"={self.scheduler_options!r}: expected a dict")
        kind = self.schedulers()[0].kind  # (a bad name or option: the scheduler's own error)
        if self.free_init is not None and kind not in RENOISING:
            raise FieldError("free_init", f" with scheduler {kind!r}: FreeInit re-noises as DDPM does, which "
                             f"{', '.join(RENOISING)} share; use one of those")
        self._check_video(kind, n)
        for c in self.controls:
            if not isinstance(c, Control):
                raise FieldError("controls", f": expected Control objects, got {type(c).__name__}")
            c.check(self.num_frames, self.height, self.width)
        for a in _seq("ip_adapters", self.ip_adapters):
            if not isinstance(a, IPAdapter):
                raise FieldError("ip_adapters", f": expected IPAdapter objects, got {type(a).__name__}")
            a.check(self.num_frames)
        object.__setattr__(self, "ip_adapters", tuple(self.ip_adapters))

    def _check_video(self, kind: str, n: int) -> None:
        if self.video is None:
            return
        got = tuple(np.shape(self.video.frames))
        if len(got) != 5 or got[0] not in (1, n) or got[2:] != (self.height, self.width, 3):
            raise FieldError("init_video", f" must be frames [N or 1, F, {self.height}, {self.width}, 3], got {got}")
        if got[1] < self.num_frames:
            raise FieldError("init_video", f" has {got[1]} frames, fewer than num_frames={self.num_frames}")
        if kind not in RENOISING:
            raise FieldError("init_video", f" with scheduler {kind!r}: the video is noised as DDPM does, which "
                             f"{', '.join(RENOISING)} share; use one of those")
        if self.free_init is not None:
            raise FieldError("init_video", " with free_init: FreeInit starts each iteration from pure noise; give one")
        if self.video.start(self.steps) >= self.steps:
            raise FieldError("strength", f"={self.video.strength} with steps={self.steps} leaves no step to run")

    def schedulers(self) -> list[S.Scheduler]:
        """The sampler of each denoising pass: one, or one per FreeInit iteration."""
        steps = [self.steps] if self.free_init is None else self.free_init.steps(self.steps)
        try:
            return [S.make_scheduler(self.scheduler, k, **dict(self.scheduler_options)) for k in steps]
        except FieldError:
            raise
        except (ValueError, TypeError) as e:
            raise FieldError("scheduler", f"={self.scheduler!r}: {' '.join(str(e).split())}") from None

    @property
    def start(self) -> int:
        """The first denoising step (0, or later for video to video)."""
        return 0 if self.video is None else self.video.start(self.steps)

    @property
    def sdxl_sizes(self) -> bool:
        """Some SDXL size conditioning differs from its default."""
        return (self.original_size, self.crops_coords_top_left, self.target_size) != (None, (0, 0), None)

    def time_ids(self) -> np.ndarray:
        """SDXL's six time ids `[original h, w, crop top, left, target h, w]` (float32), one set for every
        video and both guidance halves, as diffusers' `_get_add_time_ids`."""
        size = (self.height, self.width)
        ids = (self.original_size or size) + self.crops_coords_top_left + (self.target_size or size)
        return np.asarray(ids, np.float32)

    @property
    def travels(self) -> bool:
        """Some prompt (or negative prompt) changes over the frames."""
        return any(not isinstance(p, str) for p in self.prompts + (self.negative_prompts or ()))

    def replace(self, **changes: Any) -> "Request":
        return dataclasses.replace(self, **changes)

    def subset(self, idx: Sequence[int]) -> "Request":
        """The videos `idx` of this request (prompts, negatives, seeds, their init latents)."""
        pick = lambda xs: None if xs is None else tuple(xs[i] for i in idx)  # noqa: E731
        lat = None if self.init_latents is None else np.asarray(self.init_latents)[list(idx)]
        return self.replace(prompts=pick(self.prompts), negative_prompts=pick(self.negative_prompts),
                            seeds=pick(self.seeds), init_latents=lat)

    @classmethod
    def create(cls, prompts: Sequence[Prompt], negative_prompts: Sequence[Prompt] | None, seeds: Sequence[int], *,
               context_windows: Mapping[str, Any] | None = None, free_init: Mapping[str, Any] | None = None,
               init_video: np.ndarray | None = None, strength: float = 0.8, motion_scale: float = 1.0,
               motion_block_scales: Mapping[str, float] | Sequence = (), pe_stretch: Sequence[int] | None = None,
               controls: Sequence[Control] = (), ip_adapters: Sequence[IPAdapter] = (), **settings: Any
               ) -> "Request":
        """A request from `generate`'s keyword names (dicts for the parts, as a config gives them)."""
        video = None if init_video is None else VideoInput(init_video, strength)
        return cls(prompts, negative_prompts, seeds, windows=Windows.from_dict(context_windows),
                   free_init=FreeInit.from_dict(free_init), video=video, controls=tuple(controls),
                   ip_adapters=(ip_adapters,) if isinstance(ip_adapters, IPAdapter) else tuple(ip_adapters),
                   motion=Motion(motion_scale, tuple(dict(motion_block_scales).items()), tuple(pe_stretch or ()) or None),
                   **settings)
