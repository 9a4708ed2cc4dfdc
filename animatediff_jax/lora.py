"""One low-rank mechanism for every adapter: domain adapter, MotionLoRA, personalised (kohya) LoRA.

A LoRA is a *partial params tree*: at the path of each adapted layer (a Dense, or a conv),
instead of `{"kernel": ...}` it holds `{"down": kernel.shape[:-1] + (r,), "up": (r, out)}`,
optionally with a scalar `"alpha"` (kohya / PEFT files: the delta is scaled by `alpha / r`).
The weight change is `scale * (alpha / r) * down @ up`, added to the kernel:

    params = merge(params, lora_tree, scale)

`merge` is pure `jnp` and jittable, so "run-time LoRA with a scale" is `merge` called inside
the jitted function with a traced `scale` (changing the scale does not recompile), and
"merged into the weights" is the same `merge` called once outside: same function, same
output. File formats (original AnimateDiff, diffusers/PEFT, kohya) are read and written by
`checkpoints.lora_formats`; `init_lora` creates a fresh LoRA for training.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

Params = dict[str, Any]
LoraTree = dict[str, Any]
Path = tuple[str, ...]
PathFilter = Callable[[Path], bool]


def is_lora_leaf(node: Any) -> bool:
    """A dict holding one layer's factors (`down`, `up`, optional `alpha`)."""
    return isinstance(node, Mapping) and "down" in node and "up" in node


def lora_layers(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Mapping[str, Any]]:
    """`{module path: {"down", "up"[, "alpha"]}}` of a LoRA tree (paths of the adapted layers)."""
    out: dict[Path, Mapping[str, Any]] = {}
    for k, v in tree.items():
        if is_lora_leaf(v):
            extra = set(v) - {"down", "up", "alpha"}
            if extra:
                raise ValueError(f"LoRA layer {'/'.join(prefix + (k,))}: unknown entries {sorted(extra)}")
            out[prefix + (k,)] = v
        elif isinstance(v, Mapping):
            out.update(lora_layers(v, prefix + (k,)))
        else:
            raise ValueError(f"LoRA tree: {'/'.join(prefix + (k,))} is not a layer's {{down, up}} pair")
    return out


def lora_rank(layer: Mapping[str, Any]) -> int:
    return int(layer["up"].shape[0])


def lora_delta(layer: Mapping[str, Any]) -> jax.Array:
    """The kernel change of one layer, `(alpha / r) * down @ up` (contracting the rank), in float32."""
    down = jnp.asarray(layer["down"], jnp.float32)
    up = jnp.asarray(layer["up"], jnp.float32)
    delta = jnp.tensordot(down, up, axes=1)
    if "alpha" in layer:
        delta = delta * (jnp.asarray(layer["alpha"], jnp.float32) / up.shape[0])
    return delta


def _set_path(tree: Params, path: Path, kernel: jax.Array) -> Params:
    """A copy of `tree` with `path + ("kernel",)` replaced (only the dicts on the path are copied)."""
    head, rest = path[0], path[1:]
    out = dict(tree)
    out[head] = _set_path(tree[head], rest, kernel) if rest else {**tree[head], "kernel": kernel}
    return out


def _get_kernel(params: Mapping[str, Any], path: Path):
    node: Any = params
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node.get("kernel") if isinstance(node, Mapping) else None


def merge(params: Params, lora: LoraTree, scale: Any = 1.0) -> Params:
    """`params` with `scale * (alpha / r) * down @ up` added to every adapted kernel.

    Pure and jittable (`scale` may be traced). The delta is formed in float32 and the sum
    cast back to the kernel's dtype. A LoRA layer with no kernel at its path, or whose delta
    does not have the kernel's shape, is an error (never silently skipped).
    """
    layers = lora_layers(lora)
    bad = []
    for path, layer in layers.items():
        kernel = _get_kernel(params, path)
        delta_shape = tuple(layer["down"].shape[:-1]) + (layer["up"].shape[-1],)
        if kernel is None:
            bad.append(f"{'/'.join(path)} (no kernel in params)")
        elif tuple(kernel.shape) != delta_shape or layer["down"].shape[-1] != layer["up"].shape[0]:
            bad.append(
                f"{'/'.join(path)} (down {tuple(layer['down'].shape)} @ up {tuple(layer['up'].shape)} "
                f"vs kernel {tuple(kernel.shape)})"
            )
    if bad:
        raise ValueError(f"LoRA does not fit the params: {', '.join(sorted(bad)[:8])} ({len(bad)} in all)")
    scale = jnp.asarray(scale, jnp.float32)
    for path, layer in layers.items():
        kernel = _get_kernel(params, path)
        new = jnp.asarray(kernel, jnp.float32) + scale * lora_delta(layer)
        params = _set_path(params, path, new.astype(kernel.dtype))
    return params


def merge_many(params: Params, loras: Sequence[tuple[LoraTree, Any]]) -> Params:
    """Several LoRAs, each with its own scale (e.g. stacked MotionLoRAs): their deltas add up."""
    for tree, scale in loras:
        params = merge(params, tree, scale)
    return params


# ------------------------------------------------------------------------- training


def kernel_paths(params: Mapping[str, Any], prefix: Path = ()) -> Iterable[tuple[Path, Any]]:
    for k, v in params.items():
        if isinstance(v, Mapping):
            yield from kernel_paths(v, prefix + (k,))
        elif k == "kernel":
            yield prefix, v


def init_lora(
    params: Mapping[str, Any], target_filter: PathFilter, rank: int, key: jax.Array, dtype: Any = jnp.float32
) -> LoraTree:
    """A fresh LoRA on every kernel whose module path passes `target_filter`.

    As in LoRA training (diffusers' `LoRALinearLayer`, the original AnimateDiff): `down` is
    normal with std `1 / rank`, `up` is zero, so the adapted model starts equal to the base.
    `params` may hold arrays or `ShapeDtypeStruct`s.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    paths = [(p, k) for p, k in kernel_paths(params) if target_filter(p)]
    if not paths:
        raise ValueError("init_lora: the target filter selects no kernel of these params")
    tree: LoraTree = {}
    for i, (path, kernel) in enumerate(paths):
        shape = tuple(kernel.shape)
        down = jax.random.normal(jax.random.fold_in(key, i), shape[:-1] + (rank,), jnp.float32) / rank
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = {"down": down.astype(dtype), "up": jnp.zeros((rank, shape[-1]), dtype)}
    return tree


_ATTN_PROJ = r"transformer_blocks_\d+/attn[12]/to_(q|k|v|out_0)$"
_SPATIAL = re.compile(r"(^|/)attentions_\d+/" + _ATTN_PROJ)
_MOTION = re.compile(r"(^|/)motion_modules_\d+/" + _ATTN_PROJ)


def domain_adapter_targets(path: Path) -> bool:
    """The v3 domain adapter's layers: spatial self/cross attention q/k/v/out (not motion modules)."""
    return bool(_SPATIAL.search("/".join(path)))


def motion_lora_targets(path: Path) -> bool:
    """MotionLoRA's layers: the motion modules' two temporal attentions' q/k/v/out."""
    return bool(_MOTION.search("/".join(path)))
