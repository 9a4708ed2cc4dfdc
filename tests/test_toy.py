"""The toy world: data through the real WebVid path, the metric on videos of known motion, the
pixel-space VAE against diffusers, motion learned by the shipped checkpoint (measured), and a
short end-to-end run of every stage through the normal `train` machinery."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import assert_close

from animatediff_jax.toy import base, demo, metrics, world

# ----------------------------------------------------------------------------------------------
# The metric, on videos whose motion is known exactly.
# ----------------------------------------------------------------------------------------------


def disc_video(centres, radii, size=16, colour=(220, 40, 40), grey=128, ss=8) -> np.ndarray:
    """uint8 `[F, size, size, 3]`: an antialiased disc (coverage from `ss`x`ss` supersampling)."""
    px = (np.arange(size * ss) + 0.5) / ss
    x, y = np.meshgrid(px, px)
    frames = []
    for (cx, cy), r in zip(centres, radii):
        cov = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).reshape(size, ss, size, ss).mean((1, 3))[..., None]
        img = cov * np.asarray(colour, np.float64) + (1 - cov) * grey
        frames.append(np.round(img).astype(np.uint8))
    return np.stack(frames)


def linear(start, velocity, n=8):
    return [(start[0] + velocity[0] * t, start[1] + velocity[1] * t) for t in range(n)]


@pytest.mark.parametrize("motion,velocity", [("right", (0.8, 0.0)), ("left", (-0.7, 0.0)), ("down", (0.0, 0.9)),
                                             ("up", (0.0, -0.6))])
def test_metric_translation(motion, velocity):
    video = disc_video(linear((8.0 - 3.5 * velocity[0], 8.0 - 3.5 * velocity[1]), velocity), [3.0] * 8)
    m = metrics.measure(video)
    assert m.predicted == motion
    assert abs(m.vx - velocity[0]) < 0.02 and abs(m.vy - velocity[1]) < 0.02, (m.vx, m.vy)
    assert abs(m.vs) < 0.01 and m.jitter < 0.1 and m.found == 1.0
    assert abs(metrics.progress(m, motion) - math.hypot(*velocity)) < 0.02
    # Upscaled (as the demo's GIFs): the same numbers, lengths are in pixels of a 16-pixel frame.
    big = metrics.measure(video.repeat(8, 1).repeat(8, 2))
    assert big.predicted == motion and abs(big.vx - m.vx) < 1e-3 and abs(big.vy - m.vy) < 1e-3


def test_metric_zoom_static_jitter_lost():
    grow = 1.7 ** (1 / 7)
    zoom_in = metrics.measure(disc_video([(8.0, 8.0)] * 8, [2.2 * grow**t for t in range(8)]))
    assert zoom_in.predicted == "zoom in" and abs(zoom_in.vs - math.log(grow)) < 0.01, zoom_in
    zoom_out = metrics.measure(disc_video([(8.0, 8.0)] * 8, [4.0 / grow**t for t in range(8)]))
    assert zoom_out.predicted == "zoom out" and abs(zoom_out.vs + math.log(grow)) < 0.01, zoom_out
    still = metrics.measure(disc_video([(6.0, 9.0)] * 8, [3.0] * 8))
    assert still.predicted == "static" and still.jitter < 1e-3 and still.smoothness > 0.999
    # Frames that jump about: the second differences of the track are the jumps.
    rng = np.random.default_rng(0)
    centres = [tuple(c) for c in rng.uniform(4, 12, (8, 2))]
    jumpy = metrics.measure(disc_video(centres, [3.0] * 8))
    c = np.asarray(centres)
    expected = np.sqrt((np.diff(c, 2, axis=0) ** 2).sum(-1).mean())
    assert abs(jumpy.jitter - expected) < 0.05 * expected and jumpy.jitter > 3, (jumpy.jitter, expected)
    lost = disc_video(linear((5.0, 8.0), (0.8, 0.0)), [3.0] * 8)
    lost[4] = 128  # the shape vanishes in one frame
    assert metrics.measure(lost).predicted == "none"


def test_metric_summary_and_watermark():
    videos = [disc_video(linear((4.0, 8.0), (1.0, 0.0)), [3.0] * 8),  # right, as prompted
              disc_video(linear((12.0, 8.0), (-1.0, 0.0)), [3.0] * 8),  # left, prompted right
              disc_video([(8.0, 8.0)] * 8, [3.0] * 8)]  # static, not scored
    s = metrics.summarize(videos, ["right", "right", None])
    assert s.n == 3 and s.accuracy == 0.5 and abs(s.progress - 0.0) < 0.02
    assert s.predicted == {"left": 1, "right": 1, "static": 1}
    marked = videos[2].copy()
    top, bottom, left, right = (int(f * 16) for f in world.WATERMARK_BOX)
    marked[:, top:bottom, left:right] = np.round(0.4 * marked[:, top:bottom, left:right] + 0.6 * 255)
    assert abs(metrics.watermark_score(videos[2])) < 1e-6
    assert abs(metrics.watermark_score(marked) - 0.6 * (1 - 128 / 255)) < 0.01


def test_metrics_script(tmp_path, capsys):
    from animatediff_jax.io.video import write_gif

    write_gif(tmp_path / "red_circle_moving_up_s0.gif", disc_video(linear((8.0, 12.0), (0.0, -1.0)), [3.0] * 8))
    write_gif(tmp_path / "red_circle_moving_left_s1.gif", disc_video(linear((4.0, 8.0), (1.0, 0.0)), [3.0] * 8))
    # A still video: Pillow stores identical frames as one, which reads back as a still image.
    write_gif(tmp_path / "red_circle_moving_down_s2.gif", disc_video([(8.0, 8.0)] * 8, [3.0] * 8))
    write_gif(tmp_path / "grid.gif", disc_video(linear((4.0, 8.0), (1.0, 0.0)), [3.0] * 8))  # skipped in folders
    assert metrics.main([str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["n"] == 3 and summary["accuracy"] == round(1 / 3, 4), summary
    assert summary["predicted"] == {"right": 1, "static": 1, "up": 1}


# ----------------------------------------------------------------------------------------------
# The world, written and read back like real data.
# ----------------------------------------------------------------------------------------------


def test_world_through_webvid_reader(tmp_path):
    from animatediff_jax.data import WebVidSource

    csvs = world.make_world(tmp_path, world.WorldSpec(images=6, videos=8, zoom=3, seed=1))
    for name, csv_path in csvs.items():
        src = WebVidSource(csv_path, tmp_path / name / "videos", n_frames=8, stride=1, size=16, flip=False,
                           caption_dropout=0.0)
        meta = world.read_meta(tmp_path / name)
        videos = [np.round((src[i]["video"] + 1) * 127.5).astype(np.uint8) for i in range(len(src))]
        assert [src.caption(i) for i in range(len(src))] == [m["caption"] for m in meta]
        for m in meta:  # captions name the motion; translations follow the world's law (colour -> direction)
            words = world.parse_caption(m["caption"])
            assert words["motion"] == m["motion"]
            assert m["motion"] not in world.TRANSLATIONS or world.DIRECTION_OF[words["colour"]] == m["motion"]
        s = metrics.summarize(videos, [m["motion"] for m in meta])
        # Every clip's motion is recovered from the decoded 16x16 frames ...
        assert s.accuracy == 1.0 and s.found == 1.0, (name, s)
        # ... at its true speed (translations: px/frame; zooms: 16 * |log zoom| per frame).
        for v, m in zip(videos, meta):
            clip = m["clip"]
            truth = clip["speed"] if m["motion"] in world.TRANSLATIONS else 16 * abs(math.log(clip["zoom_rate"]))
            got = metrics.progress(metrics.measure(v), m["motion"])
            assert abs(got - truth) < 0.12 * truth, (name, m["caption"], got, truth)
        # The video domain carries the watermark, the image domain does not.
        assert (s.watermark > 0.15) if name != "images" else (abs(s.watermark) < 0.05), (name, s.watermark)


# ----------------------------------------------------------------------------------------------
# The pixel-space VAE: an identity, in our AutoencoderKL and in diffusers'.
# ----------------------------------------------------------------------------------------------


def test_pixel_vae_is_identity_in_flax_and_diffusers():
    import jax
    from diffusers import AutoencoderKL as TorchVAE

    from animatediff_jax.checkpoints.torch_io import flax_to_torch
    from animatediff_jax.models.vae import AutoencoderKL

    cfg = base.vae_config()
    params = base.pixel_vae_params(cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    model = AutoencoderKL(cfg)
    mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    assert_close(mean, x, 0, 1e-4, "encode mean")
    assert float(np.max(logvar)) == -30.0
    z = np.random.default_rng(1).normal(0, 1.5, (2, 16, 16, 3)).astype(np.float32)
    assert_close(model.apply({"params": params}, z, method=AutoencoderKL.decode), z, 0, 1e-4, "decode")

    tv = TorchVAE(**{k: v for k, v in cfg.to_diffusers().items()}).eval()
    tv.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in flax_to_torch(params).items()})
    with torch.no_grad():
        t_mean = tv.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
        t_dec = tv.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    assert_close(mean, t_mean, 1e-5, 1e-5, "encode vs diffusers")
    assert_close(jax.device_get(model.apply({"params": params}, z, method=AutoencoderKL.decode)), t_dec, 1e-5, 1e-5,
                 "decode vs diffusers")
    assert_close(t_dec, z, 0, 1e-4, "diffusers decode is the identity")


# ----------------------------------------------------------------------------------------------
# The shipped checkpoint learned motion (measured), and the whole recipe runs.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return demo.load_toy(demo.ASSETS)


# Measured with the shipped checkpoint at these settings (2 prompts per direction, the demo's sampler
# at 10 steps; the report in animatediff_jax/toy/README.md is at 4 and 20). Thresholds leave a margin.
PER_DIRECTION = 2
# The demo's sampler at half its steps (10 DDIM steps; the demo takes 20): what the thresholds were measured at.
SETTINGS = dataclasses.replace(demo.FULL, sample_steps=10)


def test_shipped_checkpoint_moves_as_prompted(shipped):
    prompts, seeds = demo.prompt_set(world.TRANSLATIONS, PER_DIRECTION)
    expected = [world.parse_caption(p)["motion"] for p in prompts]
    rows = {}
    for name, motion, shared, adapter in (("static", False, True, 1.0), ("no_mm", False, False, 1.0),
                                          ("mm", True, False, 1.0), ("mm_no_adapter", True, False, 0.0)):
        pipe = demo.pipeline(shipped, motion=motion, adapter_scale=adapter)
        videos = demo.sample(shipped, pipe, prompts, seeds, SETTINGS, shared_noise=shared)
        rows[name] = metrics.summarize(videos, expected)
    print({k: v.row() for k, v in rows.items()})
    mm, no_mm, static = rows["mm"], rows["no_mm"], rows["static"]
    n = len(prompts)
    assert static.accuracy == 0.0 and static.predicted == {"static": n}  # one image, repeated: no motion
    # The motion module moves the shape the prompted way: clearly above chance and the base model.
    # Measured: 0.88 vs 0.12 (chance 0.25); progress 0.57 vs -0.01 px/frame (at 4 per direction and 20
    # steps: 0.94 vs 0.31, 0.67 vs 0.18).
    assert mm.accuracy >= 0.75 and mm.accuracy >= demo.CHANCE + 0.5, mm
    assert mm.accuracy >= no_mm.accuracy + 0.4, (mm, no_mm)
    assert mm.progress > 0.45 and mm.progress > no_mm.progress + 0.3, (mm.progress, no_mm.progress)
    # ... smoothly: per-frame noise without it jumps about (measured jitter 0.73 vs 5.5 px).
    assert mm.jitter < 0.3 * no_mm.jitter, (mm.jitter, no_mm.jitter)
    # The domain adapter holds the video domain's watermark (the paper's ablation): at scale 0 it is
    # gone and the motion stays (measured watermark 0.111 -> -0.008, accuracy 0.88 -> 0.75).
    plain = rows["mm_no_adapter"]
    assert mm.watermark > 0.07 and plain.watermark < 0.03, (mm.watermark, plain.watermark)
    assert plain.accuracy >= 0.6, plain


def _shape_colour(frame: np.ndarray, weight: np.ndarray) -> str:
    """The world colour nearest the mean of a frame's shape pixels."""
    rgb = frame[weight > 0.5].astype(float).mean(0)
    return min(world.COLOURS, key=lambda c: float(((np.array(world.COLOURS[c]) - rgb) ** 2).sum()))


