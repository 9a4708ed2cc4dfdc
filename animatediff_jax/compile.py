"""`animatediff-jax compile train|sample --config CONFIG --topology NAME [--config.<field>=<value> ...]`

Compiles the program `train` / `sample` would run with this config for a Cloud TPU slice, on this
machine, without the TPU and without a weight: the same step (mesh, shardings, donation, remat,
attention kernels chosen for the TPU, splash in its `shard_map`) built from the config alone
(`jax.eval_shape`), lowered and compiled by libtpu's own compiler for abstract chips of the named
topology. Run it before launching a pod: it says whether the program fits a chip's HBM and what it
costs, in a minute or two instead of at step 1 on the pod.

    pip install "jax[tpu]"     # libtpu; works on a CPU host
    animatediff-jax compile train --config configs/train/stage2_motion_module.py --topology v5e-256 \\
        --config.train.batch_size=1024
    animatediff-jax compile sample --config configs/sample/v2_motion_lora_zoom_in.py --topology v5e-1 \\
        --config.batch_size=4

Topologies: v5e-1 ... v5e-256 (also v5litepod-N), v6e-1 ... v6e-256, v5p-8 ... (Cloud names count
TensorCores: v5p-128 is 64 chips), v4-8 ..., `2xv5e-256` for two slices, or JAX's `v5e:2x2`.

Printed per program (per chip): argument / temporary / output / aliased (donated) GiB and their total
against the chip's usable HBM; TFLOP (XLA's count plus the Pallas kernels', which XLA counts as zero,
added from their shapes); GiB accessed (XLA's bytes model, every loop counted as often as it runs);
the roofline time (the larger of FLOPs / peak and bytes / bandwidth) per step and per clip or video;
XLA's own `optimal_seconds`; Pallas kernel and collective counts; lowering and compile seconds.
`--breakdown N` adds the N op groups that move the most bytes (TPU tiles padded), `--json FILE` writes
it all, `--save DIR` serializes the compiled executables with what they were compiled for; `train
--config.executables=DIR` on that slice then loads its step instead of compiling it (same config
overrides, same jax / libtpu).

Options: `--quick` lowers the compiler's effort (a real-size program in 0.5-2 min on 2 cores instead
of 5-20; memory can read higher than a full compile). `sample` only: `--motion v1|v2|v3` (the motion
module's layout; default: the file's own when it is here, else its name's), `--sparsectrl rgb|scribble`. Models are SD1.5
(or what a converted folder named by the config says, read from its header when it is here).

Exit codes: 0 compiled and fits; 2 a bad config or topology, or a program that does not fit (one line
saying by how much, and what to change); 1 writing `--json` / `--save` failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

from animatediff_jax.errors import ConfigError

GiB = 2**30
EXAMPLES = {"train": "configs/train/stage2_motion_module.py", "sample": "configs/sample/v2_motion_lora_zoom_in.py"}


class DoesNotFit(ConfigError):
    """A program needs more HBM than the chip has (exit 2, one line)."""


@dataclasses.dataclass
class Program:
    """One jitted program and its abstract arguments; `items` clips or videos per run (global)."""

    name: str
    lower: Callable[[], Any]
    items: int
    unit: str
    save_name: str = ""  # what `--save` writes it as (and the command that runs it looks for)
    match: dict = dataclasses.field(default_factory=dict)  # what that command checks besides the devices


@dataclasses.dataclass
class Report:
    name: str
    chip: str
    chips: int
    items_per_chip: float
    unit: str
    arg_gib: float
    temp_gib: float
    out_gib: float
    alias_gib: float
    total_gib: float
    hbm_gib: float
    fits: bool
    tflop: float
    int8_tflop: float  # of `tflop`: int8 x int8 products, timed at the chip's int8 rate
    pallas_tflop: float
    gib_accessed: float
    raw_tflop: float
    raw_gib_accessed: float
    loop_aware: bool
    unknown_trip_loops: int
    roofline_s: float
    compute_s: float
    memory_s: float
    optimal_s: float | None
    pallas_calls: int
    collectives: dict[str, int]
    collective_gib: float  # what the collectives deliver to each chip per run (over ICI, not in the roofline)
    lower_s: float
    compile_s: float
    breakdown: list[dict] = dataclasses.field(default_factory=list)
    note: str = ""


# ------------------------------------------------------------------------------------------ programs


def train_programs(config, devices: list) -> list[Program]:
    """The stage's train step, as `train` builds it (`training.program`), on `devices`."""
    from animatediff_jax import parallel
    from animatediff_jax.training import abstract_models, batch_shapes, make_program
    from animatediff_jax.training.config import ConfigError, validate_config

    validate_config(config, files=False)
    p = config.parallel
    try:
        mesh = parallel.make_mesh(dict(p.mesh_shape), devices)
    except ValueError as e:
        raise ConfigError(f"parallel.mesh_shape={dict(p.mesh_shape)}: {e}") from None
    models = abstract_models(config)
    program = make_program(config, models, mesh)
    batch = batch_shapes(config, program, models, _cache_latent_dtype(config))
    step = program.step(batch)
    args = program.abstract_args(batch)
    return [Program(f"{program.stage.name} train step", lambda: step.lower(*args), program.global_batch, "clip",
                    program.executable_name, {"fingerprint": program.fingerprint, "batch": sorted(batch)})]


