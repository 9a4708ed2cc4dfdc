"""Prompts to videos: text encoding, one `lax.scan` of denoising steps, chunked VAE decode.

The loop is AnimateDiff's (and diffusers' `AnimateDiffPipeline`'s): per step, the scheduler
scales the latents, the UNet predicts noise for the unconditional and the conditional text
in one batched call, classifier-free guidance mixes the two, and the scheduler steps. Here the
whole loop is one `jax.lax.scan` inside `jax.jit` (no host round trip per step), compiled once
per shape and sharding, and the samples (one per prompt/seed pair) are laid out over a
`Mesh`'s "data" axis, so several devices each denoise their share of the batch.

Videos longer than the motion module's position table are sampled with context windows
(AnimateDiff-Evolved / FreeNoise style): each step runs the UNet on overlapping windows of
frames and averages the predictions where windows overlap; or (scope "motion", diffusers' FreeNoise)
runs the UNet once on all frames with only the motion modules' attentions windowed.

Randomness is per sample: sample `b` starts from `normal(key(seed_b), (F, h, w, 4))` times
the scheduler's `init_noise_sigma`, and stochastic samplers draw step `i`'s noise from
`fold_in(key(seed_b), i)`, so a seed gives the same video whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from animatediff_jax import schedulers as S
from animatediff_jax.io.video import to_uint8
from animatediff_jax.models.layers import TemporalWindows, frame_weights
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import decode_video, encode_video
from animatediff_jax.sampling.control import Control, check_controls, control_inputs, control_residuals, latent_conditions
from animatediff_jax.sampling.pipeline import AnimationPipeline

Params = dict[str, Any]
Windows = tuple[tuple[int, ...], ...]
DATA = "data"


@dataclasses.dataclass
class GenerateResult:
    """`frames` uint8 `[N, F, H, W, 3]`; `latents` the final latents float32 `[N, F, h, w, 4]`;
    `timings` in seconds (`compile_s` apart from `run_s`, plus per stage)."""

    frames: np.ndarray
    latents: np.ndarray
    timings: dict[str, float]


def seed_key(seed: int) -> jax.Array:
    """`jax.random.key(seed)`, also for the 64-bit seeds of AnimateDiff's configs.

    Seeds below 2**32 give exactly `jax.random.key(seed)`; larger ones the threefry key that
    `jax.random.key` gives with x64 enabled (high and low 32-bit words).
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside [0, 2**64)")
    if seed < 2**31:
        return jax.random.key(seed)
    return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32), impl="threefry2x32")


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis ("data") mesh over the first `num_devices` devices (all when None)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={n}: there are {len(devices)} devices")
    return Mesh(np.asarray(devices[:n]), (DATA,))


# ----------------------------------------------------------------------------------------------
# Context windows.
# ----------------------------------------------------------------------------------------------


def context_windows(num_frames: int, length: int, overlap: int = 4, looped: bool = False) -> Windows:
    """Overlapping windows of `length` frames covering `0..num_frames-1`, starting every
    `length - overlap` frames: the last one flush with the end (AnimateDiff-Evolved's "uniform"), or
    with `looped` wrapping around it ("looped_uniform": the last frames see the first, for seamless
    loops). One window of all frames when `length >= num_frames`.
    """
    if length < 1 or not 0 <= overlap < length:
        raise ValueError(f"context windows need length >= 1 and 0 <= overlap < length, got {length}, {overlap}")
    if length >= num_frames:
        return (tuple(range(num_frames)),)
    stride = length - overlap
    if looped:
        return tuple(tuple((s + j) % num_frames for j in range(length)) for s in range(0, num_frames, stride))
    starts = list(range(0, num_frames - length + 1, stride))
    if starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return tuple(tuple(range(s, s + length)) for s in starts)


WEIGHTINGS = ("flat", "pyramid", "delayed_reverse_sawtooth")
NOISE_TYPES = ("random", "shuffle_context", "repeat_context")
SCHEDULES = ("uniform", "looped_uniform")
SCOPES = ("unet", "motion")  # what runs per window: the whole UNet, or only the motion modules' attentions


def window_weights(length: int, weighting: str = "flat") -> tuple[float, ...]:
    """How much each position of a window counts where windows overlap (diffusers' FreeNoise
    `_get_frame_weights`, `layers.frame_weights`): flat 1s; pyramid [1, 2, .., 2, 1]; delayed_reverse_sawtooth
    [0.01, .., mid, .., 1]."""
    return frame_weights(length, weighting)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Windows of frame indices and the weight of each position in a window (static: part of the compile)."""

    frames: Windows
    weights: tuple[float, ...]


def _windowed(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, windows: Windows | WindowPlan
              ) -> jax.Array:
    """`fn(frames, their indices)` (-> per-frame prediction) on each window of `x`'s frame axis,
    overlaps averaged (weighted by position in the window with a `WindowPlan`).

    Windows run one after another (`lax.map`), so memory is one window's worth of activations.
    """
    plan = windows if isinstance(windows, WindowPlan) else WindowPlan(windows, (1.0,) * len(windows[0]))
    idx = np.asarray(plan.frames, np.int32)  # [W, L], static
    w, length = idx.shape
    pos = np.broadcast_to(np.asarray(plan.weights, np.float64), idx.shape)
    counts = np.bincount(idx.reshape(-1), weights=pos.reshape(-1), minlength=x.shape[1])
    if (counts == 0).any():
        raise ValueError(f"context windows leave frames {np.flatnonzero(counts == 0).tolist()} uncovered")
    preds = jax.lax.map(lambda ix: fn(jnp.take(x, ix, axis=1), ix), jnp.asarray(idx))  # [W, B, L, ...]
    preds = preds * jnp.asarray(pos, preds.dtype).reshape((w, 1, length) + (1,) * (preds.ndim - 3))
    preds = jnp.moveaxis(preds, 0, 1).reshape((x.shape[0], w * length) + preds.shape[3:])
    total = jnp.zeros(preds.shape[:1] + x.shape[1:2] + preds.shape[2:], preds.dtype)
    total = total.at[:, idx.reshape(-1)].add(preds)
    return total / jnp.asarray(counts, preds.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def free_noise_perms(key: jax.Array) -> Callable[[int], np.ndarray]:
    """The permutations `free_noise` shuffles a video's noise with, drawn in turn from its key."""
    counter = itertools.count(1)
    return lambda n: np.asarray(jax.random.permutation(jax.random.fold_in(key, 0x4E4F4953 + next(counter)), n))


