"""The train step: diffusion loss on (online- or pre-) encoded clips, AdamW on the trainable tree only.

`make_train_step` returns a pure `(state, frozen, batch) -> (state, metrics)`; `jit_train_step`
compiles it for a mesh with the shardings of `parallel` and donates the train state. The step
draws every random number from `state.rng` (one split per step, then one key per clip of the
global batch), so a run is a deterministic function of the seed and the data, whatever the
mesh, the number of hosts or the gradient accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from animatediff_jax import parallel
from animatediff_jax.data.webvid import pixels_to_float
from animatediff_jax.models.unet import AddedCond
from animatediff_jax.models.vae import AutoencoderKL, encode_video
from animatediff_jax.schedulers import add_noise, make_alphas_cumprod, velocity
from animatediff_jax.training.stages import Stage, apply_unet

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]

# Batch entries the step reads; anything else (caption strings, ids of clips) stays on the host.
# `time_ids` (SDXL, optional): each clip's own size/crop ids, else those of its pixel size.
BATCH_KEYS = ("latents", "video", "context", "input_ids", "time_ids")


def select_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries the step uses: cached `latents` over `video`, cached `context` over `input_ids`."""
    out = {}
    for pair in (("latents", "video"), ("context", "input_ids")):
        for k in pair:
            if k in batch:
                out[k] = batch[k]
                break
    if "time_ids" in batch:
        out["time_ids"] = batch["time_ids"]
    return out


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the frozen weights and the data position.

    `rng` holds raw `uint32` key data (not a typed key) so checkpoints store it as a plain array.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