def _cache_latent_dtype(config) -> str:
    """The latents' dtype a `data.source="cache"` run reads (`prepare --latent-dtype`), float32 if unknown."""
    d = config.data
    if d.source != "cache" or not d.cache_dir:
        return "float32"
    from animatediff_jax.io import fs

    path = f"{d.cache_dir.rstrip('/')}/cache_info.json"
    if not fs.isfile(path):
        return "float32"
    with fs.open(path) as f:
        return str(json.load(f).get("latent_dtype", "float32"))


def abstract_pipeline(c: dict, motion: str | None = None):
    """An `AnimationPipeline` of `ShapeDtypeStruct` params with the sample config's layouts: the converted
    base folder's configs when it is here (SD1.5 otherwise); the motion module's own layout when its file
    is here and `motion` does not say one, else `motion` or the file name's."""
    import jax.numpy as jnp

    from animatediff_jax.checkpoints.motion import motion_version_of
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.config import MotionConfig, UNetConfig, sd15_unet, sdxl_unet
    from animatediff_jax.models.shapes import clip_shapes, sdxl_text_shapes, unet_shapes, vae_shapes
    from animatediff_jax.models.vae import VAEConfig
    from animatediff_jax.sampling.pipeline import AnimationPipeline, cast_floating, quantize_unet

    unet, vae, text, text_2 = sd15_unet(), VAEConfig.sd15(), CLIPTextConfig.sd15(), None
    guessed = motion or motion_version_of(c["motion_module"] or "")
    if guessed in ("sdxl_beta", "hotshot_xl"):  # (an SDXL motion module: SDXL's base, until its files say)
        unet, vae, text_2 = sdxl_unet(), VAEConfig.sdxl(), CLIPTextConfig.sdxl_g()
    converted = os.path.join(c["base_model"], "params.safetensors")
    if os.path.isfile(converted):
        from animatediff_jax.checkpoints.params_io import config_from_dict
        from animatediff_jax.checkpoints.torch_io import safetensors_metadata

        meta = safetensors_metadata(converted)
        unet = config_from_dict(UNetConfig, json.loads(meta["unet_config"]))
        vae = config_from_dict(VAEConfig, json.loads(meta["vae_config"]))
        text = config_from_dict(CLIPTextConfig, json.loads(meta["text_config"]))
        text_2 = config_from_dict(CLIPTextConfig, json.loads(meta["text_config_2"])) if "text_config_2" in meta else None
    unet = unet.replace(motion=None)
    if c["motion_module"] and os.path.exists(c["motion_module"]) and motion is None:
        from animatediff_jax.checkpoints.load import load_motion

        _, unet = load_motion(c["motion_module"], unet)  # the file's own layout (read as `sample` reads it)
    else:
        unet = unet.with_motion(MotionConfig.for_version(guessed))
    dtype = jnp.dtype(c["dtype"])
    params = {"unet": quantize_unet(unet, unet_shapes(unet), c["quantize"]), "vae": vae_shapes(vae),
              "text_encoder": clip_shapes(text)}
    if text_2 is not None:
        params["text_encoder_2"] = sdxl_text_shapes(text_2)
    params = cast_floating(params, dtype)
    return AnimationPipeline(unet, vae, text, params, None, dtype, c["attention"], c["quantize"], text_config_2=text_2)


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def abstract_controls(c: dict, pipe, sparsectrl: str | None) -> list[tuple[Any, Any]]:
    """`(config, ShapeDtypeStruct params)` of the config's ControlNets / SparseCtrl (`assemble.control_entries`)."""
    import jax

    from animatediff_jax.models.controlnet import sd15_controlnet, sparsectrl_config
    from animatediff_jax.models.shapes import controlnet_shapes
    from animatediff_jax.sampling.assemble import control_entries

    out = []
    for name, e in control_entries(c):
        if name == "sparsectrl":
            kind = sparsectrl or ("scribble" if re.search(r"scribble|sketch", str(e["path"]).lower()) else "rgb")
            cfg = sparsectrl_config(kind)
        else:
            cfg = sd15_controlnet()
        out.append((cfg, jax.tree.map(lambda s: _sds(s.shape, pipe.dtype), controlnet_shapes(cfg))))
    return out