def free_noise(noise: np.ndarray, length: int, stride: int, noise_type: str, perms: Callable[[int], np.ndarray]
               ) -> np.ndarray:
    """FreeNoise's initial noise over `[N, F, ...]` (diffusers' `_prepare_latents_free_noise`):
    "repeat_context" repeats the first `length` frames; "shuffle_context" fills each later stretch of
    `stride` frames with a permutation (`perms(n)`) of the frames a window earlier; "random" keeps it."""
    f = noise.shape[1]
    if noise_type == "random":
        return noise
    if noise_type == "repeat_context":
        return np.concatenate([noise[:, :length]] * -(-f // length), axis=1)[:, :f]
    if noise_type != "shuffle_context":
        raise ValueError(f"context_windows.noise={noise_type!r}: expected one of {', '.join(NOISE_TYPES)}")
    out = np.array(noise)
    for i in range(length, f, stride):
        lo = max(0, i - length)
        n = min(f, lo + stride) - lo
        if n == 0:
            break
        src = np.arange(lo, lo + n)[perms(n)]
        k = min(f, i + n) - i
        out[:, i:i + k] = out[:, src[:k]]
    return out


# ----------------------------------------------------------------------------------------------
# The denoising loop (pure, jittable).
# ----------------------------------------------------------------------------------------------


def _cfg_enabled(guidance_scale: Any) -> bool:
    """diffusers guides only when the scale exceeds 1; a traced scale means guidance is on."""
    try:
        return float(guidance_scale) > 1.0
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return True


def predict_noise(
    unet: UNet3D,
    unet_params: Params,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array,
    uncond: jax.Array | None,
    guidance_scale: Any,
    windows: Windows | None = None,
    control: Callable[..., tuple[Any, Any]] | None = None,
) -> jax.Array:
    """Guided float32 noise prediction for the (already scaled) model input `x` `[B, F, h, w, C]`;
    `cond`/`uncond` `[B, L, D]`, or `[B, F, L, D]` a text per frame (windows take their frames').

    With `uncond`, one UNet call on 2B videos: sample b's unconditional and conditional copies
    are adjacent (a per-sample `concat([uncond, cond])`), so a batch sharded over devices stays
    local; then `uncond + g * (cond - uncond)`. Without `uncond`, or with a concrete scale <= 1,
    the conditional prediction alone. `control(x, t, context, frames, pairs) -> (down, mid)`: the
    control models' residuals for that same UNet input (`sampling.control`), or None.
    """
    apply = functools.partial(unet.apply, {"params": unet_params})
    if not _cfg_enabled(guidance_scale):
        uncond = None

    def frames(c: jax.Array | None, ix: jax.Array | None) -> jax.Array | None:
        """A per-frame context `[B, F, L, D]` cut to the window's frames (one per video stays)."""
        return c if c is None or ix is None or c.ndim == 3 else jnp.take(c, ix, axis=1)

    def run(xw: jax.Array, ix: jax.Array | None = None) -> jax.Array:
        b = xw.shape[0]
        c, u = frames(cond, ix), frames(uncond, ix)

        def unet(x_, ctx_, pairs):
            res = (None, None) if control is None else control(x_, t, ctx_, ix, pairs)
            return apply(x_, t, ctx_, *res).astype(jnp.float32)

        if u is None:
            return unet(xw, c, False)
        x2 = jnp.stack([xw, xw], axis=1).reshape((2 * b,) + xw.shape[1:])
        ctx = jnp.stack([u, c], axis=1).reshape((2 * b,) + c.shape[1:])
        out = unet(x2, ctx, True).reshape((b, 2) + xw.shape[1:])
        eps_u, eps_c = out[:, 0], out[:, 1]
        return eps_u + guidance_scale * (eps_c - eps_u)

    return run(x) if windows is None else _windowed(run, x, windows)


def _sample_keys(key: jax.Array, batch: int) -> jax.Array:
    """One typed key per sample: `key` itself when it is already `[B]`, else `fold_in(key, b)`."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 1:
        if key.shape[0] != batch:
            raise ValueError(f"{key.shape[0]} keys for a batch of {batch}")
        return key
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def denoise(
    unet: UNet3D,
    unet_params: Params,
    sched: S.Scheduler,
    latents: jax.Array,
    cond: jax.Array,
    uncond: jax.Array | None,
    guidance_scale: Any,
    key: jax.Array,
    progress_cb: Callable[[int], None] | None = None,
    windows: Windows | None = None,
    start: int = 0,
    controls: tuple | None = None,
) -> jax.Array:
    """Runs the steps `start..` of `sched` from `latents` (already times `init_noise_sigma`, or noised
    to the start step's timestep: video-to-video) in one `lax.scan`.

    `cond`/`uncond`: text embeddings `[B, L, D]` (or `[B, F, L, D]`, one per frame); guidance is on when `uncond` is given and
    `guidance_scale > 1` (or traced). `key`: one key, or one per sample (typed or raw key
    data); step `i` of sample `b` uses `fold_in(key_b, i)`. `progress_cb(i)` is called from the
    compiled loop after step `i` (via `jax.debug.callback`). `windows`: frame windows from
    `context_windows`, or None to run the UNet on all frames at once. `controls`: `(specs, params,
    scales, arrays)` of `sampling.control` (arrays batched like the latents), or None. Returns float32 latents.
    """
    latents = latents.astype(jnp.float32)
    b = latents.shape[0]
    if not _cfg_enabled(guidance_scale):
        uncond = None
    keys = _sample_keys(key, b)
    # Per-sample scheduler state and noise: vmap the (elementwise) update over the batch.
    carry0 = jax.vmap(functools.partial(S.init_carry, sched))(latents)

    def body(state, i):
        x, carry = state
        x_in = S.scale_model_input(sched, i, x)
        control = None if not controls else functools.partial(
            control_residuals, *controls, i - start, sched.num_inference_steps - start)
        eps = predict_noise(unet, unet_params, x_in, sched.timesteps[i], cond, uncond, guidance_scale, windows,
                            control)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        update = lambda c, e, s, k: S.step(sched, c, i, e, s, k)
        x, carry = jax.vmap(update)(carry, eps, x, step_keys)
        if progress_cb is not None:
            # The step index, tied to the new latents by a barrier (not by reading them: an element of a
            # batch-sharded array would cost a cross-device op per step), fires once the step is done.
            done, x = jax.lax.optimization_barrier((i, x))
            jax.debug.callback(lambda s: progress_cb(int(s)), done, ordered=False)
        return (x, carry), None

    (x, _), _ = jax.lax.scan(body, (latents, carry0), jnp.arange(start, sched.num_inference_steps))
    return x


# ----------------------------------------------------------------------------------------------
# Text.
# ----------------------------------------------------------------------------------------------


def encode_text(
    pipe: AnimationPipeline,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    clip_skip: int = 0,
) -> tuple[jax.Array, jax.Array | None, float]:
    """(cond, uncond or None, compile seconds): CLIP embeddings `[N, 77, D]`.

    `clip_skip` applies to the prompts only; negatives use the last layer, as diffusers'
    `encode_prompt` does.
    """
    if pipe.tokenizer is None:
        raise ValueError("the pipeline has no tokenizer: pass one to AnimationPipeline / from_sd15")
    model = pipe.text_encoder
    params = pipe.params["text_encoder"]
    ids = jnp.asarray(pipe.tokenizer(list(prompts)))
    neg = None if negative_prompts is None else jnp.asarray(pipe.tokenizer(list(negative_prompts)))

    def fn(params, ids, neg):
        cond = model.apply({"params": params}, ids, clip_skip)
        uncond = None if neg is None else model.apply({"params": params}, neg, 0)
        return cond, uncond

    compiled, compile_s = pipe._compiled("text", fn, (model, clip_skip), (params, ids, neg))
    cond, uncond = compiled(params, ids, neg)
    return cond, uncond, compile_s


# ----------------------------------------------------------------------------------------------
# Prompt travel: a text per frame, interpolated between keyframes.
# ----------------------------------------------------------------------------------------------

Prompt = Union[str, Mapping[int, str]]
INTERPOLATIONS = ("linear", "slerp")


def keyframes(prompt: Prompt, num_frames: int, name: str) -> list[tuple[int, str]]:
    """The sorted `(frame, text)` keyframes of a prompt: a string is one keyframe at frame 0; a map
    `{frame: text}` (keys may be digit strings, as config files give them) must have frame 0 and
    stay inside the video."""
    if isinstance(prompt, str):
        return [(0, prompt)]
    if not isinstance(prompt, Mapping) or not prompt:
        raise ValueError(f"{name}={prompt!r}: expected a string or a non-empty {{frame: prompt}} map")
    out = []
    for k, v in prompt.items():
        if isinstance(k, bool) or not (isinstance(k, (int, np.integer)) or (isinstance(k, str) and k.strip().isdigit())):
            raise ValueError(f"{name}: key {k!r} is not a frame number")
        if not isinstance(v, str):
            raise ValueError(f"{name}[{k}]={v!r}: expected a string")
        out.append((int(k), v))
    out.sort()
    frames = [f for f, _ in out]
    if len(set(frames)) != len(frames):
        raise ValueError(f"{name}: frame {next(f for f in frames if frames.count(f) > 1)} is given twice")
    if frames[0] != 0:
        raise ValueError(f"{name}: no prompt at frame 0 (keyframes {frames}): the video must start from one")
    if frames[-1] >= num_frames:
        raise ValueError(f"{name}: frame {frames[-1]} is outside the video (frames 0 to {num_frames - 1})")
    return out


def _travel(keys: list[tuple[int, str]], num_frames: int, row: Mapping[str, int]) -> tuple[np.ndarray, ...]:
    """Per frame: the two embeddings (rows of the unique texts) it lies between, and where (0..1).
    As diffusers' FreeNoise: keyframe k to k+1 inclusive, the last keyframe held to the last frame."""
    frames, texts = [f for f, _ in keys], [t for _, t in keys]
    if frames[-1] != num_frames - 1:
        frames, texts = frames + [num_frames - 1], texts + [texts[-1]]
    i = np.full(num_frames, row[texts[0]], np.int32)
    j, t = i.copy(), np.zeros(num_frames, np.float32)
    for a in range(len(frames) - 1):
        start, end = frames[a], frames[a + 1]
        for f in range(start, end + 1):
            i[f], j[f], t[f] = row[texts[a]], row[texts[a + 1]], (f - start) / (end - start)
    return i, j, t


def interpolate(emb: jax.Array, i: jax.Array, j: jax.Array, t: jax.Array, method: str = "linear") -> jax.Array:
    """`emb[i]` to `emb[j]` at `t` (`[F]` each) for embeddings `emb` `[K, L, D]` -> `[F, L, D]`.

    "linear": `(1 - t) a + t b` (diffusers' FreeNoise `_lerp`); "slerp": along the great circle
    between each token's two vectors (linear where they are parallel)."""
    a, b = emb[i].astype(jnp.float32), emb[j].astype(jnp.float32)
    tt = t.astype(jnp.float32)[:, None, None]
    if method == "linear":
        return (1 - tt) * a + tt * b
    if method != "slerp":
        raise ValueError(f"prompt interpolation {method!r}: expected one of {INTERPOLATIONS}")
    norm = jnp.linalg.norm(a, axis=-1, keepdims=True) * jnp.linalg.norm(b, axis=-1, keepdims=True)
    cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True) / jnp.maximum(norm, 1e-12), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sin(theta)
    parallel = sin < 1e-4
    safe = jnp.where(parallel, 1.0, sin)
    wa = jnp.where(parallel, 1 - tt, jnp.sin((1 - tt) * theta) / safe)
    wb = jnp.where(parallel, tt, jnp.sin(tt * theta) / safe)
    return wa * a + wb * b


def encode_prompts(
    pipe: AnimationPipeline,
    prompts: Sequence[Prompt],
    negative_prompts: Sequence[Prompt] | None,
    num_frames: int,
    clip_skip: int = 0,
    interpolation: str = "linear",
) -> tuple[jax.Array, jax.Array | None, float]:
    """`encode_text` for prompts that may travel: `[N, 77, D]` embeddings when every prompt is one
    string, else `[N, F, 77, D]`, each frame's text interpolated between its keyframes (each unique
    text encoded once)."""
    texts = list(prompts) + list(negative_prompts or [])
    if all(isinstance(p, str) for p in texts):
        return encode_text(pipe, list(prompts), None if negative_prompts is None else list(negative_prompts), clip_skip)
    pos = [keyframes(p, num_frames, f"prompts[{b}]") for b, p in enumerate(prompts)]
    neg = None if negative_prompts is None else [
        keyframes(p, num_frames, f"negative_prompts[{b}]") for b, p in enumerate(negative_prompts)]
    unique_pos = list(dict.fromkeys(t for k in pos for _, t in k))
    unique_neg = None if neg is None else list(dict.fromkeys(t for k in neg for _, t in k))
    cond_u, uncond_u, compile_s = encode_text(pipe, unique_pos, unique_neg, clip_skip)

    def per_frame(emb, keys, texts):
        row = {t: r for r, t in enumerate(texts)}
        return jnp.stack([interpolate(emb, *map(jnp.asarray, _travel(k, num_frames, row)), interpolation)
                          for k in keys])

    cond = per_frame(cond_u, pos, unique_pos)
    uncond = None if neg is None else per_frame(uncond_u, neg, unique_neg)
    return cond.astype(cond_u.dtype), None if uncond is None else uncond.astype(uncond_u.dtype), compile_s


# ----------------------------------------------------------------------------------------------
# FreeInit: re-initialise the noise's low frequencies from the last video, then denoise again.
# ----------------------------------------------------------------------------------------------

FREE_INIT_METHODS = ("butterworth", "gaussian", "ideal")
FREE_INIT_DEFAULTS = dict(num_iters=3, method="butterworth", order=4, spatial_stop_frequency=0.25,
                          temporal_stop_frequency=0.25, use_fast_sampling=False)  # diffusers' enable_free_init
_FREE_INIT_KINDS = ("ddim", "pndm")  # samplers whose add_noise is sqrt(abar) x + sqrt(1 - abar) noise
_FREE_INIT_SALT = 0x46524545  # folded into a video's key for each iteration's fresh noise ("FREE")


def free_init_options(free_init: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`free_init` with diffusers' defaults filled in and checked (None or num_iters <= 1: off)."""
    if free_init is None:
        return None
    unknown = sorted(set(free_init) - set(FREE_INIT_DEFAULTS))
    if unknown:
        raise ValueError(f"free_init: unknown option(s) {unknown} (valid: {', '.join(FREE_INIT_DEFAULTS)})")
    o = {**FREE_INIT_DEFAULTS, **free_init}
    if not isinstance(o["num_iters"], (int, np.integer)) or isinstance(o["num_iters"], bool) or o["num_iters"] < 0:
        raise ValueError(f"free_init.num_iters={o['num_iters']!r}: expected an integer >= 0 (<= 1: off)")
    if o["method"] not in FREE_INIT_METHODS:
        raise ValueError(f"free_init.method={o['method']!r}: expected one of {', '.join(FREE_INIT_METHODS)}")
    for name in ("order", "spatial_stop_frequency", "temporal_stop_frequency"):
        v = o[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise ValueError(f"free_init.{name}={v!r}: expected a number >= 0")
    if not isinstance(o["use_fast_sampling"], bool):
        raise ValueError(f"free_init.use_fast_sampling={o['use_fast_sampling']!r}: expected True or False")
    return o if o["num_iters"] > 1 else None


def check_free_init(free_init: Mapping[str, Any] | None, sched: S.Scheduler) -> dict[str, Any] | None:
    """`free_init_options`, and a sampler FreeInit can re-noise for (its add_noise is DDPM's)."""
    fi = free_init_options(free_init)
    if fi is not None and sched.kind not in _FREE_INIT_KINDS:
        raise ValueError(f"free_init with scheduler {sched.kind!r}: FreeInit re-noises as DDPM does, which "
                         f"{', '.join(_FREE_INIT_KINDS)} share; use one of those")
    return fi


def free_init_filter(frames: int, height: int, width: int, method: str = "butterworth", order: float = 4,
                     spatial_stop_frequency: float = 0.25, temporal_stop_frequency: float = 0.25) -> np.ndarray:
    """FreeInit's low-pass filter `[F, h, w]` over the centred (fftshift-ed) frequencies, as diffusers'
    `_get_free_init_freq_filter` (the same for every channel)."""
    if spatial_stop_frequency == 0 or temporal_stop_frequency == 0:
        return np.zeros((frames, height, width), np.float32)
    t = (spatial_stop_frequency / temporal_stop_frequency) * (2 * np.arange(frames) / frames - 1)
    h, w = 2 * np.arange(height) / height - 1, 2 * np.arange(width) / width - 1
    d2 = t[:, None, None] ** 2 + h[None, :, None] ** 2 + w[None, None, :] ** 2
    if method == "butterworth":
        mask = 1 / (1 + (d2 / spatial_stop_frequency**2) ** order)
    elif method == "gaussian":
        mask = np.exp(-1 / (2 * spatial_stop_frequency**2) * d2)
    elif method == "ideal":
        mask = (d2 <= spatial_stop_frequency * 2).astype(np.float64)
    else:
        raise ValueError(f"free_init method {method!r}: expected one of {FREE_INIT_METHODS}")
    return mask.astype(np.float32)


def freq_mix(x: jax.Array, noise: jax.Array, low_pass: jax.Array) -> jax.Array:
    """`x`'s low frequencies and `noise`'s high ones, over (frames, height, width) of `[B, F, h, w, C]`
    videos (diffusers' `_apply_freq_filter`)."""
    axes = (1, 2, 3)
    lp = jnp.asarray(low_pass, jnp.float32)[None, :, :, :, None]
    xf = jnp.fft.fftshift(jnp.fft.fftn(x.astype(jnp.float32), axes=axes), axes=axes)
    nf = jnp.fft.fftshift(jnp.fft.fftn(noise.astype(jnp.float32), axes=axes), axes=axes)
    mixed = jnp.fft.ifftshift(xf * lp + nf * (1 - lp), axes=axes)
    return jnp.fft.ifftn(mixed, axes=axes).real


def free_init_noise(key_data: jax.Array, iteration: int, shape: tuple[int, ...]) -> jax.Array:
    """The fresh standard-normal noise iteration `iteration` of FreeInit mixes in, per video from its key."""
    keys = _sample_keys(key_data, shape[0])
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _FREE_INIT_SALT + iteration), shape[1:],
                                                jnp.float32))(keys)


def free_init_steps(steps: int, options: Mapping[str, Any]) -> list[int]:
    """Denoising steps of each FreeInit iteration: all of them, or coarse to fine with `use_fast_sampling`."""
    n = int(options["num_iters"])
    if not options["use_fast_sampling"]:
        return [steps] * n
    return [max(1, int(steps / n * (k + 1))) for k in range(n)]


# ----------------------------------------------------------------------------------------------
# Video to video: start from a video's latents noised to `strength`.
# ----------------------------------------------------------------------------------------------

_VIDEO_SALT = 0x56494456  # folded into a video's key for its VAE posterior sample ("VIDV")
_CONTROL_SALT = 0x53504354  # ... for an RGB SparseCtrl's keyframes ("SPCT", + the control's index)


def video_start(steps: int, strength: float) -> int:
    """The first step a video-to-video run takes: the last `int(steps * strength)` run (diffusers'
    `get_timesteps`; strength 1 is every step, from pure noise over the video's latents)."""
    return steps - min(int(steps * strength), steps)


def check_video_options(strength: Any, sched: S.Scheduler, free_init: Mapping | None) -> int:
    """The start step of a video-to-video run, after checking `strength` and the sampler."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r}: expected a number in (0, 1]")
    if sched.kind not in _FREE_INIT_KINDS:
        raise ValueError(f"init_video with scheduler {sched.kind!r}: the video is noised as DDPM does, which "
                         f"{', '.join(_FREE_INIT_KINDS)} share; use one of those")
    if free_init:
        raise ValueError("init_video with free_init: FreeInit starts each iteration from pure noise; give one")
    start = video_start(sched.num_inference_steps, float(strength))
    if start >= sched.num_inference_steps:
        raise ValueError(f"strength={strength} with steps={sched.num_inference_steps} leaves no step to run")
    return start


def video_pixels(video: np.ndarray) -> np.ndarray:
    """Frames `[..., H, W, 3]` as float32 in [-1, 1] (uint8 0..255 as diffusers' video processor maps them)."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 127.5 - 1.0
    return video.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# generate: validation, placement, compile, run.
# ----------------------------------------------------------------------------------------------


def _as_list(name: str, value: Any) -> list:
    if isinstance(value, (str, int)) or value is None:
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)


def per_prompt(name: str, values: Sequence[Any], n: int) -> list:
    """`values` for each of `n` prompts: one (broadcast to all) or `n` of them."""
    values = list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name}: {n} prompts but {len(values)} given: give 1 or {n}")
    return values


