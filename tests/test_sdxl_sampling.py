"""SDXL sampling against diffusers' `AnimateDiffSDXLPipeline` (fp32 CPU, tiny random models): the same
initial latents give the same latents after 3 guided DDIM steps and the same frames; SD1.5's sampler
program is untouched; what SDXL cannot do yet is refused in one line. Prompt travel on SDXL (every frame
its own interpolated hidden states and pooled embedding): one text on every keyframe is the plain sample,
a pooled embedding per frame is diffusers' `UNet2DConditionModel` given that frame's, and a travelling
video's end frames are its keyframes' texts' (a UNet without motion: frames independent).

The reference: a tiny SDXL `UNetMotionModel` (text_time conditioning, a MotionAdapter without mid block:
its motion norms span the frames, as our `sdxl_beta` layout's), a tiny `AutoencoderKL` with SDXL's
scaling factor, two tiny CLIP text towers (the second with a projection) and their tokenizers (the second
pads with "!"), DDIM with SDXL's schedule; all converted to ours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from test_sdxl_text import TINY_G, TINY_L, hf_text, np_state_dict
from torch_refs import torch_motion_unet

from animatediff_jax import parity
from animatediff_jax.checkpoints.sd15 import convert_clip_text, convert_unet_state_dict, convert_vae
from animatediff_jax.errors import FieldError
from animatediff_jax.models.config import tiny_sdxl_unet
from animatediff_jax.models.shapes import sdxl_text_shapes
from animatediff_jax.models.vae import VAEConfig
from animatediff_jax.sampling import AnimationPipeline, generate
from animatediff_jax.testing.tiny import write_tiny_tokenizer
from animatediff_jax.text import Tokenizer

F, H, W = 4, 16, 16  # tiny VAE: latents 8x8; three UNet levels: 8, 4, 2
PROMPTS = ["a dog, and the cat!", "x9 y"]
# SDXL base's scheduler_config.json read as DDIM (scaled_linear betas, set_alpha_to_one False, leading).
DDIM_SDXL = dict(beta_schedule="scaled_linear", set_alpha_to_one=False, timestep_spacing="leading")
CFG = tiny_sdxl_unet(cross_attention_dim=TINY_L.hidden_size + TINY_G.hidden_size,
                     projection_class_embeddings_input_dim=TINY_G.projection_dim + 6 * 8)
VAE = dataclasses.replace(VAEConfig.tiny(), scaling_factor=0.13025)  # SDXL's (VAEConfig.sdxl())


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(diffusers `AnimateDiffSDXLPipeline`, our `AnimationPipeline` of the same weights)."""
    from diffusers import AnimateDiffSDXLPipeline, AutoencoderKL
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("sdxl")
    tok, tok2 = str(root / "tokenizer"), str(root / "tokenizer_2")
    vocab = write_tiny_tokenizer(tok)
    write_tiny_tokenizer(tok2, pad_token="!")
    text_l = hf_text(TINY_L, vocab, 2, seed=3)  # eos_token_id 2: SDXL's released configs
    text_g = hf_text(TINY_G, vocab, 2, seed=4)
    unet = torch_motion_unet(CFG, seed=5)
    assert unet.config.use_motion_mid_block is False
    vae = parity.randomize(AutoencoderKL(**VAE.to_diffusers()), seed=6)
    ref = AnimateDiffSDXLPipeline(
        vae=vae, text_encoder=text_l, text_encoder_2=text_g, unet=unet, motion_adapter=None,
        tokenizer=CLIPTokenizer.from_pretrained(tok, local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok2, local_files_only=True),
        scheduler=parity.diffusers_scheduler("ddim", DDIM_SDXL),
    ).to(torch.float32)
    ref.set_progress_bar_config(disable=True)
    params = {
        "unet": convert_unet_state_dict(unet.state_dict(), CFG),
        "vae": convert_vae(np_state_dict(vae), VAE),
        "text_encoder": convert_clip_text(np_state_dict(text_l), sdxl_text_shapes(TINY_L)),
        "text_encoder_2": convert_clip_text(np_state_dict(text_g), sdxl_text_shapes(TINY_G)),
    }
    ours = AnimationPipeline(CFG, VAE, TINY_L, jax.tree.map(jnp.asarray, params), Tokenizer(tok),
                             text_config_2=TINY_G, tokenizer_2=Tokenizer(tok2), eos_token_id_2=2)
    assert ours.sdxl and ours.vae.config.scaling_factor == 0.13025
    return ref, ours


