"""The two programs a request compiles to: the denoising call (video / keyframe encoding, every
FreeInit iteration's `lax.scan`) and the VAE decode. `generate` runs them; `abstract_sampler` gives
them with `ShapeDtypeStruct` arguments laid out on a mesh, for `animatediff-jax compile sample`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from animatediff_jax import parallel
from animatediff_jax import schedulers as S
from animatediff_jax.errors import FieldError
from animatediff_jax.io.video import to_uint8
from animatediff_jax.models.ip_adapter import with_ip_layers
from animatediff_jax.models.unet import AddedCond, UNet3D
from animatediff_jax.models.vae import decode_video, encode_video
from animatediff_jax.sampling.compiled import PROGRAMS, Programs
from animatediff_jax.sampling.control import ControlSpec, control_inputs, latent_conditions
from animatediff_jax.sampling.denoise import denoise
from animatediff_jax.sampling.free_init import free_init_noise, freq_mix, low_pass
from animatediff_jax.sampling.ip_adapter import abstract_image_prompts
from animatediff_jax.sampling.keys import CONTROL_SALT, VIDEO_SALT, salted, sample_keys, seed_key
from animatediff_jax.sampling.options import Request
from animatediff_jax.sampling.pipeline import AnimationPipeline
from animatediff_jax.sampling.windows import WindowPlan, motion_windows, window_plan

DATA = "data"  # the sampling mesh's first axis: videos are spread over it
# Its second axis, when a video is spread over several devices (`context_parallel`): frames are split over it.
CONTEXT = parallel.CONTEXT


def mesh_over(devices: Sequence, context: int = 1) -> Mesh:
    """The sampling mesh over `devices`: videos over "data"; with `context` > 1 each video's frames also
    over "context" (`context` devices per video, neighbours in `devices`' order)."""
    n = len(devices)
    if context == 1:
        return Mesh(np.asarray(devices, dtype=object), (DATA,))
    if context < 1 or n % context:
        raise FieldError("context_parallel", f"={context}: expected a divisor of the {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(n // context, context), (DATA, CONTEXT))


def video_sharding(mesh: Mesh) -> NamedSharding:
    """Videos `[N, F, ...]` (latents, noise, frames): N over "data", F over "context" when the mesh has it."""
    return NamedSharding(mesh, P(DATA, CONTEXT) if CONTEXT in mesh.axis_names else P(DATA))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a request on a pipeline compiles to, before any array: the UNet the loop calls (motion
    strength, FreeNoise windows inside), the windows it runs over, the latents' shape, the samplers."""

    unet: UNet3D
    windows: WindowPlan | None
    shape: tuple[int, ...]  # (N, F, h, w, C)
    schedulers: tuple[S.Scheduler, ...]
    specs: tuple[ControlSpec, ...]
    control_arrays: tuple[dict, ...]  # per video, no batch axis yet


def layout(pipe: AnimationPipeline, request: Request) -> Layout:
    """`request`'s `Layout` on `pipe` (scope "motion" windows go inside the motion modules)."""
    f, spec = request.num_frames, request.windows
    plan = None if spec is None else window_plan(f, spec)
    if plan is not None and spec.scope == "motion":
        unet, plan = pipe.unet_for(request.motion, motion_windows(f, spec)), None
    else:
        unet = pipe.unet_for(request.motion)
    down = pipe.vae_config.downscale
    shape = (len(request.prompts), f, request.height // down, request.width // down, pipe.unet_config.in_channels)
    specs, arrays = [], []
    for c in request.controls:
        s, a = control_inputs(c, f, pipe.dtype, pipe.attention)
        specs.append(s)
        arrays.append(a)
    return Layout(unet, plan, shape, tuple(request.schedulers()), tuple(specs), tuple(arrays))


def sampler_fns(pipe: AnimationPipeline, request: Request, lay: Layout, progress: bool,
                programs: Programs = PROGRAMS) -> tuple[Callable, Callable, tuple, bool]:
    """`(sample_fn, decode_fn, static, needs_vae)`: the two programs; `static` keys the compiled cache."""
    specs, start, fi, chunk = lay.specs, request.start, request.free_init, request.decode_chunk
    has_video, posterior = request.video is not None, request.sample_posterior
    needs_vae = has_video or any(s.latent for s in specs)
    vae, unet, windows = pipe.vae, lay.unet, lay.windows
    lp = None if fi is None else low_pass(fi, lay.shape)
    offsets = np.cumsum([-start] + [int(x.num_inference_steps) for x in lay.schedulers]).tolist()

    def step_cb(it: int):  # progress over all FreeInit iterations' steps
        return (lambda i: programs.emit(i + offsets[it])) if progress else None

    def sample_fn(params, scheds, noise, cond, uncond, added, g, key_data, ctrl_params, ctrl_scales, ctrl_arrays,
                  images=None, vae_params=None, video=None):
        first = noise * scheds[0].init_noise_sigma
        if images is not None:  # IP-Adapter: their to_k_ip / to_v_ip join the UNet's cross-attentions
            params = with_ip_layers(params, images.layers, pipe.unet_config)
        keys = sample_keys(key_data, noise.shape[0])

        def encode_keyframes(pixels, j):  # an RGB SparseCtrl's keyframes, each video's posterior from its key
            return encode_video(vae, vae_params, pixels, salted(keys, CONTROL_SALT + j) if posterior else None, chunk)

        controls = None
        if specs:
            controls = (specs, ctrl_params, ctrl_scales,
                        latent_conditions(specs, ctrl_arrays, encode_keyframes, noise.shape[1]))
        if video is not None:  # video to video: its latents noised to the start step's timestep
            z0 = encode_video(vae, vae_params, video, salted(keys, VIDEO_SALT) if posterior else None, chunk)
            t0 = jnp.full((noise.shape[0],), scheds[0].timesteps[start])
            first = S.add_noise(scheds[0].alphas_cumprod, z0, noise, t0)
        x = denoise(unet, params, scheds[0], first, cond, uncond, g, key_data, step_cb(0), windows, start, controls,
                    images, added)
        for it, sched in enumerate(scheds[1:], start=1):  # FreeInit: back to the last timestep, low frequencies kept
            t_last = jnp.full((x.shape[0],), sched.alphas_cumprod.shape[0] - 1)
            z_t = S.add_noise(sched.alphas_cumprod, x, first, t_last)
            x = freq_mix(z_t, free_init_noise(key_data, it, x.shape), lp)
            x = denoise(unet, params, sched, x, cond, uncond, g, key_data, step_cb(it), windows, 0, controls, images,
                        added)
        return x

    def decode_fn(params, latents):
        return to_uint8(decode_video(vae, params, latents, chunk))

    static = (unet, windows, progress, fi, start if has_video else None,
              (vae, chunk, posterior) if needs_vae else None, specs)
    return sample_fn, decode_fn, static, needs_vae


def abstract_sampler(pipe: AnimationPipeline, request: Request, mesh: Mesh, progress: bool = True
                     ) -> dict[str, tuple[Callable, tuple, NamedSharding]]:
    """`generate`'s two programs for `request`, with `ShapeDtypeStruct` arguments laid out on `mesh`
    as `generate` lays out its arrays: `{"denoise": (fn, args, out_sharding), "decode": ...}`.
    `pipe.params` (and the controls' params) may be `ShapeDtypeStruct`s: nothing is read or run, and
    `mesh` may be a TPU topology's abstract devices."""
    lay = layout(pipe, request)
    use_cfg = request.guidance_scale > 1.0
    n = -(-lay.shape[0] // mesh.shape[DATA]) * mesh.shape[DATA]  # padded to the data axis, as generate pads
    rep, batch, videos = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA)), video_sharding(mesh)

    def sds(shape_, dtype, sharding=batch):
        return jax.ShapeDtypeStruct(tuple(shape_), jnp.dtype(dtype), sharding=sharding)

    def params(tree):
        return jax.tree.map(lambda x: sds(np.shape(x), x.dtype, rep), tree)

    text = pipe.text_config
    f = request.num_frames
    ctx = (n, text.max_positions, pipe.context_dim)
    ctx = ctx[:1] + (f,) + ctx[1:] if request.travels else ctx
    added = None
    if pipe.sdxl:  # the pooled text (per frame under travel) and time ids per video, each guidance half its own
        pooled = (n,) + ((f,) if request.travels else ()) + (pipe.unet_config.text_embeds_dim,)
        one = AddedCond(sds(pooled, pipe.dtype), sds((n, 6), jnp.float32))
        added = (one, one if use_cfg else None)
    control_arrays = [{k: sds((n,) + np.shape(v), np.asarray(v).dtype) for k, v in a.items()}
                      for a in lay.control_arrays]
    sample_fn, decode_fn, _, needs_vae = sampler_fns(pipe, request, lay, progress)
    key_data = jax.random.key_data(seed_key(0))
    args = (params(pipe.params["unet"]), jax.tree.map(lambda x: sds(np.shape(x), np.asarray(x).dtype, rep),
                                                      lay.schedulers),
            sds((n,) + lay.shape[1:], jnp.float32, videos), sds(ctx, pipe.dtype), sds(ctx, pipe.dtype) if use_cfg else None,
            added, sds((), jnp.float32, rep), sds((n,) + key_data.shape, key_data.dtype),
            [params(c.params) for c in request.controls], sds((len(request.controls),), jnp.float32, rep),
            control_arrays, None)
    if request.ip_adapters:
        images = abstract_image_prompts(request.ip_adapters, pipe.unet_config, f, use_cfg, pipe.dtype)
        args = args[:-1] + (jax.tree.map(lambda x: sds(x.shape, x.dtype, rep), images),)
    if needs_vae:
        video = None if request.video is None else sds((n, f, request.height, request.width, 3), jnp.float32, videos)
        args += (params(pipe.params["vae"]), video)
    latents = sds((n,) + lay.shape[1:], jnp.float32, videos)
    return {"denoise": (sample_fn, args, videos), "decode": (decode_fn, (params(pipe.params["vae"]), latents), videos)}
