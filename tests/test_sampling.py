"""The sampling loop: scan == Python loop, batched CFG == two calls, compile once per shape,
context windows, validation, and 8 fake devices == 1 (in a subprocess).

Weights: the UNet is diffusers' `UNetMotionModel` with random weights (tests/torch_refs.py),
the VAE and text encoder diffusers'/transformers' tiny random ones, all converted to ours.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, xla_flags

from animatediff_jax import parity
from animatediff_jax import schedulers as S
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.vae import decode_video
from animatediff_jax.sampling import (
    PROGRAMS,
    AnimationPipeline,
    context_windows,
    denoise,
    encode_text,
    generate,
    predict_noise,
    seed_key,
)

F, H, W = 4, 16, 16  # tiny VAE: latents 8x8
MAX_POS = 8  # a short position table so long-video paths are cheap to reach
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cross_attention_dim: int):
    cfg = tiny_unet("v2", cross_attention_dim=cross_attention_dim)
    return cfg.replace(motion=dataclasses.replace(cfg.motion, max_positions=MAX_POS))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from torch_refs import torch_motion_unet

    torch_pipe, tok = parity.build_random_pipeline("tiny", workdir=str(tmp_path_factory.mktemp("tok")))
    base = parity.ours_from_diffusers(torch_pipe, tok)
    cfg = tiny_config(base.text_config.hidden_size)  # original AnimateDiff numerics (per-frame norms)
    unet = convert_unet_state_dict(torch_motion_unet(cfg, seed=3).state_dict(), cfg)
    params = dict(base.params, unet=jax.tree.map(jnp.asarray, unet))
    return AnimationPipeline(cfg, base.vae_config, base.text_config, params, base.tokenizer)


def inputs(pipe, b=2, f=F, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, f, H // 2, W // 2, 4))
    cond, uncond, _ = encode_text(pipe, ["the cat", "a dog and the cat"][:b], ["dog", ""][:b])
    return x, cond, uncond


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_scan_equals_python_loop_and_reports_progress(pipe, name):
    sched = S.make_scheduler(name, 4)
    x0, cond, uncond = inputs(pipe)
    x0 = x0 * sched.init_noise_sigma
    seen = []

    def cb(i):
        seen.append(i)

    run = jax.jit(denoise, static_argnames=("unet", "progress_cb"))
    ours = run(pipe.unet, pipe.params["unet"], sched, x0, cond, uncond, 7.5, jax.random.key(0), progress_cb=cb)
    jax.block_until_ready(ours)
    jax.effects_barrier()
    assert sorted(seen) == list(range(sched.num_inference_steps))

    eps_fn = jax.jit(predict_noise, static_argnums=0)
    x, carry = x0, S.init_carry(sched, x0)
    for i in range(sched.num_inference_steps):
        eps = eps_fn(pipe.unet, pipe.params["unet"], S.scale_model_input(sched, i, x), sched.timesteps[i],
                     cond, uncond, 7.5)
        x, carry = S.step(sched, carry, i, eps, x)
    # Same ops, fused differently inside the scan: float32 rounding only (a few ulp of the latents' scale).
    err = assert_close(ours, x, rtol=3e-6, atol=1e-6, what=f"{name}: scan vs Python loop")
    print(f"{name}: scan vs loop max abs {err:.2e} (latents max {np.abs(np.asarray(x)).max():.3g})")


def test_batched_cfg_equals_two_calls(pipe):
    x, cond, uncond = inputs(pipe)
    t = jnp.int32(500)
    # guidance <= 1 is the conditional prediction alone: diffusers skips the unconditional pass.
    single = jax.jit(lambda p, x, c, u: predict_noise(pipe.unet, p, x, t, c, u, 1.0))
    eps_c = single(pipe.params["unet"], x, cond, uncond)
    eps_u = single(pipe.params["unet"], x, uncond, cond)
    guided = jax.jit(predict_noise, static_argnums=0)(pipe.unet, pipe.params["unet"], x, t, cond, uncond, 7.5)
    err = assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-5, what="batched CFG vs two UNet calls")
    print(f"CFG max abs err {err:.2e}")
    assert np.abs(np.asarray(eps_c) - np.asarray(eps_u)).max() > 1e-2  # the texts matter


def test_generate_compiles_once_and_matches_its_parts(pipe):
    seen = []
    kw = dict(num_frames=F, height=H, width=W, steps=3, decode_chunk=3, progress=seen.append)
    r1 = generate(pipe, ["the cat", "a dog"], ["dog"], [1, 2], **kw)
    assert sorted(seen) == [0, 1, 2]
    assert r1.frames.dtype == np.uint8 and r1.frames.shape == (2, F, H, W, 3)
    assert r1.latents.shape == (2, F, H // 2, W // 2, 4) and r1.timings["compile_s"] > 0
    cached = PROGRAMS.compiles

    # Same shapes, other prompts/seeds/guidance: no new compile.
    r2 = generate(pipe, ["x9 y", "the dog"], None, [3, 4], guidance_scale=5.0, **kw)
    assert r2.timings["compile_s"] == 0.0 and PROGRAMS.compiles == cached
    assert not np.allclose(r1.latents, r2.latents)
    # A window as long as the video is the plain path: same executable, same numbers.
    r3 = generate(pipe, ["the cat", "a dog"], ["dog"], [1, 2], context_windows=dict(length=MAX_POS), **kw)
    assert r3.timings["compile_s"] == 0.0
    np.testing.assert_array_equal(r3.latents, r1.latents)
    # Length 0 is off (a sample config's default): the plain path too.
    r0 = generate(pipe, ["the cat", "a dog"], ["dog"], [1, 2], context_windows=dict(length=0, overlap=4), **kw)
    assert r0.timings["compile_s"] == 0.0
    np.testing.assert_array_equal(r0.latents, r1.latents)

    # The documented initial noise: normal(key(seed)) per sample.
    noise = jnp.stack([jax.random.normal(jax.random.key(s), (F, H // 2, W // 2, 4)) for s in (1, 2)])
    r4 = generate(pipe, ["the cat", "a dog"], ["dog"], [7, 8], init_latents=noise, **kw)
    np.testing.assert_array_equal(r4.latents, r1.latents)
    # Frames: the VAE's own video decoder (tested against diffusers), post-processed as diffusers does.
    video = decode_video(pipe.vae, pipe.params["vae"], jnp.asarray(r1.latents), chunk=None)
    want = np.round(np.clip(np.asarray(video) / 2 + 0.5, 0, 1) * 255)
    assert np.abs(r1.frames.astype(np.int32) - want).max() <= 1


def test_seed_keys():
    """Seeds below 2**32 are `jax.random.key(seed)`; AnimateDiff's 64-bit seeds get their own keys."""
    for s in (0, 5, 2**31 + 3, 2**32 - 1):
        np.testing.assert_array_equal(jax.random.key_data(seed_key(s)), jax.random.key_data(jax.random.key(s)))
    big = 10788741199826055526
    np.testing.assert_array_equal(jax.random.key_data(seed_key(big)), [big >> 32, big & 0xFFFFFFFF])
    assert not np.array_equal(jax.random.key_data(seed_key(big)), jax.random.key_data(seed_key(big + 1)))


