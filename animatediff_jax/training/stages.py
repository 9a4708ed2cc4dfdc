"""The three AnimateDiff training stages, as data: what trains, what is frozen, what is attached.

A stage never copies the frozen base into the optimizer: `init_stage` splits the UNet params into
a small *trainable* tree (a LoRA, or the motion-module subtrees) and a *frozen* tree (everything
else, with the stage's attached adapters already merged), and `apply_unet` runs the UNet on the
two inside the loss: the motion-module subtrees are put back into the tree; a trained LoRA is
applied unmerged at run time (`lora.at_runtime`), so its small delta is never rounded into a bf16
base kernel. `combine` (merged) builds the full params for sampling and export. Only the
trainable tree gets gradients and optimizer state.

1. `domain_adapter`: LoRA on the spatial self/cross attention (q/k/v/out) of the image UNet,
   trained on single frames, so the adapter absorbs the look of video frames (v3's domain adapter).
2. `motion_module`: the motion modules train; the base is frozen with the domain adapter merged
   at its scale (if one is given).
3. `motion_lora`: LoRA on the motion modules' temporal attention, on top of frozen motion modules
   (and, if given, the domain adapter).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Literal, Mapping

import jax
import jax.numpy as jnp

from animatediff_jax import lora as lora_lib
from animatediff_jax.models.shapes import is_motion_path

Params = dict[str, Any]
Path = tuple[str, ...]
PathFilter = Callable[[Path], bool]

is_motion_module = is_motion_path  # the older name (bench/train_bench.py): the same function


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    `kind`: "lora" (a fresh LoRA on the kernels `targets` selects) or "subtree" (the params whose
    path `targets` selects train as they are). `motion_modules`: the UNet has motion modules.
    `single_frame`: clips are cut into single frames (image objective). `attach`: names of
    pretrained adapters (config `model.<name>` / `model.<name>_scale`) merged into the frozen base.
    `export`: file name of the trained params (read by the next stage and the sampler).
    """

    name: str
    kind: Literal["lora", "subtree"]
    targets: PathFilter
    motion_modules: bool
    single_frame: bool
    attach: tuple[str, ...]
    export: str


STAGES: dict[str, Stage] = {
    "domain_adapter": Stage(
        name="domain_adapter",
        kind="lora",
        targets=lora_lib.domain_adapter_targets,
        motion_modules=False,
        single_frame=True,
        attach=(),
        export="domain_adapter.safetensors",
    ),
    "motion_module": Stage(
        name="motion_module",
        kind="subtree",
        targets=is_motion_path,
        motion_modules=True,
        single_frame=False,
        attach=("domain_adapter",),
        export="motion_module.safetensors",
    ),
    "motion_lora": Stage(
        name="motion_lora",
        kind="lora",
        targets=lora_lib.motion_lora_targets,
        motion_modules=True,
        single_frame=False,
        attach=("domain_adapter",),
        export="motion_lora.safetensors",
    ),
}
_ALIASES = {"1": "domain_adapter", "2": "motion_module", "3": "motion_lora",
            "stage1": "domain_adapter", "stage2": "motion_module", "stage3": "motion_lora"}


def get_stage(name: str) -> Stage:
    key = _ALIASES.get(str(name), str(name))
    if key not in STAGES:
        raise ValueError(f"unknown training stage {name!r}: expected one of {sorted(STAGES)} (or 1/2/3)")
    return STAGES[key]


# ------------------------------------------------------------------------- tree surgery


def partition(params: Mapping[str, Any], keep: PathFilter, prefix: Path = ()) -> tuple[Params, Params]:
    """`(selected, rest)`: two partial trees of `params`, split by the path of each leaf."""
    sel: Params = {}
    rest: Params = {}
    for k, v in params.items():
        path = prefix + (k,)
        if isinstance(v, Mapping):
            a, b = partition(v, keep, path)
            if a:
                sel[k] = a
            if b:
                rest[k] = b
        elif keep(path):
            sel[k] = v
        else:
            rest[k] = v
    return sel, rest


def union(a: Mapping[str, Any], b: Mapping[str, Any]) -> Params:
    """The deep union of two partial trees that share no leaf (the inverse of `partition`)."""
    out: Params = dict(a)
    for k, v in b.items():
        if k in out:
            if not (isinstance(out[k], Mapping) and isinstance(v, Mapping)):
                raise ValueError(f"trees overlap at {k!r}")
            out[k] = union(out[k], v)
        else:
            out[k] = v
    return out


