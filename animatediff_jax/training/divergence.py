"""A diverging run: stop it with a message that says what to change, and never write its NaNs.

The step skips a non-finite update itself (`step.make_train_step`); here the run counts those
steps in a row (`NonfiniteStreak`, `train.max_nonfinite_steps`) and refuses a checkpoint or an
export of params that are not finite (`check_finite`).
"""

from __future__ import annotations

from typing import Any

import jax

from animatediff_jax import parallel
from animatediff_jax.training.config import TrainingDiverged, TrainingError
from animatediff_jax.training.step import tree_all_finite


class NonfiniteStreak:
    """Non-finite steps in a row, fed the flags of each log (`metrics.Progress.log`);
    `train.max_nonfinite_steps` of them raise `TrainingDiverged` (0: never)."""

    def __init__(self, config, last_checkpoint: int | None):
        self.config = config
        self.limit = int(config.train.get("max_nonfinite_steps", 10))
        self.last_checkpoint = last_checkpoint  # named in the message: where a rerun resumes
        self.run = 0

    def update(self, step: int, flags: list[int]) -> None:
        for f in flags:
            self.run = self.run + 1 if f else 0
        if self.limit > 0 and self.run >= self.limit:
            raise TrainingDiverged(self.message(step))

    def message(self, step: int) -> str:
        lr = float(self.config.optim.learning_rate)
        where = (f"the last checkpoint (step {self.last_checkpoint})" if self.last_checkpoint is not None
                 else "no checkpoint (none was saved)")
        return (f"training diverged at step {step}: {self.run} steps in a row had a non-finite loss or gradients "
                f"(train.max_nonfinite_steps={int(self.config.train.max_nonfinite_steps)}; they were skipped, the "
                f"params are finite); lower optim.learning_rate (now {lr:g}) or raise optim.warmup_steps, then rerun: "
                f"it resumes from {where}")


_all_finite = jax.jit(lambda params, opt_state: tree_all_finite((params, opt_state)))


def check_finite(state: Any, what: str) -> None:
    """Refuses to write `what` if the train state's params or optimizer state hold NaN/inf (one host sync)."""
    if not bool(parallel.fetch(_all_finite(state.params, state.opt_state))):
        step = int(parallel.fetch(state.step))
        raise TrainingError(f"refusing to write {what}: the params or optimizer state at step {step} are not "
                            f"finite (NaN/inf); lower optim.learning_rate and rerun", exit_code=3)