def test_context_windows_layout():
    assert context_windows(4, 16) == (tuple(range(4)),)
    wins = context_windows(20, 8, 2)
    assert all(len(w) == 8 and list(w) == list(range(w[0], w[0] + 8)) for w in wins)
    assert sorted(set(i for w in wins for i in w)) == list(range(20))
    assert [w[0] for w in wins] == [0, 6, 12]  # the last one flush with the end
    assert context_windows(10, 8, 4)[-1] == tuple(range(2, 10))
    with pytest.raises(ValueError, match="overlap"):
        context_windows(10, 4, 4)


def test_windowed_prediction_averages_overlaps(pipe):
    x, cond, uncond = inputs(pipe, f=6)
    t = jnp.int32(300)
    fn = jax.jit(predict_noise, static_argnames=("unet", "windows"))
    plain = fn(pipe.unet, pipe.params["unet"], x, t, cond, uncond, 7.5)
    one = fn(pipe.unet, pipe.params["unet"], x, t, cond, uncond, 7.5, windows=(tuple(range(6)),))
    np.testing.assert_array_equal(one, plain)  # a single window is exactly the plain path

    wins = ((0, 1, 2, 3), (2, 3, 4, 5))
    got = fn(pipe.unet, pipe.params["unet"], x, t, cond, uncond, 7.5, windows=wins)
    both = fn(pipe.unet, pipe.params["unet"], jnp.concatenate([x[:, :4], x[:, 2:]]), t,
              jnp.concatenate([cond, cond]), jnp.concatenate([uncond, uncond]), 7.5)
    a, b = both[:2], both[2:]
    want = jnp.concatenate([a[:, :2], (a[:, 2:] + b[:, :2]) / 2, b[:, 2:]], axis=1)
    assert_close(got, want, rtol=1e-5, what="windowed prediction vs per-window average")
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3  # windows change what the motion module sees


