"""`animatediff-jax demo`: the whole AnimateDiff recipe in the toy world, measured.

    animatediff-jax demo                      # train everything into runs/toy (skips what exists), then evaluate
    animatediff-jax demo --pretrained         # evaluate the small checkpoint shipped in the package (~2 min)
    animatediff-jax demo --quick --root DIR   # a few steps per stage: proves the pipeline runs (CI)

Training, in order (each step is skipped when its output already exists under `--root`, so a
second run loads the first one's results):

1. the toy world: WebVid-style CSV + MP4 datasets (`toy.world`);
2. the base text-to-image model on single clean frames (`toy.base`, `configs/toy/base.py`);
3. stage 1 domain adapter, stage 2 motion module, stage 3 zoom-in MotionLoRA, each with the
   normal `train` machinery (`training.loop.train`) and its config in `configs/toy/`.

Evaluation: the same prompts and seeds sampled (a) without the motion module, every frame
from the same noise (a still image) and from per-frame noise, (b) with the motion module,
(c) zoom prompts without and with the MotionLoRA, and (d) a domain-adapter-scale sweep (the
paper's ablation). Every set of videos is scored by `toy.metrics` (direction accuracy vs the
prompt, smoothness, watermark) and written as GIFs (one per video, named after its prompt, plus
a grid) under `<root>/demo/`, with `metrics.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from animatediff_jax.toy import recipe, world
from animatediff_jax.toy.recipe import FRAMES

Params = dict[str, Any]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "toy")
STAGE_FILES = (("base", "base.py"), ("domain_adapter", "stage1_domain_adapter.py"),
               ("motion_module", "stage2_motion_module.py"), ("motion_lora", "stage3_motion_lora.py"))
# The files a finished run leaves behind (relative to its root) = what the package ships.
SHIPPED = ("base/model/params.safetensors", "base/model/toy.json", "stage1/domain_adapter.safetensors",
           "stage2/motion_module.safetensors", "stage3/motion_lora.safetensors")
GIF_SCALE = 8  # 16x16 frames are shown 128x128
CHANCE = 0.25  # a random one of the four directions


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `--quick` shrinks: world size, training steps (None: the config's), sampling."""

    world: world.WorldSpec = dataclasses.field(default_factory=world.WorldSpec)
    steps: dict | None = None
    seeds: int = 4  # prompts per direction
    sample_steps: int = 20
    guidance: float = 4.0
    sweep: tuple[float, ...] = (0.0, 0.5, 1.0)