def noise(seed: int = 0) -> np.ndarray:
    """Standard-normal initial latents `[N, F, h, w, C]` (ours; diffusers takes them as `[N, C, F, h, w]`)."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (len(PROMPTS), F, H // 2, W // 2, 4)))


def torch_latents(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


CASES = {
    "negatives, default sizes": dict(negative_prompt=["the dog", ""]),
    "no negative (zeros), sizes given": dict(original_size=(64, 48), crops_coords_top_left=(8, 4),
                                             target_size=(32, 40)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_latents_match_animatediff_sdxl_pipeline(pipes, case):
    """3 DDIM steps with guidance 7.5 from the same initial latents: the same latents."""
    ref, ours = pipes
    kw = CASES[case]
    x0 = noise(1)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, num_frames=F, height=H, width=W, num_inference_steps=3, guidance_scale=7.5,
                   latents=torch_latents(x0), output_type="latent", **kw).frames
    want = want.numpy().transpose(0, 2, 3, 4, 1)
    sizes = {k: v for k, v in kw.items() if k != "negative_prompt"}
    got = generate(ours, PROMPTS, kw.get("negative_prompt"), [0, 1], num_frames=F, height=H, width=W, steps=3,
                   guidance_scale=7.5, scheduler="ddim", scheduler_options=DDIM_SDXL, init_latents=x0,
                   progress=False, **sizes).latents
    # fp32 on both sides, the same ops in another order: ~1e-6 of the latents' scale
    err = assert_close(got, want, rtol=1e-5, atol=1e-5, what=f"SDXL latents [{case}]")
    print(f"SDXL latents [{case}]: max abs err {err:.2e} (latents max {np.abs(want).max():.3g})")
    # the conditioning matters: other size ids give other latents
    other = generate(ours, PROMPTS, kw.get("negative_prompt"), [0, 1], num_frames=F, height=H, width=W, steps=3,
                     guidance_scale=7.5, scheduler="ddim", scheduler_options=DDIM_SDXL, init_latents=x0,
                     progress=False, original_size=(1024, 1024)).latents
    assert np.abs(other - want).max() > 1e-3


def test_frames_match_animatediff_sdxl_pipeline(pipes):
    """Decoded frames (latents / 0.13025 through the VAE) within 1/255 of diffusers' float frames."""
    ref, ours = pipes
    x0 = noise(2)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, negative_prompt="the cat", num_frames=F, height=H, width=W, num_inference_steps=3,
                   guidance_scale=7.5, latents=torch_latents(x0), output_type="np").frames
    want = np.asarray(want, np.float32)  # [N, F, H, W, 3] in [0, 1]
    got = generate(ours, PROMPTS, ["the cat"], [0, 1], num_frames=F, height=H, width=W, steps=3, guidance_scale=7.5,
                   scheduler="ddim", scheduler_options=DDIM_SDXL, init_latents=x0, progress=False).frames
    assert got.shape == want.shape == (len(PROMPTS), F, H, W, 3)
    err = np.abs(got.astype(np.float64) - want * 255).max()
    print(f"SDXL frames: max abs err {err:.3f} / 255")
    assert err <= 1.0, err