def init_state(params: Params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """Step 0 with fresh optimizer state; `key` is a typed PRNG key (`jax.random.key(seed)`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(key),
    )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AnimateDiff's defaults: AdamW lr 1e-4, betas (0.9, 0.999), wd 1e-2, eps 1e-8, clip 1.0, constant lr."""

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    warmup_steps: int = 0


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW (decoupled decay, as torch's AdamW); constant lr after warm-up."""
    if cfg.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    else:
        schedule = optax.constant_schedule(cfg.learning_rate)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """DDPM training objective. `min_snr_gamma` > 0 turns on min-SNR-gamma weighting (Hang et al. 2023)."""

    prediction_type: str = "epsilon"  # or "v_prediction"
    min_snr_gamma: float = 0.0
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"


def loss_and_optim(config) -> tuple[LossConfig, OptimConfig]:
    """The loss and optimizer a training config asks for (`config.loss`, `config.optim`): the one
    reading of those fields, for the stages' program and the toy base model alike."""
    o, ls = config.optim, config.loss
    loss = LossConfig(str(ls.prediction_type), float(ls.min_snr_gamma), int(ls.num_train_timesteps),
                      float(ls.beta_start), float(ls.beta_end), str(ls.beta_schedule))
    optim = OptimConfig(float(o.learning_rate), float(o.b1), float(o.b2), float(o.eps), float(o.weight_decay),
                        float(o.grad_clip), int(o.warmup_steps))
    return loss, optim


def diffusion_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
                   alphas_cumprod: jax.Array, cfg: LossConfig) -> jax.Array:
    """Mean over clips of the (optionally SNR-weighted) per-clip MSE to the epsilon / v target."""
    if cfg.prediction_type == "epsilon":
        target = noise
    elif cfg.prediction_type == "v_prediction":
        target = velocity(alphas_cumprod, x0, noise, t)
    else:
        raise ValueError(f"prediction_type {cfg.prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    per_clip = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
    if cfg.min_snr_gamma > 0:
        ac = alphas_cumprod[t]
        snr = ac / (1.0 - ac)
        w = jnp.minimum(snr, cfg.min_snr_gamma)
        per_clip = per_clip * (w / snr if cfg.prediction_type == "epsilon" else w / (snr + 1.0))
    return jnp.mean(per_clip)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the step computes (static under jit).

    `unet` carries the compute dtype (bf16 for training at scale; trainable params stay fp32).
    `vae` / `text` are needed only when batches hold pixels (`video`) / token ids (`input_ids`)
    instead of cached `latents` / `context`. Caption dropout (CFG) is the data pipeline's: a
    dropped caption arrives as the empty prompt's ids or cached context.

    `text_2` (SDXL's second tower) makes it SDXL's step: `input_ids` `[b, 2, L]` hold both
    tokenizers' ids; the context is both towers' penultimate hidden states side by side, and the
    UNet's added conditioning is the second's pooled output with each clip's time ids (as
    diffusers' `train_text_to_image_sdxl.py`; a dropped caption is the encoded "", not zeros).
    """

    stage: Stage
    unet: nn.Module
    loss: LossConfig = LossConfig()
    vae: AutoencoderKL | None = None
    text: nn.Module | None = None
    text_2: nn.Module | None = None
    lora_scale: float = 1.0
    grad_accum_steps: int = 1
    vae_sample_posterior: bool = True


def sdxl_time_ids(height: int, width: int, batch: int) -> jax.Array:
    """SDXL's micro-conditioning `[b, 6]` for a whole clip at its own size: original size = target size
    = (height, width), crop corner (0, 0) -- what AnimateDiff-SDXL samples with, so the motion modules
    train under the conditioning they run under (the data pipeline's centre crop is not reported)."""
    return jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (batch, 1))


def _sdxl_text(spec: StepSpec, frozen: Params, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[b, 2, L]` ids of both tokenizers -> (context `[b, L, D1 + D2]`, pooled text `[b, P]`)."""
    hidden, _ = spec.text.apply({"params": frozen["text_encoder"]}, ids[:, 0])
    hidden_2, pooled = spec.text_2.apply({"params": frozen["text_encoder_2"]}, ids[:, 1])
    return jnp.concatenate([hidden, hidden_2], axis=-1), pooled


def _latents_and_context(spec: StepSpec, frozen: Params, batch: Batch, keys: jax.Array
                         ) -> tuple[jax.Array, jax.Array, AddedCond | None]:
    """Scaled latents `[b, F, h, w, 4]`, text context `[b, L, D]` and (SDXL) the added conditioning,
    encoding pixels / ids if needed."""
    if "latents" in batch:
        latents = batch["latents"].astype(jnp.float32)
    elif "video" in batch:
        if spec.vae is None:
            raise ValueError("batch holds pixels ('video') but no VAE was given to encode them")
        # (each clip's posterior sample from its own key)
        video = pixels_to_float(batch["video"])  # uint8 from the pipeline -> [-1, 1], exactly as on the host
        latents = encode_video(spec.vae, frozen["vae"], video, keys if spec.vae_sample_posterior else None)
    else:
        raise ValueError(f"batch needs 'latents' or 'video', has {sorted(batch)}")
    added = None
    if spec.text_2 is not None:  # SDXL
        if "input_ids" not in batch:
            raise ValueError(f"an SDXL step needs 'input_ids' (both tokenizers' ids), has {sorted(batch)}")
        context, pooled = _sdxl_text(spec, frozen, batch["input_ids"])
        if "time_ids" in batch:
            time_ids = batch["time_ids"].astype(jnp.float32)
        elif "video" in batch:
            time_ids = sdxl_time_ids(batch["video"].shape[2], batch["video"].shape[3], pooled.shape[0])
        else:
            raise ValueError("an SDXL batch of latents needs 'time_ids' (the clips' sizes)")
        added = jax.lax.stop_gradient(AddedCond(pooled.astype(jnp.float32), time_ids))
    elif "context" in batch:
        context = batch["context"]
    elif "input_ids" in batch:
        if spec.text is None:
            raise ValueError("batch holds token ids but no text encoder was given")
        context = spec.text.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
    else:
        raise ValueError(f"batch needs 'context' or 'input_ids', has {sorted(batch)}")
    return (jax.lax.stop_gradient(latents.astype(jnp.float32)), jax.lax.stop_gradient(context.astype(jnp.float32)),
            added)


def _gathering(gather: tuple[Mesh, parallel.ShardingRules] | None):
    return parallel.gather_per_layer(*gather) if gather is not None else contextlib.nullcontext()


def make_loss_fn(spec: StepSpec, gather: tuple[Mesh, parallel.ShardingRules] | None = None
                 ) -> Callable[[Params, Params, Batch, jax.Array, jax.Array], jax.Array]:
    """`loss(trainable, frozen, batch, key, rows)`: the scalar the step differentiates (w.r.t. `trainable`).

    Every random draw of clip `i` (posterior sample, timestep, noise) comes from
    `fold_in(key, rows[i])`, `rows` being the clips' indices in the global batch: the loss is
    the same however the batch is cut into micro-batches or spread over devices and hosts.

    `gather` (`(mesh, rules)` of FSDP-sharded params): FSDP per layer. The models run inside
    `parallel.gather_per_layer(gather)`: each layer all-gathers its own (FSDP-sharded) weights,
    cast to the compute dtype, where it is called (a LoRA's factors likewise), and the gradients
    of trainable weights are summed back onto their shards (XLA's reduce-scatter where the backend
    forms one; in the dtype of the weight-gradient matmul, as before). No step holds the whole
    gathered params tree: with per-block remat (`parallel.remat`) a gathered weight lives only
    inside its block and the backward pass gathers it again; without remat XLA keeps the forward
    gathers alive for the backward. Activations stay split by batch only.
    """
    acp = np.asarray(make_alphas_cumprod(spec.loss.num_train_timesteps, spec.loss.beta_start,
                                         spec.loss.beta_end, spec.loss.beta_schedule))
    n_t = spec.loss.num_train_timesteps
    factor_gather = None if gather is None else (
        lambda x: jax.lax.with_sharding_constraint(x, parallel.replicated(gather[0])))

    def unet_apply(trainable, frozen_unet, x, t, ctx, added):  # rematerialisation, if any, is per block inside the UNet
        kwargs = {} if added is None else {"added_cond": added}
        return apply_unet(spec.stage, spec.unet, trainable, frozen_unet, spec.lora_scale, x, t, ctx,
                          layers=lambda: _gathering(gather), gather=factor_gather, **kwargs)

    def loss_fn(trainable, frozen, batch, key, rows):
        keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(key, r), 3))(rows)
        with _gathering(gather):
            latents, context, added = _latents_and_context(spec, frozen, batch, keys[:, 0])
        b, f = latents.shape[:2]
        noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(keys[:, 1])
        # One timestep per clip; for the image objective (stage 1) one per frame.
        t_shape = (f,) if spec.stage.single_frame else ()
        t = jax.vmap(lambda k: jax.random.randint(k, t_shape, 0, n_t))(keys[:, 2])
        if spec.stage.single_frame:
            # Every frame is its own image example, with its clip's caption (no-op for F = 1).
            latents, noise = (x.reshape((b * f, 1) + x.shape[2:]) for x in (latents, noise))
            t = t.reshape(b * f)
            context = jnp.repeat(context, f, axis=0)
            added = None if added is None else jax.tree.map(lambda x: jnp.repeat(x, f, axis=0), added)
        noisy = add_noise(acp, latents, noise, t)
        pred = unet_apply(trainable, frozen["unet"], noisy, t, context, added)
        return diffusion_loss(pred, latents, noise, t, acp, spec.loss)

    return loss_fn


def tree_all_finite(tree) -> jax.Array:
    """Scalar bool: every element of every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _global_norm(tree) -> jax.Array:
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.4; global_norm is deprecated
    return norm(tree) if norm is not None else optax.global_norm(tree)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] with micro-batch k = rows k, k+n, k+2n, ...

    Interleaving keeps each device's rows on that device (a batch-sharded leading axis stays
    sharded along B/n), so accumulation moves no data between devices.
    """
    b = x.shape[0]
    if b % n:
        raise ValueError(f"batch of {b} is not divisible by grad_accum_steps={n}")
    return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)


def make_train_step(
    spec: StepSpec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch_sharding: Callable[[int], NamedSharding] | None = None,
    gather: tuple[Mesh, parallel.ShardingRules] | None = None,
) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step. `batch_sharding(ndim)` pins per-clip arrays (micro-batches, clip
    indices) to the batch sharding, so per-clip work stays on the clip's device; `gather`: see
    `make_loss_fn`."""
    loss_fn = make_loss_fn(spec, gather)
    grad_fn = jax.value_and_grad(loss_fn)
    n_acc = int(spec.grad_accum_steps)

    def step_fn(state: TrainState, frozen: Params, batch: Batch):
        batch = select_batch(batch)
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        rows = jnp.arange(next(iter(batch.values())).shape[0], dtype=jnp.int32)
        if batch_sharding is not None:
            rows = jax.lax.with_sharding_constraint(rows, batch_sharding(1))
        if n_acc <= 1:
            loss, grads = grad_fn(state.params, frozen, batch, key, rows)
        else:
            micro = {k: _split_micro(v, n_acc) for k, v in batch.items()}

            def body(carry, xs):
                mb, mrows = xs
                if batch_sharding is not None:
                    mb = {k: jax.lax.with_sharding_constraint(v, batch_sharding(v.ndim)) for k, v in mb.items()}
                loss, g = grad_fn(state.params, frozen, mb, key, mrows)
                acc_loss, acc_g = carry
                return (acc_loss + loss, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (jnp.zeros((), jnp.float32), zeros)
            (loss, grads), _ = jax.lax.scan(body, init, (micro, _split_micro(rows, n_acc)))
            loss, grads = loss / n_acc, jax.tree.map(lambda g: g / n_acc, grads)
        grad_norm = _global_norm(grads)
        # A non-finite loss or gradient (any NaN/inf element makes the norm non-finite) skips the
        # step: params and optimizer state stay those before it; the step count and RNG still
        # advance (the data moved on), so a resumed run stays bit-exact. `finite` is two scalars
        # known before the update, so the select fuses into the update (no extra copy of the
        # state). The host reads `nonfinite` with the other metrics when it logs (no extra sync).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
        return new, metrics

    return step_fn


def state_shardings(state_shapes: TrainState, mesh: Mesh, rules: parallel.ShardingRules) -> TrainState:
    """FSDP shardings for the trainable params and optimizer state; step and RNG replicated."""
    return TrainState(
        step=parallel.replicated(mesh),
        params=parallel.param_shardings(state_shapes.params, mesh, rules),
        opt_state=parallel.param_shardings(state_shapes.opt_state, mesh, rules),
        rng=parallel.replicated(mesh),
    )


def jit_train_step(
    spec: StepSpec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    rules: parallel.ShardingRules,
    state_sharding: TrainState,
    frozen_sharding: Params,
    batch_sharding: Mapping[str, NamedSharding],
):
    """`jax.jit` of the step with explicit in/out shardings, traced under `mesh` (so splash attention
    gets its `shard_map`: `parallel.OnMesh`); the train state is donated.

    Batches passed to the result must hold exactly the keys of `batch_sharding`.
    """
    def sharding(ndim: int) -> NamedSharding:
        return NamedSharding(mesh, rules.batch_spec(mesh, ndim))

    # FSDP per layer (see `make_loss_fn`) when params are sharded; on a pure data-parallel mesh they
    # are replicated already and nothing needs gathering.
    gather = (mesh, rules) if mesh.shape.get(rules.fsdp_axis, 1) > 1 else None
    return parallel.jit_on_mesh(
        make_train_step(spec, tx, schedule, sharding, gather), mesh,
        in_shardings=(state_sharding, frozen_sharding, dict(batch_sharding)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
