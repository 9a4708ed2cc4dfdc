"""The training run: models -> sharded train state -> steps with logging, checkpoints and exports.

    trainer = build_trainer(config)            # loads / initialises models, mesh, jitted step
    run(trainer, config, data_iterator)        # resumes from the latest checkpoint if any

`train(config)` does both with the data pipeline of `animatediff_jax.data` (per process, its own
rows of every global batch). Metrics go to the console (process 0), to `workdir/metrics.jsonl`
(one JSON object per logged step) and, when `tensorboardX` is installed, to TensorBoard event
files in `workdir/tensorboard`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from animatediff_jax import compilation_cache, executables
from animatediff_jax import lora as lora_lib
from animatediff_jax import parallel
from animatediff_jax.io import fs
from animatediff_jax.training import checkpointing, stages
from animatediff_jax.training.config import (
    ConfigError,
    TrainingDiverged,
    TrainingError,
    check_batch,
    check_config,
    validate_config,
)
from animatediff_jax.training.models import Models, load_models
from animatediff_jax.training.program import TrainProgram, make_program
from animatediff_jax.training.step import TrainState, init_state, make_optimizer, select_batch, tree_all_finite

Params = dict[str, Any]
ValidateFn = Callable[[int, "Trainer"], Mapping[str, float] | None]

# ------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Trainer:
    """A `TrainProgram` with its weights placed on the mesh. `state` is donated by every step."""

    program: TrainProgram
    models: Models
    state: TrainState
    frozen: Params
    executables: str = ""  # a `compile train --save` folder: a matching saved step is loaded, not compiled
    _steps: dict = dataclasses.field(default_factory=dict)

    stage = property(lambda self: self.program.stage)
    spec = property(lambda self: self.program.spec)
    mesh = property(lambda self: self.program.mesh)
    rules = property(lambda self: self.program.rules)
    optim = property(lambda self: self.program.optim)
    global_batch = property(lambda self: self.program.global_batch)
    state_sharding = property(lambda self: self.program.state_sharding)
    frozen_sharding = property(lambda self: self.program.frozen_sharding)

    def batch_sharding(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return self.program.batch_sharding(batch)

    def step_fn(self, batch: Mapping[str, Any]):
        """The jitted step for this batch's entries (compiled once per set of keys), or the matching
        executable saved in `executables`."""
        key = tuple(sorted(batch))
        if key not in self._steps:
            step = None
            if self.executables:
                expect = {**executables.target(list(self.mesh.devices.flat)), "fingerprint": self.program.fingerprint,
                          "batch": list(key)}
                step, why = executables.load(self.executables, self.program.executable_name, expect)
                _log(f"loaded the compiled step from {self.executables}" if step is not None
                     else f"compiling the step: {why}")
            self._steps[key] = step if step is not None else self.program.step(batch)
        return self._steps[key]

    def put_batch(self, local: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's rows (numpy) -> the global batch, sharded over the batch axes."""
        local = select_batch(local)
        return parallel.global_batch_from_local(local, self.batch_sharding(local), self.global_batch)

    def train_step(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        self.state, metrics = self.step_fn(batch)(self.state, self.frozen, batch)
        return metrics

    def full_params(self) -> Params:
        """The UNet params the stage trains (frozen + trained), e.g. for validation samples."""
        return stages.combine(self.stage, self.state.params, self.frozen["unet"], self.spec.lora_scale)

    def export_meta(self) -> dict[str, Any]:
        """What `checkpoints.load` reads: kind (motion_module | domain_adapter | motion_lora), UNet config."""
        meta = {"stage": self.stage.name, "kind": self.stage.name,
                "step": int(parallel.fetch(self.state.step)), "unet_config": self.models.unet_config}
        if self.stage.kind == "lora":
            layers = lora_lib.lora_layers(self.state.params)
            meta.update(rank=lora_lib.lora_rank(next(iter(layers.values()))), scale=self.spec.lora_scale)
        return meta


def build_trainer(config, models: Models | None = None, mesh: Mesh | None = None) -> Trainer:
    """Models (loaded from the config unless given), mesh, sharded state and frozen weights: the
    config's `TrainProgram` with real weights placed as it says."""
    check_config(config)
    models = load_models(config) if models is None else models
    mesh = parallel.make_mesh(dict(config.parallel.mesh_shape)) if mesh is None else mesh
    program = make_program(config, models, mesh)
    if program.global_batch % jax.process_count():
        raise ValueError(f"train.batch_size={program.global_batch} must divide among {jax.process_count()} processes")

    k_init, k_train = jax.random.split(jax.random.key(int(config.seed)))
    trainable, frozen_unet = stages.init_stage(
        program.stage, models.unet, k_init, lora_rank=int(config.model.lora_rank), attached=models.attached,
        trainable_init=models.trainable_init)
    frozen = {"unet": frozen_unet}
    if models.vae is not None:
        frozen["vae"] = models.vae
    if models.text_encoder is not None:
        frozen["text_encoder"] = models.text_encoder
    # In the program's dtypes: trainable float32, frozen `parallel.frozen_dtype`.
    trainable = jax.tree.map(lambda x, s: np.asarray(x).astype(s.dtype), trainable, program.trainable)
    frozen = jax.tree.map(lambda x, s: np.asarray(x).astype(s.dtype), frozen, program.frozen)
    tx, _ = make_optimizer(program.optim)
    params = parallel.put_global(trainable, program.state_sharding.params)
    # The optimizer state is created on the mesh directly (never materialised on one device).
    state = jax.jit(lambda t: init_state(t, tx, k_train), out_shardings=program.state_sharding)(params)
    frozen = parallel.put_global(frozen, program.frozen_sharding)
    return Trainer(program, models, state, frozen, str(config.get("executables", "")))


# ------------------------------------------------------------------------- logging


class MetricsWriter:
    """`workdir/metrics.jsonl` always; TensorBoard event files too when `tensorboardX` is importable.

    A workdir in a bucket: both are written to a local folder and uploaded whole at every write
    (`io.fs.SyncedFolder`), the JSONL first downloaded to append to it."""

    def __init__(self, workdir: str, tensorboard: bool = True, start: int | None = None):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        fs.makedirs(workdir, exist_ok=True)
        self.folder = fs.SyncedFolder(workdir)
        self.folder.fetch("metrics.jsonl")
        path = os.path.join(self.folder.path, "metrics.jsonl")
        if start is not None and os.path.exists(path):
            _truncate_metrics(path, start)
        self.jsonl = open(path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.folder.path, "tensorboard"))
            except ImportError:
                print("[train] tensorboardX not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if row[k] is not None:  # TensorBoard gets no NaN/inf either
                    self.tb.add_scalar(f"train/{k}", float(v), step)
            self.tb.flush()
        self.folder.sync()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            self.folder.close()


def _json_number(v) -> float | int | None:
    """A metric as strict JSON: non-finite values become null (never a bare NaN / Infinity)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


def _truncate_metrics(path: str, start: int) -> None:
    """Drops the rows of steps after `start` (logged by a run that died before its next checkpoint),
    so a resumed run never repeats a step in `metrics.jsonl`."""
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= start:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
            continue
    if keep != lines:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_progress(step: int, total: int, m: Mapping[str, float]) -> str:
    rate = m.get("clips_per_s")
    line = (f"step {step}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad {m['grad_norm']:.3f} | "
            f"{f'{rate:.2f}' if rate is not None else '-'} clips/s | ETA {_duration(m.get('eta_s', float('nan')))}")
    if m.get("nonfinite_steps"):
        line += f" | {int(m['nonfinite_steps'])} non-finite step(s) skipped"
    if m.get("skipped"):
        line += f" | {int(m['skipped'])} unreadable videos skipped"
    return line


# ------------------------------------------------------------------------- the loop


def run(
    trainer: Trainer,
    config,
    data: Iterator[Mapping[str, Any]],
    *,
    validate: ValidateFn | None = None,
    evaluate: ValidateFn | None = None,
    num_steps: int | None = None,
    resume: bool = True,
    skipped: Callable[[], int] | None = None,
) -> dict[str, float]:
    """Trains until `config.train.steps` (or `num_steps` more steps), resuming from the latest
    checkpoint in `workdir/checkpoints` when `resume`. `data` yields this process's rows of each
    global batch; if it has `get_state`/`set_state` its position is checkpointed and restored.
    Returns the last logged metrics. `skipped()` (the pipeline's count of unreadable records, this
    process, this run) goes into the metrics as `skipped`.

    Non-finite steps are skipped by the step itself; `train.max_nonfinite_steps` of them in a row
    raise `TrainingDiverged` (checked when the metrics are fetched, at log steps). Nothing with
    NaN/inf params is ever saved or exported.
    """
    workdir = config.workdir
    ck = config.checkpoint
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), ck.every, ck.keep, ck.async_save)
    if resume:
        restored = ckpt.restore(trainer.state, config=config.to_dict() if hasattr(config, "to_dict") else None)
        if restored is not None:
            trainer.state, data_state = restored
            if data_state is not None and hasattr(data, "set_state"):
                data.set_state(data_state)
            _log(f"resumed from step {int(parallel.fetch(trainer.state.step))}")
    start = int(parallel.fetch(trainer.state.step))
    end = int(config.train.steps) if num_steps is None else start + int(num_steps)
    writer = MetricsWriter(workdir, config.log.tensorboard, start=start)
    every, pending, last = max(1, int(config.log.every)), [], {}
    max_nonfinite = int(config.train.get("max_nonfinite_steps", 10))
    nonfinite_run, last_ckpt = 0, ckpt.latest_step()
    t_log, n_log = time.perf_counter(), start
    export_path = os.path.join(workdir, trainer.stage.export)
    cfg_dict = config.to_dict() if hasattr(config, "to_dict") else None
    stop = StopRequest()
    try:
        stop.install()
        for step in range(start + 1, end + 1):
            batch = trainer.put_batch(_next_batch(data, config))
            pending.append(trainer.train_step(batch))
            data_state = data.get_state() if hasattr(data, "get_state") else None
            if step == start + 1:  # rates count from the end of the first (compiling) step
                jax.block_until_ready(pending[-1])
                t_log, n_log = time.perf_counter(), step
            if step % every == 0 or step == end:
                last, flags = _log_metrics(writer, trainer, step, end, pending, t_log, n_log, skipped)
                pending, t_log, n_log = [], time.perf_counter(), step
                for f in flags:
                    nonfinite_run = nonfinite_run + 1 if f else 0
                if max_nonfinite > 0 and nonfinite_run >= max_nonfinite:
                    raise TrainingDiverged(_diverged_message(config, step, nonfinite_run, last_ckpt))
            stopping = stop.agreed(at_log_step=step % every == 0)
            if stopping and pending:  # log the steps since the last log before leaving
                last, _ = _log_metrics(writer, trainer, step, end, pending, t_log, n_log, skipped)
                pending = []
            if ckpt.should_save(step, force=step == end or stopping):
                _check_finite(trainer, f"a checkpoint at step {step}")
                if ckpt.save(step, trainer.state, data_state, cfg_dict, force=True):
                    last_ckpt = step
                    _log(f"checkpoint at step {step}")
            if stopping and step < end:
                ckpt.wait()
                _log(f"stopped by {stop.name} at step {step}/{end}, checkpoint saved; "
                     f"resume with the same command: workdir {fs.abspath(workdir)}, step {step}")
                return last
            if ck.export_every and step % ck.export_every == 0 and step != end:
                _check_finite(trainer, f"an export at step {step}")
                checkpointing.export_trainable(export_path, trainer.state.params, trainer.export_meta())
            run_hooks(writer, config, step, trainer, validate, evaluate)
        if end > start:
            _check_finite(trainer, "the export")
            checkpointing.export_trainable(export_path, trainer.state.params, trainer.export_meta())
            _log(f"exported {trainer.stage.name} params to {export_path}")
    finally:
        stop.uninstall()
        ckpt.close()
        writer.close()
    return last


def run_hooks(writer: MetricsWriter, config, step: int, trainer: Trainer, validate: ValidateFn | None,
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


class StopRequest:
    """SIGTERM / SIGINT while training: the loop finishes the step it is in, saves a checkpoint at
    that step, waits for it and returns (exit code 0). A second signal stops at once (the default
    action). With several processes the flag is combined over all of them at log steps
    (`process_allgather`, where the metrics are fetched anyway), so every process stops at the same
    step; a single process stops after the current step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "request"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum  # no printing here: the handler may interrupt a print
            return
        self.uninstall()  # a second signal: act now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def agreed(self, at_log_step: bool) -> bool:
        """Whether every process stops after this step."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not at_log_step:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.signum is not None, np.int32))
        if self.signum is None and np.any(flags):
            self.signum = signal.SIGTERM  # another process's signal
        return bool(np.any(flags))


def _diverged_message(config, step: int, run: int, last_ckpt: int | None) -> str:
    lr = float(config.optim.learning_rate)
    where = f"the last checkpoint (step {last_ckpt})" if last_ckpt is not None else "no checkpoint (none was saved)"
    return (f"training diverged at step {step}: {run} steps in a row had a non-finite loss or gradients "
            f"(train.max_nonfinite_steps={int(config.train.max_nonfinite_steps)}; they were skipped, the params "
            f"are finite); lower optim.learning_rate (now {lr:g}) or raise optim.warmup_steps, then rerun: it "
            f"resumes from {where}")


_all_finite = jax.jit(lambda params, opt_state: tree_all_finite((params, opt_state)))


def _check_finite(trainer: Trainer, what: str) -> None:
    """Refuses to write `what` if the trainable params or optimizer state hold NaN/inf (one host sync)."""
    if not bool(parallel.fetch(_all_finite(trainer.state.params, trainer.state.opt_state))):
        step = int(parallel.fetch(trainer.state.step))
        raise TrainingError(f"refusing to write {what}: the params or optimizer state at step {step} are not "
                            f"finite (NaN/inf); lower optim.learning_rate and rerun", exit_code=3)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[train] {msg}", flush=True)


def _next_batch(data: Iterator, config) -> Mapping[str, Any]:
    from animatediff_jax.data import NoReadableData

    try:
        return next(data)
    except NoReadableData as e:
        d = config.data
        where = (f"data.csv={d.csv!r}, data.video_folder={d.video_folder!r}" if d.source == "webvid"
                 else f"data.source={d.source!r}")
        raise TrainingError(f"{e} -- check {where}", exit_code=2) from e


def _log_metrics(writer: MetricsWriter, trainer: Trainer, step: int, end: int, pending: list, t0: float,
                 n0: int, skipped: Callable[[], int] | None = None) -> tuple[dict[str, float], list[int]]:
    """Averages the steps since the last log (fetched only now, so the host never waits per step):
    loss and grad norm over the finite steps; `nonfinite_steps` counts the skipped ones. Returns the
    metrics and each step's non-finite flag."""
    if not pending:
        return {}, []
    vals = parallel.fetch(pending)
    flags = [int(v.get("nonfinite", 0)) for v in vals]
    ok = [v for v, f in zip(vals, flags) if not f]
    m = {k: (float(np.mean([v[k] for v in ok])) if ok else float("nan"))
         for k in vals[0] if k not in ("lr", "nonfinite")}
    m["lr"] = float(vals[-1]["lr"])
    m["nonfinite_steps"] = int(sum(flags))
    if skipped is not None:
        m["skipped"] = int(skipped())
    dt = time.perf_counter() - t0
    if step > n0 and dt > 0:
        rate = (step - n0) / dt
        m["clips_per_s"] = rate * trainer.global_batch
        m["eta_s"] = (end - step) / rate
    writer.write(step, m)
    _log(format_progress(step, end, m))
    return m, flags


# ------------------------------------------------------------------------- data


def hash_tokenizer(vocab_size: int, length: int = 77) -> Callable[[list[str]], np.ndarray]:
    """A toy word-hashing tokenizer (BOS, words, EOS, padding with EOS), for tiny runs without a
    CLIP vocabulary on disk. Same word -> same id across runs (crc32, not Python's `hash`).
    """
    import zlib

    bos, eos = vocab_size - 2, vocab_size - 1

    def tokenize(texts) -> np.ndarray:
        out = np.full((len(texts), length), eos, np.int32)
        for i, t in enumerate(texts):
            ids = [bos] + [zlib.crc32(w.encode()) % (vocab_size - 2) for w in t.lower().split()][: length - 2] + [eos]
            out[i, : len(ids)] = ids
        return out

    return tokenize


def make_tokenizer(config, trainer: Trainer) -> Callable[[list[str]], np.ndarray]:
    """`data.tokenizer`: "hash" (toy), a CLIP tokenizer folder, or "" for the pretrained folder's."""
    if config.data.tokenizer == "hash":
        if trainer.models.text_config is None:
            raise ValueError("data.tokenizer='hash' needs the text encoder's config (model.text_encoder=True)")
        return hash_tokenizer(trainer.models.text_config.vocab_size)
    from animatediff_jax.text import Tokenizer

    folder = config.data.tokenizer or trainer.models.tokenizer_path
    if not folder:
        raise ValueError("data.tokenizer: no CLIP tokenizer folder (set it, or 'hash' for toy runs)")
    return Tokenizer(folder)


def make_data(config, trainer: Trainer):
    """The grain pipeline of `config.data` for this process (its rows of every global batch)."""
    from animatediff_jax import data as data_lib

    d, t = config.data, config.train
    stage = trainer.stage
    n_frames = 1 if stage.single_frame else int(t.num_frames)
    clip = dict(n_frames=n_frames, stride=int(d.stride), size=int(t.resolution), is_image=stage.single_frame,
                flip=bool(d.flip), caption_dropout=float(d.caption_dropout), seed=int(d.seed))
    if d.source == "synthetic":
        source = data_lib.SyntheticVideoSource(int(d.synthetic_clips), n_frames=n_frames, size=int(t.resolution),
                                               seed=int(d.seed), caption_dropout=float(d.caption_dropout),
                                               is_image=stage.single_frame)
    elif d.source == "webvid":
        source = data_lib.WebVidSource(d.csv, d.video_folder, **clip)
    elif d.source == "tfds":
        source = data_lib.TFDSSource(d.tfds_name, d.tfds_split, data_dir=d.tfds_data_dir or None, **clip)
    elif d.source == "cache":
        source = data_lib.CachedLatentSource(d.cache_dir, caption_dropout=float(d.caption_dropout), seed=int(d.seed))
    else:
        raise ValueError(f"data.source {d.source!r}: expected webvid | tfds | cache | synthetic")
    tokenizer = make_tokenizer(config, trainer) if d.source != "cache" else None
    return data_lib.make_dataset(
        source, global_batch_size=trainer.global_batch, seed=int(d.seed), shuffle=bool(d.shuffle),
        worker_count=int(d.worker_count), worker_buffer_size=int(d.get("worker_buffer_size", 2)),
        read_threads=int(d.read_threads), prefetch=int(d.prefetch), pixels="uint8",  # scaled on the device
        tokenizer=tokenizer, max_skips_in_a_row=int(d.get("max_skips_in_a_row", 1000)))


def _sampler(config, trainer: Trainer, tokenizer: Callable | None = None, what: str = "validation samples"):
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
    pipe = AnimationPipeline(m.unet_config, m.vae_config, m.text_config,
                             {"unet": None, "vae": m.vae, "text_encoder": m.text_encoder}, tokenizer)

    def sample(trainer: Trainer, prompts: list[str], seeds: list[int]):
        unet = parallel.fetch(trainer.full_params())
        if jax.process_index() != 0:
            return None
        pipe.params["unet"] = unet
        return generate(pipe, prompts, None, seeds, num_frames=frames, height=size, width=size,
                        steps=int(lg.sample_steps), guidance_scale=float(lg.sample_guidance),
                        scheduler=lg.sample_scheduler, progress=False)

    return sample


def make_sample_hook(config, trainer: Trainer, tokenizer: Callable | None = None) -> ValidateFn:
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

    def validate(step: int, trainer: Trainer) -> dict[str, float] | None:
        res = sample(trainer, prompts, [int(lg.sample_seed) + i for i in range(len(prompts))])
        if res is None:
            return None
        for i, video in enumerate(res.frames):
            write_gif(os.path.join(folder, f"step_{step:07d}_{i}.gif"), video)
        return {"sample_s": res.timings["run_s"], "sample_compile_s": res.timings["compile_s"]}

    return validate


def make_eval_hook(config, trainer: Trainer, tokenizer: Callable | None = None, clip=None) -> ValidateFn:
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

    def evaluate(step: int, trainer: Trainer) -> dict[str, float] | None:
        t0 = time.perf_counter()
        res = sample(trainer, prompts, seeds)
        if res is None:
            return None
        result = clip_eval.evaluate_videos(clip, list(res.frames), prompts, text=text)
        out = {k: result["metrics"][k]["mean"] for k in ("text_alignment", "clip_score", "smoothness", "consistency")}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, "eval_s": time.perf_counter() - t0}

    return evaluate