def combine(stage: Stage, trainable: Params, frozen: Params, lora_scale: Any = 1.0) -> Params:
    """The full UNet params (sampling, export): frozen + trainable (LoRA merged, or the subtrees put back).

    A LoRA is merged in float32; the adapted kernels keep that precision when the frozen base is
    stored in a narrower dtype (merging into bf16 would round the delta away).
    """
    if stage.kind == "lora":
        wide = {path: None for path in lora_lib.lora_layers(trainable)}
        frozen = _upcast_kernels(frozen, wide)
        return lora_lib.merge(frozen, trainable, lora_scale)
    return union(frozen, trainable)


def _upcast_kernels(params: Mapping[str, Any], paths: Mapping[Path, Any], prefix: Path = ()) -> Params:
    """`params` with the kernel under each of `paths` in float32 (at least); the rest untouched."""
    out: Params = {}
    for k, v in params.items():
        path = prefix + (k,)
        if isinstance(v, Mapping):
            out[k] = _upcast_kernels(v, paths, path)
        elif k == "kernel" and prefix in paths:
            out[k] = jnp.asarray(v, jnp.promote_types(v.dtype, jnp.float32))
        else:
            out[k] = v
    return out


def apply_unet(stage: Stage, unet: Any, trainable: Params, frozen: Params, lora_scale: Any, *args,
               layers: Callable[[], ContextManager] = contextlib.nullcontext,
               gather: Callable[[jax.Array], jax.Array] | None = None, **kwargs):
    """`unet.apply` with the stage's params: the subtrees put back into the frozen tree, or the
    frozen base run as stored with the LoRA added unmerged at run time (`lora.at_runtime`, float32
    low-rank term). In float32 both equal applying `combine(...)`.

    `layers`: a context entered around the apply, inside the LoRA's (e.g.
    `parallel.gather_per_layer`, which replaces the layers' calls and so must come after the LoRA
    has seen them). `gather`: applied to the LoRA factors where they are used."""
    if stage.kind == "lora":
        with lora_lib.at_runtime(trainable, lora_scale, gather=gather), layers():
            return unet.apply({"params": frozen}, *args, **kwargs)
    with layers():
        return unet.apply({"params": union(frozen, trainable)}, *args, **kwargs)


def init_stage(
    stage: Stage,
    unet_params: Params,
    key: jax.Array,
    *,
    lora_rank: int = 64,
    attached: Mapping[str, tuple[Params, float]] | None = None,
    trainable_init: Params | None = None,
) -> tuple[Params, Params]:
    """`(trainable, frozen)` for `stage` from the full UNet params.

    `attached`: `{name: (lora_tree, scale)}` for the names in `stage.attach` (missing ones are
    skipped): merged into the frozen base once, here. `trainable_init`: start from these trained
    params (e.g. a pretrained motion module or LoRA) instead of a fresh initialisation.
    """
    unknown = set(attached or {}) - set(stage.attach)
    if unknown:
        raise ValueError(f"stage {stage.name} attaches {list(stage.attach)}, not {sorted(unknown)}")
    if stage.kind == "lora":
        trainable = trainable_init if trainable_init is not None else lora_lib.init_lora(
            unet_params, stage.targets, lora_rank, key)
        frozen = dict(unet_params)
    else:
        trainable, frozen = partition(unet_params, stage.targets)
        if not trainable:
            raise ValueError(f"stage {stage.name}: no params match its targets (does the UNet have motion modules?)")
        if trainable_init is not None:
            trainable = _replace_like(trainable, trainable_init, stage.name)
    for name in stage.attach:
        if attached and name in attached:
            tree, scale = attached[name]
            frozen = lora_lib.merge(frozen, tree, scale)
    return trainable, frozen


def _replace_like(target: Params, source: Mapping[str, Any], what: str) -> Params:
    """`source`'s values in `target`'s structure; every leaf must exist with the same shape."""
    flat_t = dict(jax.tree_util.tree_leaves_with_path(target))
    flat_s = dict(jax.tree_util.tree_leaves_with_path(source))
    missing = [jax.tree_util.keystr(k) for k in flat_t if k not in flat_s]
    extra = [jax.tree_util.keystr(k) for k in flat_s if k not in flat_t]
    bad = [jax.tree_util.keystr(k) for k, v in flat_t.items() if k in flat_s and tuple(flat_s[k].shape) != tuple(v.shape)]
    if missing or extra or bad:
        raise ValueError(f"{what}: initial params do not fit: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"shape mismatch {bad[:3]}")
    return jax.tree_util.tree_map_with_path(lambda k, _: flat_s[k], target)


def count_params(tree: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
