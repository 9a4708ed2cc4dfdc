"""The training run, phase by phase: what `animatediff-jax train` does, read top to bottom.

    train(config)                              # config, models, trainer, data -> run
    run(trainer, config, data_iterator)        # resume, the loop, final save

The machinery of each phase has its own module: `trainer` (the weights on the mesh), `inputs`
(the data pipeline), `metrics` (console, `workdir/metrics.jsonl`, TensorBoard), `preemption`
(SIGTERM / SIGINT), `divergence` (non-finite steps), `hooks` (validation samples, CLIP metrics),
`checkpointing`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

from animatediff_jax import compilation_cache, parallel
from animatediff_jax.io import fs
from animatediff_jax.training import checkpointing
from animatediff_jax.training.config import Validated, validate_config
from animatediff_jax.training.divergence import NonfiniteStreak, check_finite
from animatediff_jax.training.hooks import ValidateFn, make_eval_hook, make_sample_hook, run_hooks
from animatediff_jax.training.inputs import hash_tokenizer, make_data, make_tokenizer, next_batch
from animatediff_jax.training.metrics import MetricsWriter, Progress, format_progress, log
from animatediff_jax.training.models import load_models
from animatediff_jax.training.preemption import StopRequest
from animatediff_jax.training.trainer import Trainer, build_trainer, train_mesh

__all__ = [  # the outline, and the names callers have imported from here
    "MetricsWriter", "StopRequest", "Trainer", "ValidateFn", "build_trainer", "format_progress", "hash_tokenizer",
    "make_data", "make_eval_hook", "make_sample_hook", "make_tokenizer", "run", "run_hooks", "train",
]


def train(config, *, validate: ValidateFn | None = None, evaluate: ValidateFn | None = None) -> dict[str, float]:
    """The whole run of one stage from its config (what `animatediff-jax train` calls). `config`: a
    `ConfigDict`, or the `Validated` one `validate_config` returned (then it is not checked again).

    Without a `validate` hook, one that writes sample GIFs is made when `log.validate_every`
    and `log.sample_prompts` are set; without an `evaluate` hook, one that logs CLIP metrics
    (`make_eval_hook`) when `log.eval_every` is set.
    """
    # ---- config: validated once, here (nothing after checks it again); the devices' mesh ----
    checked = config if isinstance(config, Validated) else validate_config(config)
    config = checked.config
    compilation_cache.enable(config.get("compilation_cache", compilation_cache.AUTO),
                             os.path.join(config.workdir, "jax_cache"))
    p = config.parallel
    parallel.maybe_initialize_distributed(p.distributed, p.coordinator, int(p.num_processes), int(p.process_id))
    mesh = train_mesh(config)

    # ---- models ----
    models = load_models(config, checked.stage)

    # ---- trainer: the step's program on the mesh (it checks the batch), the weights placed; hooks ----
    trainer = build_trainer(checked, models, mesh)
    if validate is None and config.log.validate_every and config.log.sample_prompts:
        validate = make_sample_hook(config, trainer)
    if evaluate is None and config.log.get("eval_every"):
        evaluate = make_eval_hook(config, trainer)
    log(trainer.describe())

    # ---- data ----
    pipeline = make_data(config, trainer)

    # ---- resume, the loop, final save ----
    return run(trainer, config, iter(pipeline), validate=validate, evaluate=evaluate, skipped=lambda: pipeline.skipped)


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
    workdir, ck = config.workdir, config.checkpoint
    config_dict = config.to_dict() if hasattr(config, "to_dict") else None

    # ---- resume ----
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), ck.every, ck.keep, ck.async_save)
    if resume:
        _resume(trainer, ckpt, data, config_dict)
    start = trainer.current_step
    end = int(config.train.steps) if num_steps is None else start + int(num_steps)

    # ---- the loop ----
    every = max(1, int(config.log.every))
    progress = Progress(MetricsWriter(workdir, config.log.tensorboard, start=start), trainer.global_batch, start, end,
                        skipped)
    streak = NonfiniteStreak(config, ckpt.latest_step())
    export_path = os.path.join(workdir, trainer.stage.export)
    stop = StopRequest()
    try:
        stop.install()
        for step in range(start + 1, end + 1):
            progress.add(step, trainer.train_step(trainer.put_batch(next_batch(data, config))))
            data_state = data.get_state() if hasattr(data, "get_state") else None
            if step % every == 0 or step == end:
                streak.update(step, progress.log(step))
            stopping = stop.agreed(at_log_step=step % every == 0)
            if stopping:
                progress.log(step)  # the steps since the last log, before leaving
            if ckpt.should_save(step, force=step == end or stopping) and _save(ckpt, trainer, step, data_state,
                                                                               config_dict):
                streak.last_checkpoint = step
            if stopping and step < end:
                ckpt.wait()
                log(f"stopped by {stop.name} at step {step}/{end}, checkpoint saved; "
                    f"resume with the same command: workdir {fs.abspath(workdir)}, step {step}")
                return progress.last
            if ck.export_every and step % ck.export_every == 0 and step != end:
                _export(trainer, export_path, f"an export at step {step}")
            run_hooks(progress.writer, config, step, trainer, validate, evaluate)

        # ---- final save ----
        if end > start:
            _export(trainer, export_path, "the export")
            log(f"exported {trainer.stage.name} params to {export_path}")
    finally:
        stop.uninstall()
        ckpt.close()
        progress.writer.close()
    return progress.last


def _resume(trainer: Trainer, ckpt: checkpointing.Checkpointer, data, config_dict: dict | None) -> None:
    """The latest intact checkpoint (if any) into `trainer.state`, and the data position into `data`."""
    restored = ckpt.restore(trainer.state, config=config_dict)
    if restored is None:
        return
    trainer.state, data_state = restored
    if data_state is not None and hasattr(data, "set_state"):
        data.set_state(data_state)
    log(f"resumed from step {trainer.current_step}")


def _save(ckpt: checkpointing.Checkpointer, trainer: Trainer, step: int, data_state, config_dict) -> bool:
    """A checkpoint at `step` (finite params only); whether one was written."""
    check_finite(trainer.state, f"a checkpoint at step {step}")
    if not ckpt.save(step, trainer.state, data_state, config_dict, force=True):
        return False
    log(f"checkpoint at step {step}")
    return True


def _export(trainer: Trainer, path: str, what: str) -> None:
    """The trained params (finite only) as the stage's export file, with `Trainer.export_meta`."""
    check_finite(trainer.state, what)
    checkpointing.export_trainable(path, trainer.state.params, trainer.export_meta())
