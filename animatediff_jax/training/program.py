"""The abstract half of a trainer: what a stage's step computes, on which mesh, with which shapes and
shardings, and the jitted step itself, from a config and models that may be real arrays or only
`jax.ShapeDtypeStruct`s. `build_trainer` places real weights by it; `animatediff-jax compile train`
lowers the very same step from it for a TPU topology without a weight or a chip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from animatediff_jax import parallel
from animatediff_jax.dtypes import to_jnp
from animatediff_jax.executables import fingerprint
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import AutoencoderKL
from animatediff_jax.training import stages
from animatediff_jax.training.config import check_batch
from animatediff_jax.training.models import Models
from animatediff_jax.training.step import (
    OptimConfig,
    StepSpec,
    TrainState,
    init_state,
    jit_train_step,
    loss_and_optim,
    make_optimizer,
    state_shardings,
)

Params = dict[str, Any]


@dataclasses.dataclass
class TrainProgram:
    """A stage's step on a mesh: spec, optimizer, rules, and the abstract train state and frozen weights.

    `trainable` / `frozen` / `state` are `ShapeDtypeStruct` trees in the dtypes the step sees
    (trainable params and optimizer state float32, frozen weights `parallel.frozen_dtype`).
    """

    stage: stages.Stage
    spec: StepSpec
    optim: OptimConfig
    mesh: Mesh
    rules: parallel.ShardingRules
    global_batch: int
    trainable: Params
    frozen: Params
    state: TrainState
    state_sharding: TrainState
    frozen_sharding: Params
    fingerprint: str  # of the config fields that decide the program (`program_fields`)

    @property
    def executable_name(self) -> str:
        """The name `compile train --save` gives this step's executable (and `train` looks for)."""
        return f"train-{self.stage.name}"

    def batch_sharding(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return {k: NamedSharding(self.mesh, self.rules.batch_spec(self.mesh, np.ndim(v))) for k, v in batch.items()}

    def step(self, batch: Mapping[str, Any]) -> parallel.OnMesh:
        """The jitted step for batches with `batch`'s entries (traced under the mesh: see `parallel.OnMesh`)."""
        tx, schedule = make_optimizer(self.optim)
        return jit_train_step(self.spec, tx, schedule, self.mesh, self.rules, self.state_sharding,
                              self.frozen_sharding, self.batch_sharding(batch))

    def abstract_args(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[TrainState, Params, dict]:
        """`(state, frozen, batch)` as sharded `ShapeDtypeStruct`s: what `step(batch).lower` takes."""
        def spec(tree, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        return (spec(self.state, self.state_sharding), spec(self.frozen, self.frozen_sharding),
                spec(dict(batch), self.batch_sharding(batch)))


def make_program(config, models: Models, mesh: Mesh, stage: stages.Stage | None = None) -> TrainProgram:
    """The stage's program from the config and its models (arrays or `ShapeDtypeStruct`s). `stage`:
    the config's, when the caller has resolved it (`config.Validated`)."""
    stage = stages.get_stage(config.stage) if stage is None else stage
    p = config.parallel
    rules = parallel.ShardingRules(tuple(p.batch_axes), p.fsdp_axis, int(p.min_fsdp_size))
    global_batch = int(config.train.batch_size)
    check_batch(config, rules.batch_size_divisor(mesh))

    def split(unet, attached, trainable_init):
        key = jax.random.key(int(config.seed))
        return stages.init_stage(stage, unet, jax.random.split(key)[0], lora_rank=int(config.model.lora_rank),
                                 attached=attached, trainable_init=trainable_init)

    trainable, frozen_unet = jax.eval_shape(split, models.unet, models.attached, models.trainable_init)
    f32 = np.dtype(np.float32)
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, f32), trainable)
    frozen = models.frozen(frozen_unet)
    # frozen_dtype applies to the frozen weights only: the trainable tree and its optimizer state stay float32.
    frozen_dtype = np.dtype(to_jnp(p.frozen_dtype, "parallel.frozen_dtype"))
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), frozen_dtype), frozen)

    compute = to_jnp(p.compute_dtype, "parallel.compute_dtype")
    loss, optim = loss_and_optim(config)
    text, text_2 = models.text_modules()
    spec = StepSpec(
        stage=stage,
        unet=UNet3D(models.unet_config, dtype=compute, remat=p.remat, attention=p.get("attention", "auto")),
        loss=loss,
        vae=AutoencoderKL(models.vae_config, dtype=compute) if models.vae is not None else None,
        text=text,
        text_2=text_2,
        lora_scale=float(config.model.lora_scale),
        grad_accum_steps=int(config.train.grad_accum_steps),
    )
    tx, _ = make_optimizer(optim)
    state = jax.eval_shape(lambda t: init_state(t, tx, jax.random.key(0)), trainable)
    return TrainProgram(stage, spec, optim, mesh, rules, global_batch, trainable, frozen, state,
                        state_shardings(state, mesh, rules), parallel.param_shardings(frozen, mesh, rules),
                        fingerprint(program_fields(config, stage)))