def test_sdxl_refuses_what_it_cannot_do_yet(pipes):
    _, ours = pipes
    kw = dict(num_frames=F, height=H, width=W, steps=1, progress=False)
    with pytest.raises(FieldError, match="prompt_syntax") as e:
        generate(ours, ["(the cat:1.3)"], None, [0], **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(FieldError, match="prompt_syntax"):  # a travelling prompt's keyframes are checked too
        generate(ours, [{0: "the cat", 2: "(the dog:1.3)"}], None, [0], **kw)


def test_sd15_refuses_sdxl_sizes(tmp_path):
    from torch_refs import tiny_text_encoder

    _, _, text_pipe = tiny_text_encoder(str(tmp_path / "tok"))
    from animatediff_jax.models.config import tiny_unet

    pipe = AnimationPipeline(tiny_unet("v2", cross_attention_dim=32), VAEConfig.tiny(), text_pipe.text_config,
                             text_pipe.params, text_pipe.tokenizer)
    with pytest.raises(FieldError, match="original_size .*SDXL's size conditioning"):
        generate(pipe, ["the cat"], None, [0], num_frames=F, height=H, width=W, steps=1, original_size=(64, 64))


def test_windows_give_each_window_its_videos_added_cond(pipes):
    """Context windows: each window of a video is predicted with that video's pooled text and time ids
    (two disjoint windows == the UNet on each half alone)."""
    from animatediff_jax.models.unet import AddedCond
    from animatediff_jax.sampling import predict_noise
    from animatediff_jax.sampling.prompts import encode_sdxl

    _, ours = pipes
    cond, uncond, added = encode_sdxl(ours, PROMPTS, ["the dog", ""], np.asarray([16, 16, 0, 0, 16, 16]), True)
    added = (added[0], AddedCond(added[1].text_embeds, added[1].time_ids.at[1].set(99.0)))  # each half its own
    x, t = jnp.asarray(noise(3)), jnp.int32(500)
    run = jax.jit(predict_noise, static_argnames=("unet", "windows"))
    eps = lambda x_, windows=None: run(ours.unet, ours.params["unet"], x_, t, cond, uncond, 7.5, windows,  # noqa: E731
                                       added=added)
    windowed = eps(x, ((0, 1), (2, 3)))
    halves = jnp.concatenate([eps(x[:, :2]), eps(x[:, 2:])], axis=1)
    err = assert_close(windowed, halves, rtol=1e-5, what="windows vs halves")
    print(f"SDXL windows vs halves: max abs err {err:.2e}")
    # prompt travel: each window takes its frames of the per-frame hidden states AND pooled embeddings
    cond, uncond, added = encode_sdxl(ours, [{0: PROMPTS[0], 3: PROMPTS[1]}, PROMPTS[1]], ["the dog", ""],
                                      np.asarray([16, 16, 0, 0, 16, 16]), True, num_frames=F)
    assert added[0].text_embeds.shape == added[1].text_embeds.shape == (2, F, CFG.text_embeds_dim)
    half = lambda a, k: AddedCond(a.text_embeds[:, k], a.time_ids)  # noqa: E731
    windowed = run(ours.unet, ours.params["unet"], x, t, cond, uncond, 7.5, ((0, 1), (2, 3)), added=added)
    halves = jnp.concatenate([run(ours.unet, ours.params["unet"], x[:, k], t, cond[:, k], uncond[:, k], 7.5,
                                  added=tuple(half(a, k) for a in added)) for k in (slice(0, 2), slice(2, 4))], axis=1)
    err = assert_close(windowed, halves, rtol=1e-5, what="travelling windows vs halves")
    print(f"SDXL travelling windows vs halves: max abs err {err:.2e}")


def test_programs_inputs(pipes):
    """SD1.5's denoising program takes no added inputs; SDXL's takes the pooled text and time ids of
    both guidance halves, and its abstract program (`animatediff-jax compile`) lowers."""
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.shapes import unet_shapes
    from animatediff_jax.sampling import Request
    from animatediff_jax.sampling.programs import abstract_sampler, mesh_over

    _, ours = pipes
    mesh = mesh_over(jax.devices()[:1])
    request = Request.create(PROMPTS, None, [0, 1], num_frames=F, height=H, width=W, steps=2)
    sd15_unet = tiny_unet("v2", cross_attention_dim=TINY_L.hidden_size)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s.shape), jnp.float32), unet_shapes(sd15_unet))
    sd15 = AnimationPipeline(sd15_unet, VAE, TINY_L, {**ours.params, "unet": shapes})
    counts = {}
    for name, pipe in (("sdxl", ours), ("sd15", sd15)):
        fn, args, sharding = abstract_sampler(pipe, request, mesh)["denoise"]
        counts[name] = len(jax.tree.leaves(args[5]))  # (params, schedulers, noise, cond, uncond, added, ...)
        with jax.set_mesh(mesh):
            jax.jit(fn, out_shardings=sharding).lower(*args)
    assert counts == {"sd15": 0, "sdxl": 4}, counts
    added = abstract_sampler(ours, request, mesh)["denoise"][1][5]
    assert [a.shape for a in jax.tree.leaves(added)] == [(2, TINY_G.projection_dim), (2, 6)] * 2
    travel = request.replace(prompts=({0: "a", 2: "b"}, "c"))  # prompt travel: a pooled embedding per frame
    added = abstract_sampler(ours, travel, mesh)["denoise"][1][5]
    assert [a.shape for a in jax.tree.leaves(added)] == [(2, F, TINY_G.projection_dim), (2, 6)] * 2


