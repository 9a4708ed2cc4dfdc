"""SPMD plumbing: the device mesh, sharding rules for batches / params / optimizer state, multi-host.

One rule places every array, so params and their optimizer moments always agree:

* a **batch** array is split along its leading (example) axis over the batch axes of the mesh
  (`data` x `fsdp` by default: FSDP is data parallelism whose params are sharded too);
* a **param-like** array (params, Adam moments, frozen weights) is split FSDP-style over the
  `fsdp` axis along its largest dimension divisible by that axis' size, and replicated when it
  is small or has no such dimension (biases, norms, scalars).

Because the param rule looks only at shapes, it needs no per-layer annotations and applies
unchanged to the optimizer state (whose moments have the params' shapes).

Inside the forward pass, `gather_per_layer` makes every layer all-gather its own weights (cast
to the compute dtype first) where it is called, instead of gathering the whole params tree up
front: with per-block rematerialisation the gathered copies live only inside one block, and the
backward pass gathers them again (FSDP / ZeRO-3; the gradients of trainable weights are
summed back onto their shards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

# Environment variables that mean "this process is one of several" (TPU pods set their own and are
# detected by `jax.distributed.initialize()` without arguments; these are for explicit launches).
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(mode: str | bool = "auto", coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> bool:
    """Calls `jax.distributed.initialize` when asked to (or, for "auto", when the environment says so).

    `mode`: True/"true" always, False/"false" never, "auto" when a coordinator is given or set in
    the environment, when `TPU_WORKER_HOSTNAMES` lists several workers (GKE), or on any Cloud TPU
    VM (libtpu and TPU chips present: JAX then finds the slice's hosts from the TPU metadata, and
    a single-host VM simply becomes process 0 of 1). Explicit `coordinator` / `num_processes` /
    `process_id` are passed through (needed off-TPU, e.g. GPU clusters or the CPU tests).
    Returns whether this call initialised the distributed runtime.
    """
    mode = str(mode).lower()
    if mode in ("false", "0", "no", "off"):
        return False
    if mode == "auto":
        hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
        env = coordinator or any(os.environ.get(k) for k in _MULTIHOST_ENV) or len(hosts) > 1
        if not (env or _on_cloud_tpu_vm()):
            return False
    if jax.distributed.is_initialized():
        return False
    kw: dict[str, Any] = {}
    if coordinator:
        kw["coordinator_address"] = coordinator
    if num_processes > 0:
        kw["num_processes"] = num_processes
    if process_id >= 0:
        kw["process_id"] = process_id
    jax.distributed.initialize(**kw)
    return True


def _on_cloud_tpu_vm() -> bool:
    """libtpu installed and TPU chips attached (checked without initialising any JAX backend)."""
    import glob
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills the (at most one) `-1` axis so the sizes multiply to `num_devices`."""
    shape = {str(k): int(v) for k, v in mesh_shape.items()}
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh_shape {shape}: at most one axis may be -1")
    if any(v == 0 or v < -1 for v in shape.values()):
        raise ValueError(f"mesh_shape {shape}: sizes must be positive (or -1)")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh_shape {shape}: {num_devices} devices are not divisible by {fixed}")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh_shape {shape} needs {math.prod(shape.values())} devices, there are {num_devices}")
    return shape


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with the config's axis names and sizes over all (global) devices, in that axis order.

    On TPU, `mesh_utils` picks a device order that follows the physical torus; elsewhere the
    devices are reshaped in id order (process by process, so each host owns a contiguous block).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    dims = tuple(shape.values())
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(dims, devices)
    except Exception:  # unusual topologies, or a subset of the devices: plain order is always valid
        grid = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(grid, tuple(shape))


# Context parallelism (sampling): one video's frames spread over the mesh's "context" axis. The spatial
# layers run on each device's own frames; each motion module regroups frames <-> spatial positions with
# one all-to-all each way (Ulysses-style), so its temporal attention sees every frame of its positions.
CONTEXT = "context"
# Mesh axes a leading (example) axis may be split over, in order; the context axis splits what is left.
ROW_AXES = ("data", "fsdp", CONTEXT)


