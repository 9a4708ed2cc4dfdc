"""The three AnimateDiff training stages (domain adapter, motion module, MotionLoRA), SPMD-sharded.

`stages` says what trains in each stage, `step` is the loss and the jitted step, `models` loads
(or, for `compile`, only shapes) the models, `program` lays the step out on a mesh, `trainer` places
the weights; `loop` is the outline of a run (with `inputs`, `metrics`, `hooks`, `preemption`,
`divergence`, `checkpointing`); `config.base_config()` holds every option.
"""

from animatediff_jax.training.config import (
    ConfigError,
    TrainingDiverged,
    TrainingError,
    base_config,
    check_config,
    validate_config,
)
from animatediff_jax.training.loop import Trainer, build_trainer, run, train
from animatediff_jax.training.models import Models, abstract_models, load_models
from animatediff_jax.training.program import TrainProgram, batch_shapes, make_program
from animatediff_jax.training.stages import STAGES, Stage, get_stage
from animatediff_jax.training.step import LossConfig, OptimConfig, StepSpec, TrainState, make_optimizer, make_train_step

__all__ = [
    "ConfigError",
    "STAGES",
    "TrainingDiverged",
    "TrainingError",
    "validate_config",
    "LossConfig",
    "Models",
    "TrainProgram",
    "abstract_models",
    "batch_shapes",
    "make_program",
    "OptimConfig",
    "Stage",
    "StepSpec",
    "TrainState",
    "Trainer",
    "base_config",
    "build_trainer",
    "check_config",
    "get_stage",
    "load_models",
    "make_optimizer",
    "make_train_step",
    "run",
    "train",
]
