"""Prompts to videos: `generate(pipe, request)` — text encoding, one compiled denoising call (a
`lax.scan` of steps), chunked VAE decode.

The loop is AnimateDiff's (and diffusers' `AnimateDiffPipeline`'s): per step, the scheduler
scales the latents, the UNet predicts noise for the unconditional and the conditional text
in one batched call, classifier-free guidance mixes the two, and the scheduler steps. Here the
whole loop is one `jax.lax.scan` inside `jax.jit` (no host round trip per step), compiled once
per shape and sharding (`compiled.Programs`), and the videos (one per prompt/seed pair) are laid
out over a mesh's "data" axis, so several devices each denoise their share of the batch.

Randomness is per video: video `b` starts from `normal(key(seed_b), (F, h, w, 4))` times
the scheduler's `init_noise_sigma`, and stochastic samplers draw step `i`'s noise from
`fold_in(key(seed_b), i)`, so a seed gives the same video whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from animatediff_jax.errors import ConfigError, FieldError
from animatediff_jax.sampling.compiled import PROGRAMS, Programs
from animatediff_jax.sampling.control import check_base
from animatediff_jax.sampling.free_init import video_pixels
from animatediff_jax.sampling.ip_adapter import ImagePrompts, check_ip_adapters, encode_ip_adapters
from animatediff_jax.sampling.keys import seed_key
from animatediff_jax.sampling.options import Prompt, Request, check_size
from animatediff_jax.sampling.pipeline import AnimationPipeline
from animatediff_jax.sampling.programs import CONTEXT, DATA, Layout, layout, mesh_over, sampler_fns, video_sharding
from animatediff_jax.sampling.prompts import encode_prompts, encode_sdxl
from animatediff_jax.sampling.windows import free_noise, free_noise_perms


@dataclasses.dataclass
class GenerateResult:
    """`frames` uint8 `[N, F, H, W, 3]`; `latents` the final latents float32 `[N, F, h, w, 4]`;
    `timings` in seconds (`compile_s` apart from `run_s`, plus per stage)."""

    frames: np.ndarray
    latents: np.ndarray
    timings: dict[str, float]


def sampling_mesh(num_devices: int | None = None, context: int = 1) -> Mesh:
    """The sampler's mesh over the first `num_devices` devices (all when None): videos over its "data"
    axis; with `context` > 1, each video's frames over `context` devices too (context parallelism)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices={n}: there are {len(devices)} devices")
    return mesh_over(devices[:n], int(context))


