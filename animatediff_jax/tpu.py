"""Cloud TPU topologies as abstract devices, and what a program compiled for them needs.

With libtpu installed (`pip install "jax[tpu]"`, which also works on a CPU host), JAX can describe
a TPU slice that is not there (`jax.experimental.topologies`): a `Mesh` of its abstract chips,
`ShapeDtypeStruct`s sharded over it and `jax.jit(f).lower(...).compile()` run libtpu's real
compiler, Mosaic (Pallas kernels) included, and give the chip's own memory and cost accounting.
That is how `animatediff-jax compile` checks a pod run before it is launched.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip: usable HBM (what the compiler will place), bf16 and int8 dense peaks, HBM bandwidth."""

    name: str
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float
    dims: int  # 2: a 2-D torus (v5e, v6e); 3: v4 / v5p
    megacore: bool  # two TensorCores per chip seen as one device ("v5p-8" counts 8 cores = 4 chips)
    int8_tops: float  # int8 x int8 products (Google's published peaks: 2x bf16 from v5e on, 1x on v4)


# Usable HBM: the v5e figure is what libtpu reports when a program does not fit (15.75 of 16 GiB);
# the others keep the same 1.6% reserve of their HBM (an assumption until measured the same way).
CHIPS = {
    "v4": Chip("TPU v4", 31.5, 275.0, 1228.0, 3, True, 275.0),
    "v5e": Chip("TPU v5 lite", 15.75, 197.0, 819.0, 2, False, 394.0),
    "v5p": Chip("TPU v5", 93.5, 459.0, 2765.0, 3, True, 918.0),
    "v6e": Chip("TPU v6 lite", 31.5, 918.0, 1640.0, 2, False, 1836.0),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (or several): `get_topology_desc` arguments and the chip."""

    name: str
    generation: str
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """One slice's Cloud name ("v5litepod-8", "v5p-128": TensorCores for megacore chips)."""
        chips = math.prod(self.shape) * (2 if self.chip.megacore else 1)
        return f"{'v5litepod' if self.generation == 'v5e' else self.generation}-{chips}"

    def devices(self) -> list:
        """The slice's abstract devices (libtpu needed; no TPU needed)."""
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover - every supported JAX has it
            raise ValueError(f"this JAX has no jax.experimental.topologies ({e})") from None
        import importlib.util
        import os

        from animatediff_jax.parallel import _on_cloud_tpu_vm

        if importlib.util.find_spec("libtpu") is None:
            raise ValueError('compiling for a TPU needs libtpu: pip install "jax[tpu]" (it also works on a CPU host)')
        if not _on_cloud_tpu_vm():  # off a TPU VM libtpu looks for its slice and warns at length: say it
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.accelerator_type)
        per_host = (1, 1, 1) if self.chips == 1 else (2, 4, 1) if math.prod(self.shape) == 8 and self.chip.dims == 2 \
            else (2, 2, 1)
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=self.topology_name,
            chip_config_name="megacore" if self.chip.megacore else "default",
            chips_per_host_bounds=per_host, num_slices=self.num_slices)
        return list(desc.devices)


_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
       512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


def topology(name: str) -> Topology:
    """A Cloud TPU name: "v5e-8", "v5litepod-256", "v5p-128" (cores, as Cloud names them), "v6e-1",
    "v4-8", "2xv5e-256" (multi-slice), or a JAX topology name "v5e:2x2" / "v5p:4x4x4"."""
    text = name.strip().lower()
    slices = 1
    m = re.fullmatch(r"(\d+)x(.+)", text)
    if m and not re.fullmatch(r"[\dx]+", m.group(2)):
        slices, text = int(m.group(1)), m.group(2)
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:([\dx]+))", text)
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if m is None or gen not in CHIPS:
        raise ValueError(f"--topology {name!r}: expected a Cloud TPU name like v5e-8, v5p-128, v6e-1, v4-8, "
                         f"2xv5e-256, or v5e:2x2 (generations {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(3):
        shape = tuple(int(x) for x in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"--topology {name!r}: {gen} slices are {chip.dims}-D (e.g. "
                             f"{gen}:{'x'.join(['2'] * chip.dims)})")
    else:
        count = int(m.group(2))
        chips = count // 2 if chip.megacore else count
        table = _3D if chip.dims == 3 else _2D
        if chips not in table or (chip.megacore and count % 2):
            sizes = sorted(k * (2 if chip.megacore else 1) for k in table)
            raise ValueError(f"--topology {name!r}: {gen} comes in sizes {', '.join(map(str, sizes))}")
        shape = table[chips]
    return Topology(name, gen, shape, slices)


def oom_message(e: BaseException) -> str | None:
    """libtpu's one-line reason a program does not fit HBM, or None when `e` is something else."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    head = next((l for l in lines if "Ran out of memory" in l or "RESOURCE_EXHAUSTED" in l), lines[0])
    used = next((l for l in lines if re.search(r"(Used|Total hbm usage|exceeds)", l)), "")
    return (head + (" " + used if used and used != head else ""))[:400]
