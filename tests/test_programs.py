"""Sampling's compiled programs have one owner (`sampling.compiled.Programs`): a bounded cache keyed by
shapes, holding no arrays, so a training run's validations (a new UNet each time) neither recompile
nor keep device copies of old UNets alive. (The pipeline used to cache placed params by `id()`,
one more device-resident UNet per validation.)
"""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np

from animatediff_jax.sampling.compiled import Programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_programs_are_bounded_and_keyed_by_shapes_not_values():
    programs = Programs(max_entries=2)
    double = lambda x: 2 * x  # noqa: E731
    f1, _ = programs.compiled("double", double, (), (jnp.ones(3),))
    f2, seconds = programs.compiled("double", double, (), (jnp.zeros(3),))  # other values, same shape
    assert f2 is f1 and seconds == 0.0 and programs.compiles == 1
    programs.compiled("double", double, (), (jnp.ones(4),))
    programs.compiled("double", double, (), (jnp.ones(5),))
    assert len(programs) == 2 and programs.compiles == 3  # the least recently used (shape 3) went
    _, seconds = programs.compiled("double", double, (), (jnp.ones(3),))
    assert seconds > 0 and programs.compiles == 4
    assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(list(programs._entries)))


def _live_bytes() -> tuple[int, int]:
    gc.collect()
    arrays = jax.live_arrays()
    return len(arrays), sum(a.nbytes for a in arrays)


def test_validations_through_the_real_trainer_keep_device_memory_constant(tmp_path, monkeypatch):
    """The validation hook of a real tiny stage-2 trainer, four times with the real sampler: the
    live device arrays after each are the same (count and bytes), and nothing recompiles after the
    first. Holding on to each validation's pipeline (what the old placement cache did) is seen."""
    import animatediff_jax.sampling as sampling
    from animatediff_jax.sampling import PROGRAMS
    from animatediff_jax.train import parse_config
    from animatediff_jax.training import build_trainer
    from animatediff_jax.training.hooks import make_sample_hook

    config, _ = parse_config(["--config", os.path.join(ROOT, "configs", "train", "tiny_stage2.py"),
                              f"--config.workdir={tmp_path / 'w'}", "--config.model.domain_adapter=",
                              "--config.train.num_frames=2", "--config.train.batch_size=2",
                              "--config.log.validate_every=1", "--config.log.sample_steps=2"])
    trainer = build_trainer(config)
    real, held = sampling.generate, []

    def generate(pipe, *args, **kwargs):
        if keep:
            held.append(jax.device_put(pipe.params["unet"]))  # a placed copy kept alive, as the old cache did
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate)
    hook, keep = make_sample_hook(config, trainer), False
    after = []
    for step in range(1, 5):
        assert hook(step, trainer)["sample_s"] > 0
        after.append((_live_bytes(), PROGRAMS.compiles))
    (first, compiles), *rest = after
    assert all(live == first and c == compiles for live, c in rest), after
    assert len(os.listdir(tmp_path / "w" / "samples")) == 4 * len(config.log.sample_prompts)

    keep = True  # the test sees a retained UNet
    for step in (5, 6):
        hook(step, trainer)
    unet_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(held[0]))
    assert _live_bytes()[1] >= first[1] + 2 * unet_bytes


def test_compilation_cache_off_words_write_no_folder(tmp_path, monkeypatch):
    """`compilation_cache=off` (or "false", "") turns the cache off: no folder of that name appears."""
    from animatediff_jax import compilation_cache

    monkeypatch.chdir(tmp_path)
    before = jax.config.jax_compilation_cache_dir  # (the suite's own cache, set by conftest)
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        for word in ("off", "false", "", "None"):
            assert compilation_cache.enable(word, str(tmp_path / "auto")) is None
            assert not jax.config.jax_compilation_cache_dir
        assert os.listdir(tmp_path) == []
        assert compilation_cache.enable("auto", str(tmp_path / "auto")) == str(tmp_path / "auto")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
