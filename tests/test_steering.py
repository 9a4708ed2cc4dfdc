"""Steering the motion (issue 14), against diffusers (PyTorch, fp32, rtol 1e-5):

- at the UNet (`UNetMotionModel`, original GroupNorm semantics via `torch_refs.patch_to_original`):
  a text context per frame (diffusers takes `(B*F, L, D)` encoder states, ours `[B, F, L, D]`), and
  motion scale (every motion module adds `scale x` its output to its input, `motion_scale` for all
  times `motion_block_scales` per block; the reference wraps each of diffusers' motion modules so);
- prompt travel in the sampler (`{frame: prompt}` maps, interpolated between keyframes) against
  `AnimateDiffPipeline` with FreeNoise enabled over one window (its prompt interpolation only):
  the per-frame embeddings and the latents after 3 DDIM steps from the same noise.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from torch_refs import patch_to_original, torch_motion_unet

from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.unet import UNet3D

FRAMES = 4
CFG = tiny_unet("v2")


@pytest.fixture(scope="module")
def reference():
    tm = torch_motion_unet(CFG, seed=3)
    params = convert_unet_state_dict(tm.state_dict(), CFG)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, CFG.in_channels, FRAMES, 8, 8, generator=g)
    ctx = torch.randn(2, FRAMES, 5, CFG.cross_attention_dim, generator=g)  # a different text per frame
    return patch_to_original(tm, CFG, FRAMES), params, x, torch.tensor([10, 730]), ctx


def ours(params, x, t, ctx, **unet_kw) -> np.ndarray:
    out = UNet3D(CFG, **unet_kw).apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()),
                                       jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def test_a_context_per_frame(reference):
    tm, params, x, t, ctx = reference
    with torch.no_grad():
        ref = tm(x, t, ctx.reshape(-1, *ctx.shape[2:])).sample.numpy()  # (B*F, L, D), frame-major per video
    err = assert_close(ours(params, x, t, ctx), ref, rtol=1e-5, what="per-frame contexts vs UNetMotionModel")
    # ... and it is not one context repeated: frame 0's text everywhere gives another output.
    same = ours(params, x, t, ctx[:, :1].expand_as(ctx).contiguous())
    assert np.abs(same - ref).max() > 100 * max(err, 1e-6)
    print(f"per-frame context: max abs err {err:.2e}")


class _Scaled(torch.nn.Module):
    """A diffusers motion module whose contribution is scaled: `x + s * (module(x) - x)`."""

    def __init__(self, inner, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.scale * (self.inner(hidden_states, *args, **kwargs) - hidden_states)


def _scaled_reference(tm, scales: dict[str, float]):
    import copy

    tm = copy.deepcopy(tm)
    blocks = {f"down_blocks_{i}": b for i, b in enumerate(tm.down_blocks)}
    blocks.update({"mid_block": tm.mid_block}, **{f"up_blocks_{i}": b for i, b in enumerate(tm.up_blocks)})
    for name, block in blocks.items():
        mms = getattr(block, "motion_modules", None)
        for j in range(len(mms) if mms is not None else 0):
            mms[j] = _Scaled(mms[j], scales.get(name, 1.0))
    return tm


@pytest.mark.parametrize("scale, per_block", [(0.0, ()), (1.6, (("mid_block", 0.25), ("up_blocks_1", 0.5)))])
def test_motion_scale(reference, scale, per_block):
    tm, params, x, t, ctx = reference
    names = [f"down_blocks_{i}" for i in range(2)] + ["mid_block"] + [f"up_blocks_{i}" for i in range(2)]
    scales = {n: scale * dict(per_block).get(n, 1.0) for n in names}
    with torch.no_grad():
        ref = _scaled_reference(tm, scales)(x, t, ctx.reshape(-1, *ctx.shape[2:])).sample.numpy()
    got = ours(params, x, t, ctx, motion_scale=scale, motion_block_scales=per_block)
    err = assert_close(got, ref, rtol=1e-5, what=f"motion scale {scale} {per_block} vs scaled UNetMotionModel")
    assert np.abs(got - ours(params, x, t, ctx)).max() > 1e-3  # the scale changes the output
    print(f"motion scale {scale} {per_block}: max abs err {err:.2e}")


def test_motion_scale_names_the_blocks(reference):
    _, params, x, t, ctx = reference
    with pytest.raises(ValueError, match="no block \\['up_blocks_7'\\]"):
        ours(params, x, t, ctx, motion_block_scales=(("up_blocks_7", 1.0),))


@pytest.mark.parametrize("stretch", [(2, 4), (32, 40)])
def test_pe_stretch_is_animatediff_evolveds(reference, stretch):
    """`position_stretch=(n, m)` vs the diffusers UNet whose every motion position table is replaced as
    AnimateDiff-Evolved does it: `F.interpolate(pe[:, :n], size=(m, C), mode="bilinear")`."""
    import copy

    import torch.nn.functional as TF

    tm, params, x, t, ctx = reference
    n, m = stretch
    tm = copy.deepcopy(tm)
    tables = 0
    for mod in tm.modules():
        if hasattr(mod, "pe") and isinstance(mod.pe, torch.Tensor) and mod.pe.ndim == 3:
            mod.pe = TF.interpolate(mod.pe[:, :n][None], size=(m, mod.pe.shape[-1]), mode="bilinear")[0]
            tables += 1
    assert tables > 0
    with torch.no_grad():
        ref = tm(x, t, ctx.reshape(-1, *ctx.shape[2:])).sample.numpy()
    got = ours(params, x, t, ctx, position_stretch=stretch)
    err = assert_close(got, ref, rtol=1e-5, what=f"PE stretch {stretch} vs interpolated tables")
    assert np.abs(got - ours(params, x, t, ctx)).max() > 1e-3  # the stretch changes the output
    print(f"PE stretch {stretch}: max abs err {err:.2e}")


# ------------------------------------------------------------------ prompt travel in the sampler

F, H, W = 6, 16, 16
TRAVEL = {0: "the cat", 3: "a dog", 4: "the dog and the cat"}
NEG = {0: "dog", 4: ""}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from animatediff_jax import parity

    torch_pipe, tok = parity.build_random_pipeline("tiny", workdir=str(tmp_path_factory.mktemp("travel")))
    torch_pipe.set_progress_bar_config(disable=True)
    # FreeNoise with one window as long as the video: its prompt interpolation, no windowing, no noise shuffle.
    torch_pipe.enable_free_noise(context_length=F, context_stride=4)
    return torch_pipe, parity.ours_from_diffusers(torch_pipe, tok)  # (diffusers' own GroupNorm semantics)


def test_prompt_travel_embeddings_are_diffusers_free_noise(pipes):
    from animatediff_jax.sampling.prompts import encode_prompts

    torch_pipe, ours = pipes
    with torch.no_grad():
        both, neg = torch_pipe._encode_prompt_free_noise(TRAVEL, F, "cpu", 1, True, NEG)
    cond, uncond, _ = encode_prompts(ours, [TRAVEL, "the cat"], [NEG, ""], F)
    assert cond.shape == (2, F, 77, ours.text_config.hidden_size)
    e1 = assert_close(cond[0], both[F:].numpy(), rtol=1e-5, what="travelling prompt embeddings vs FreeNoise")
    e2 = assert_close(uncond[0], neg.numpy(), rtol=1e-5, what="travelling negative embeddings vs FreeNoise")
    # A plain prompt in the same batch is its one embedding on every frame; keyframes hold exactly.
    plain, _, _ = encode_prompts(ours, ["the cat", "a dog"], None, F)
    np.testing.assert_allclose(np.asarray(cond[1]), np.broadcast_to(np.asarray(plain[0]), cond[1].shape), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cond[0, 3]), np.asarray(plain[1]), atol=1e-6)
    print(f"prompt travel embeddings vs diffusers FreeNoise: {e1:.2e} (prompts), {e2:.2e} (negative)")


def test_slerp_keeps_the_norm_between_keyframes(pipes):
    from animatediff_jax.sampling.prompts import encode_prompts

    _, ours = pipes
    lin, _, _ = encode_prompts(ours, [{0: "the cat", 5: "a dog"}], None, F)
    sl, _, _ = encode_prompts(ours, [{0: "the cat", 5: "a dog"}], None, F, interpolation="slerp")
    np.testing.assert_allclose(np.asarray(sl[0, [0, 5]]), np.asarray(lin[0, [0, 5]]), atol=1e-5)  # the keyframes
    a, b, mid = (np.linalg.norm(np.asarray(sl[0, k]), axis=-1) for k in (0, 5, 2))
    assert np.all(mid >= np.minimum(a, b) - 1e-3)  # on the great circle, not cut through it as linear is
    assert np.abs(np.asarray(sl[0, 2]) - np.asarray(lin[0, 2])).max() > 1e-4


def test_generate_with_prompt_travel_is_diffusers_free_noise(pipes):
    from animatediff_jax.sampling import generate

    torch_pipe, ours = pipes
    noise = np.array(jax_normal((1, F, H // 2, W // 2, 4)))
    with torch.no_grad():
        ref = torch_pipe(prompt=TRAVEL, negative_prompt=NEG, num_frames=F, height=H, width=W, num_inference_steps=3,
                         guidance_scale=7.5, latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3),
                         output_type="latent").frames
    res = generate(ours, [TRAVEL], [NEG], [0], num_frames=F, height=H, width=W, steps=3, init_latents=noise,
                   progress=False)
    err = assert_close(res.latents, ref.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5,
                       what="prompt travel latents vs AnimateDiffPipeline with FreeNoise")
    # Windows take their frames' texts: windows of 4 (overlap 2) still run, and differ from one window.
    windowed = generate(ours, [TRAVEL], [NEG], [0], num_frames=F, height=H, width=W, steps=3, init_latents=noise,
                        progress=False, context_windows=dict(length=4, overlap=2))
    assert np.isfinite(windowed.latents).all() and np.abs(windowed.latents - res.latents).max() > 1e-4
    print(f"prompt travel, 3 DDIM steps: latents max abs err {err:.2e} vs diffusers FreeNoise")


def test_prompt_map_errors_name_the_frame(pipes):
    from animatediff_jax.sampling import generate

    _, ours = pipes
    kw = dict(num_frames=F, height=H, width=W, steps=2, progress=False)
    with pytest.raises(ValueError, match="no prompt at frame 0"):
        generate(ours, [{2: "a dog"}], None, [0], **kw)
    with pytest.raises(ValueError, match="frame 6 is outside the video"):
        generate(ours, [{0: "a dog", 6: "the cat"}], None, [0], **kw)
    with pytest.raises(ValueError, match="prompt_interpolation='cubic'"):
        generate(ours, [{0: "a dog"}], None, [0], prompt_interpolation="cubic", **kw)


def jax_normal(shape):
    import jax

    return jax.random.normal(jax.random.key(11), shape)


# ------------------------------------------------------------------ from a sample config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sample", "tiny.py")
FAST = ["--config.L=6", "--config.steps=2", "--config.seed=(5,)"]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from animatediff_jax.testing.tiny import write_tiny_models

    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_models(folder)
    return f"{TINY}:{folder}"


def _run(spec, out, *overrides):
    from animatediff_jax import sample as S

    return S.sample(S.load_config(spec, *FAST, f"--config.output.dir={out}", *overrides))


def test_sample_config_prompt_travel_and_motion_scale(tiny_spec, tmp_path, capsys):
    from animatediff_jax import sample as S
    from animatediff_jax.cli import main as cli

    plain = _run(tiny_spec, tmp_path / "plain", "--config.prompt=('best, a cat',)")
    travel = _run(tiny_spec, tmp_path / "travel", "--config.prompt=()", "--config.head_prompt=best",
                  "--config.prompt_map={'0': 'a cat', '4': 'the dog'}")
    assert travel.frames.shape == plain.frames.shape == (1, 6, 32, 32, 3)
    # Frame 0's text is the plain prompt's; from there it travels to "best, the dog" (an other video).
    assert np.abs(travel.frames.astype(int) - plain.frames.astype(int)).max() > 0
    assert travel.config["prompt_map"] == {"0": "a cat", "4": "the dog"}
    # The saved config replays the travelling video exactly.
    replay = S.sample(S.load_config(os.path.join(os.path.dirname(TINY), "replay.py") + ":"
                                    + os.path.join(travel.folder, "config.yaml"),
                                    f"--config.output.dir={tmp_path / 'replay'}"))
    np.testing.assert_array_equal(replay.frames, travel.frames)

    still = _run(tiny_spec, tmp_path / "still", "--config.prompt=('best, a cat',)", "--config.motion_scale=0.0")
    assert np.abs(still.frames.astype(int) - plain.frames.astype(int)).max() > 0  # the motion modules' share
    freeinit = _run(tiny_spec, tmp_path / "freeinit", "--config.prompt=('best, a cat',)",
                    "--config.free_init={'num_iters': 2, 'method': 'gaussian'}")
    assert np.abs(freeinit.frames.astype(int) - plain.frames.astype(int)).max() > 0
    from animatediff_jax.io.video import write_gif

    clip = np.random.default_rng(0).integers(0, 256, (8, 40, 48, 3), dtype=np.uint8)  # resized to 32x32, first 6
    write_gif(tmp_path / "in.gif", clip)
    restyled = _run(tiny_spec, tmp_path / "v2v", "--config.prompt=('best, a cat',)",
                    f"--config.init_video={tmp_path / 'in.gif'}", "--config.strength=0.5")
    assert restyled.frames.shape == plain.frames.shape and np.abs(restyled.frames.astype(int) - plain.frames).max() > 0
    write_gif(tmp_path / "short.gif", clip[:3])

    capsys.readouterr()
    bad = [("--config.prompt_map={'2': 'a dog'}", "prompt_map: no prompt at frame 0"),
           ("--config.prompt_map={'0': 'a', '9': 'b'}", "prompt_map: frame 9 is outside the video"),
           ("--config.motion_block_scales={'middle': 0.5}", "motion_block_scales: no block 'middle'"),
           ("--config.free_init={'num_iters': 2, 'method': 'box'}", "free_init.method='box'"),
           (f"--config.init_video={tmp_path / 'short.gif'}", "init_video: "),
           (f"--config.init_video={tmp_path / 'in.gif'}", None)]
    for override, message in bad:
        extra = ["--config.prompt=()"] if "prompt_map" in override else []
        if message is None:  # strength outside (0, 1]
            extra, message = ["--config.strength=1.5"], "strength=1.5: expected a number in (0, 1]"
        assert cli(["sample", "--config", tiny_spec, *FAST, *extra, override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in " ".join(err), err


# ------------------------------------------------------------------ FreeInit


@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
def test_free_init_filter_and_mix_are_diffusers(pipes, method):
    from animatediff_jax.sampling.free_init import free_init_filter, freq_mix

    torch_pipe, _ = pipes
    ref = torch_pipe._get_free_init_freq_filter((1, 4, F, 8, 8), "cpu", method, 4, 0.25, 0.3)
    ours = free_init_filter(F, 8, 8, method, 4, 0.25, 0.3)
    np.testing.assert_allclose(ours, ref[0, 0].numpy(), rtol=1e-6, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 4, F, 8, 8, generator=g), torch.randn(2, 4, F, 8, 8, generator=g)
    mixed = torch_pipe._apply_freq_filter(x, noise, ref).numpy()
    to_ours = lambda v: jnp.asarray(v.permute(0, 2, 3, 4, 1).numpy())  # noqa: E731
    got = np.asarray(freq_mix(to_ours(x), to_ours(noise), ours)).transpose(0, 4, 1, 2, 3)
    assert_close(got, mixed, rtol=1e-5, what=f"FreeInit frequency mix ({method}) vs diffusers")


@pytest.mark.parametrize("fast", [False, True])
def test_generate_with_free_init_is_diffusers(pipes, monkeypatch, fast):
    """`enable_free_init(num_iters=3)` from the same initial latents, diffusers' fresh noise per
    iteration replaced by ours (`free_init_noise`): the latents after the last iteration agree."""
    import jax
    from diffusers.pipelines import free_init_utils

    from animatediff_jax.sampling import generate
    from animatediff_jax.sampling.free_init import free_init_noise
    from animatediff_jax.sampling.keys import seed_key

    torch_pipe, ours = pipes
    shape = (1, F, H // 2, W // 2, 4)
    noise = np.array(jax_normal(shape))
    key_data = jnp.stack([jax.random.key_data(seed_key(7))])
    fresh = [torch.from_numpy(np.array(free_init_noise(key_data, it, shape))).permute(0, 4, 1, 2, 3)
             for it in (1, 2)]
    monkeypatch.setattr(free_init_utils, "randn_tensor", lambda *a, **k: fresh.pop(0))
    torch_pipe.disable_free_noise()
    torch_pipe.enable_free_init(num_iters=3, use_fast_sampling=fast)
    try:
        with torch.no_grad():
            ref = torch_pipe(prompt="the cat", negative_prompt="dog", num_frames=F, height=H, width=W,
                             num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                             latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3)).frames
    finally:
        torch_pipe.disable_free_init()
        torch_pipe.enable_free_noise(context_length=F, context_stride=4)
    assert not fresh  # diffusers drew exactly the two fresh noises
    seen = []
    res = generate(ours, ["the cat"], ["dog"], [7], num_frames=F, height=H, width=W, steps=3, init_latents=noise,
                   progress=seen.append, free_init=dict(num_iters=3, use_fast_sampling=fast))
    err = assert_close(res.latents, ref.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5,
                       what=f"FreeInit (fast sampling {fast}) latents vs diffusers")
    assert sorted(set(seen)) == list(range(6 if fast else 9))  # every iteration's steps, in one compiled call
    plain = generate(ours, ["the cat"], ["dog"], [7], num_frames=F, height=H, width=W, steps=3, init_latents=noise,
                     progress=False)
    assert np.abs(plain.latents - res.latents).max() > 1e-3
    print(f"FreeInit 3 iterations (fast {fast}): latents max abs err {err:.2e} vs diffusers")


def test_free_init_errors(pipes):
    from animatediff_jax.sampling import generate

    _, ours = pipes
    kw = dict(num_frames=F, height=H, width=W, steps=2, progress=False)
    with pytest.raises(ValueError, match="free_init.method='box'"):
        generate(ours, ["a"], None, [0], free_init=dict(method="box"), **kw)
    with pytest.raises(ValueError, match="unknown option"):
        generate(ours, ["a"], None, [0], free_init=dict(iters=2), **kw)
    with pytest.raises(ValueError, match="free_init with scheduler 'euler'"):
        generate(ours, ["a"], None, [0], free_init=dict(num_iters=2), scheduler="euler", **kw)


# ------------------------------------------------------------------ video to video


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_video_to_video_is_diffusers(pipes, monkeypatch, strength):
    """`AnimateDiffVideoToVideoPipeline` from the same video and noise (its posterior sample replaced by
    the mean, ours `sample_posterior=False`; its randn by our seeds' noise): the same latents."""
    from diffusers import AnimateDiffVideoToVideoPipeline
    from diffusers.pipelines.animatediff import pipeline_animatediff_video2video as v2v

    from animatediff_jax.sampling import generate

    torch_pipe, ours = pipes
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, (1, F + 2, H, W, 3), dtype=np.uint8)  # longer than the video made: its first F
    noise = np.array(jax_normal((1, F, H // 2, W // 2, 4)))
    monkeypatch.setattr(v2v, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    monkeypatch.setattr(v2v, "randn_tensor", lambda *a, **k: torch.from_numpy(noise).permute(0, 1, 4, 2, 3))
    torch_pipe.disable_free_noise()
    try:
        ref_pipe = AnimateDiffVideoToVideoPipeline(
            vae=torch_pipe.vae, text_encoder=torch_pipe.text_encoder, tokenizer=torch_pipe.tokenizer,
            unet=torch_pipe.unet, motion_adapter=torch_pipe.motion_adapter, scheduler=torch_pipe.scheduler)
        ref_pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            ref = ref_pipe(video=video[:, :F].astype(np.float32) / 255, prompt="the cat", negative_prompt="dog",
                           height=H, width=W, num_inference_steps=5, guidance_scale=7.5, strength=strength,
                           output_type="latent").frames
    finally:
        torch_pipe.enable_free_noise(context_length=F, context_stride=4)
    seen = []
    res = generate(ours, ["the cat"], ["dog"], [0], num_frames=F, height=H, width=W, steps=5, init_latents=noise,
                   init_video=video, strength=strength, sample_posterior=False, progress=seen.append)
    err = assert_close(res.latents, ref.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5,
                       what=f"video to video (strength {strength}) vs AnimateDiffVideoToVideoPipeline")
    assert len(set(seen)) == min(int(5 * strength), 5)  # only the last steps run
    print(f"video to video, strength {strength}: latents max abs err {err:.2e}")


def test_video_to_video_keeps_the_video_at_low_strength(pipes):
    from animatediff_jax.models.vae import encode_video
    from animatediff_jax.sampling import generate
    from animatediff_jax.sampling.free_init import video_pixels

    _, ours = pipes
    video = np.random.default_rng(4).integers(0, 256, (1, F, H, W, 3), dtype=np.uint8)
    kw = dict(num_frames=F, height=H, width=W, steps=10, progress=False)
    low = generate(ours, ["the cat"], None, [1], init_video=video, strength=0.2, sample_posterior=False, **kw)
    high = generate(ours, ["the cat"], None, [1], init_video=video, strength=1.0, sample_posterior=False, **kw)
    # (random weights: the VAE does not reconstruct, so compare in latent space) low strength stays near the
    # video's latents, full strength goes anywhere.
    z0 = np.asarray(encode_video(ours.vae, ours.params["vae"], jnp.asarray(video_pixels(video))))
    err = lambda r: np.abs(r.latents - z0).mean()  # noqa: E731
    assert err(low) < 0.5 * err(high)
    with pytest.raises(ValueError, match="fewer than num_frames"):
        generate(ours, ["a"], None, [1], init_video=video[:, :3], **kw)
    with pytest.raises(ValueError, match="strength=0: expected a number in \\(0, 1\\]"):
        generate(ours, ["a"], None, [1], init_video=video, strength=0, **kw)


# ------------------------------------------------------------------ FreeNoise: weights, noise, looped windows


@pytest.mark.parametrize("length", [4, 5, 16])
@pytest.mark.parametrize("weighting", ["flat", "pyramid", "delayed_reverse_sawtooth"])
def test_window_weights_are_free_noises(length, weighting):
    from diffusers.models.attention import FreeNoiseTransformerBlock

    from animatediff_jax.sampling.windows import window_weights

    assert window_weights(length, weighting) == tuple(
        float(w) for w in FreeNoiseTransformerBlock._get_frame_weights(None, length, weighting))


def test_weighted_windows_average_by_position():
    """Where windows overlap, each prediction counts by its position's weight (pyramid: the middle most)."""
    from animatediff_jax.sampling.windows import WindowPlan, context_windows, window_weights, windowed

    frames = context_windows(10, 4, 2)
    plan = WindowPlan(frames, window_weights(4, "pyramid"))
    x = jnp.zeros((1, 10, 1))
    out = np.asarray(windowed(lambda xw, ix: xw + ix[0].astype(jnp.float32), x, plan))[0, :, 0]
    # By hand: each window predicts its start frame for all its frames; weights [1, 2, 2, 1].
    want, total = np.zeros(10), np.zeros(10)
    for win in frames:
        for p, f in enumerate(win):
            want[f] += plan.weights[p] * win[0]
            total[f] += plan.weights[p]
    np.testing.assert_allclose(out, want / total, rtol=1e-6)


def test_looped_windows_wrap_around():
    from animatediff_jax.sampling.windows import context_windows

    assert context_windows(12, 8, 4, looped=True) == (
        tuple(range(8)), tuple(range(4, 12)), (8, 9, 10, 11, 0, 1, 2, 3))
    assert context_windows(12, 8, 4) == (tuple(range(8)), tuple(range(4, 12)))


def test_shuffle_context_noise_is_free_noises(pipes, monkeypatch):
    """diffusers' `_prepare_latents_free_noise` ("shuffle_context", length 4, stride 2, 11 frames) from
    the same drawn noise and the same permutations: the same latents."""
    from diffusers.pipelines import free_noise_utils

    from animatediff_jax.sampling.windows import free_noise

    torch_pipe, _ = pipes
    base = np.random.default_rng(2).standard_normal((1, 11, 2, 2, 4)).astype(np.float32)  # ours: [N, F, h, w, C]
    rng = np.random.default_rng(5)
    perms = []

    def perm(n):
        perms.append(rng.permutation(n))
        return perms[-1]

    ours = free_noise(base, 4, 2, "shuffle_context", perm)
    replay = iter(perms)
    monkeypatch.setattr(free_noise_utils, "randn_tensor", lambda *a, **k: torch.from_numpy(base.copy()).permute(0, 4, 1, 2, 3))
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.from_numpy(next(replay)))
    monkeypatch.setattr(torch_pipe, "_free_noise_context_length", 4)
    monkeypatch.setattr(torch_pipe, "_free_noise_context_stride", 2)
    monkeypatch.setattr(torch_pipe, "_free_noise_noise_type", "shuffle_context")
    ref = torch_pipe._prepare_latents_free_noise(1, 4, 11, 4, 4, torch.float32, "cpu", None)
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 4, 1).numpy())
    assert not np.array_equal(ours, base) and len(perms) > 1
    # repeat_context repeats the first window's noise (diffusers 0.42 draws every frame's, comparing the
    # length with the string "repeat_context", so its repeat has nothing to repeat: ours follows its docstring).
    rep = free_noise(base, 4, 2, "repeat_context", perm)
    np.testing.assert_array_equal(rep[:, 4:8], base[:, :4])


def test_generate_with_free_noise_windows(pipes):
    from animatediff_jax.sampling import generate

    _, ours = pipes
    kw = dict(num_frames=10, height=H, width=W, steps=2, progress=False)
    plain = generate(ours, ["the cat"], None, [1], context_windows=dict(length=4, overlap=2), **kw)
    free = generate(ours, ["the cat"], None, [1], **kw, context_windows=dict(
        length=4, overlap=2, weighting="pyramid", noise="shuffle_context", schedule="looped_uniform"))
    assert np.isfinite(free.latents).all() and np.abs(free.latents - plain.latents).max() > 1e-4
    with pytest.raises(ValueError, match="context_windows.weighting='steep'"):
        generate(ours, ["the cat"], None, [1], context_windows=dict(length=4, weighting="steep"), **kw)


# Even and odd frame counts, two weightings (the weights alone: test_window_weights_are_free_noises).
@pytest.mark.parametrize("frames,weighting", [(8, "flat"), (7, "pyramid")])
def test_motion_scope_windows_are_diffusers_free_noise(pipes, frames, weighting):
    """scope "motion": one UNet call on all frames, every motion module's transformer blocks windowed as
    diffusers' `FreeNoiseTransformerBlock` (`enable_free_noise(context_length=4, context_stride=2)`): the
    latents after 3 DDIM steps with CFG from the same noise. 7 frames: diffusers' flush-to-end last window."""
    from animatediff_jax.sampling import generate

    torch_pipe, ours = pipes
    noise = np.array(jax_normal((1, frames, H // 2, W // 2, 4)))
    torch_pipe.enable_free_noise(context_length=4, context_stride=2, weighting_scheme=weighting, noise_type="random")
    try:
        with torch.no_grad():
            ref = torch_pipe(prompt="the cat", negative_prompt="dog", num_frames=frames, height=H, width=W,
                             num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                             latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3)).frames
    finally:
        torch_pipe.enable_free_noise(context_length=F, context_stride=4)
    kw = dict(num_frames=frames, height=H, width=W, steps=3, init_latents=noise, progress=False)
    windows = dict(length=4, overlap=2, weighting=weighting, noise="random")
    res = generate(ours, ["the cat"], ["dog"], [0], context_windows=dict(windows, scope="motion"), **kw)
    err = assert_close(res.latents, ref.permute(0, 2, 3, 4, 1).numpy(), rtol=2e-5,
                       what=f"scope='motion' ({frames} frames, {weighting}) latents vs diffusers FreeNoise")
    unet = generate(ours, ["the cat"], ["dog"], [0], context_windows=windows, **kw)  # the UNet per window
    assert np.abs(unet.latents - res.latents).max() > 1e-4
    print(f"FreeNoise in the motion modules ({frames} frames, {weighting}), 3 DDIM steps: latents max abs err "
          f"{err:.2e} vs diffusers; scope 'unet' differs by {np.abs(unet.latents - res.latents).max():.2e}")


def test_context_windows_scope_error(pipes):
    from animatediff_jax.sampling import generate

    _, ours = pipes
    with pytest.raises(ValueError, match=r"^context_windows.scope='spatial': expected one of unet, motion$"):
        generate(ours, ["the cat"], None, [1], num_frames=8, height=H, width=W, steps=2, progress=False,
                 context_windows=dict(length=4, overlap=2, scope="spatial"))