def test_long_video_needs_and_uses_windows(pipe):
    kw = dict(num_frames=MAX_POS + 2, height=H, width=W, steps=2, progress=False)
    with pytest.raises(ValueError, match=rf"position table \({MAX_POS} frames\).*context_windows"):
        generate(pipe, ["the cat"], None, [0], **kw)
    r = generate(pipe, ["the cat"], None, [0], context_windows=dict(length=MAX_POS, overlap=4), **kw)
    assert r.frames.shape == (1, MAX_POS + 2, H, W, 3) and np.isfinite(r.latents).all()
    assert r.frames.std() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=18), r"height=18 must be a positive multiple of 4"),
        (dict(width=0), r"width=0"),
        (dict(seeds=[1]), r"2 prompts but 1 seeds"),
        (dict(negative_prompts=["a", "b", "c"]), r"negative_prompts: 2 prompts but 3 given"),
        (dict(num_frames=MAX_POS + 1), r"position table"),
        (dict(num_frames=12, context_windows=dict(length=12)), r"context_windows.length=12 exceeds"),
        (dict(context_windows=dict(length=-2)), r"context_windows.length=-2: expected an integer >= 1 \(0: off\)"),
        (dict(context_windows=dict(length=4, overlap=4)), r"overlap"),
        (dict(context_windows=dict(size=4)), r"context_windows takes"),
        (dict(scheduler="heun"), r"unknown scheduler 'heun'"),
        (dict(scheduler_options=dict(foo=1)), r"no option foo"),
        (dict(clip_skip=9), r"clip_skip"),
        (dict(init_latents=np.zeros((2, F, 4, 4, 4))), r"init_latents must have shape"),
        (dict(prompts="the cat"), r"prompts must be a list"),
        (dict(decode_chunk=0), r"decode_chunk"),
        (dict(seeds=[-1, 2]), r"seeds must be integers in \[0, 2\*\*64\)"),
    ],
)
def test_validation_fails_before_compiling(pipe, kwargs, match):
    args = dict(prompts=["the cat", "a dog"], negative_prompts=None, seeds=[1, 2], num_frames=F, height=H, width=W)
    args.update(kwargs)
    cached = PROGRAMS.compiles
    with pytest.raises(ValueError, match=match):
        generate(pipe, args.pop("prompts"), args.pop("negative_prompts"), args.pop("seeds"), **args)
    assert PROGRAMS.compiles == cached


CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import MotionConfig, UNetConfig
    from animatediff_jax.models.shapes import clip_shapes, vae_shapes
    from animatediff_jax.models.shapes import unet_shapes
    from animatediff_jax.models.vae import VAEConfig
    from animatediff_jax.sampling import PROGRAMS, AnimationPipeline, generate, sampling_mesh
    from animatediff_jax.text import Tokenizer
    from animatediff_jax.testing.tiny import write_tiny_tokenizer

    assert jax.device_count() == 8, jax.devices()
    text_cfg, vae_cfg = CLIPTextConfig.tiny(), VAEConfig.tiny()
    cfg = {cfg}
    rng = np.random.default_rng(0)
    def rand(shapes):  # numpy random weights on the shapes of the tree (no JAX compile needed)
        def leaf(path, s):
            name = path[-1].key
            if name == "scale":
                return 1 + 0.1 * rng.standard_normal(s.shape, np.float32)
            fan_in = int(np.prod(s.shape[:-1])) if name == "kernel" else 10
            return rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in)
        return jax.tree_util.tree_map_with_path(leaf, shapes)
    params = dict(unet=rand(unet_shapes(cfg)), vae=rand(vae_shapes(vae_cfg)), text_encoder=rand(clip_shapes(text_cfg)))
    tok = tempfile.mkdtemp()
    write_tiny_tokenizer(tok)
    pipe = AnimationPipeline(cfg, vae_cfg, text_cfg, params, Tokenizer(tok))
    prompts, seeds = ["the cat", "a dog", "the dog and the cat"], [5, 6, 7]
    kw = dict(num_frames=4, height=16, width=16, steps=3, scheduler="euler_ancestral", decode_chunk=2)
    steps = []
    sharded = generate(pipe, prompts, ["dog"], seeds, mesh=sampling_mesh(8), progress=steps.append, **kw)
    single = generate(pipe, prompts, ["dog"], seeds, mesh=sampling_mesh(1), progress=False, **kw)
    alone = generate(pipe, prompts[1:2], ["dog"], seeds[1:2], mesh=sampling_mesh(8), progress=steps.append, **kw)
    def collectives(programs):
        return sorted({op for c in programs for op in
                       ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")
                       if op in c.as_text()})
    plain_collectives = collectives(PROGRAMS.executables())
    # Context parallelism: 2 videos at a time x 4 devices each, one frame per device.
    spread = generate(pipe, prompts, ["dog"], seeds, mesh=sampling_mesh(8, context=4), progress=False, **kw)
    spread_programs = PROGRAMS.executables()[-2:]
    errors = []
    for bad in (dict(kw, num_frames=6), dict(kw, context_windows=dict(length=2, overlap=1))):
        try:
            generate(pipe, prompts, ["dog"], seeds, mesh=sampling_mesh(8, context=4), progress=False, **bad)
        except ValueError as e:
            errors.append(str(e))
    print(json.dumps(dict(
        context=float(np.abs(spread.latents - single.latents).max()),
        context_frames=int(np.abs(spread.frames.astype(int) - single.frames.astype(int)).max()),
        context_denoise=collectives(spread_programs[:1]),
        context_decode=collectives(spread_programs[1:]),
        errors=errors,
        latents=float(np.abs(sharded.latents - single.latents).max()),
        frames=int(np.abs(sharded.frames.astype(int) - single.frames.astype(int)).max()),
        alone=float(np.abs(alone.latents[0] - single.latents[1]).max()),
        scale=float(np.abs(single.latents).max()),
        shape=list(sharded.frames.shape),
        steps=sorted(steps),
        recompiled=alone.timings["compile_denoise_s"] > 0,
        # The compiled loop (with its progress callback) holds no cross-device op: the params are
        # replicated and every sample's work stays on its device.
        collectives=plain_collectives,
    )))
    """
)


def test_sharded_over_8_devices_equals_single_device():
    """8 fake CPU devices (3 samples padded to 8) == 1 device; a sample alone == the same sample in a batch;
    each video's frames over 4 devices (context parallelism, 2 videos at a time) == 1 device too."""
    cfg = tiny_config(32)
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD.replace("{cfg}", repr(cfg))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["shape"] == [3, 4, 16, 16, 3]
    assert res["steps"] == [0, 0, 1, 1, 2, 2] and not res["recompiled"]
    assert res["collectives"] == [], res
    assert res["scale"] > 0.1
    # A stochastic sampler: per-sample noise keys make results independent of layout and batch.
    assert res["latents"] <= 1e-5 * res["scale"], res
    assert res["alone"] <= 1e-5 * res["scale"], res
    assert res["frames"] <= 1, res
    # Context parallelism: the same videos; the motion modules regroup frames <-> positions by all-to-all
    # (no frame is gathered whole), and the VAE decodes each device's frames where they are.
    assert res["context"] <= 1e-5 * res["scale"] and res["context_frames"] <= 1, res
    assert "all-to-all" in res["context_denoise"] and "all-gather" not in res["context_denoise"], res
    assert res["context_decode"] == [], res
    assert "num_frames=6" in res["errors"][0] and "multiple of 4" in res["errors"][0], res
    assert "context_windows" in res["errors"][1] and "context_parallel=4" in res["errors"][1], res
