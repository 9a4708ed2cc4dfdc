"""`animatediff-jax sample --config configs/sample/<name>.py [--config.<field>=<value> ...]`

Text to video from a prompt config, as the original AnimateDiff's `scripts/animate.py` does it:
an SD1.5 base (converted folder, diffusers folder or single file), optionally a personalised model
over it (`dreambooth_path`) and a personalised LoRA (`lora_model_path`, `lora_alpha`), a motion
module, MotionLoRAs (`motion_module_lora_configs`, each with its alpha) and a v3 domain adapter
(`adapter_lora_path`, `adapter_lora_scale`), all merged into the weights once; ControlNets (`controlnet`)
and SparseCtrl (`sparsectrl`: keyframes, image to video) steering every step, IP-Adapters (`ip_adapter`:
image prompts); then one compiled sampler over all devices. Every field can be overridden:

    animatediff-jax sample --config configs/sample/v2_motion_lora_zoom_in.py \\
        --config.prompt="a lighthouse at dusk, waves" --config.seed=42 --config.steps=30

The command line is parsed by `ml_collections.config_flags`, as `train`'s: each value is read as
its field's type (`--config.W=768`, `--config.output.formats="('gif', 'mp4')"`,
`--config.context_windows.length=16`); a tuple field takes one value as a 1-tuple (`--config.seed=42`
is `(42,)`, `--config.prompt="a cat"` one prompt), `scheduler_options` a whole dict (`--config.scheduler_options="{'eta': 0.5}"`).
`--config FILE:ARG` passes ARG to the file's `get_config(ARG)`. A saved run replays with
`--config configs/sample/replay.py:RUN/config.yaml` (the same videos: random seeds are saved
resolved). `--print_config` prints the resolved config and exits.

Outputs in `output.dir` (`{time}` is replaced by the start time): `sample/<i>-<prompt>.gif`
(and/or `.mp4`, `<i>-<prompt>/0000.png` frames), `sample.gif` (a grid of all videos),
`config.yaml` (the resolved config), `timings.json` (with `safety_checker`: `nsfw_flags`, one per
video, flagged ones written black) and, with `evaluate.clip`, `metrics.json` (the CLIP metrics of
`animatediff_jax.evaluation`, also printed). Everything that can be checked is checked
before any weights are loaded or anything is compiled. Exit codes: 0 done; 2 a bad config, argument
or weight file (one line `error: ...` naming the field); 1 writing the outputs failed; 130 stopped by
Ctrl-C / SIGTERM (one line: nothing written, or the complete files already in the folder; every
file is written atomically, so none is half written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from animatediff_jax import compilation_cache, interrupts
from animatediff_jax.cli import parse_config_flags, run_command
from animatediff_jax.errors import ConfigError
from animatediff_jax.evaluation.sample_checks import SampleChecks
from animatediff_jax.io import fs
from animatediff_jax.sampling import assemble
from animatediff_jax.sampling.config import plain, to_yaml
from animatediff_jax.sampling.generate import check_fits, generate, sampling_mesh
from animatediff_jax.sampling.options import Request
from animatediff_jax.sampling.outputs import output_folder, timing_summary, write_outputs
from animatediff_jax.sampling.pipeline import AnimationPipeline

EXAMPLE = "configs/sample/tiny.py"


def load_config(spec: str, *overrides: str) -> dict:
    """The config `--config SPEC [OVERRIDES ...]` gives on the command line, as plain dicts."""
    return plain(parse_config_flags(["--config", spec, *overrides], "sample", EXAMPLE)[0])


@dataclasses.dataclass
class SampleResult:
    """What `sample` made: the output folder, files written, uint8 frames `[N, F, H, W, 3]`,
    the resolved config (seeds drawn), timings in seconds, and the pipeline (compiled, reusable)."""

    folder: str
    files: list[str]
    frames: np.ndarray
    config: dict
    timings: dict[str, float]
    pipeline: AnimationPipeline


def _batches(n: int, size: int) -> list[list[int]]:
    """Index batches of exactly `size` (the last one padded by repeating its last index)."""
    out = []
    for start in range(0, n, size):
        idx = list(range(start, min(n, start + size)))
        out.append(idx + [idx[-1]] * (size - len(idx)))
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_inputs(c: dict) -> tuple[np.ndarray | None, list[np.ndarray], list[list[np.ndarray]]]:
    """The video to restyle, the control images and the IP-Adapter images, read before any weights load (a
    short or unreadable clip is the first error)."""
    video = None
    if c["init_video"]:
        from animatediff_jax.io.video import VideoReadError, read_frames

        try:
            video = read_frames(c["init_video"], c["L"], (c["H"], c["W"]))[None]
        except (VideoReadError, ValueError) as e:
            raise ConfigError(f"init_video: {e}") from None
    return video, assemble.read_conditions(c), assemble.read_ip_images(c)


def _load(c: dict, pipeline: AnimationPipeline | None, mesh) -> tuple[AnimationPipeline, list, list]:
    """The pipeline, the control models and the IP-Adapters (their weights replicated over `mesh` once as
    the image prompts go in; the image encoders run before, where their params are), loaded once."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from animatediff_jax.checkpoints.torch_io import nonfinite_allowed

    with nonfinite_allowed() if c["allow_nonfinite"] else contextlib.nullcontext():
        pipe = pipeline if pipeline is not None else assemble.load_pipeline(c)
        models = assemble.load_controls(c, pipe.unet_config, pipe.dtype)
        ip_models = assemble.load_ip_adapters(c, pipe.unet_config, pipe.dtype)
    rep = NamedSharding(mesh, P())
    return pipe.on(mesh), [(cfg, jax.device_put(p, rep)) for cfg, p in models], ip_models