def test_free_init_is_diffusers_on_sdxl(pipes, monkeypatch):
    """FreeInit on SDXL: `AnimateDiffSDXLPipeline.enable_free_init(num_iters=2)` from the same initial latents,
    diffusers' fresh noise replaced by ours (`free_init_noise`): the same latents after the last iteration."""
    from diffusers.pipelines import free_init_utils

    from animatediff_jax.sampling.free_init import free_init_noise
    from animatediff_jax.sampling.keys import seed_key

    ref, ours = pipes
    x = noise(3)[:1]
    key_data = jnp.stack([jax.random.key_data(seed_key(7))])
    fresh = [torch.from_numpy(np.array(free_init_noise(key_data, 1, x.shape))).permute(0, 4, 1, 2, 3)]
    monkeypatch.setattr(free_init_utils, "randn_tensor", lambda *a, **k: fresh.pop(0))
    ref.enable_free_init(num_iters=2)
    try:
        with torch.no_grad():
            want = ref(prompt="the cat", negative_prompt="dog", num_frames=F, height=H, width=W, num_inference_steps=3,
                       guidance_scale=7.5, output_type="latent", latents=torch_latents(x)).frames
    finally:
        ref.disable_free_init()
    assert not fresh  # diffusers drew exactly the one fresh noise
    kw = dict(num_frames=F, height=H, width=W, steps=3, init_latents=x, scheduler="ddim", scheduler_options=DDIM_SDXL,
              progress=False)
    got = generate(ours, ["the cat"], ["dog"], [7], free_init=dict(num_iters=2), **kw)
    err = assert_close(got.latents, want.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5, what="SDXL FreeInit vs diffusers")
    plain = generate(ours, ["the cat"], ["dog"], [7], **kw)
    assert np.abs(plain.latents - got.latents).max() > 1e-3
    print(f"SDXL FreeInit 2 iterations: latents max abs err {err:.2e} vs diffusers")


def test_video_to_video_keeps_the_video_at_low_strength_on_sdxl(pipes):
    """Video to video on SDXL (no diffusers reference: its SDXL pipeline has none): a low strength stays near
    the video's latents (encoded with SDXL's 0.13025), full strength goes anywhere."""
    from animatediff_jax.models.vae import encode_video
    from animatediff_jax.sampling.free_init import video_pixels

    _, ours = pipes
    video = np.random.default_rng(4).integers(0, 256, (1, F, H, W, 3), dtype=np.uint8)
    kw = dict(num_frames=F, height=H, width=W, steps=10, sample_posterior=False, progress=False)
    low = generate(ours, ["the cat"], None, [1], init_video=video, strength=0.2, **kw)
    high = generate(ours, ["the cat"], None, [1], init_video=video, strength=1.0, **kw)
    z0 = np.asarray(encode_video(ours.vae, ours.params["vae"], jnp.asarray(video_pixels(video))))
    err = lambda r: np.abs(r.latents - z0).mean()  # noqa: E731
    assert err(low) < 0.5 * err(high)


# ------------------------------------------------------------------ prompt travel (a pooled embedding per frame)

SPATIAL = tiny_sdxl_unet(None, cross_attention_dim=CFG.cross_attention_dim,
                         projection_class_embeddings_input_dim=CFG.projection_class_embeddings_input_dim)


@pytest.fixture(scope="module")
def spatial(pipes):
    """(diffusers' `UNet2DConditionModel` of `SPATIAL`, our pipeline with it: the SDXL image UNet run per
    frame, the text encoders and VAE of `pipes`)."""
    from diffusers import UNet2DConditionModel
    from torch_refs import unet2d_kwargs

    _, ours = pipes
    tm = parity.randomize(UNet2DConditionModel(**unet2d_kwargs(SPATIAL)), seed=8)
    params = {**ours.params, "unet": jax.tree.map(jnp.asarray, convert_unet_state_dict(tm.state_dict(), SPATIAL))}
    return tm, dataclasses.replace(ours, unet_config=SPATIAL, params=params)


def test_travel_of_one_text_is_the_plain_sample(pipes):
    """Every keyframe the same text (negatives plain, and a negative that travels too): the same latents
    as the plain prompts, the per-frame hidden states and pooled embeddings all equal to the video's."""
    _, ours = pipes
    kw = dict(num_frames=F, height=H, width=W, steps=2, guidance_scale=7.5, scheduler="ddim",
              scheduler_options=DDIM_SDXL, init_latents=noise(4), progress=False)
    plain = generate(ours, PROMPTS, ["the dog", ""], [0, 1], **kw).latents
    travel = [{0: PROMPTS[0], 2: PROMPTS[0]}, {0: PROMPTS[1], 1: PROMPTS[1], 3: PROMPTS[1]}]
    for negatives in (["the dog", ""], [{0: "the dog", 3: "the dog"}, ""]):
        got = generate(ours, travel, negatives, [0, 1], prompt_interpolation="slerp", **kw).latents
        # fp32: the same embeddings up to rounding (slerp's, the encoders' other batch size, the added
        # embedding computed per frame), through 2 steps at guidance 7.5: measured ~4e-6 of the latents' scale
        err = assert_close(got, plain, rtol=1e-5, atol=1e-6, what=f"one-text travel vs plain [{negatives[0]}]")
        print(f"SDXL one-text travel vs plain sample: max abs err {err:.2e} (latents max {np.abs(plain).max():.3g})")


