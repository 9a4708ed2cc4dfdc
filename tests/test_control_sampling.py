"""The whole sampler with control models against diffusers' `AnimateDiffControlNetPipeline` and
`AnimateDiffSparseControlNetPipeline` (PyTorch, CPU, fp32), from the same initial latents: the final
latents and the decoded frames.

Tiny random models (the parity pipeline's), the control models built in diffusers with seeded random
weights (zero convolutions too) and converted. Motion-module GroupNorms: diffusers' semantics (across
frames) on both sides, for the UNet and SparseCtrl's own motion modules (see animatediff_jax/parity.py).
SparseCtrl RGB encodes its keyframes with the VAE: diffusers draws a posterior sample from torch's
global generator, so both sides use the posterior mean here (diffusers' `retrieve_latents` in "argmax"
mode, ours `sample_posterior=False`).
"""

import numpy as np
import pytest

from animatediff_jax import parity

RTOL, ATOL = 2e-5, 1e-5  # relative to each quantity's reference scale
F, H, W, STEPS = 4, 16, 16, 3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    torch_pipe, tok = parity.build_random_pipeline("tiny", workdir=str(tmp_path_factory.mktemp("control")))
    return torch_pipe, parity.ours_from_diffusers(torch_pipe, tok)


def control_model(kind, ours, seed):
    """(diffusers control model with random weights, our ControlNetConfig, our params) for `ours`' UNet."""
    from diffusers import ControlNetModel, SparseControlNetModel

    from animatediff_jax.checkpoints.controlnet import convert_controlnet_state_dict
    from animatediff_jax.models.controlnet import tiny_controlnet

    u = ours.unet_config
    cfg = tiny_controlnet(kind, cross_attention_dim=u.cross_attention_dim)
    if cfg.sparse:  # diffusers' motion-module norm semantics, as the parity UNet
        cfg = cfg.replace(unet=cfg.unet.replace(motion=cfg.unet.motion.replace(norm_per_frame=False)))
    cls = SparseControlNetModel if cfg.sparse else ControlNetModel
    ref = parity.randomize(cls(**cfg.to_diffusers()), seed)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, cfg, convert_controlnet_state_dict(sd, cfg, what=f"diffusers {cls.__name__}")


def images(seed, n):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def noise_for(ours, seeds):
    import jax
    import jax.numpy as jnp

    shape = (F, H // ours.vae_config.downscale, W // ours.vae_config.downscale, ours.unet_config.in_channels)
    return np.stack([np.asarray(jax.random.normal(jax.random.key(s), shape, jnp.float32)) for s in seeds])


def run_reference(pipe, noise, **kw):
    """diffusers' pipeline from our noise: (final latents [B, F, h, w, C], frames [B, F, H, W, 3] in [0, 1])."""
    import torch

    captured = {}

    def on_step(p, i, t, k):
        captured["latents"] = k["latents"].detach().numpy()
        return {}

    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(num_frames=F, height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5,
                   latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()), output_type="np",
                   callback_on_step_end=on_step, **kw)
    return captured["latents"].transpose(0, 2, 3, 4, 1), np.asarray(out.frames, np.float32)


def run_ours(ours, noise, seeds, controls, prompts, negative):
    import jax.numpy as jnp

    from animatediff_jax.models.vae import decode_video
    from animatediff_jax.sampling import generate

    res = generate(ours, prompts, negative, seeds, num_frames=F, height=H, width=W, steps=STEPS, guidance_scale=7.5,
                   decode_chunk=F, progress=False, init_latents=noise, controls=controls, sample_posterior=False)
    frames = np.clip(np.asarray(decode_video(ours.vae, ours.params["vae"], jnp.asarray(res.latents), F)) / 2 + 0.5, 0, 1)
    return res.latents, frames, res.frames


def check(name, ours, ref):
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
    print(f"{name}: max abs {err:.2e} (ref max {scale:.3g})")
    assert scale > 0 and err <= ATOL + RTOL * scale, (name, err, scale)


