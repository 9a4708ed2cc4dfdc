"""One low-rank mechanism for every adapter: domain adapter, MotionLoRA, personalised (kohya) LoRA.

A LoRA is a *partial params tree*: at the path of each adapted layer (a Dense, or a conv),
instead of `{"kernel": ...}` it holds `{"down": kernel.shape[:-1] + (r,), "up": (r, out)}`,
optionally with a scalar `"alpha"` (kohya / PEFT files: the delta is scaled by `alpha / r`).
The weight change is `scale * (alpha / r) * down @ up`. It is used in one of two ways, both
built on the same factors (`_factors`):

* **merged** (inference, export, frozen adapters attached to a training base):

      params = merge(params, lora_tree, scale)

  adds the delta to the kernel (formed in float32, cast back to the kernel's dtype). `merge` is
  pure `jnp` and jittable, so a traced `scale` does not recompile.

* **unmerged, at run time** (training a LoRA on a bf16 base):

      with at_runtime(lora_tree, scale):
          y = unet.apply({"params": base}, ...)

  every adapted `nn.Dense` / `nn.Conv` computes `layer(x) + scale * (alpha / r) * (x · down) · up`,
  the low-rank term in float32 and added to the layer's output. The base kernel is never
  rewritten: a small delta merged into a bf16 kernel would be rounded away (bf16 keeps 8 bits),
  while here only the sum of the two outputs is rounded to the compute dtype. In float32 both
  ways give the same outputs and gradients (`tests/test_train_memory.py`).

File formats (original AnimateDiff, diffusers/PEFT, kohya) are read and written by
`checkpoints.lora_formats`; `init_lora` creates a fresh LoRA for training.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
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


def _factors(layer: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(down, up, coef)` in float32 with `coef = alpha / r` (1 without alpha): the delta is `coef * down @ up`."""
    down = jnp.asarray(layer["down"], jnp.float32)
    up = jnp.asarray(layer["up"], jnp.float32)
    coef = jnp.asarray(layer["alpha"], jnp.float32) / up.shape[0] if "alpha" in layer else jnp.ones((), jnp.float32)
    return down, up, coef


def lora_delta(layer: Mapping[str, Any]) -> jax.Array:
    """The kernel change of one layer, `(alpha / r) * down @ up` (contracting the rank), in float32."""
    down, up, coef = _factors(layer)
    return coef * jnp.tensordot(down, up, axes=1)


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


def _misfit(path: Path, layer: Mapping[str, Any], kernel_shape) -> str | None:
    """Why `layer` cannot adapt a kernel of `kernel_shape` (None if it fits)."""
    if kernel_shape is None:
        return f"{'/'.join(path)} (no kernel in params)"
    delta_shape = tuple(layer["down"].shape[:-1]) + (layer["up"].shape[-1],)
    if tuple(kernel_shape) != delta_shape or layer["down"].shape[-1] != layer["up"].shape[0]:
        return (f"{'/'.join(path)} (down {tuple(layer['down'].shape)} @ up {tuple(layer['up'].shape)} "
                f"vs kernel {tuple(kernel_shape)})")
    return None


def _raise_misfits(bad: list[str]) -> None:
    if bad:
        raise ValueError(f"LoRA does not fit the params: {', '.join(sorted(bad)[:8])} ({len(bad)} in all)")


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
        problem = _misfit(path, layer, None if kernel is None else kernel.shape)
        if problem:
            bad.append(problem)
    _raise_misfits(bad)
    scale = jnp.asarray(scale, jnp.float32)
    for path, layer in layers.items():
        kernel = _get_kernel(params, path)
        new = jnp.asarray(kernel, jnp.float32) + scale * lora_delta(layer)
        params = _set_path(params, path, new.astype(kernel.dtype))
    return params


def low_rank_term(module: nn.Module, x: jax.Array, layer: Mapping[str, Any], scale: Any = 1.0) -> jax.Array:
    """`scale * (alpha / r) * (x · down) · up` of one adapted layer, in float32: what `merge` adds
    to `module(x)` (module an `nn.Dense`, or an `nn.Conv`, whose window / strides / padding the
    `down` factor is applied with)."""
    down, up, coef = _factors(layer)
    x = jnp.asarray(x, jnp.float32)
    if isinstance(module, nn.Dense):
        h = jnp.tensordot(x, down, axes=1)
    elif isinstance(module, nn.Conv):
        if module.feature_group_count != 1:
            raise ValueError(f"LoRA on a grouped conv ({'/'.join(module.path)}) is not supported")
        # The same conv with `r` output channels and no bias: flax does the padding / strides.
        narrow = module.clone(parent=None, features=down.shape[-1], use_bias=False, dtype=jnp.float32,
                              param_dtype=jnp.float32, precision=None)
        h = narrow.apply({"params": {"kernel": down}}, x)
    else:
        raise ValueError(f"LoRA at {'/'.join(module.path)}: a {type(module).__name__}, not an nn.Dense / nn.Conv")
    return (jnp.asarray(scale, jnp.float32) * coef) * jnp.tensordot(h, up, axes=1)


@contextlib.contextmanager
def at_runtime(lora: LoraTree, scale: Any = 1.0, gather: Callable[[jax.Array], jax.Array] | None = None):
    """Inside this context, Flax models apply `lora` unmerged: each `nn.Dense` / `nn.Conv` whose
    module path (relative to the applied root module, i.e. the params path) has a LoRA layer
    returns `module(x) + low_rank_term(...)`, summed in float32 and cast to the layer's output
    dtype. The base kernels are used as stored; gradients reach the factors through the low-rank
    term. Use it around the `apply` of the model the LoRA was made for, at trace time (inside the
    jitted function). A LoRA layer whose kernel does not fit is an error, and so is one that no
    call reached by the end of the context (never silently skipped). `gather` (optional) is
    applied to each factor where it is used (the train step's per-layer FSDP all-gather). Enter it
    outside any context that replaces the layers' calls (`parallel.gather_per_layer`): Flax runs
    interceptors in the order their contexts were entered.
    """
    layers = {tuple(p): layer for p, layer in lora_layers(lora).items()}
    used: set[Path] = set()
    bad: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        layer = layers.get(path)
        if layer is None:
            return next_fun(*args, **kwargs)
        kernel = module.variables.get("params", {}).get("kernel")
        problem = _misfit(path, layer, None if kernel is None else kernel.shape)
        if problem:
            bad.append(problem)
            _raise_misfits(bad)
        used.add(path)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if gather is not None:
            layer = {k: gather(v) for k, v in layer.items()}
        return (y.astype(jnp.float32) + low_rank_term(module, x, layer, scale)).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield
    missing = sorted("/".join(p) for p in set(layers) - used)
    if missing:
        raise ValueError(f"LoRA layers never reached by the model: {', '.join(missing[:8])} "
                         f"({len(missing)} of {len(layers)})")


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