def abstract_ip_adapters(c: dict, pipe) -> list[tuple[Any, Any, None]]:
    """`(config, ShapeDtypeStruct params, no encoder)` of the config's IP-Adapters (`assemble.ip_entries`): the
    SD1.5 layout the file name says (`plus` / `plus-face`: the Resampler, `full`: full-face, else base)."""
    import jax

    from animatediff_jax.models.ip_adapter import IPAdapterConfig
    from animatediff_jax.models.shapes import ip_adapter_shapes
    from animatediff_jax.sampling.assemble import ip_entries

    out = []
    for _, e in ip_entries(c):
        name = os.path.basename(str(e["path"])).lower()
        kind = "plus" if "plus" in name else "full" if "full" in name else "base"
        cfg = IPAdapterConfig.sd15(kind)
        shapes = ip_adapter_shapes(cfg, pipe.unet_config)
        out.append((cfg, jax.tree.map(lambda s: _sds(s.shape, pipe.dtype), shapes), None))
    return out


def sample_programs(config, devices: list, motion: str | None = None, sparsectrl: str | None = None
                    ) -> list[Program]:
    """`sample`'s denoising call and VAE decode for one batch (`batch_size`, or `videos_per_call`'s), on `devices`."""
    from animatediff_jax.errors import ConfigError
    from animatediff_jax.sampling.assemble import request, validate, videos_per_call
    from animatediff_jax.sampling.generate import check_fits
    from animatediff_jax.sampling.programs import DATA, abstract_sampler, mesh_over

    c = validate(config, files=False)
    count = len(devices) if c["devices"] == -1 else c["devices"]
    if count > len(devices):
        raise ConfigError(f"devices={c['devices']}: the topology has {len(devices)} chips")
    mesh = mesh_over(devices[:count], c["context_parallel"])
    pipe = abstract_pipeline(c, motion)
    motion = pipe.unet_config.motion.version
    req = request(c, models=abstract_controls(c, pipe, sparsectrl), ip_models=abstract_ip_adapters(c, pipe))
    size = videos_per_call(c["batch_size"], len(req.prompts), mesh.shape[DATA])
    idx = [i % len(req.prompts) for i in range(size)]
    check_fits(pipe, req.subset(idx), mesh, need_tokenizer=False)
    programs = abstract_sampler(pipe, req.subset(idx), mesh)
    out = []
    for name, (fn, args, sharding) in programs.items():
        def lower(fn=fn, args=args, sharding=sharding):
            import jax

            with jax.set_mesh(mesh):
                return jax.jit(fn, out_shardings=sharding).lower(*args)

        label = f"sampler ({c['steps']} steps, {c['L']}x{c['H']}x{c['W']}, motion {motion})" if name == "denoise" \
            else f"VAE decode (chunks of {c['decode_chunk']} frames)"
        out.append(Program(label, lower, len(idx), "video"))
    return out


# ------------------------------------------------------------------------------------------ compile


@contextlib.contextmanager
def compiler_effort(quick: bool):
    """`quick`: the compiler's lowest time-optimisation and memory-fitting effort while compiling."""
    import jax

    if not quick:
        yield
        return
    names = ("jax_exec_time_optimization_effort", "jax_memory_fitting_effort")
    before = {n: getattr(jax.config, n) for n in names}
    for n in names:
        jax.config.update(n, -1.0)
    try:
        yield
    finally:
        for n, v in before.items():
            jax.config.update(n, v)