def test_controlnets_match_animatediff_controlnet_pipeline(pipes):
    """Two ControlNets at once (scales 0.8 and 1.3, the second only over the middle of the run)."""
    from diffusers import AnimateDiffControlNetPipeline
    from PIL import Image

    from animatediff_jax.sampling import Control

    torch_pipe, ours = pipes
    (ref_a, cfg_a, p_a), (ref_b, cfg_b, p_b) = control_model(False, ours, 11), control_model(False, ours, 12)
    frames_a, frames_b = images(1, F), images(2, F)
    pipe = AnimateDiffControlNetPipeline(
        vae=torch_pipe.vae, text_encoder=torch_pipe.text_encoder, tokenizer=torch_pipe.tokenizer, unet=torch_pipe.unet,
        motion_adapter=torch_pipe.motion_adapter, controlnet=[ref_a, ref_b],
        scheduler=parity.diffusers_scheduler("ddim"))
    # (One prompt: diffusers 0.42's MultiControlNet path mis-sizes the condition batch for several.)
    prompts, negative, seeds = ["a cat and the dog"], ["dog"], [3]
    noise = noise_for(ours, seeds)
    ref_lat, ref_frames = run_reference(
        pipe, noise, prompt=prompts, negative_prompt=negative,
        conditioning_frames=[[Image.fromarray(f) for f in frames_a], [Image.fromarray(f) for f in frames_b]],
        controlnet_conditioning_scale=[0.8, 1.3], control_guidance_start=[0.0, 0.3], control_guidance_end=[1.0, 0.7],
        decode_chunk_size=F)
    controls = [Control(cfg_a, p_a, frames_a, scale=0.8), Control(cfg_b, p_b, frames_b, scale=1.3, start=0.3, end=0.7)]
    lat, frames, _ = run_ours(ours, noise, seeds, controls, prompts, negative)
    check("latents", lat, ref_lat)
    check("frames", frames, ref_frames)
    # ... and the controls did something: without them the latents differ by far more than the tolerance.
    plain, _, _ = run_ours(ours, noise, seeds, [], prompts, negative)
    assert np.abs(plain - ref_lat).max() > 100 * (ATOL + RTOL * np.abs(ref_lat).max())


@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_sparsectrl_matches_animatediff_sparse_controlnet_pipeline(pipes, kind, monkeypatch):
    """Two keyframes (frames 0 and 2) steer a 4-frame video; RGB through the VAE, scribble as pixels."""
    import diffusers.pipelines.animatediff.pipeline_animatediff_sparsectrl as sparse_module
    from diffusers import AnimateDiffSparseControlNetPipeline
    from PIL import Image

    from animatediff_jax.sampling import Control

    original = sparse_module.retrieve_latents
    monkeypatch.setattr(sparse_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, generator, "argmax"))
    torch_pipe, ours = pipes
    ref, cfg, params = control_model(kind, ours, 21)
    keyframes, indices = images(5, 2), [0, 2]
    pipe = AnimateDiffSparseControlNetPipeline(
        vae=torch_pipe.vae, text_encoder=torch_pipe.text_encoder, tokenizer=torch_pipe.tokenizer, unet=torch_pipe.unet,
        motion_adapter=torch_pipe.motion_adapter, controlnet=ref, scheduler=parity.diffusers_scheduler("ddim"))
    prompt, seeds = ["a cat and the dog"], [7]
    noise = noise_for(ours, seeds)
    ref_lat, ref_frames = run_reference(
        pipe, noise, prompt=prompt, negative_prompt=["dog"], conditioning_frames=[Image.fromarray(f) for f in keyframes],
        controlnet_frame_indices=indices, controlnet_conditioning_scale=0.9)
    lat, frames, _ = run_ours(ours, noise, seeds, [Control(cfg, params, keyframes, tuple(indices), scale=0.9)], prompt,
                              ["dog"])
    check("latents", lat, ref_lat)
    check("frames", frames, ref_frames)