def _mesh_sizes() -> dict[str, int]:
    """The axis sizes of the mesh in context (`jax.set_mesh`), {} when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return {}
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def context_devices() -> int:
    """Devices one video's frames are spread over: the mesh in context's "context" axis, else 1."""
    return _mesh_sizes().get(CONTEXT, 1)


def spread_rows(x: jax.Array) -> jax.Array:
    """Under context parallelism, `x` with its leading axis split over every row axis of the mesh (where
    GSPMD would otherwise gather it); else `x` itself (no constraint: the same program as before)."""
    sizes = _mesh_sizes()
    if sizes.get(CONTEXT, 1) == 1:
        return x
    axes = tuple(a for a in ROW_AXES if a in sizes)
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """The one place that decides how arrays are laid out on the mesh.

    `batch_axes`: mesh axes the batch's leading axis is split over (missing axes are ignored).
    `fsdp_axis`: mesh axis params are split over; `min_fsdp_size`: arrays with fewer elements stay
    replicated (gathering tiny biases costs more than storing them).
    """

    batch_axes: tuple[str, ...] = ("data", "fsdp")
    fsdp_axis: str = "fsdp"
    min_fsdp_size: int = 2**12

    def batch_spec(self, mesh: Mesh, ndim: int) -> P:
        axes = tuple(a for a in self.batch_axes if a in mesh.shape)
        return P(axes if axes else None, *([None] * (ndim - 1)))

    def param_spec(self, mesh: Mesh, shape: Sequence[int]) -> P:
        n = mesh.shape.get(self.fsdp_axis, 1)
        if n <= 1 or math.prod(shape) < self.min_fsdp_size:
            return P()
        # Largest divisible dimension; ties go to the last one (output features of a kernel).
        best = max((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: (shape[d], d), default=None)
        if best is None:
            return P()
        spec: list[str | None] = [None] * len(shape)
        spec[best] = self.fsdp_axis
        return P(*spec)

    def batch_size_divisor(self, mesh: Mesh) -> int:
        """The global batch must be a multiple of this (the product of the batch axes)."""
        return math.prod(mesh.shape[a] for a in self.batch_axes if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(tree: PyTree, mesh: Mesh, rules: ShardingRules) -> PyTree:
    """`NamedSharding`s for a params-like tree (arrays or `ShapeDtypeStruct`s); scalars replicate."""
    return jax.tree.map(lambda x: NamedSharding(mesh, rules.param_spec(mesh, np.shape(x))), tree)


def batch_shardings(tree: PyTree, mesh: Mesh, rules: ShardingRules) -> PyTree:
    return jax.tree.map(lambda x: NamedSharding(mesh, rules.batch_spec(mesh, np.ndim(x))), tree)


_GATHER_STATE = threading.local()


@contextlib.contextmanager
def gather_per_layer(mesh: Mesh, rules: ShardingRules):
    """Inside this context every Flax module that owns params and no submodules (`nn.Dense`,
    `nn.Conv`, norms, embeddings), when called, all-gathers its own params (laid out by `rules`)
    right there and runs on the gathered copies.

    `nn.Dense` / `nn.Conv` params are cast to the module's compute `dtype` on their shards, before
    the gather (the layer casts them anyway, so the numbers are the same): a bf16 model gathers
    bf16, whatever the storage dtype. Other params keep their dtype (norm scales are small and
    replicated anyway). Trace the model's `apply` inside the context. With per-block `nn.remat`
    the gather happens inside each block's checkpoint region, so no gathered weight outlives its
    block: the backward pass gathers again (unless the remat policy saves it; the dot policies do
    not). Without remat, XLA keeps the forward's gathered weights for the backward.
    """
    full = replicated(mesh)

    def gather(x, dtype):
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            # Pin the cast to the shard layout, or XLA may gather first and cast after.
            x = jax.lax.with_sharding_constraint(x.astype(dtype), NamedSharding(mesh, rules.param_spec(mesh, x.shape)))
        return jax.lax.with_sharding_constraint(x, full)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or getattr(_GATHER_STATE, "inside", False) or module.scope is None:
            return next_fun(*args, **kwargs)
        variables = module.variables
        own = variables.get("params", {})
        if not own or any(isinstance(v, Mapping) for v in own.values()):
            return next_fun(*args, **kwargs)  # no params, or a module with submodules: its layers gather
        dtype = getattr(module, "dtype", None) if isinstance(module, (nn.Dense, nn.Conv)) else None
        gathered = {**variables, "params": {k: gather(v, dtype) for k, v in own.items()}}
        _GATHER_STATE.inside = True  # the clone's own call must not be intercepted again
        try:
            return module.clone(parent=None).apply(gathered, *args, **kwargs)
        finally:
            _GATHER_STATE.inside = False

    with nn.intercept_methods(interceptor):
        yield


class OnMesh:
    """A jitted function that is traced, lowered and run under its mesh (`jax.set_mesh`).

    Pallas kernels (TPU splash attention) cannot be partitioned by XLA: on a multi-device mesh
    they must sit in a `shard_map`, which the attention code builds from the mesh in context at
    trace time. `jax.jit` traces at the first call (or at `.lower`), so the mesh has to be in
    context then, not only when the function was made: without it a pod's step fails to lower
    ("Mosaic kernels cannot be automatically partitioned").
    """

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def jit_on_mesh(fun: Any, mesh: Mesh, **jit_kwargs) -> OnMesh:
    """`jax.jit(fun, **jit_kwargs)`, always traced under `mesh` (see `OnMesh`)."""
    return OnMesh(jax.jit(fun, **jit_kwargs), mesh)


def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
    """Host arrays that every process holds in full -> global arrays laid out by `shardings`.

    Works the same with one or many processes (each process fills only its own shards), unlike
    `device_put` of a host value across processes.
    """

    def put(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable and x.sharding == sharding:
            return x
        arr = np.asarray(x)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    return jax.tree.map(put, tree, shardings)


def process_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """Rows of a batch-sharded array that this process's devices hold (a contiguous block).

    The data pipeline of process `i` must produce exactly these rows of the global batch for
    multi-host runs to be equal to single-host ones; `global_batch_from_local` relies on it.
    """
    idx = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(f"this process's batch rows are not contiguous: {starts}")
    return slice(lo, hi)


def global_batch_from_local(local: Mapping[str, Any], shardings: Mapping[str, NamedSharding],
                            global_batch: int) -> dict[str, jax.Array]:
    """Process-local batch arrays (this process's rows) -> global arrays sharded over the batch axes."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, (global_batch,) + v.shape[1:])
    return out


def fetch(tree: PyTree) -> PyTree:
    """Global arrays (sharded, possibly across processes) -> full numpy arrays on every process."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