def _run(pipe: AnimationPipeline, request: Request, size: int, mesh, timings: dict) -> np.ndarray:
    """Every video of `request`, `size` per compiled call (the last call padded), timings summed."""
    frames, batches = [], _batches(len(request.prompts), size)
    for b, idx in enumerate(batches):
        if len(batches) > 1:
            _log(f"batch {b + 1}/{len(batches)}")
        res = generate(pipe, request.subset(idx), mesh=mesh, progress=True)
        frames.append(res.frames[:len(dict.fromkeys(idx))])
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return np.concatenate(frames)


def sample(config: Any, pipeline: AnimationPipeline | None = None) -> SampleResult:
    """Validates `config` (a ConfigDict, or a dict of some fields), reads its inputs, loads the pipeline
    (unless given), generates every prompt's video on all devices (batches of one compiled shape;
    `generate` checks what needs the loaded models, such as frames against the motion module, before
    compiling), writes the outputs and the timing summary."""
    c = assemble.validate(config)
    compilation_cache.enable(c["compilation_cache"], compilation_cache.default_dir())
    try:
        mesh = sampling_mesh(None if c["devices"] == -1 else c["devices"], c["context_parallel"])
    except ValueError as e:
        raise ConfigError(f"devices: {e}") from None
    folder = output_folder(c["output"]["dir"].replace("{time}", time.strftime("%Y-%m-%dT%H-%M-%S")))
    interrupts.output(folder)  # (Ctrl-C: the line names the complete videos written there, if any)
    video, images, ip_images = _read_inputs(c)
    assemble.request(c, video, images, ip_images=ip_images)  # (the counts of the images read, before any weights load)
    checks = SampleChecks(c)  # safety_checker / evaluate.clip: loaded (and checked) before the pipeline
    t0 = time.perf_counter()
    pipe, models, ip_models = _load(c, pipeline, mesh)
    timings = {"load_s": time.perf_counter() - t0}
    request = assemble.request(c, video, images, models, ip_images, ip_models)
    with assemble.config_names(c):
        check_fits(pipe, request, mesh)  # what needs the loaded models, in the config's names, before compiling
    n = len(request.prompts)
    size = assemble.videos_per_call(c["batch_size"], n, mesh.shape["data"])
    _log(f"sampling {n} video(s) of {c['L']} frames {c['H']}x{c['W']}, {c['scheduler']} {c['steps']} steps, "
         f"guidance {c['guidance_scale']}, {c['dtype']}, attention {assemble.attention_note(c)}, "
         f"on {mesh.shape['data']} device(s)"
         + (f" x {c['context_parallel']} per video (context_parallel)" if c["context_parallel"] > 1 else "")
         + f", {-(-n // size)} batch(es) of {size}")
    prompts = list(request.prompts)
    frames_np = checks.check(_run(pipe, request, size, mesh, timings), prompts, timings)  # (flagged: black)

    t0 = time.perf_counter()
    fs.makedirs(folder, exist_ok=True)
    files = write_outputs(folder, frames_np, prompts, c)
    timings["write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    still = request.replace(motion=dataclasses.replace(request.motion, scale=0.0))
    if checks.metrics(folder, frames_np, prompts, lambda: _run(pipe, still, size, mesh, {})):
        files.append(os.path.join(folder, "metrics.json"))
        timings["evaluate_s"] = time.perf_counter() - t0
    with fs.open(os.path.join(folder, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    files.append(os.path.join(folder, "timings.json"))
    _log(timing_summary(timings, n))
    _log(f"wrote {folder}/ ({len(files)} files)")
    return SampleResult(folder, files, frames_np, c, timings, pipe)


def _command(argv: Sequence[str]) -> None:
    config, print_only = parse_config_flags(argv, "sample", EXAMPLE)
    if print_only:
        print(to_yaml(config), end="")
        return
    sample(config)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_command, argv, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