def test_unet_pooled_embedding_per_frame(pipes, spatial):
    """`text_embeds` `[B, F, P]`: equal rows are the per-video `[B, P]` call (motion UNet); different
    rows are, frame by frame, diffusers' `UNet2DConditionModel` given that frame's `added_cond_kwargs`
    (no motion: the frames do not mix)."""
    from animatediff_jax.models.unet import AddedCond, UNet3D

    _, ours = pipes
    tm, spatial_pipe = spatial
    b, p = 2, CFG.text_embeds_dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, F, H // 2, W // 2, 4)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, CFG.cross_attention_dim)).astype(np.float32)
    text = rng.standard_normal((b, F, p)).astype(np.float32)
    ids = np.asarray([[64, 48, 8, 4, 32, 40], [16, 16, 0, 0, 16, 16]], np.float32)
    t = np.asarray([500, 20], np.int32)

    motion = jax.jit(UNet3D(CFG).apply)
    per_video = motion({"params": ours.params["unet"]}, x, t, ctx, added_cond=AddedCond(text[:, 0], ids))
    repeated = np.repeat(text[:, :1], F, axis=1)
    per_frame = motion({"params": ours.params["unet"]}, x, t, ctx, added_cond=AddedCond(repeated, ids))
    err = assert_close(per_frame, per_video, rtol=1e-5, what="equal pooled rows per frame vs per video")
    print(f"SDXL UNet, pooled per frame (equal rows) vs per video: max abs err {err:.2e}")

    got = jax.jit(UNet3D(SPATIAL).apply)({"params": spatial_pipe.params["unet"]}, x, t, ctx,
                                          added_cond=AddedCond(text, ids))
    frames = lambda v: torch.from_numpy(np.ascontiguousarray(v)).repeat_interleave(F, 0)  # noqa: E731  per video -> per frame
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.reshape(b * F, H // 2, W // 2, 4).transpose(0, 3, 1, 2).copy()), frames(t),
                 frames(ctx), added_cond_kwargs={"text_embeds": torch.from_numpy(text.reshape(b * F, p)),
                                                 "time_ids": frames(ids)}).sample
    ref = ref.numpy().transpose(0, 2, 3, 1).reshape(got.shape)
    err = assert_close(got, ref, rtol=1e-5, what="pooled per frame vs UNet2DConditionModel per frame")
    print(f"SDXL spatial UNet, pooled per frame vs diffusers per frame: max abs err {err:.2e} "
          f"(ref max {np.abs(ref).max():.2f})")
    # each frame's own row matters: the first frame's row on every frame gives other frames 1..F-1
    first = jax.jit(UNet3D(SPATIAL).apply)({"params": spatial_pipe.params["unet"]}, x, t, ctx,
                                            added_cond=AddedCond(np.repeat(text[:, :1], F, axis=1), ids))
    np.testing.assert_allclose(first[:, 0], got[:, 0], rtol=0, atol=1e-5)
    assert min(np.abs(np.asarray(first[:, k]) - ref[:, k]).max() for k in range(1, F)) > 1e-3


