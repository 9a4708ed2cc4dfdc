"""A `TrainProgram` with real weights on its mesh: what the loop steps, checkpoints and exports.

    trainer = build_trainer(config)            # loads / initialises models, mesh, sharded state
    trainer.train_step(trainer.put_batch(rows))

The program (shapes, shardings, the jitted step) is `training.program`'s, the models
`training.models`'; this module places the weights as the program says.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from animatediff_jax import executables, parallel
from animatediff_jax import lora as lora_lib
from animatediff_jax.training import stages
from animatediff_jax.training.config import ConfigError, Validated, check_config, check_processes, check_stage
from animatediff_jax.training.metrics import log
from animatediff_jax.training.models import Models, load_models
from animatediff_jax.training.program import TrainProgram, make_program
from animatediff_jax.training.step import TrainState, init_state, make_optimizer, select_batch

Params = dict[str, Any]


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
                log(f"loaded the compiled step from {self.executables}" if step is not None
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

    @property
    def current_step(self) -> int:
        """The train state's step count (a host sync)."""
        return int(parallel.fetch(self.state.step))

    def full_params(self) -> Params:
        """The UNet params the stage trains (frozen + trained), e.g. for validation samples."""
        return stages.combine(self.stage, self.state.params, self.frozen["unet"], self.spec.lora_scale)

    def export_meta(self) -> dict[str, Any]:
        """What `checkpoints.load` reads: kind (motion_module | domain_adapter | motion_lora), UNet config."""
        meta = {"stage": self.stage.name, "kind": self.stage.name, "step": self.current_step,
                "unet_config": self.models.unet_config}
        if self.stage.kind == "lora":
            layers = lora_lib.lora_layers(self.state.params)
            meta.update(rank=lora_lib.lora_rank(next(iter(layers.values()))), scale=self.spec.lora_scale)
        return meta

    def describe(self) -> str:
        return (f"stage {self.stage.name}: {stages.count_params(self.state.params):,} trainable / "
                f"{stages.count_params(self.frozen):,} frozen params; mesh {dict(self.mesh.shape)}; "
                f"{jax.process_count()} process(es), {jax.device_count()} device(s)")


def train_mesh(config) -> Mesh:
    """`parallel.mesh_shape` over this job's devices; a shape that does not fit them is a `ConfigError`."""
    shape = dict(config.parallel.mesh_shape)
    try:
        return parallel.make_mesh(shape)
    except ValueError as e:
        raise ConfigError(f"parallel.mesh_shape={shape}: {e}") from None


def build_trainer(config, models: Models | None = None, mesh: Mesh | None = None) -> Trainer:
    """Models (loaded from the config unless given), mesh, sharded state and frozen weights: the
    config's `TrainProgram` with real weights placed as it says.

    `config`: a `Validated` one (from `validate_config`: nothing is checked again) or a bare
    `ConfigDict` (its choice fields and stage are checked here, before anything loads)."""
    checked = config if isinstance(config, Validated) else Validated(check_config(config), check_stage(config))
    config = checked.config
    models = load_models(config, checked.stage) if models is None else models
    mesh = train_mesh(config) if mesh is None else mesh
    program = make_program(config, models, mesh, checked.stage)  # checks the batch against the mesh
    check_processes(config, jax.process_count())

    k_init, k_train = jax.random.split(jax.random.key(int(config.seed)))
    trainable, frozen_unet = stages.init_stage(
        program.stage, models.unet, k_init, lora_rank=int(config.model.lora_rank), attached=models.attached,
        trainable_init=models.trainable_init)
    frozen = models.frozen(frozen_unet)
    # In the program's dtypes: trainable float32, frozen `parallel.frozen_dtype`.
    trainable = jax.tree.map(lambda x, s: np.asarray(x).astype(s.dtype), trainable, program.trainable)
    frozen = jax.tree.map(lambda x, s: np.asarray(x).astype(s.dtype), frozen, program.frozen)
    tx, _ = make_optimizer(program.optim)
    params = parallel.put_global(trainable, program.state_sharding.params)
    # The optimizer state is created on the mesh directly (never materialised on one device).
    state = jax.jit(lambda t: init_state(t, tx, k_train), out_shardings=program.state_sharding)(params)
    frozen = parallel.put_global(frozen, program.frozen_sharding)
    return Trainer(program, models, state, frozen, str(config.get("executables", "")))