def train(config, *, validate: ValidateFn | None = None, evaluate: ValidateFn | None = None) -> dict[str, float]:
    """The whole run of one stage from its config (what `animatediff-jax train` calls).

    Without a `validate` hook, one that writes sample GIFs is made when `log.validate_every`
    and `log.sample_prompts` are set; without an `evaluate` hook, one that logs CLIP metrics
    (`make_eval_hook`) when `log.eval_every` is set.
    """
    validate_config(config)
    compilation_cache.enable(config.get("compilation_cache", compilation_cache.AUTO),
                             os.path.join(config.workdir, "jax_cache"))
    p = config.parallel
    parallel.maybe_initialize_distributed(p.distributed, p.coordinator, int(p.num_processes), int(p.process_id))
    try:
        mesh = parallel.make_mesh(dict(p.mesh_shape))
    except ValueError as e:
        raise ConfigError(f"parallel.mesh_shape={dict(p.mesh_shape)}: {e}") from None
    rules = parallel.ShardingRules(tuple(p.batch_axes), p.fsdp_axis, int(p.min_fsdp_size))
    check_batch(config, rules.batch_size_divisor(mesh), jax.process_count())  # before the workdir exists
    trainer = build_trainer(config, mesh=mesh)
    if validate is None and config.log.validate_every and config.log.sample_prompts:
        validate = make_sample_hook(config, trainer)
    if evaluate is None and config.log.get("eval_every"):
        evaluate = make_eval_hook(config, trainer)
    _log(f"stage {trainer.stage.name}: {stages.count_params(trainer.state.params):,} trainable / "
         f"{stages.count_params(trainer.frozen):,} frozen params; mesh {dict(trainer.mesh.shape)}; "
         f"{jax.process_count()} process(es), {jax.device_count()} device(s)")
    pipeline = make_data(config, trainer)
    return run(trainer, config, iter(pipeline), validate=validate, evaluate=evaluate, skipped=lambda: pipeline.skipped)