def compile_program(program: Program, topology, quick: bool, breakdown: int = 0) -> tuple[Report, Any]:
    """Lowers and compiles `program` for the TPU; the report of what it needs (and the executable)."""
    from animatediff_jax import tpu, xla_cost
    from animatediff_jax.models import attention

    chip = topology.chip
    t0 = time.perf_counter()
    with attention.target_platform("tpu"):
        lowered = program.lower()
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with compiler_effort(quick):
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - libtpu's out-of-memory is an XlaRuntimeError
        msg = tpu.oom_message(e)
        if msg is None:
            raise
        raise DoesNotFit(f"{program.name} does not fit a {chip.name} ({chip.hbm_gib:g} GiB usable): {msg}; try "
                         f"{_remedy(program)}") from None
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg, temp = mem.argument_size_in_bytes / GiB, mem.temp_size_in_bytes / GiB
    out, alias = mem.output_size_in_bytes / GiB, mem.alias_size_in_bytes / GiB
    total = arg + temp + out - alias
    text = xla_cost.module_text(compiled)
    module = xla_cost.Module.parse(text)
    cost = xla_cost.loop_aware_cost(compiled, text)
    pallas = xla_cost.pallas_kernels(module)
    flops = cost["flops"] + pallas["pallas_flops"]
    int8 = min(xla_cost.int8_flops(module), flops)  # (at the chip's int8 rate; the rest at bf16's)
    compute_s = (flops - int8) / (chip.peak_tflops * 1e12) + int8 / (chip.int8_tops * 1e12)
    memory_s = cost["bytes accessed"] / (chip.hbm_gbps * 1e9)
    try:
        optimal = float(_cost(compiled).get("optimal_seconds"))
    except (TypeError, ValueError):
        optimal = None
    report = Report(
        name=program.name, chip=chip.name, chips=topology.chips, items_per_chip=program.items / topology.chips,
        unit=program.unit, arg_gib=arg, temp_gib=temp, out_gib=out, alias_gib=alias, total_gib=total,
        hbm_gib=chip.hbm_gib, fits=total <= chip.hbm_gib, tflop=flops / 1e12, int8_tflop=int8 / 1e12,
        pallas_tflop=pallas["pallas_flops"] / 1e12, gib_accessed=cost["bytes accessed"] / GiB,
        raw_tflop=cost["raw_flops"] / 1e12, raw_gib_accessed=cost["raw_bytes accessed"] / GiB,
        loop_aware=bool(cost["loop_aware"]), unknown_trip_loops=int(cost["unknown_trip_loops"]),
        roofline_s=max(compute_s, memory_s), compute_s=compute_s, memory_s=memory_s, optimal_s=optimal,
        pallas_calls=int(pallas["pallas_calls"]), collectives=xla_cost.collectives(module),
        collective_gib=xla_cost.collective_bytes(module) / GiB,
        lower_s=lower_s, compile_s=compile_s,
        breakdown=xla_cost.breakdown(text, top=breakdown) if breakdown else [])
    if not report.fits:
        raise DoesNotFit(f"{program.name} does not fit a {chip.name}: needs {total:.2f} GiB per chip "
                         f"({temp:.2f} GiB of temporaries), {chip.hbm_gib:g} GiB usable; try "
                         f"{_remedy(program)}")
    return report, compiled


def _remedy(program: Program) -> str:
    """What to change when `program` does not fit: a train step's settings or a sampler's."""
    if program.unit == "video":
        return ("a smaller --config.batch_size (or decode_chunk), each video over chips (--config.context_parallel), "
                "or more chips")
    return "--config.parallel.remat=full, a smaller batch, or more chips"


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    return (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}