class WindowSpec(NamedTuple):
    length: int
    overlap: int
    weighting: str = "flat"
    noise: str = "random"
    schedule: str = "uniform"
    scope: str = "unet"  # "unet": the UNet per window (AnimateDiff-Evolved); "motion": diffusers' FreeNoise


def check_windows(context_windows: Mapping[str, Any] | None) -> WindowSpec | None:
    """The `context_windows` argument checked (`length`, `overlap`, `weighting`, `noise`, `schedule`,
    `scope`), or None for off (None or length 0)."""
    if context_windows is None:
        return None
    unknown = sorted(set(context_windows) - set(WindowSpec._fields))
    if unknown or "length" not in context_windows:
        raise ValueError(f"context_windows takes length (required), {', '.join(WindowSpec._fields[1:])}; "
                         f"got {dict(context_windows)}")
    length = int(context_windows["length"])
    overlap = int(context_windows.get("overlap", length // 4))
    if length == 0:
        return None
    if length < 1 or not 0 <= overlap < length:
        raise ValueError(f"context_windows needs length >= 1 (0: off) and 0 <= overlap < length, "
                         f"got length={length}, overlap={overlap}")
    spec = WindowSpec(length, overlap, *(context_windows.get(k, d) for k, d in
                                         (("weighting", "flat"), ("noise", "random"), ("schedule", "uniform"),
                                          ("scope", "unet"))))
    for name, value, valid in (("weighting", spec.weighting, WEIGHTINGS), ("noise", spec.noise, NOISE_TYPES),
                               ("schedule", spec.schedule, SCHEDULES), ("scope", spec.scope, SCOPES)):
        if value not in valid:
            raise ValueError(f"context_windows.{name}={value!r}: expected one of {', '.join(valid)}")
    return spec


def _validate(pipe, prompts, negative_prompts, seeds, num_frames, height, width, steps, scheduler,
              scheduler_options, clip_skip, decode_chunk, mesh, init_latents, context_windows,
              prompt_interpolation="linear", free_init=None, init_video=None, strength=0.8, controls=(),
              need_tokenizer=True):
    """Every check of generate's arguments that can fail, before anything is compiled; returns the
    resolved pieces. (A sample config's checks call the pieces a config also has: `check_windows`,
    `per_prompt`, the scheduler's.)"""
    prompts = _as_list("prompts", prompts)
    seeds = _as_list("seeds", seeds)
    if not prompts or not all(isinstance(p, (str, Mapping)) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings (or {{frame: prompt}} maps), got {prompts!r}")
    n = len(prompts)
    if len(seeds) != n:
        raise ValueError(f"{n} prompts but {len(seeds)} seeds: give one seed per prompt")
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s < 2**64 for s in seeds):
        raise ValueError(f"seeds must be integers in [0, 2**64), got {seeds!r}")
    if negative_prompts is not None:
        negative_prompts = per_prompt("negative_prompts", _as_list("negative_prompts", negative_prompts), n)
    if pipe.tokenizer is None and need_tokenizer:
        raise ValueError("the pipeline has no tokenizer: pass one to AnimationPipeline / from_sd15")
    m = pipe.size_multiple
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % m:
            raise ValueError(f"{name}={v} must be a positive multiple of {m} (VAE factor x UNet downsampling)")
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    for name, values in (("prompts", prompts), ("negative_prompts", negative_prompts or [])):
        for b, p in enumerate(values):
            keyframes(p, num_frames, f"{name}[{b}]")  # a travelling prompt's keyframes inside the video
    if prompt_interpolation not in INTERPOLATIONS:
        raise ValueError(f"prompt_interpolation={prompt_interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    layers = pipe.text_config.num_layers
    if not 0 <= int(clip_skip) <= layers:
        raise ValueError(f"clip_skip={clip_skip}: the text encoder has {layers} layers (expected 0 to {layers})")
    if decode_chunk is not None and (not isinstance(decode_chunk, (int, np.integer)) or decode_chunk < 1):
        raise ValueError(f"decode_chunk must be a positive integer or None, got {decode_chunk!r}")
    if mesh is not None and DATA not in mesh.axis_names:
        raise ValueError(f"mesh must have a {DATA!r} axis, has {mesh.axis_names}")
    sched = S.make_scheduler(scheduler, steps, **dict(scheduler_options or {}))
    fi = check_free_init(free_init, sched)
    scheds = [sched] if fi is None else [S.make_scheduler(scheduler, k, **dict(scheduler_options or {}))
                                         for k in free_init_steps(steps, fi)]

    win = check_windows(context_windows)
    motion = pipe.unet_config.motion
    limit = motion.max_positions if motion is not None else None
    stretch = pipe.position_stretch
    if stretch and limit is not None:
        if len(stretch) != 2 or not 1 <= stretch[0] <= limit or stretch[1] < 1:
            raise ValueError(f"pe_stretch={tuple(stretch)}: expected (n, m) with 1 <= n <= {limit} (the motion "
                             "module's position table) and m >= 1")
        limit = int(stretch[1])
    if win is None and limit is not None and num_frames > limit:
        raise ValueError(
            f"num_frames={num_frames} exceeds the motion module's position table ({limit} frames); sample it in "
            f"overlapping windows (context_windows length {limit}, overlap 4) or stretch the table (pe_stretch)"
        )
    if win is not None and limit is not None and win.length > limit:
        raise ValueError(f"context_windows.length={win.length} exceeds the motion module's position table "
                         f"({limit} frames)")
    windows = None if win is None else context_windows_or_none(num_frames, win)

    h, w = height // pipe.vae_config.downscale, width // pipe.vae_config.downscale
    shape = (n, num_frames, h, w, pipe.unet_config.in_channels)
    start = 0
    if init_video is not None:
        got = tuple(np.shape(init_video))
        if len(got) != 5 or got[0] not in (1, n) or got[2:] != (height, width, 3):
            raise ValueError(f"init_video must be frames [N or 1, F, {height}, {width}, 3], got {got}")
        if got[1] < num_frames:
            raise ValueError(f"init_video has {got[1]} frames, fewer than num_frames={num_frames}")
        start = check_video_options(strength, sched, fi)
    check_controls(controls, num_frames, height, width, pipe.unet_config,  # scope "motion": controls see all frames
                   win.length if windows is not None and win.scope == "unet" else None)
    if init_latents is not None and tuple(np.shape(init_latents)) != shape:
        raise ValueError(f"init_latents must have shape {shape} (N, F, h, w, C), got {tuple(np.shape(init_latents))}")
    return prompts, negative_prompts, [int(s) for s in seeds], scheds, fi, windows, win, shape, start


def motion_windows(num_frames: int, spec: WindowSpec) -> TemporalWindows | None:
    """`spec`'s windows for the motion modules (scope "motion", diffusers' FreeNoise): `context_windows`'
    frames; off the stride grid, the last (flush with the end) adds only the frames past the window before
    it, as `FreeNoiseTransformerBlock`'s; None when one window holds every frame."""
    looped = spec.schedule == "looped_uniform"
    frames = context_windows(num_frames, spec.length, spec.overlap, looped=looped)
    if len(frames) == 1:
        return None
    end = list(range(0, num_frames - spec.length + 1, spec.length - spec.overlap))[-1] + spec.length
    return TemporalWindows(frames, spec.weighting, 0 if looped else num_frames - end)


def context_windows_or_none(num_frames: int, spec: WindowSpec) -> WindowPlan | None:
    """The windows of `spec` over `num_frames`, or None when one window holds every frame (the plain path)."""
    frames = context_windows(num_frames, spec.length, spec.overlap, looped=spec.schedule == "looped_uniform")
    if len(frames) == 1:
        return None
    return WindowPlan(frames, window_weights(len(frames[0]), spec.weighting))


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



def _sampler_fns(pipe: AnimationPipeline, unet: UNet3D, scheds: Sequence[S.Scheduler], fi: Mapping | None,
                 shape: tuple[int, ...], start: int, windows, specs: tuple, has_video: bool,
                 decode_chunk: int | None, sample_posterior: bool, progress) -> tuple[Callable, Callable, tuple, bool]:
    """The two programs `generate` compiles, `(sample_fn, decode_fn, static, needs_vae)`: the denoising
    call (video / keyframe encoding, every FreeInit iteration's scan) and the VAE decode. `static`
    keys the compiled cache; the same functions are what `abstract_sampler` lowers for a TPU."""
    needs_vae = has_video or any(s.latent for s in specs)
    vae = pipe.vae
    emit = pipe._emit if progress else None
    low_pass = None if fi is None else free_init_filter(
        shape[1], shape[2], shape[3], fi["method"], fi["order"], fi["spatial_stop_frequency"],
        fi["temporal_stop_frequency"])
    offsets = np.cumsum([-start] + [int(x.num_inference_steps) for x in scheds]).tolist()

    def step_cb(it: int):  # progress over all FreeInit iterations' steps
        return None if emit is None else (lambda i: emit(i + offsets[it]))

    def sample_fn(params, scheds, noise, cond, uncond, g, key_data, ctrl_params, ctrl_scales, ctrl_arrays,
                  vae_params=None, video=None):
        first = noise * scheds[0].init_noise_sigma
        keys = _sample_keys(key_data, noise.shape[0])

        def encode_keyframes(pixels, j):  # an RGB SparseCtrl's keyframes, each video's posterior from its key
            ks = jax.vmap(lambda k: jax.random.fold_in(k, _CONTROL_SALT + j))(keys)
            return encode_video(vae, vae_params, pixels, ks if sample_posterior else None, decode_chunk)

        controls = None
        if specs:
            controls = (specs, ctrl_params, ctrl_scales, latent_conditions(specs, ctrl_arrays, encode_keyframes,
                                                                           noise.shape[1]))
        if video is not None:  # video to video: its latents noised to the start step's timestep
            vkeys = jax.vmap(lambda k: jax.random.fold_in(k, _VIDEO_SALT))(keys)
            z0 = encode_video(vae, vae_params, video, vkeys if sample_posterior else None, decode_chunk)
            t0 = jnp.full((noise.shape[0],), scheds[0].timesteps[start])
            first = S.add_noise(scheds[0].alphas_cumprod, z0, noise, t0)
        x = denoise(unet, params, scheds[0], first, cond, uncond, g, key_data, step_cb(0), windows, start, controls)
        for it, sched in enumerate(scheds[1:], start=1):  # FreeInit: back to the last timestep, low frequencies kept
            t_last = jnp.full((x.shape[0],), sched.alphas_cumprod.shape[0] - 1)
            z_t = S.add_noise(sched.alphas_cumprod, x, first, t_last)
            x = freq_mix(z_t, free_init_noise(key_data, it, x.shape), low_pass)
            x = denoise(unet, params, sched, x, cond, uncond, g, key_data, step_cb(it), windows, 0, controls)
        return x

    def decode_fn(params, latents):
        return to_uint8(decode_video(vae, params, latents, decode_chunk))

    static = (unet, windows, progress is not False, None if fi is None else tuple(sorted(fi.items())),
              start if has_video else None, (vae, decode_chunk, sample_posterior) if needs_vae else None, specs)
    return sample_fn, decode_fn, static, needs_vae


def _sampler_unet(pipe: AnimationPipeline, num_frames: int, windows, win) -> tuple[UNet3D, Any]:
    """The UNet the loop calls and the windows it runs over: scope "motion" puts the windows inside
    the motion modules (one UNet call on all frames), scope "unet" windows the whole UNet."""
    if windows is not None and win.scope == "motion":
        return dataclasses.replace(pipe.unet, motion_windows=motion_windows(num_frames, win)), None
    return pipe.unet, windows


def abstract_sampler(pipe: AnimationPipeline, prompts: list[Prompt], negative_prompts: list[Prompt] | None,
                     seeds: list[int], *, mesh: Mesh, num_frames: int = 16, height: int = 512, width: int = 512,
                     steps: int = 25, guidance_scale: float = 7.5, scheduler: str = "ddim",
                     scheduler_options: Mapping[str, Any] | None = None, clip_skip: int = 0,
                     decode_chunk: int | None = 4, context_windows: Mapping[str, Any] | None = None,
                     free_init: Mapping[str, Any] | None = None, init_video_frames: int = 0,
                     strength: float = 0.8, sample_posterior: bool = True, controls: Sequence[Control] = (),
                     progress: bool = True) -> dict[str, tuple[Callable, tuple, NamedSharding]]:
    """`generate`'s two compiled programs for these arguments, with `ShapeDtypeStruct` arguments laid
    out on `mesh` as `generate` lays out its arrays: `{"denoise": (fn, args, out_sharding), "decode":
    ...}`. `pipe.params` may be `ShapeDtypeStruct`s (nothing is read or run), and `mesh` a TPU
    topology's abstract devices: `animatediff-jax compile sample` lowers and compiles these.
    `init_video_frames` > 0 stands for an `init_video` of that many frames (video to video).
    Control images are read by `control_inputs` as `generate` reads them (their values do not matter)."""
    init_video = None if not init_video_frames else np.zeros((1, init_video_frames, height, width, 3), np.uint8)
    prompts, negative_prompts, seeds, scheds, fi, windows, win, shape, start = _validate(
        pipe, prompts, negative_prompts, seeds, num_frames, height, width, steps, scheduler, scheduler_options,
        clip_skip, decode_chunk, mesh, None, context_windows, "linear", free_init, init_video, strength, controls,
        need_tokenizer=False)
    unet, windows = _sampler_unet(pipe, num_frames, windows, win)
    use_cfg = guidance_scale > 1.0
    if use_cfg and negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    n = -(-shape[0] // mesh.shape[DATA]) * mesh.shape[DATA]  # padded to the data axis, as generate pads
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))

    def sds(shape_, dtype, sharding=batch):
        return jax.ShapeDtypeStruct(tuple(shape_), jnp.dtype(dtype), sharding=sharding)

    def params(tree):
        return jax.tree.map(lambda x: sds(np.shape(x), x.dtype, rep), tree)

    text = pipe.text_config
    travels = any(not isinstance(p, str) for p in list(prompts) + list(negative_prompts or []))
    ctx = (n, num_frames, text.max_positions, text.hidden_size) if travels else (n, text.max_positions, text.hidden_size)
    cond = sds(ctx, pipe.dtype)
    uncond = sds(ctx, pipe.dtype) if use_cfg else None
    specs, control_arrays = [], []
    for c in controls:
        spec, arrays = control_inputs(c, shape[1], pipe.dtype, pipe.attention)
        specs.append(spec)
        control_arrays.append({k: sds((n,) + np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()})
    sample_fn, decode_fn, _, needs_vae = _sampler_fns(
        pipe, unet, scheds, fi, shape, start, windows, tuple(specs), init_video is not None, decode_chunk,
        sample_posterior, progress)
    host_scheds = jax.tree.map(lambda x: sds(np.shape(x), np.asarray(x).dtype, rep), tuple(scheds))
    key_data = jax.random.key_data(seed_key(0))
    args = (params(pipe.params["unet"]), host_scheds, sds((n,) + shape[1:], jnp.float32), cond, uncond,
            sds((), jnp.float32, rep), sds((n,) + key_data.shape, key_data.dtype),
            [params(c.params) for c in controls], sds((len(controls),), jnp.float32, rep), control_arrays)
    if needs_vae:
        video = None if init_video is None else sds((n,) + init_video.shape[1:], jnp.float32)
        args += (params(pipe.params["vae"]), video)
    latents = sds((n,) + shape[1:], jnp.float32)
    return {"denoise": (sample_fn, args, batch), "decode": (decode_fn, (params(pipe.params["vae"]), latents), batch)}


def generate(
    pipe: AnimationPipeline,
    prompts: list[Prompt],
    negative_prompts: list[Prompt] | None,
    seeds: list[int],
    *,
    num_frames: int = 16,
    height: int = 512,
    width: int = 512,
    steps: int = 25,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    scheduler_options: Mapping[str, Any] | None = None,
    clip_skip: int = 0,
    decode_chunk: int | None = 4,
    mesh: Mesh | None = None,
    progress: bool | Callable[[int], None] = True,
    init_latents: np.ndarray | None = None,
    context_windows: Mapping[str, int] | None = None,
    prompt_interpolation: str = "linear",
    free_init: Mapping[str, Any] | None = None,
    init_video: np.ndarray | None = None,
    strength: float = 0.8,
    sample_posterior: bool = True,
    controls: Sequence[Control] = (),
) -> GenerateResult:
    """One video per (prompt, seed) pair: text -> scan of `steps` denoising steps -> VAE decode.

    `negative_prompts`: None (empty strings), one (broadcast) or one per prompt. `mesh`: a
    Mesh with a "data" axis to spread the samples over (default: the first device); the batch
    is padded to a multiple of that axis and the padding dropped. `init_latents`: standard
    normal noise `[N, F, h, w, C]` to start from instead of the seeds' (still multiplied by
    `init_noise_sigma`, as diffusers does with `latents=`). `context_windows`:
    `dict(length=16, overlap=4)` to denoise in overlapping frame windows (needed beyond the
    motion module's position table; overlap defaults to length // 4; None or length 0: off; `scope`
    "unet" (default) windows the whole UNet, "motion" only the motion modules' attentions, as diffusers'
    `enable_free_noise` with `context_stride = length - overlap`).
    `progress`: a tqdm bar (True), nothing (False) or a callable given each finished step index.
    Prompt travel: a prompt (or negative prompt) may be a map `{frame: text}` from frame 0: each
    frame is conditioned on its own text embedding, interpolated between the keyframes'
    (`prompt_interpolation` "linear", as diffusers' FreeNoise, or "slerp"); with context windows too.
    `free_init`: FreeInit (diffusers' `enable_free_init` options: `num_iters` (3), `method`
    butterworth/gaussian/ideal, `order`, `spatial_stop_frequency`, `temporal_stop_frequency`,
    `use_fast_sampling`): after each full denoise the video is re-noised to the last timestep, its low
    frequencies kept and the high ones drawn afresh (`free_init_noise`), and denoised again; all
    iterations in the one compiled call. None or `num_iters` <= 1: off.
    Video to video (diffusers' `AnimateDiffVideoToVideoPipeline`): `init_video` frames `[N or 1, F', H, W,
    3]` (uint8, or float in [-1, 1]; the first `num_frames` used) are VAE-encoded `decode_chunk` frames at a
    time (a posterior sample from each video's key, or its mean without `sample_posterior`), noised to
    the timestep of step `video_start(steps, strength)` with the seeds' noise, and denoised from there.
    `controls`: ControlNets and SparseCtrl (`sampling.control.Control`: model, params, condition images,
    scale, start/end) whose residuals join the UNet's in every step; an RGB SparseCtrl's keyframes are
    VAE-encoded inside the call (a posterior sample, or the mean without `sample_posterior`).
    Every argument is checked before anything compiles (a `ValueError` naming it).
    """
    t_start = time.perf_counter()
    prompts, negative_prompts, seeds, scheds, fi, windows, win, shape, start = _validate(
        pipe, prompts, negative_prompts, seeds, num_frames, height, width, steps, scheduler,
        scheduler_options, clip_skip, decode_chunk, mesh, init_latents, context_windows, prompt_interpolation,
        free_init, init_video, strength, controls,
    )
    n = shape[0]
    windowed = windows is not None
    unet, windows = _sampler_unet(pipe, num_frames, windows, win)
    use_cfg = guidance_scale > 1.0
    if use_cfg and negative_prompts is None:
        negative_prompts = [""] * n
    mesh = mesh if mesh is not None else make_mesh(1)
    timings: dict[str, float] = {}

    # Text embeddings, before the loop.
    t0 = time.perf_counter()
    cond, uncond, c_text = encode_prompts(pipe, prompts, negative_prompts if use_cfg else None, num_frames,
                                          clip_skip, prompt_interpolation)
    if uncond is not None and uncond.ndim != cond.ndim:  # one side travels: both per frame
        cond, uncond = (c if c.ndim == 4 else jnp.repeat(c[:, None], num_frames, axis=1) for c in (cond, uncond))
    jax.block_until_ready(cond)
    timings["compile_text_s"] = c_text
    timings["text_s"] = time.perf_counter() - t0 - c_text

    # Per-sample noise and keys, padded to the mesh and laid out over its data axis.
    keys = [seed_key(s) for s in seeds]
    if init_latents is None:
        noise = jnp.stack([jax.random.normal(k, shape[1:], jnp.float32) for k in keys])
    else:
        noise = jnp.asarray(init_latents, jnp.float32)
    if windowed and win.noise != "random":  # FreeNoise's initial noise, per video
        noise = jnp.asarray(np.concatenate([
            free_noise(np.asarray(noise[b:b + 1]), win.length, win.length - win.overlap, win.noise,
                       free_noise_perms(keys[b])) for b in range(n)]))
    key_data = jnp.stack([jax.random.key_data(k) for k in keys])
    pad = -n % mesh.shape[DATA]

    def place(x):
        if x is None:
            return None
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
        return jax.device_put(x, NamedSharding(mesh, P(DATA)))

    video = None
    if init_video is not None:
        video = jnp.asarray(video_pixels(np.asarray(init_video)[:, :shape[1]]))
        video = jnp.repeat(video, n, axis=0) if video.shape[0] != n else video
    noise, key_data, cond, uncond, video = place(noise), place(key_data), place(cond), place(uncond), place(video)
    specs, control_arrays = [], []
    for c in controls:  # each video's condition, laid out with it; params and scales replicated
        spec, arrays = control_inputs(c, shape[1], pipe.dtype, pipe.attention)
        specs.append(spec)
        control_arrays.append({k: place(jnp.repeat(jnp.asarray(v)[None], n, axis=0)) for k, v in arrays.items()})
    control_params = [pipe.placed(mesh, c.params) for c in controls]
    control_scales = jax.device_put(jnp.asarray([c.scale for c in controls], jnp.float32), NamedSharding(mesh, P()))
    specs = tuple(specs)
    batch_sharding = NamedSharding(mesh, P(DATA))
    scheds = jax.device_put(tuple(scheds), NamedSharding(mesh, P()))
    unet_params = pipe.replicated(mesh, "unet")
    vae_params = pipe.replicated(mesh, "vae")
    g = jax.device_put(jnp.asarray(guidance_scale if use_cfg else 1.0, jnp.float32), NamedSharding(mesh, P()))
    sample_fn, decode_fn, static, needs_vae = _sampler_fns(
        pipe, unet, scheds, fi, shape, start, windows, specs, video is not None, decode_chunk, sample_posterior,
        progress)
    args = (unet_params, scheds, noise, cond, uncond, g, key_data, control_params, control_scales, control_arrays)
    if needs_vae:
        args += (vae_params, video)
    sample_c, c_denoise = pipe._compiled("denoise", sample_fn, static, args, out_shardings=batch_sharding)
    timings["compile_denoise_s"] = c_denoise

    bar = _Progress(sum(int(x.num_inference_steps) for x in scheds) - start, progress) if progress else None
    pipe._on_step[0] = bar
    try:
        t0 = time.perf_counter()
        latents = jax.block_until_ready(sample_c(*args))
        jax.effects_barrier()
        timings["denoise_s"] = time.perf_counter() - t0
    finally:
        pipe._on_step[0] = None
        if bar is not None:
            bar.close()

    decode_c, c_decode = pipe._compiled("decode", decode_fn, (pipe.vae, decode_chunk), (vae_params, latents),
                                        out_shardings=batch_sharding)
    timings["compile_decode_s"] = c_decode
    t0 = time.perf_counter()
    frames = jax.block_until_ready(decode_c(vae_params, latents))
    timings["decode_s"] = time.perf_counter() - t0

    frames_np = np.asarray(frames)[:n]
    latents_np = np.asarray(latents, np.float32)[:n]
    timings["compile_s"] = c_text + c_denoise + c_decode
    timings["run_s"] = timings["text_s"] + timings["denoise_s"] + timings["decode_s"]
    timings["total_s"] = time.perf_counter() - t_start
    return GenerateResult(frames=frames_np, latents=latents_np, timings=timings)