FULL = Settings()
QUICK = Settings(world=world.WorldSpec(images=24, videos=24, zoom=4),
                 steps={"base": 8, "domain_adapter": 4, "motion_module": 4, "motion_lora": 4},
                 seeds=1, sample_steps=4, sweep=(0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Training: every step through the project's own commands, skipped when its output exists.
# ----------------------------------------------------------------------------------------------


def load_config(name: str, root: str, configs: str = CONFIGS):
    """`get_config(root)` of `configs/toy/<file>` for stage `name` ("base", "domain_adapter", ...)."""
    path = os.path.join(configs, dict(STAGE_FILES)[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: toy config not found (run from a checkout, or pass --configs DIR)")
    spec = importlib.util.spec_from_file_location(f"toy_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(root)


def _output(name: str, root: str) -> str:
    p = recipe.paths(root)
    return {"base": os.path.join(p["model"], "params.safetensors"), "domain_adapter": p["domain_adapter"],
            "motion_module": p["motion_module"], "motion_lora": p["motion_lora"]}[name]


def train_all(root: str, settings: Settings = FULL, configs: str = CONFIGS, log=print) -> dict[str, float]:
    """Makes the world and trains the four models under `root` (what exists is kept); seconds per step."""
    from animatediff_jax.toy.base import train_base
    from animatediff_jax.training.loop import train

    times: dict[str, float] = {}
    data = recipe.paths(root)["data"]
    t0 = time.perf_counter()
    if all(os.path.isfile(recipe.dataset(root, n)[0]) for n in world.DATASETS):
        log(f"[demo] toy world: reusing {data}")
    else:
        world.make_world(data, settings.world)
        times["world"] = time.perf_counter() - t0
        log(f"[demo] toy world: {settings.world.images} image clips, {settings.world.videos} video clips, "
            f"{settings.world.zoom} zoom clips in {data} ({times['world']:.0f}s)")
    for name, _ in STAGE_FILES:
        out = _output(name, root)
        if os.path.isfile(out):
            log(f"[demo] {name}: reusing {out}")
            continue
        config = load_config(name, root, configs)
        if settings.steps is not None:
            config.train.steps = settings.steps[name]
            config.log.every = max(1, settings.steps[name] // 2)
        log(f"[demo] {name}: training {config.train.steps} steps -> {out}")
        t0 = time.perf_counter()
        train_base(config) if name == "base" else train(config)
        times[name] = time.perf_counter() - t0
        log(f"[demo] {name}: {times[name]:.0f}s")
    return times


def save_assets(root: str, assets: str = ASSETS) -> None:
    """Copies a finished run's four model files into the package (the shipped checkpoint)."""
    for rel in SHIPPED:
        dst = os.path.join(assets, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(root, rel), dst)


# ----------------------------------------------------------------------------------------------
# Loading a run and sampling from it.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Toy:
    """A trained toy run: the base model plus the three stages' exports (UNet trees)."""

    base: Any  # checkpoints.sd15.SD15
    motion_config: Any  # UNetConfig with the motion modules of stage 2
    motion_module: Params
    domain_adapter: Params
    motion_lora: Params
    lora_scale: float
    prediction_type: str
    pipes: dict = dataclasses.field(default_factory=dict, repr=False)  # compiled samplers, by `motion`

    @property
    def tokenizer(self):
        from animatediff_jax.training.loop import hash_tokenizer

        return hash_tokenizer(self.base.text_config.vocab_size)


def load_toy(root: str) -> Toy:
    """Reads the four files of a toy run (or of the shipped assets, same layout)."""
    from animatediff_jax.checkpoints.load import load_lora, load_motion
    from animatediff_jax.checkpoints.sd15 import load_converted
    from animatediff_jax.toy.base import read_info

    p = recipe.paths(root)
    missing = [rel for rel in SHIPPED if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise FileNotFoundError(f"{root}: not a finished toy run, missing {missing}")
    base = load_converted(p["model"])
    mm, unet_config = load_motion(p["motion_module"], base.unet_config)
    da = load_lora(p["domain_adapter"], "domain_adapter", base=unet_config)
    ml = load_lora(p["motion_lora"], "motion_lora", base=unet_config)
    return Toy(base, unet_config, mm, da.unet, ml.unet, ml.scale, read_info(p["model"])["prediction_type"])


def unet_params(toy: Toy, *, motion: bool, adapter_scale: float = 1.0, lora_scale: float = 0.0) -> Params:
    """The base UNet (+ motion modules) with the domain adapter / MotionLoRA merged at these scales."""
    from animatediff_jax import lora as lora_lib
    from animatediff_jax.training.stages import union

    unet = union(toy.base.params["unet"], toy.motion_module) if motion else toy.base.params["unet"]
    if adapter_scale:
        unet = lora_lib.merge(unet, toy.domain_adapter, adapter_scale)
    if lora_scale:
        if not motion:
            raise ValueError("the MotionLoRA needs the motion module")
        unet = lora_lib.merge(unet, toy.motion_lora, lora_scale)
    return unet


def pipeline(toy: Toy, *, motion: bool, adapter_scale: float = 1.0, lora_scale: float = 0.0):
    """An `AnimationPipeline` with `unet_params(...)`: a new value each time (the compiled sampler,
    keyed by shapes, is reused across scales); the rest of it is built once per `motion` and kept on `toy`."""
    import dataclasses

    from animatediff_jax.sampling import AnimationPipeline

    pipe = toy.pipes.get(motion)
    if pipe is None:
        config = toy.motion_config if motion else toy.base.unet_config
        params = {"vae": toy.base.params["vae"], "text_encoder": toy.base.params["text_encoder"]}
        pipe = toy.pipes[motion] = AnimationPipeline(config, toy.base.vae_config, toy.base.text_config, params,
                                                     toy.tokenizer)
    unet = unet_params(toy, motion=motion, adapter_scale=adapter_scale, lora_scale=lora_scale)
    return dataclasses.replace(pipe, params={**pipe.params, "unet": unet})


def prompt_set(motions: Sequence[str], per_motion: int) -> tuple[list[str], list[int]]:
    """`per_motion` prompts per motion, cycling shapes (translations in their colour, zooms cycling
    colours); the seed of prompt i is i."""
    colours = list(world.COLOURS)
    prompts = [world.caption(world.COLOUR_OF.get(m, colours[(i + j) % len(colours)]),
                             world.SHAPES[(i + 2 * j) % len(world.SHAPES)], m)
               for j, m in enumerate(motions) for i in range(per_motion)]
    return prompts, list(range(len(prompts)))


def sample(toy: Toy, pipe, prompts: list[str], seeds: list[int], settings: Settings, *,
           shared_noise: bool = False) -> np.ndarray:
    """uint8 videos `[N, F, 16, 16, 3]`; `shared_noise`: every frame starts from its sample's frame-0 noise."""
    import jax

    from animatediff_jax.sampling import generate, seed_key
    from animatediff_jax.toy.base import SIZE

    init = None
    if shared_noise:
        c = pipe.unet_config.in_channels
        init = np.stack([np.repeat(np.asarray(jax.random.normal(seed_key(s), (1, SIZE, SIZE, c))), FRAMES, 0)
                         for s in seeds])
    res = generate(pipe, prompts, None, seeds, num_frames=FRAMES, height=SIZE, width=SIZE,
                   steps=settings.sample_steps, guidance_scale=settings.guidance, progress=False, init_latents=init,
                   scheduler_options={"prediction_type": toy.prediction_type})
    return res.frames


def _slug(prompt: str) -> str:
    return prompt.replace("a ", "", 1).replace(" ", "_")


def write_gifs(folder: str, videos: np.ndarray, prompts: list[str], seeds: list[int]) -> None:
    """One upscaled GIF per video (`<prompt>_s<seed>.gif`, which `toy.metrics` parses) and `grid.gif`."""
    from animatediff_jax.io.video import write_gif, write_grid

    big = videos.repeat(GIF_SCALE, axis=2).repeat(GIF_SCALE, axis=3)
    for v, p, s in zip(big, prompts, seeds):
        write_gif(os.path.join(folder, f"{_slug(p)}_s{s}.gif"), v)
    write_grid(os.path.join(folder, "grid.gif"), big, cols=min(len(big), 8), padding=4)


def evaluate(toy: Toy, out: str, settings: Settings = FULL, log=print) -> dict[str, Any]:
    """Samples, scores and writes every comparison of the demo; returns the metrics (also `metrics.json`)."""
    from animatediff_jax.toy import metrics as M

    prompts, seeds = prompt_set(world.TRANSLATIONS, settings.seeds)
    expected = [world.parse_caption(p)["motion"] for p in prompts]
    # As many zoom prompts as translation prompts: same batch shape, so no recompilation.
    zoom_prompts, zoom_seeds = prompt_set(("zoom in",), len(prompts))
    zoom_expected = ["zoom in"] * len(zoom_prompts)
    rows: dict[str, M.Summary] = {}
    times: dict[str, float] = {}

    def run(name: str, folder: str | None, pipe, ps, ss, exp, **kw) -> np.ndarray:
        t0 = time.perf_counter()
        videos = sample(toy, pipe, ps, ss, settings, **kw)
        times[name] = time.perf_counter() - t0
        rows[name] = M.summarize(videos, exp)
        if folder:
            write_gifs(os.path.join(out, folder), videos, ps, ss)
        log(f"[demo] sampled {name!r}: {len(ps)} videos in {times[name]:.0f}s")
        return videos

    scale = 1.0
    base = pipeline(toy, motion=False, adapter_scale=scale)
    run("no motion module, shared noise", "static", base, prompts, seeds, expected, shared_noise=True)
    run("no motion module, per-frame noise", "no_motion_module", base, prompts, seeds, expected)
    run("motion module", "moving", pipeline(toy, motion=True, adapter_scale=scale), prompts, seeds, expected)
    run("zoom prompts, motion module", "zoom_without_lora", pipeline(toy, motion=True, adapter_scale=scale),
        zoom_prompts, zoom_seeds, zoom_expected)
    run("zoom prompts, + MotionLoRA", "motion_lora",
        pipeline(toy, motion=True, adapter_scale=scale, lora_scale=toy.lora_scale), zoom_prompts, zoom_seeds,
        zoom_expected)
    sweep: dict[str, M.Summary] = {}
    for s in settings.sweep:
        name = f"adapter scale {s:g}"
        if s == scale:
            sweep[name] = rows["motion module"]
            continue
        run(name, f"adapter_{s:g}", pipeline(toy, motion=True, adapter_scale=s), prompts, seeds, expected)
        sweep[name] = rows.pop(name)
    result = {"rows": {k: v.row() for k, v in rows.items()}, "adapter_sweep": {k: v.row() for k, v in sweep.items()},
              "chance_accuracy": CHANCE, "sample_seconds": times,
              "settings": {"prompts_per_direction": settings.seeds, "sample_steps": settings.sample_steps,
                           "guidance": settings.guidance, "adapter_scale": scale}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    log("\n" + M.format_table(rows, CHANCE))
    log("\ndomain-adapter scale sweep (motion module on; the watermark lives in the adapter):")
    log(M.format_table(sweep))
    return result


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from animatediff_jax.cli import run_command

    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="animatediff-jax demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=recipe.DEFAULT_ROOT, help="folder of the run (default %(default)s)")
    ap.add_argument("--pretrained", action="store_true", help="evaluate the checkpoint shipped in the package")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage and a small evaluation (smoke test)")
    ap.add_argument("--out", default=None, help="where GIFs and metrics.json go (default <root>/demo)")
    ap.add_argument("--configs", default=CONFIGS, help="folder of the toy configs (default %(default)s)")
    ap.add_argument("--save-assets", action="store_true", help="copy the trained models into the package's assets")
    ap.add_argument("--seeds", type=int, default=None, help="prompts per direction (default 4; quick 1)")
    args = ap.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.seeds:
        settings = dataclasses.replace(settings, seeds=args.seeds)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    if args.pretrained:
        root = ASSETS
        out = args.out or os.path.join(args.root, "demo")
    else:
        root = args.root
        out = args.out or recipe.paths(root)["demo"]
        times = train_all(root, settings, args.configs)
        if args.save_assets:
            save_assets(root)
            print(f"[demo] copied the trained models to {ASSETS}")
    toy = load_toy(root)
    t_eval = time.perf_counter()
    evaluate(toy, out, settings)
    times["evaluate"] = time.perf_counter() - t_eval
    times["total"] = time.perf_counter() - t0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(times, f, indent=2)
    print(f"\n[demo] GIFs and metrics.json in {out}; times (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