def check_fits(pipe: AnimationPipeline, request: Request, mesh: Mesh | None = None, need_tokenizer: bool = True
               ) -> None:
    """What of `request` depends on the loaded models: the size against the UNet and VAE, `clip_skip`
    against the text encoder, frames (or windows) against the motion module's position table, the
    controls against the base, `init_latents`' shape. (Everything else `Request` checked when built.)"""
    if pipe.tokenizer is None and need_tokenizer:
        raise ConfigError("the pipeline has no tokenizer: pass one to AnimationPipeline / from_base")
    check_size(request.height, request.width, pipe.size_multiple)
    check_family(pipe, request)
    layers = pipe.text_config.num_layers
    if request.clip_skip > layers:
        raise FieldError("clip_skip", f"={request.clip_skip}: the text encoder has {layers} layers (expected 0 to "
                         f"{layers})")
    f, win = request.num_frames, request.windows
    motion = pipe.unet_config.motion
    limit = None if motion is None else motion.max_positions
    stretch = request.motion.pe_stretch
    if stretch and limit is not None:
        if not stretch[0] <= limit:
            raise FieldError("pe_stretch", f"={stretch}: expected (n, m) with 1 <= n <= {limit} (the motion module's "
                             "position table) and m >= 1")
        limit = stretch[1]
    if win is None and limit is not None and f > limit:
        raise FieldError("num_frames", f"={f} exceeds the motion module's position table ({limit} frames); sample it "
                         f"in overlapping windows (context_windows length {limit}, overlap 4) or stretch the table "
                         "(pe_stretch)")
    if win is not None and limit is not None and win.length > limit:
        raise FieldError("context_windows.length", f"={win.length} exceeds the motion module's position table "
                         f"({limit} frames)")
    windowed = win is not None and win.scope == "unet" and win.length < f  # (scope "motion": controls see all)
    check_base(request.controls, pipe.unet_config, win.length if windowed else f)
    check_ip_adapters(request.ip_adapters, pipe.unet_config)
    down = pipe.vae_config.downscale
    shape = (len(request.prompts), f, request.height // down, request.width // down, pipe.unet_config.in_channels)
    if request.init_latents is not None and tuple(np.shape(request.init_latents)) != shape:
        raise FieldError("init_latents", f" must have shape {shape} (N, F, h, w, C), got "
                         f"{tuple(np.shape(request.init_latents))}")
    if mesh is not None and DATA not in mesh.axis_names:
        raise ConfigError(f"mesh must have a {DATA!r} axis, has {mesh.axis_names}")
    context = 1 if mesh is None else dict(mesh.shape).get(CONTEXT, 1)
    if context > 1:  # one video's frames over several devices
        if f % context:
            raise FieldError("num_frames", f"={f}: context_parallel={context} splits each video's frames over "
                             f"{context} devices; use a multiple of {context} frames")
        if win is not None and win.length < f:
            raise FieldError("context_windows", f": context_parallel={context} runs every frame at once over "
                             f"{context} devices; turn one of them off (context_windows.length=0 or "
                             "context_parallel=1)")


def check_family(pipe: AnimationPipeline, request: Request) -> None:
    """What an SDXL base cannot do yet (one line naming the option), and SDXL's options on an SD1.5 base."""
    if not pipe.sdxl:
        if request.sdxl_sizes:
            raise FieldError("original_size", " / crops_coords_top_left / target_size: SDXL's size conditioning, "
                             f"but the base is {pipe.unet_config.describe()}")
        return
    if pipe.text_config_2 is None or "text_encoder_2" not in pipe.params:
        raise ConfigError("an SDXL pipeline needs its second text encoder (text_config_2, params['text_encoder_2'])")
    layers = min(pipe.text_config.num_layers, pipe.text_config_2.num_layers)
    if request.clip_skip >= layers:
        raise FieldError("clip_skip", f"={request.clip_skip}: SDXL's text encoders have {layers} layers (expected 0 to "
                         f"{layers - 1})")
    if request.controls:
        raise FieldError("controls", ": ControlNet / SparseCtrl are not supported on SDXL yet")
    if request.ip_adapters:
        raise FieldError("ip_adapters", ": IP-Adapter is not supported on SDXL yet")


class _Progress:
    """Per-step progress: a tqdm bar, or a user callable; repeated or out-of-order steps are ignored."""

    def __init__(self, total: int, progress: bool | Callable[[int], None]):
        self.done, self.total = 0, total
        self.fn = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", leave=False)

    def __call__(self, step: int) -> None:
        if step + 1 <= self.done:
            return
        if self.bar is not None:
            self.bar.update(step + 1 - self.done)
        self.done = step + 1
        if self.fn is not None:
            self.fn(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _initial_noise(request: Request, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Each video's starting noise (from its seed, or `init_latents`; FreeNoise's arrangement with its
    windows) and key data."""
    keys = [seed_key(s) for s in request.seeds]
    if request.init_latents is None:
        noise = jnp.stack([jax.random.normal(k, shape[1:], jnp.float32) for k in keys])
    else:
        noise = jnp.asarray(request.init_latents, jnp.float32)
    win = request.windows
    if win is not None and win.length < shape[1] and win.noise != "random":
        noise = jnp.asarray(np.concatenate([
            free_noise(np.asarray(noise[b:b + 1]), win.length, win.length - win.overlap, win.noise,
                       free_noise_perms(keys[b])) for b in range(shape[0])]))
    return noise, jnp.stack([jax.random.key_data(k) for k in keys])


def _arguments(pipe: AnimationPipeline, request: Request, lay: Layout, mesh: Mesh, cond, uncond, needs_vae: bool,
               images: ImagePrompts | None = None, added=None) -> tuple:
    """The denoising program's arguments, each video's padded to the mesh and laid out over its data
    axis (SDXL's added conditioning too), params, scalars and IP-Adapter image prompts replicated
    (already-placed params are not copied)."""
    n = lay.shape[0]
    pad = -n % mesh.shape[DATA]
    rep = NamedSharding(mesh, P())

    def place(x, sharding=NamedSharding(mesh, P(DATA))):
        if x is None:
            return None
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
        return jax.device_put(x, sharding)

    noise, key_data = _initial_noise(request, lay.shape)
    controls = [{k: place(jnp.repeat(jnp.asarray(v)[None], n, axis=0)) for k, v in a.items()}
                for a in lay.control_arrays]
    use_cfg = uncond is not None
    videos = video_sharding(mesh)
    args = (jax.device_put(pipe.params["unet"], rep), jax.device_put(lay.schedulers, rep), place(noise, videos),
            place(cond), place(uncond), jax.tree.map(place, added), jax.device_put(jnp.asarray(request.guidance_scale if use_cfg else 1.0, jnp.float32), rep),
            place(key_data), [jax.device_put(c.params, rep) for c in request.controls],
            jax.device_put(jnp.asarray([c.scale for c in request.controls], jnp.float32), rep), controls,
            None if images is None else jax.device_put(images, rep))
    if needs_vae:
        video = None
        if request.video is not None:
            video = jnp.asarray(video_pixels(np.asarray(request.video.frames)[:, :lay.shape[1]]))
            video = place(jnp.repeat(video, n, axis=0) if video.shape[0] != n else video, videos)
        args += (jax.device_put(pipe.params["vae"], rep), video)
    return args


def generate(pipe: AnimationPipeline, request: Request | Sequence[Prompt], negative_prompts: Sequence[Prompt] | None
             = None, seeds: Sequence[int] | None = None, *, mesh: Mesh | None = None,
             progress: bool | Callable[[int], None] = True, programs: Programs = PROGRAMS, **settings: Any
             ) -> GenerateResult:
    """One video per (prompt, seed) pair of `request`: text -> the denoising scan -> VAE decode.

    The keyword form `generate(pipe, prompts, negative_prompts, seeds, num_frames=16, ...)` builds the
    `Request` (`Request.create`: `context_windows` and `free_init` as dicts, `init_video` + `strength`,
    `motion_scale`, `controls`, `ip_adapters`, ...). `mesh`: a mesh with a "data" axis to spread the videos
    over (default: the first device), and a "context" axis to spread each video's frames over
    (`sampling_mesh(n, context)`); the batch is padded to a multiple of the data axis and the padding
    dropped. `progress`: a tqdm bar (True), nothing (False) or a callable given each finished step.
    Everything is checked before anything compiles (a `FieldError` naming the setting).

    On an SDXL pipeline (`pipe.sdxl`) it is diffusers' `AnimateDiffSDXLPipeline`: both text encoders, the
    pooled embeddings and size ids (`original_size`, `crops_coords_top_left`, `target_size`) per video into
    the UNet, no negative prompt giving zero embeddings (`force_zeros_for_empty_prompt`); prompt travel gives
    each frame its interpolated hidden states and pooled embedding (`prompts.travel_sdxl`); controls and
    IP-Adapter are refused.
    """
    if not isinstance(request, Request):
        request = Request.create(request, negative_prompts, seeds, **settings)
    elif negative_prompts is not None or seeds is not None or settings:
        raise TypeError("generate(pipe, request) takes no other settings: put them in the Request")
    t_start = time.perf_counter()
    check_fits(pipe, request, mesh)
    mesh = mesh if mesh is not None else sampling_mesh(1)
    lay = layout(pipe, request)
    n, timings = lay.shape[0], {}

    t0 = time.perf_counter()
    use_cfg = request.guidance_scale > 1.0
    negatives = (request.negative_prompts or ("",) * n) if use_cfg else None
    added = None
    if pipe.sdxl:  # (diffusers' SDXL: no negative prompt is zeros, not "", under force_zeros_for_empty_prompt)
        cond, uncond, added = encode_sdxl(pipe, request.prompts, request.negative_prompts, request.time_ids(), use_cfg,
                                          request.clip_skip, request.prompt_syntax, request.num_frames,
                                          request.prompt_interpolation)
        c_text = 0.0
    else:
        cond, uncond, c_text = encode_prompts(pipe, request.prompts, negatives, request.num_frames, request.clip_skip,
                                              request.prompt_interpolation, programs, request.prompt_syntax)
    jax.block_until_ready(cond)
    timings["compile_text_s"], timings["text_s"] = c_text, time.perf_counter() - t0 - c_text

    sample_fn, decode_fn, static, needs_vae = sampler_fns(pipe, request, lay, progress is not False, programs)
    images = None
    if request.ip_adapters:  # IP-Adapter: the image prompts' tokens, once per call
        t0 = time.perf_counter()
        images, c_img = encode_ip_adapters(pipe, request.ip_adapters, request.num_frames, uncond is not None, programs)
        jax.block_until_ready(images)
        timings["compile_image_s"], timings["image_s"] = c_img, time.perf_counter() - t0 - c_img
    args = _arguments(pipe, request, lay, mesh, cond, uncond, needs_vae, images, added)
    batch = video_sharding(mesh)
    sample_c, timings["compile_denoise_s"] = programs.compiled("denoise", sample_fn, static, args, out_shardings=batch)
    total = sum(int(x.num_inference_steps) for x in lay.schedulers) - request.start
    bar = _Progress(total, progress) if progress else None
    try:
        with programs.reporting(bar):
            t0 = time.perf_counter()
            latents = jax.block_until_ready(sample_c(*args))
            jax.effects_barrier()
            timings["denoise_s"] = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()

    vae_params = jax.device_put(pipe.params["vae"], NamedSharding(mesh, P()))
    decode_c, timings["compile_decode_s"] = programs.compiled("decode", decode_fn, (pipe.vae, request.decode_chunk),
                                                              (vae_params, latents), out_shardings=batch)
    t0 = time.perf_counter()
    frames = jax.block_until_ready(decode_c(vae_params, latents))
    timings["decode_s"] = time.perf_counter() - t0
    timings["compile_s"] = (timings["compile_text_s"] + timings.get("compile_image_s", 0.0)
                            + timings["compile_denoise_s"] + timings["compile_decode_s"])
    timings["run_s"] = timings["text_s"] + timings.get("image_s", 0.0) + timings["denoise_s"] + timings["decode_s"]
    timings["total_s"] = time.perf_counter() - t_start
    return GenerateResult(frames=np.asarray(frames)[:n], latents=np.asarray(latents, np.float32)[:n], timings=timings)