def test_travel_end_frames_are_their_keyframes_texts(spatial):
    """A 2-keyframe travel ({0: A, F-1: B}) through the UNet without motion (frames independent): frame 0
    is the plain A video's frame 0, frame F-1 the plain B video's (both the hidden states and the pooled
    embedding reach B), and the frames between move from A to B, each further from A and nearer to B."""
    _, pipe = spatial
    a, b = PROMPTS
    kw = dict(num_frames=F, height=H, width=W, steps=2, guidance_scale=7.5, scheduler="ddim",
              scheduler_options=DDIM_SDXL, init_latents=noise(5)[:1], progress=False)
    got = generate(pipe, [{0: a, F - 1: b}], ["the dog"], [0], **kw).latents[0]
    want_a = generate(pipe, [a], ["the dog"], [0], **kw).latents[0]
    want_b = generate(pipe, [b], ["the dog"], [0], **kw).latents[0]
    e0 = assert_close(got[0], want_a[0], rtol=1e-5, atol=1e-6, what="travel frame 0 vs keyframe 0's text")
    e1 = assert_close(got[-1], want_b[-1], rtol=1e-5, atol=1e-6, what="travel last frame vs keyframe 1's text")
    print(f"SDXL travel end frames vs their texts' samples: max abs err {e0:.2e}, {e1:.2e}")
    to_a = [np.abs(got[k] - want_a[k]).max() for k in range(F)]
    to_b = [np.abs(got[k] - want_b[k]).max() for k in range(F)]
    print(f"SDXL travel: distance to A's frames {np.round(to_a, 4)}, to B's {np.round(to_b, 4)}")
    assert all(x < y for x, y in zip(to_a, to_a[1:])), to_a
    assert all(x > y for x, y in zip(to_b, to_b[1:])), to_b
    # the pooled embeddings travel by the hidden states' rule and weights (linear: frame k at k / (F - 1))
    from animatediff_jax.sampling.prompts import encode_sdxl

    ids = np.asarray([16, 16, 0, 0, 16, 16])
    cond, _, (added, _) = encode_sdxl(pipe, [{0: a, F - 1: b}], None, ids, False, num_frames=F)
    keys, _, (ends, _) = encode_sdxl(pipe, [a, b], None, ids, False)
    assert cond.shape == (1, F) + keys.shape[1:] and added.text_embeds.shape == (1, F, CFG.text_embeds_dim)
    for name, got_, ends_ in (("hidden states", cond[0], keys), ("pooled", added.text_embeds[0], ends.text_embeds)):
        for k in range(F):
            w = k / (F - 1)
            assert_close(got_[k], (1 - w) * ends_[0] + w * ends_[1], rtol=1e-6, atol=1e-6, what=f"{name} frame {k}")
    np.testing.assert_array_equal(added.time_ids, ids[None].astype(np.float32))


CONTEXT_CHILD = """
import dataclasses, json
import jax, numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from animatediff_jax.checkpoints.sdxl import load_sdxl
from animatediff_jax.models.config import MotionConfig
from animatediff_jax.models.init import random_params
from animatediff_jax.models.shapes import is_motion_path, unet_shapes
from animatediff_jax.sampling import AnimationPipeline, generate, sampling_mesh
from animatediff_jax.training.stages import union

assert jax.device_count() == 8
base = load_sdxl({folder!r})
out = {{}}
for version in ("sdxl_beta",):
    cfg = dataclasses.replace(base.unet_config, motion=MotionConfig.for_version(version))
    motion = {{k: np.asarray(v) for k, v in flatten_dict(random_params(unet_shapes(cfg), 7)).items() if is_motion_path(k)}}
    pipe = AnimationPipeline.from_base(dataclasses.replace(
        base, unet_config=cfg, params={{**base.params, "unet": union(unflatten_dict(motion), base.params["unet"])}}))
    kw = dict(num_frames=4, height=64, width=64, steps=2, decode_chunk=2, progress=False)
    one = generate(pipe, ["a cat", "a dog"], ["bad"], [1, 2], mesh=sampling_mesh(1), **kw)
    spread = generate(pipe, ["a cat", "a dog"], ["bad"], [1, 2], mesh=sampling_mesh(8, context=4), **kw)
    out[version] = dict(latents=float(np.abs(spread.latents - one.latents).max()),
                        scale=float(np.abs(one.latents).max()),
                        frames=int(np.abs(spread.frames.astype(int) - one.frames.astype(int)).max()))
print(json.dumps(out))
"""


def test_context_parallel_sdxl_equals_one_device(tmp_path):
    """Each SDXL video's frames over 4 of 8 fake CPU devices (`sampling_mesh(8, context=4)`: the added
    conditioning follows its video, the motion modules regroup frames <-> positions across devices) == one
    device with the AnimateDiff-SDXL beta layout, to float32 rounding (measured 8.2e-5 on latents of scale 16;
    HotshotXL's layout too, by hand: 8.4e-5)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import xla_flags

    from animatediff_jax.testing.tiny import write_tiny_sdxl

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = write_tiny_sdxl(tmp_path / "tiny_sdxl")
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", CONTEXT_CHILD.format(folder=str(folder))], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    print(res)
    for version, r in res.items():
        assert r["scale"] > 1 and r["latents"] < 1e-5 * r["scale"] and r["frames"] <= 1, (version, r)