def test_shipped_checkpoint_travels_between_prompts(shipped):
    """Prompt travel from "a red circle moving left" (frame 0) to "a blue circle moving up" (frame 4):
    the colour turns at the keyframe and the motion after it is the second prompt's.
    Measured (8 seeds, 10 steps): red at frame 0 and blue at frame 7 in 8/8, "up" over frames 4-7 in 7/8."""
    pipe = demo.pipeline(shipped, motion=True)
    travel = {0: "a red circle moving left", 4: "a blue circle moving up"}
    videos = demo.sample(shipped, pipe, [travel] * 8, list(range(8)), SETTINGS)
    weights = [metrics.shape_weights(v) for v in videos]
    turned = sum(_shape_colour(v[0], w[0]) == "red" and _shape_colour(v[-1], w[-1]) == "blue"
                 for v, w in zip(videos, weights))
    up_after = sum(metrics.measure(v[4:]).predicted == "up" for v in videos)
    print({"turned": turned, "up_after": up_after})
    assert turned >= 7 and up_after >= 5, (turned, up_after)


def test_shipped_video_to_video_keeps_the_track_at_low_strength(shipped):
    """vid2vid from world clips moving left, prompted "moving up": at strength 0.3 the shape stays on
    the input's track (the share of steps that run is too small to move it), at 1.0 (text to video from
    the same noise) it leaves it. Measured (6 clips, 10 steps): mean distance to the input's track
    0.2-0.9 px at 0.3 in all 6 (at 20 steps the shape was lost in one: its colour sits between the clip's
    and the prompt's), 2.8-5.6 px at 1.0 (the shape is ~6 px across)."""
    from animatediff_jax.sampling import generate
    from animatediff_jax.toy.base import SIZE

    rng = np.random.default_rng(0)
    clips = np.stack([world.render(world.random_clip(rng, "left", frames=demo.FRAMES, size=SIZE), SIZE)[0]
                      for _ in range(6)])
    pipe = demo.pipeline(shipped, motion=True)
    dist = {}
    for strength in (0.3, 1.0):
        out = generate(pipe, ["a blue circle moving up"] * 6, None, list(range(6)), num_frames=demo.FRAMES,
                       height=SIZE, width=SIZE, steps=SETTINGS.sample_steps, guidance_scale=SETTINGS.guidance,
                       progress=False, scheduler_options={"prediction_type": shipped.prediction_type},
                       init_video=clips, strength=strength).frames
        d = [np.linalg.norm(metrics.track(o)[:, :2] - metrics.track(v)[:, :2], axis=-1) for o, v in zip(out, clips)]
        dist[strength] = [float(np.nanmean(x)) if np.isfinite(x).any() else np.inf for x in d]
    print(dist)
    assert sum(x < 1.5 for x in dist[0.3]) >= 5, dist
    assert sum(x > 2.5 for x in dist[1.0]) >= 5, dist


