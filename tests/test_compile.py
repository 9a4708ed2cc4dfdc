"""Compiled by the real TPU compiler (libtpu, abstract chips, no TPU): the train step on a data x fsdp
mesh, the sampler with splash and a ControlNet in its scan (frames over chips: context parallelism), and
`animatediff-jax compile`'s exit codes.

Tiny models keep each compile under a minute; the compiler runs at reduced effort. These are the only
tests that see the TPU kernels (splash attention in its `shard_map`): CPU never picks them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason='compiling for TPU needs libtpu (pip install "jax[tpu]": the test extras)')

from animatediff_jax import compile as compile_cmd  # noqa: E402
from animatediff_jax import parallel, tpu, xla_cost  # noqa: E402
from animatediff_jax.models import attention  # noqa: E402
from animatediff_jax.training import abstract_models, batch_shapes, make_program  # noqa: E402
from animatediff_jax.training.config import base_config, tiny_overrides  # noqa: E402


@pytest.fixture(autouse=True)
def _quick_compiles():
    """Reduced compiler effort, and the default matmul precision (conftest's "highest" makes every f32
    matmul six bf16 passes on TPU: slower compiles, and nothing these tests compare)."""
    with compile_cmd.compiler_effort(True), jax.default_matmul_precision("default"):
        yield


def tiny_stage2(mesh_shape: dict, batch: int = 4, resolution: int = 64):
    """Tiny stage 2 from pixels; at 64² the tiny VAE leaves 32x32 = 1024 latent tokens: splash on TPU."""
    c = tiny_overrides(base_config())
    c.stage = "motion_module"
    c.data.source = "synthetic"
    c.train.num_frames = 4
    c.train.resolution = resolution
    c.train.batch_size = batch
    c.parallel.mesh_shape = mesh_shape
    c.parallel.compute_dtype = "bfloat16"
    return c


def test_topology_names():
    cases = {"v5e-1": ("v5e", (1, 1), 1), "v5litepod-8": ("v5e", (2, 4), 8), "v5e-256": ("v5e", (16, 16), 256),
             "v5p-8": ("v5p", (2, 2, 1), 4), "v5p-128": ("v5p", (4, 4, 4), 64), "v6e-8": ("v6e", (2, 4), 8),
             "v4-8": ("v4", (2, 2, 1), 4), "2xv5e-256": ("v5e", (16, 16), 512), "v5e:2x2": ("v5e", (2, 2), 4)}
    for name, (gen, shape, chips) in cases.items():
        t = tpu.topology(name)
        assert (t.generation, t.shape, t.chips) == (gen, shape, chips), name
    assert len(tpu.topology("v5p-128").devices()) == 64
    assert [tpu.topology(n).accelerator_type for n in ("v5e-8", "v5p-128", "2xv6e-8")] == [
        "v5litepod-8", "v5p-128", "v6e-8"]
    for bad in ("v5e-3", "v7-8", "v5p:2x2", "tpu"):
        with pytest.raises(ValueError, match="--topology"):
            tpu.topology(bad)


def test_stage2_step_compiles_on_a_v5e_2x2_data_x_fsdp_mesh():
    """The pod crash: on a multi-chip mesh the step must trace under its mesh, or splash (a Mosaic kernel)
    cannot be partitioned. Traced without the mesh it fails to lower (the bug); the program's own step
    (`parallel.OnMesh`) compiles, with splash kernels and FSDP all-gathers, and fits."""
    devices = tpu.topology("v5e:2x2").devices()
    config = tiny_stage2({"data": 2, "fsdp": 2})
    mesh = parallel.make_mesh(dict(config.parallel.mesh_shape), devices)
    models = abstract_models(config)
    program = make_program(config, models, mesh)
    batch = batch_shapes(config, program, models)
    step = program.step(batch)
    args = program.abstract_args(batch)

    with attention.target_platform("tpu"), pytest.raises(Exception, match="Mosaic kernels cannot be automatically"):
        step.jitted.lower(*args)  # the same jit, traced without the mesh in context: what crashed pods

    report, compiled = compile_cmd.compile_program(compile_cmd.Program("step", lambda: step.lower(*args), 4, "clip"),
                                                   tpu.topology("v5e:2x2"), quick=True)
    assert report.pallas_calls >= 4  # splash forward + dq + dkv per long attention, inside shard_map
    assert report.pallas_tflop > 0 and report.tflop > report.raw_tflop  # Pallas FLOPs added from shapes
    assert report.collectives.get("all-gather", 0) > 0  # FSDP: every layer gathers its weights
    assert report.fits and 0 < report.total_gib < 15.75
    assert report.alias_gib > 0  # the donated train state


def test_per_chip_state_shrinks_with_fsdp():
    """Params and AdamW moments are split over `fsdp`: per-chip bytes of the train state fall with it."""
    devices = tpu.topology("v5e:2x2").devices()

    def per_chip_bytes(mesh_shape):
        config = tiny_stage2(mesh_shape)
        mesh = parallel.make_mesh(mesh_shape, devices)
        program = make_program(config, abstract_models(config), mesh)
        state, frozen, _ = program.abstract_args(batch_shapes(config, program, abstract_models(config)))
        leaves = jax.tree.leaves((state, frozen))
        return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)

    replicated, sharded = per_chip_bytes({"data": 4, "fsdp": 1}), per_chip_bytes({"data": 1, "fsdp": 4})
    assert sharded < 0.4 * replicated, (sharded, replicated)


def test_sampler_with_splash_and_a_controlnet_compiles_for_v5e_2x2_with_context_parallelism():
    """`sample`'s denoising program (forced splash, CFG, a ControlNet's residuals in every step of the
    scan) compiles for a v5e 2x2 slice, 2 videos x 2 chips each (context parallelism: splash's
    `shard_map` splits the frames too, the motion modules regroup by all-to-all); the loop's trip count
    is read from its condition (TPU HLO has no `known_trip_count`), so the loop-aware FLOPs are the
    steps' times one step's."""
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import tiny_unet
    from animatediff_jax.models.controlnet import tiny_controlnet
    from animatediff_jax.models.shapes import clip_shapes, controlnet_shapes, unet_shapes, vae_shapes
    from animatediff_jax.models.vae import VAEConfig
    from animatediff_jax.sampling.options import Control, Request
    from animatediff_jax.sampling.pipeline import AnimationPipeline
    from animatediff_jax.sampling.programs import abstract_sampler, mesh_over

    text = CLIPTextConfig.tiny()
    unet, vae = tiny_unet("v2", cross_attention_dim=text.hidden_size), VAEConfig.tiny()
    params = {"unet": unet_shapes(unet), "vae": vae_shapes(vae), "text_encoder": clip_shapes(text)}
    pipe = AnimationPipeline(unet, vae, text, params, None, np.float32, "splash")
    cnet = tiny_controlnet(cross_attention_dim=text.hidden_size)
    control = Control(cnet, controlnet_shapes(cnet), np.zeros((4, 64, 64, 3), np.uint8))
    topology = tpu.topology("v5e:2x2")
    mesh = mesh_over(topology.devices(), context=2)
    steps = 3
    request = Request(("a", "b"), None, (0, 1), num_frames=4, height=64, width=64, steps=steps, controls=(control,))
    fn, args, sharding = abstract_sampler(pipe, request, mesh)["denoise"]

    def lower():
        with jax.set_mesh(mesh):
            return jax.jit(fn, out_shardings=sharding).lower(*args)

    report, compiled = compile_cmd.compile_program(compile_cmd.Program("sampler", lower, 2, "video"), topology, True)
    assert report.pallas_calls >= steps  # splash in every step of the scan
    module = xla_cost.Module.parse(xla_cost.module_text(compiled))
    trips = [module.trip_count(i) for c in module.instrs.values() for i in c if i.opcode == "while"]
    assert steps in trips and None not in trips, trips
    assert report.loop_aware and report.unknown_trip_loops == 0
    assert report.tflop > 2 * report.raw_tflop  # the scan's body counted `steps` times, not once
    assert report.collectives.get("all-to-all", 0) > 0 and report.collective_gib > 0, report.collectives
    assert report.fits


def test_the_command_fits_and_does_not_fit(capsys, monkeypatch):
    """rc 0 and the per-chip table when the step fits; rc 2 and one line saying by how much when a
    program does not fit (a 44 GiB argument on a 15.75 GiB chip)."""
    import jax.numpy as jnp

    argv = ["train", "--config", "configs/train/tiny_stage2.py", "--topology", "v5e-1", "--quick",
            "--config.data.source=cache", "--config.train.resolution=32", "--config.train.batch_size=1",
            "--config.parallel.compute_dtype=bfloat16", "--breakdown", "3"]
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert compile_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "GiB accessed" in out and "roofline" in out and "bytes by op" in out

    def too_big(config, devices):
        big = jax.ShapeDtypeStruct((11, 2**29), jnp.float32)
        return [compile_cmd.Program("too big", lambda: jax.jit(lambda x: x * 2).lower(big), 1, "clip")]

    monkeypatch.setattr(compile_cmd, "train_programs", too_big)
    assert compile_cmd.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "too big does not fit a TPU v5 lite: needs 44.00 GiB per chip" in err[0], err
    assert "15.75 GiB usable" in err[0] and "remat=full" in err[0]

    assert compile_cmd.main(["train", "--config", "configs/train/tiny_stage2.py", "--topology", "v9-8"]) == 2
    assert "--topology 'v9-8'" in capsys.readouterr().err


def test_libtpu_out_of_memory_is_one_line():
    """What libtpu raised for the default stage-2 step at 4 clips on a v5e (remat dots, 16x256²)."""
    raw = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.50G) "
           "exceeds available HBM (15.75G).\n\nAdditional details ...")
    msg = tpu.oom_message(RuntimeError(raw))
    assert msg is not None and "\n" not in msg and "20.50G" in msg
    assert tpu.oom_message(RuntimeError("INVALID_ARGUMENT: something else")) is None
    # What to change is the program's own: a train step's remat, a sampler's batch or chips per video.
    assert "remat=full" in compile_cmd._remedy(compile_cmd.Program("step", None, 4, "clip"))
    sampler = compile_cmd._remedy(compile_cmd.Program("sampler", None, 4, "video"))
    assert "batch_size" in sampler and "context_parallel" in sampler and "remat" not in sampler


def test_motion_version_from_released_names():
    from animatediff_jax.checkpoints.motion import motion_version_of

    names = {"mm_sd_v14.ckpt": "v1", "mm_sd_v15.ckpt": "v1", "mm_sd_v15_v2.ckpt": "v2", "v3_sd15_mm.ckpt": "v3",
             "animatediff_lightning_4step_diffusers.safetensors": "v2", "models/mm_v2.safetensors": "v2",
             "mm_sdxl_v10_beta.ckpt": "sdxl_beta", "hsxl_temporal_layers.safetensors": "hotshot_xl"}
    for name, version in names.items():
        assert motion_version_of(name) == version, name


def test_compile_sample_reads_the_config_files_that_are_here(tmp_path, capsys):
    """`compile sample` on the tiny files: the converted base's and the motion module's own layouts
    (not SD1.5's), both programs (denoise scan, VAE decode) compiled for one v5e chip."""
    from animatediff_jax.testing.tiny import write_tiny_models

    folder = os.path.dirname(write_tiny_models(tmp_path / "models")["base_model"])
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sample", "tiny.py")
    assert compile_cmd.main(["sample", "--config", f"{config}:{folder}", "--topology", "v5e-1", "--quick"]) == 0
    out = capsys.readouterr().out
    # (one batch of both prompts' videos on the chip, as `sample` runs them: up to 4 per device per call)
    assert "sampler (4 steps, 8x32x32, motion v2): 1 x TPU v5 lite, 2 video(s) per chip" in out, out
    assert "VAE decode (chunks of 4 frames)" in out and out.count(": fits") == 2


@pytest.mark.parametrize("probe", ["sample-static", "train-weights"])
def test_tpu_probes_still_compile(probe, tmp_path):
    """`bench/tpu_probes.py` (speed ideas measured and not adopted: BENCHMARKS.md) patches the programs
    `compile` builds; at tiny size each probe still compiles, with the change it names in the program."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if probe == "sample-static":
        from animatediff_jax.testing.tiny import write_tiny_models

        folder = os.path.dirname(write_tiny_models(tmp_path / "models")["base_model"])
        args = ["--config", f"{root}/configs/sample/tiny.py:{folder}", "--config.dtype=bfloat16"]
    else:
        args = ["--config", f"{root}/configs/train/tiny_stage2.py", "--config.data.source=cache",
                "--config.train.resolution=32", "--config.train.batch_size=1",
                "--config.parallel.compute_dtype=bfloat16"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, f"{root}/bench/tpu_probes.py", probe, *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    said = re.search(r"probe: (\d+) (static activation scales|int8 kernels in the frozen UNet)", run.stderr)
    assert said and int(said.group(1)) > 10, run.stderr[-2000:]
    if probe == "sample-static":  # int8 x int8 products in the sampler
        assert "sampler" in run.stdout and ", int8 " in run.stdout, run.stdout
    else:
        assert "train step" in run.stdout and ": fits" in run.stdout, run.stdout


def test_frames_major_probe_is_the_motion_module(monkeypatch):
    """`bench/tpu_probes.py frames-major` measures a motion module laid out `(B, F, H*W, C)` (BENCHMARKS.md:
    more bytes, not adopted); what it measures is the motion module (v2 layout): the same params, the same
    output; and the probe puts it in every UNet built after it."""
    import importlib.util
    import sys

    from animatediff_jax.models import unet as unet_lib
    from animatediff_jax.models.config import MotionConfig
    from animatediff_jax.models.motion_module import MotionModule

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("tpu_probes", os.path.join(root, "bench", "tpu_probes.py"))
    probes = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tpu_probes", probes)  # (its Flax modules are dataclasses: looked up there)
    spec.loader.exec_module(probes)
    cfg = MotionConfig.for_version("v2")
    x = jax.random.normal(jax.random.key(1), (2 * 6, 4, 4, 64))  # 2 videos x 6 frames
    params = MotionModule(cfg).init(jax.random.key(0), x, 6)["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), params)  # proj_out != 0
    want = jax.jit(lambda p: MotionModule(cfg).apply({"params": p}, x, 6))(params)
    got = jax.jit(lambda p: probes.frames_major_module()(cfg).apply({"params": p}, x, 6))(params)
    assert float(np.abs(np.asarray(want) - np.asarray(x)).max()) > 0.1  # (the module adds something)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(unet_lib._Layers.__init__, "__defaults__", unet_lib._Layers.__init__.__defaults__)
    probes.frames_major()
    assert any(getattr(v, "__name__", "") == "FramesMajorMotionModule" for v in unet_lib._Layers.__init__.__defaults__)
