"""What runs between steps besides checkpoints: validation samples (GIFs) and CLIP evaluation.

Each hook samples with the current params through `animatediff_jax.sampling`, as the `sample`
command would: a new pipeline value per call (the trained UNet swapped in), never a mutated one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import jax

from animatediff_jax import parallel
from animatediff_jax.training.inputs import make_tokenizer
from animatediff_jax.training.metrics import MetricsWriter

ValidateFn = Callable[[int, Any], Mapping[str, float] | None]  # (step, trainer) -> numbers to log, or None


def run_hooks(writer: MetricsWriter, config, step: int, trainer, validate: ValidateFn | None,
              evaluate: ValidateFn | None) -> None:
    """At step `step`: the validation hook every `log.validate_every` steps (its numbers logged as
    `val/*`), the evaluation hook (`make_eval_hook`: CLIP metrics of samples) every `log.eval_every`
    (`eval/*`). Every process calls it (the hooks gather the params)."""
    for hook, every, prefix in ((validate, config.log.validate_every, "val"),
                                (evaluate, config.log.get("eval_every", 0), "eval")):
        if hook is not None and every and step % every == 0:
            extra = hook(step, trainer)
            if extra:
                writer.write(step, {f"{prefix}/{k}": v for k, v in extra.items()})


def _sampler(config, trainer, tokenizer: Callable | None = None, what: str = "validation samples"):
    """`sample(trainer, prompts, seeds)`: videos of the current params as the validation samples are
    made (the sampler of `animatediff_jax.sampling`, CFG, `log.sample_*`): `generate`'s result on
    process 0, None on the others. Every process must call it (the params are gathered)."""
    from animatediff_jax.sampling import AnimationPipeline, generate

    m, lg = trainer.models, config.log
    if m.vae is None or m.text_encoder is None:
        raise ValueError(f"{what} need the VAE and the text encoder (model.vae / model.text_encoder)")
    tokenizer = make_tokenizer(config, trainer) if tokenizer is None else tokenizer
    frames = 1 if trainer.stage.single_frame else int(lg.sample_frames or config.train.num_frames)
    size = int(lg.sample_size or config.train.resolution)
    base = AnimationPipeline(unet_config=m.unet_config, vae_config=m.vae_config, text_config=m.text_config,
                             params={"unet": None, "vae": m.vae, "text_encoder": m.text_encoder}, tokenizer=tokenizer)

    def sample(trainer, prompts: list[str], seeds: list[int]):
        unet = parallel.fetch(trainer.full_params())
        if jax.process_index() != 0:
            return None
        pipe = dataclasses.replace(base, params={**base.params, "unet": unet})  # a new value: `base` stays as it is
        return generate(pipe, prompts, None, seeds, num_frames=frames, height=size, width=size,
                        steps=int(lg.sample_steps), guidance_scale=float(lg.sample_guidance),
                        scheduler=lg.sample_scheduler, progress=False,
                        prompt_syntax="plain")  # (read as the captions are trained on: text as is)

    return sample


def make_sample_hook(config, trainer, tokenizer: Callable | None = None) -> ValidateFn:
    """A validation hook that samples `config.log.sample_prompts` with the current params (the
    sampler of `animatediff_jax.sampling`, CFG, `sample_steps` steps) and writes one GIF per
    prompt to `workdir/samples/step_<step>_<i>.gif`. Every process must call it (the params are
    gathered); process 0 samples.
    """
    from animatediff_jax.io.video import write_gif

    lg = config.log
    sample = _sampler(config, trainer, tokenizer)
    prompts = [str(p) for p in lg.sample_prompts]
    folder = os.path.join(config.workdir, "samples")

    def validate(step: int, trainer) -> dict[str, float] | None:
        res = sample(trainer, prompts, [int(lg.sample_seed) + i for i in range(len(prompts))])
        if res is None:
            return None
        for i, video in enumerate(res.frames):
            write_gif(os.path.join(folder, f"step_{step:07d}_{i}.gif"), video)
        return {"sample_s": res.timings["run_s"], "sample_compile_s": res.timings["compile_s"]}

    return validate


def make_eval_hook(config, trainer, tokenizer: Callable | None = None, clip=None) -> ValidateFn:
    """A hook for `log.eval_every`: samples the fixed prompt set (`log.eval_prompts`, default the
    validation prompts; `log.eval_seeds`, default `sample_seed + i`) as the validation samples are
    made and returns the CLIP metrics of `animatediff_jax.evaluation` averaged over the prompts:
    `text_alignment`, `clip_score`, `smoothness`, `consistency` (and `eval_s`). The CLIP model
    (`log.eval_clip`, or `clip` as loaded by `load_clip`) loads once, the prompts' text embeddings
    are computed once. Every process must call it; process 0 samples and measures."""
    from animatediff_jax.evaluation import clip_eval

    lg = config.log
    prompts = [str(p) for p in (tuple(lg.eval_prompts) or tuple(lg.sample_prompts))]
    seeds = [int(s) for s in lg.eval_seeds] or [int(lg.sample_seed) + i for i in range(len(prompts))]
    seeds = seeds * len(prompts) if len(seeds) == 1 else seeds
    sample = _sampler(config, trainer, tokenizer, what="log.eval_every samples")
    if clip is None:
        from animatediff_jax.checkpoints.clip import load_clip

        clip = load_clip(lg.eval_clip, require=("vision", "text"))
    text = clip_eval.TextEmbedder(clip)

    def evaluate(step: int, trainer) -> dict[str, float] | None:
        t0 = time.perf_counter()
        res = sample(trainer, prompts, seeds)
        if res is None:
            return None
        result = clip_eval.evaluate_videos(clip, list(res.frames), prompts, text=text)
        out = {k: result["metrics"][k]["mean"] for k in ("text_alignment", "clip_score", "smoothness", "consistency")}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, "eval_s": time.perf_counter() - t0}

    return evaluate