def test_shipped_motion_lora_zooms(shipped):
    prompts, seeds = demo.prompt_set(("zoom in",), 4 * PER_DIRECTION)
    rows = {}
    for name, scale in (("mm", 0.0), ("lora", shipped.lora_scale)):
        pipe = demo.pipeline(shipped, motion=True, lora_scale=scale)
        rows[name] = metrics.summarize(demo.sample(shipped, pipe, prompts, seeds, SETTINGS), ["zoom in"] * len(prompts))
    print({k: v.row() for k, v in rows.items()})
    # Measured: 0.75 with the MotionLoRA, 0.00 without (the motion module alone translates).
    assert rows["lora"].accuracy >= 0.5 and rows["lora"].accuracy >= rows["mm"].accuracy + 0.4, rows


def test_demo_quick_runs_every_stage(tmp_path):
    from animatediff_jax.io.video import read_video
    from animatediff_jax.toy import recipe

    root = str(tmp_path / "run")
    assert demo.main(["--quick", "--root", root]) == 0
    p = recipe.paths(root)
    toy = demo.load_toy(root)  # every stage's output loads
    assert set(toy.base.params) == {"unet", "vae", "text_encoder"} and toy.motion_config.motion is not None
    for stage in ("stage1", "stage2", "stage3"):  # the normal train loop wrote checkpoints and metrics
        assert os.listdir(os.path.join(p[stage], "checkpoints")), stage
        assert os.path.getsize(os.path.join(p[stage], "metrics.jsonl")) > 0, stage
    with open(os.path.join(p["demo"], "metrics.json")) as f:
        result = json.load(f)
    assert set(result["rows"]) >= {"motion module", "zoom prompts, + MotionLoRA"}
    assert set(result["adapter_sweep"]) == {"adapter scale 0", "adapter scale 1"}
    gif = read_video(os.path.join(p["demo"], "moving", "grid.gif"))
    assert gif.shape[0] == recipe.FRAMES and gif.dtype == np.uint8
    names = sorted(os.listdir(os.path.join(p["demo"], "moving")))
    assert "red_circle_moving_left_s0.gif" in names, names