def format_report(r: Report) -> str:
    per = r.items_per_chip
    step = f"{r.roofline_s * 1e3:.0f} ms" if r.roofline_s < 10 else f"{r.roofline_s:.1f} s"
    bound = "compute" if r.compute_s >= r.memory_s else "memory"
    lines = [
        f"{r.name}: {r.chips} x {r.chip}, {per:g} {r.unit}(s) per chip",
        f"  per chip: args {r.arg_gib:.2f} + temp {r.temp_gib:.2f} + out {r.out_gib:.2f} - aliased "
        f"{r.alias_gib:.2f} = {r.total_gib:.2f} GiB of {r.hbm_gib:g} GiB usable: {'fits' if r.fits else 'DOES NOT FIT'}",
        f"  {r.tflop:.1f} TFLOP (Pallas {r.pallas_tflop:.1f}" + (f", int8 {r.int8_tflop:.1f}" if r.int8_tflop else "")
        + f"; XLA alone, loops once: {r.raw_tflop:.1f}), "
        f"{r.gib_accessed:.0f} GiB accessed (loops once: {r.raw_gib_accessed:.0f})"
        + ("" if r.loop_aware else " [loop-aware count failed: XLA's figures]")
        + (f" [{r.unknown_trip_loops} loop(s) of unknown trip count, counted once]" if r.unknown_trip_loops else ""),
        f"  roofline {step} per run ({bound}-bound: compute {r.compute_s * 1e3:.0f} ms, memory "
        f"{r.memory_s * 1e3:.0f} ms) = {r.roofline_s / per * 1e3 if per else float('nan'):.0f} ms per {r.unit} per chip"
        + (f"; XLA optimal_seconds {r.optimal_s:.3f}" if r.optimal_s is not None else ""),
        f"  {r.pallas_calls} Pallas kernel call(s); collectives "
        + (", ".join(f"{k} {v}" for k, v in sorted(r.collectives.items())) or "none")
        + (f" ({r.collective_gib:.1f} GiB to each chip)" if r.collectives else "")
        + f"; lowered in {r.lower_s:.0f} s, compiled in {r.compile_s:.0f} s",
    ]
    if r.breakdown:
        lines.append("  bytes by op (TPU tiles padded; per run):")
        for b in r.breakdown:
            lines.append(f"    {b['bytes'] / GiB:9.1f} GiB ({b['untiled_bytes'] / GiB:7.1f} unpadded) {b['ops']:6d} ops  "
                         f"{b['op']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command


def _parse(argv: Sequence[str]):
    if not argv or argv[0] not in EXAMPLES:
        raise ConfigError(f"compile: expected `train` or `sample` first, e.g. animatediff-jax compile train --config "
                         f"{EXAMPLES['train']} --topology v5e-8")
    what = argv[0]
    p = argparse.ArgumentParser(prog=f"animatediff-jax compile {what}", add_help=False)
    p.add_argument("--topology", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--breakdown", type=int, default=0)
    p.add_argument("--json", default="")
    p.add_argument("--save", default="")
    p.add_argument("--motion", choices=("v1", "v2", "v3"))
    p.add_argument("--sparsectrl", choices=("rgb", "scribble"))
    own, rest = [], []
    it = iter(argv[1:])
    names = {a.option_strings[0] for a in p._actions}
    for a in it:
        key = a.split("=", 1)[0]
        if key in names:
            own.append(a)
            if "=" not in a and key not in ("--quick",):
                own.append(next(it, ""))
        else:
            rest.append(a)
    try:
        args = p.parse_args(own)
    except SystemExit:
        raise ConfigError(f"compile {what}: --topology NAME is required (e.g. v5e-8); options: --quick, "
                         "--breakdown N, --json FILE, --save DIR, --motion v1|v2|v3, --sparsectrl rgb|scribble") from None
    if what == "sample" and args.save:
        raise ConfigError("--save is for `compile train` (its step is what `train --config.executables=DIR` loads)")
    if what == "train" and (args.motion or args.sparsectrl):
        raise ConfigError("--motion / --sparsectrl are for `compile sample` (train configs say model.motion_version)")
    return what, args, rest


def run(what: str, config, topology_name: str, quick: bool = False, breakdown: int = 0, motion: str | None = None,
        sparsectrl: str | None = None, save: str = "", echo: Callable[[str], None] = print) -> list[Report]:
    """Compiles `what`'s programs for `topology_name`; raises `DoesNotFit` (after printing the ones that fit)."""
    from animatediff_jax import tpu

    try:
        topology = tpu.topology(topology_name)
        devices = topology.devices()
    except ValueError as e:  # tpu.py: an unknown topology name, no libtpu (the user's to fix)
        raise ConfigError(" ".join(str(e).split())) from None
    programs = train_programs(config, devices) if what == "train" else sample_programs(config, devices, motion,
                                                                                      sparsectrl)
    echo(f"compiling {len(programs)} program(s) for {topology_name} ({topology.chips} x {topology.chip.name}, "
         f"{topology.chip.hbm_gib:g} GiB usable HBM, {topology.chip.peak_tflops:g} TFLOP/s bf16, "
         f"{topology.chip.hbm_gbps:g} GB/s){' at reduced effort' if quick else ''}")
    reports = []
    for program in programs:
        report, compiled = compile_program(program, topology, quick, breakdown)
        reports.append(report)
        echo(format_report(report))
        if save:
            from animatediff_jax import executables

            meta = {**executables.target(devices), **program.match, "program": program.name, "topology": topology_name}
            name = program.save_name or f"{what}-{program.name.split(' (')[0]}"
            echo(f"  saved {executables.save(save, name, compiled, meta)}")
    return reports


def _command(argv: Sequence[str]) -> None:
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # everything but the TPU compile stays on the host
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # (a TPU VM's own training may hold libtpu's lock)
    from animatediff_jax.cli import parse_config_flags

    what, args, rest = _parse(argv)
    config, print_only = parse_config_flags(rest, f"compile {what}", EXAMPLES[what])
    if print_only:
        print(config)
        return
    reports = run(what, config, args.topology, args.quick, args.breakdown, args.motion, args.sparsectrl, args.save)
    if args.json:
        from animatediff_jax.io import fs

        with fs.atomic_file(args.json) as tmp, open(tmp, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    from animatediff_jax.cli import run_command

    return run_command(_command, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
