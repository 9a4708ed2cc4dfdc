"""The denoising loop, pure and jittable: guided noise prediction (CFG in one batched UNet call,
optionally per context window, with the control models' residuals) and the `lax.scan` of scheduler
steps."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from animatediff_jax import schedulers as S
from animatediff_jax.models.unet import AddedCond, UNet3D
from animatediff_jax.sampling.control import control_residuals
from animatediff_jax.sampling.ip_adapter import ImagePrompts, image_context
from animatediff_jax.sampling.keys import sample_keys
from animatediff_jax.sampling.windows import Frames, WindowPlan, windowed

Params = dict[str, Any]


def _cfg_enabled(guidance_scale: Any) -> bool:
    """diffusers guides only when the scale exceeds 1; a traced scale means guidance is on."""
    try:
        return float(guidance_scale) > 1.0
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return True


def pairwise(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """`[2B, ...]` of sample b's unconditional and conditional rows side by side (a per-sample concat)."""
    return jnp.stack([uncond, cond], axis=1).reshape((2 * cond.shape[0],) + cond.shape[1:])


def predict_noise(
    unet: UNet3D,
    unet_params: Params,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array,
    uncond: jax.Array | None,
    guidance_scale: Any,
    windows: Frames | WindowPlan | None = None,
    control: Callable[..., tuple[Any, Any]] | None = None,
    images: ImagePrompts | None = None,
    added: tuple[AddedCond, AddedCond | None] | None = None,
) -> jax.Array:
    """Guided float32 noise prediction for the (already scaled) model input `x` `[B, F, h, w, C]`;
    `cond`/`uncond` `[B, L, D]`, or `[B, F, L, D]` a text per frame (windows take their frames').

    With `uncond`, one UNet call on 2B videos: sample b's unconditional and conditional copies
    are adjacent (a per-sample `concat([uncond, cond])`), so a batch sharded over devices stays
    local; then `uncond + g * (cond - uncond)`. Without `uncond`, or with a concrete scale <= 1,
    the conditional prediction alone. `control(x, t, context, frames, pairs) -> (down, mid)`: the
    control models' residuals for that same UNet input (`sampling.control`), or None. `images`: IP-Adapter
    image prompts (`sampling.ip_adapter`; `unet_params` holding their `to_k_ip` / `to_v_ip`), each CFG half
    with its own tokens, or None. `added`: SDXL's `(cond, uncond)` added conditioning (`AddedCond`: time ids
    per video, every window of a video gets them; the pooled text per video too, or per frame as the texts
    may be: windows take their frames'), laid out as the texts; None for an SD1.5 UNet (no input added).
    """
    apply = functools.partial(unet.apply, {"params": unet_params})
    if not _cfg_enabled(guidance_scale):
        uncond = None
    added_c, added_u = (None, None) if added is None else added

    def frames(c: jax.Array | None, ix: jax.Array | None, per_video_ndim: int = 3) -> jax.Array | None:
        """A per-frame input (context `[B, F, L, D]`, pooled text `[B, F, P]`) cut to the window's frames
        (one per video, of `per_video_ndim` dims, stays)."""
        return c if c is None or ix is None or c.ndim == per_video_ndim else jnp.take(c, ix, axis=1)

    def run(xw: jax.Array, ix: jax.Array | None = None) -> jax.Array:
        b = xw.shape[0]
        c, u = frames(cond, ix), frames(uncond, ix)
        a_c, a_u = (None if a is None else a._replace(text_embeds=frames(a.text_embeds, ix, 2))
                    for a in (added_c, added_u))

        def unet(x_, ctx_, pairs, added_):
            res = (None, None) if control is None else control(x_, t, ctx_, ix, pairs)
            if images is not None:
                res += (image_context(images, b, ix, pairs),)
            kw = {} if added_ is None else {"added_cond": added_}
            return apply(x_, t, ctx_, *res, **kw).astype(jnp.float32)

        if u is None:
            return unet(xw, c, False, a_c)
        x2 = jnp.stack([xw, xw], axis=1).reshape((2 * b,) + xw.shape[1:])
        ctx = pairwise(u, c)
        both = None if a_c is None else AddedCond(*(pairwise(a, b_) for a, b_ in zip(a_u, a_c)))
        out = unet(x2, ctx, True, both).reshape((b, 2) + xw.shape[1:])
        eps_u, eps_c = out[:, 0], out[:, 1]
        return eps_u + guidance_scale * (eps_c - eps_u)

    return run(x) if windows is None else windowed(run, x, windows)


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
    windows: Frames | WindowPlan | None = None,
    start: int = 0,
    controls: tuple | None = None,
    images: ImagePrompts | None = None,
    added: tuple[AddedCond, AddedCond | None] | None = None,
) -> jax.Array:
    """Runs the steps `start..` of `sched` from `latents` (already times `init_noise_sigma`, or noised
    to the start step's timestep: video-to-video) in one `lax.scan`.

    `cond`/`uncond`: text embeddings `[B, L, D]` (or `[B, F, L, D]`, one per frame); guidance is on when `uncond` is given and
    `guidance_scale > 1` (or traced). `key`: one key, or one per sample (typed or raw key
    data); step `i` of sample `b` uses `fold_in(key_b, i)`. `progress_cb(i)` is called from the
    compiled loop after step `i` (via `jax.debug.callback`). `windows`: frame windows from
    `context_windows`, or None to run the UNet on all frames at once. `controls`: `(specs, params,
    scales, arrays)` of `sampling.control` (arrays batched like the latents), or None. `images`: IP-Adapter
    image prompts (`sampling.ip_adapter.ImagePrompts`; their layers already in `unet_params`), or None.
    `added`: SDXL's `(cond, uncond)` added conditioning (see `predict_noise`), or None. Returns float32 latents.
    """
    latents = latents.astype(jnp.float32)
    b = latents.shape[0]
    if not _cfg_enabled(guidance_scale):
        uncond = None
    keys = sample_keys(key, b)
    # Per-sample scheduler state and noise: vmap the (elementwise) update over the batch.
    carry0 = jax.vmap(functools.partial(S.init_carry, sched))(latents)

    def body(state, i):
        x, carry = state
        x_in = S.scale_model_input(sched, i, x)
        control = None if not controls else functools.partial(
            control_residuals, *controls, i - start, sched.num_inference_steps - start)
        eps = predict_noise(unet, unet_params, x_in, sched.timesteps[i], cond, uncond, guidance_scale, windows,
                            control, images, added)
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