def program_fields(config, stage: stages.Stage | None = None) -> dict[str, Any]:
    """The config fields the compiled step depends on (paths, logging and checkpointing do not; the
    seed does not either: it lives in the train state)."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = {"model": ("pretrained", "size", "motion_version", "motion_norm_per_frame", "lora_rank", "lora_scale", "vae",
                      "text_encoder"),
            "train": ("batch_size", "num_frames", "resolution", "grad_accum_steps"),
            "optim": None, "loss": None,
            "parallel": ("mesh_shape", "batch_axes", "fsdp_axis", "min_fsdp_size", "compute_dtype", "frozen_dtype",
                         "remat", "attention"),
            "data": ("source",)}
    out: dict[str, Any] = {"stage": (stage or stages.get_stage(c["stage"])).name}
    for group, names in keep.items():
        g = c.get(group, {})
        out[group] = {k: g.get(k) for k in (names or sorted(g))}
    out["model"]["pretrained"] = bool(out["model"]["pretrained"])
    if out["model"]["motion_norm_per_frame"] is None:  # (unset: the release's own, as the step builds it)
        from animatediff_jax.models.config import MotionConfig

        out["model"]["motion_norm_per_frame"] = MotionConfig.for_version(c["model"]["motion_version"]).norm_per_frame
    return out



def batch_shapes(config, program: TrainProgram, models: Models, latent_dtype: Any = np.float32
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the data pipeline of `config.data` feeds the step, as `ShapeDtypeStruct`s.

    `data.source="cache"`: VAE latents (`latent_dtype`, as `prepare --latent-dtype` wrote them) and
    text contexts; otherwise uint8 pixels and token ids, encoded inside the step.
    """
    t = config.train
    b = program.global_batch
    frames = 1 if program.stage.single_frame else int(t.num_frames)
    size = int(t.resolution)
    if config.data.source == "cache":
        down = models.vae_config.downscale if models.vae_config is not None else 8
        text = models.text_config
        length, width = (text.max_positions, text.hidden_size) if text is not None else (
            77, models.unet_config.cross_attention_dim)
        return {"latents": jax.ShapeDtypeStruct((b, frames, size // down, size // down,
                                                 models.unet_config.in_channels), np.dtype(latent_dtype)),
                "context": jax.ShapeDtypeStruct((b, length, width), np.dtype(np.float32))}
    length = models.text_config.max_positions if models.text_config is not None else 77
    ids = (b, 2, length) if models.family == "sdxl" else (b, length)  # (SDXL: both tokenizers' ids)
    return {"video": jax.ShapeDtypeStruct((b, frames, size, size, 3), np.dtype(np.uint8)),
            "input_ids": jax.ShapeDtypeStruct(ids, np.dtype(np.int32))}