def test_control_errors_are_one_line(pipes):
    """Wrong frame counts, keyframes outside the video, a control model for another base: named, before compiling."""
    from animatediff_jax.models.controlnet import tiny_controlnet
    from animatediff_jax.sampling import Control, generate

    _, ours = pipes
    _, cfg, params = control_model(False, ours, 31)
    _, scfg, sparams = control_model("scribble", ours, 32)
    kw = dict(num_frames=F, height=H, width=W, steps=2, progress=False)
    cases = [
        (Control(cfg, params, images(0, F - 1), name="controlnet[0]"), "controlnet[0]: 3 control frame(s) for a video of 4"),
        (Control(scfg, sparams, images(0, 1), (F,), name="sparsectrl"), "sparsectrl.frame_indices [4] outside the video"),
        (Control(scfg, sparams, images(0, 2), (0,), name="sparsectrl"), "2 keyframe image(s) but 1 frame_indices"),
        (Control(tiny_controlnet(False, cross_attention_dim=8), params, images(0, F)), "a control model for another base"),
        (Control(cfg, params, images(0, F)[:, :8], name="c"), "images must be [K, 16, 16, 3]"),
        (Control(cfg, params, images(0, F), scale=1.0, start=0.6, end=0.5, name="c"), "expected 0 <= start < end <= 1"),
    ]
    for control, message in cases:
        with pytest.raises(ValueError) as e:
            generate(ours, ["a cat"], None, [0], controls=[control], **kw)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_sample_config_image_to_video_and_controlnet(tmp_path):
    """`sample` from a config: a ControlNet on every frame (a GIF) plus SparseCtrl RGB with one keyframe at
    frame 0 (image to video), files read before weights load; the frames equal `generate` given the same
    controls by hand, and the keyframe steers the video (frames differ from the run without it)."""
    from animatediff_jax.checkpoints.controlnet import load_controlnet
    from animatediff_jax.io.video import read_frames, read_image, write_gif
    from animatediff_jax.sample import load_config, sample
    from animatediff_jax.sampling import Control, generate
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path / "models")
    cond_gif = str(tmp_path / "pose.gif")
    write_gif(cond_gif, np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    c = load_config(f"configs/sample/tiny.py:{tmp_path / 'models'}", f"--config.output.dir={tmp_path / 'out'}",
                    "--config.L=4", "--config.steps=2", "--config.prompt=('a cat',)", "--config.seed=5",
                    "--config.output.formats=('gif',)", "--config.motion_module_lora_configs=()")
    c["controlnet"] = ({"path": paths["controlnet"], "video": cond_gif, "scale": 0.7, "end": 0.5},)
    c["sparsectrl"] = {"path": paths["sparsectrl_rgb"], "images": (paths["keyframe"],), "frame_indices": (0,)}
    res = sample(c)
    assert res.frames.shape == (1, 4, 32, 32, 3) and any(f.endswith(".gif") for f in res.files)

    pipe = res.pipeline
    net, sparse = (load_controlnet(p, base=pipe.unet_config) for p in (paths["controlnet"], paths["sparsectrl_rgb"]))
    controls = [Control(*net, read_frames(cond_gif, 4, (32, 32)), scale=0.7, end=0.5),
                Control(*sparse, read_image(paths["keyframe"])[None], (0,))]
    kw = dict(num_frames=4, height=32, width=32, steps=2, guidance_scale=7.5, progress=False)
    again = generate(pipe, ["a cat"], ["bad quality"], [5], controls=controls, **kw).frames
    np.testing.assert_array_equal(again, res.frames)
    plain = generate(pipe, ["a cat"], ["bad quality"], [5], **kw).frames
    assert np.abs(plain.astype(int) - res.frames).max() > 10


def test_sample_config_control_errors(tmp_path):
    """Config mistakes are one line naming the field, before any weights load."""
    from animatediff_jax.errors import ConfigError
    from animatediff_jax.sample import load_config, sample
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path / "models")
    base = load_config(f"configs/sample/tiny.py:{tmp_path / 'models'}", f"--config.output.dir={tmp_path / 'out'}",
                       "--config.L=4")
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"not a png")
    cases = [
        (dict(sparsectrl={"path": paths["sparsectrl_rgb"], "images": (paths["keyframe"],), "frame_indices": (4,)}),
         "sparsectrl.frame_indices [4] outside the video"),
        (dict(sparsectrl={"path": paths["sparsectrl_rgb"], "images": (paths["keyframe"],), "frame_indices": (0, 1)}),
         "sparsectrl: 1 keyframe image(s) but 2 frame_indices"),
        (dict(controlnet=({"path": paths["controlnet"], "images": (paths["keyframe"],) * 3},)),
         "controlnet[0]: 3 control frame(s) for a video of 4 frames"),
        (dict(controlnet=({"path": paths["controlnet"], "images": (str(bad_png),) * 4},)), "broken.png: cannot read"),
        (dict(controlnet=({"path": paths["controlnet"]},)), "controlnet[0]: give video or images"),
        (dict(controlnet=({"path": paths["controlnet"], "video": "nope.gif", "scale": 1},)),
         "controlnet[0].video: nope.gif: no such file"),
        (dict(controlnet=({"path": paths["sparsectrl_rgb"], "images": (paths["keyframe"],) * 4},)),
         "is a SparseCtrl model; put it under sparsectrl"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as e:
            sample({**base, **change})
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("spec", ["v3_sparsectrl_rgb.py", "v3_sparsectrl_rgb.py:0,-1", "v3_sparsectrl_sketch.py",
                                  "v3_sparsectrl_sketch.py:storyboard"])
def test_sparsectrl_configs_are_the_originals(spec):
    """The configs' fields are valid (only the model files, absent here, are missing) and hold the original
    prompt configs' settings (3_2 / 3_3 RealisticVision: DDIM 25 steps, guidance 8.5, 512x512x16)."""
    from animatediff_jax.sample import load_config
    from animatediff_jax.sampling.assemble import ConfigError, validate

    c = load_config(f"configs/sample/{spec}")
    assert (c["steps"], c["guidance_scale"], c["W"], c["H"], c["L"]) == (25, 8.5, 512, 512, 16)
    assert len(c["sparsectrl"]["images"]) == len(c["sparsectrl"]["frame_indices"])
    with pytest.raises(ConfigError) as e:  # every file it names is missing here: all listed, in one line
        validate(c)
    msg = str(e.value)
    assert "\n" not in msg and "files the config names are not there" in msg, msg
    for field in ("base_model: models/sd15", "motion_module: ", "sparsectrl.path: ", "sparsectrl.images[0]: "):
        assert field in msg, (field, msg)
