"""What a compiled XLA program costs, read from its optimised HLO: FLOPs and bytes with every loop
counted as often as it runs, Pallas kernels' FLOPs (XLA counts them as zero), collectives, and the
bytes each op moves (`breakdown`: where a step's memory traffic goes).

`compiled.cost_analysis()` counts the body of a `while` loop once, whatever its trip count (a
25-step `lax.scan` reads as one step). `loop_aware_cost` costs every loop body on its own and
multiplies it by its trip count: `known_trip_count` where XLA wrote one (CPU/GPU), else read from
the loop's condition (`i < N` against a constant: TPU programs carry no `known_trip_count`).
XLA's own figures stay in the result as `raw_*`. Per-computation costs come from the host
backend's generic HLO cost model run on the target's optimised HLO; the whole-program figure
XLA's target model gave is the base they correct.

"bytes accessed" is XLA's model (each fusion's operands + result, no caches). `breakdown` uses the
same model per top-level op, with TPU tiles padded (`{...:T(8,128)}`: a minor dimension of 4
channels moves as 128), so a layout that wastes bandwidth shows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any, Iterable

_COST_KEYS = ("flops", "bytes accessed", "transcendentals")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1,
                "f8e5m2": 1, "token": 0}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2|token)\[([\d,]*)\](?:\{([^}]*)\})?")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(", re.M)
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_ATTR_COMP = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONST = re.compile(r"constant\((-?\d+)\)")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
             "replica-id", "opt-barrier"}
# FLOPs of one Pallas splash kernel per (q row x key x head_dim) element: forward QK^T + PV (2 matmuls),
# dq (QK^T, dO V^T, dS K: 3), dkv (QK^T, dO V^T, P^T dO, dS^T Q: 4); 2 FLOPs per multiply-add.
_SPLASH_FLOPS = (("splash_mha_dkv", 8), ("splash_mha_dq", 6), ("splash_mha_fwd", 4), ("splash", 4))


def _shape_bytes(text: str, tiled: bool = False) -> float:
    """Bytes of every array in an HLO shape string (a tuple sums its elements); `tiled` pads the
    minor dimensions to the layout's first tile (TPU `T(8,128)`)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(text):
        shape = [int(d) for d in dims.split(",") if d]
        if tiled and layout and ":T(" in layout:
            order, _, tiles = layout.partition(":")
            minor_to_major = [int(d) for d in order.split(",") if d.strip().lstrip("-").isdigit()]
            tile = re.match(r"T\(([\d,]+)\)", tiles)
            if tile and len(minor_to_major) == len(shape):
                t = [int(x) for x in tile.group(1).split(",")]
                major_to_minor = minor_to_major[::-1]
                for dim, size in zip(major_to_minor[len(major_to_minor) - len(t):], t[-len(major_to_minor):]):
                    shape[dim] = -(-shape[dim] // size) * size
        total += math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
    return total


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    callees: dict[str, str]
    branches: list[str]
    line: str

    @property
    def op_name(self) -> str:
        m = _OP_NAME.search(self.line)
        return m.group(1) if m else ""


@dataclasses.dataclass
class Module:
    """An optimised HLO module's text, split into computations of instructions."""

    text: str
    comps: dict[str, str]
    order: list[str]
    entry: str
    instrs: dict[str, list[Instr]]
    shapes: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> "Module":
        heads = [(m.start(), m.group(2), bool(m.group(1))) for m in _HEADER.finditer(text)]
        comps, order, entry = {}, [], None
        for i, (pos, name, is_entry) in enumerate(heads):
            end = heads[i + 1][0] if i + 1 < len(heads) else len(text)
            comps[name] = re.sub(r"^ENTRY ", "", text[pos:end], count=1)
            order.append(name)
            entry = name if is_entry else entry
        if entry is None:
            raise ValueError("no ENTRY computation in the module text")
        instrs, shapes = {}, {}
        for name, body in comps.items():
            out = []
            for line in body.splitlines()[1:]:
                m = _INSTR.match(line)
                if not m:
                    continue
                iname, shape, opcode, rest = m.groups()
                args = rest.split("), ", 1)[0] if "), " in rest else rest.rstrip(")")
                callees = {k: v for k, v in _ATTR_COMP.findall(rest)}
                br = _BRANCHES.search(rest)
                branches = [b.strip().lstrip("%") for b in br.group(1).split(",")] if br else []
                out.append(Instr(iname, shape, opcode, _OPERAND.findall(args), callees, branches, line))
                shapes[iname] = shape
            instrs[name] = out
        return cls(text, comps, order, entry, instrs, shapes)

    def trip_count(self, loop: Instr) -> int | None:
        """A while loop's trip count: XLA's `known_trip_count`, else `i < N` read from its condition."""
        m = _TRIP.search(loop.line)
        if m:
            return int(m.group(1))
        cond = loop.callees.get("condition")
        if cond is None:
            return None
        texts = [self.comps.get(cond, "")]
        texts += [self.comps.get(i.callees["calls"], "") for i in self.instrs.get(cond, []) if "calls" in i.callees]
        text = "\n".join(texts)
        if "direction=LT" not in text:
            return None
        consts = [int(c) for c in _CONST.findall(text)]
        return max(consts) if consts else None

    def multiplicities(self) -> dict[str, int]:
        """How many times each non-fused computation runs per call of the entry (loops multiplied)."""
        mult: dict[str, int] = defaultdict(int)

        def visit(name: str, m: int, depth: int = 0) -> None:
            mult[name] += m
            if depth > 64:
                return
            for ins in self.instrs.get(name, []):
                if ins.opcode == "while":
                    n = self.trip_count(ins)
                    visit(ins.callees["body"], m * (n or 1), depth + 1)  # (unknown: once, as XLA)
                elif ins.opcode in ("call", "conditional", "async-start", "call-start"):
                    for c in [v for k, v in ins.callees.items() if k in ("calls", "to_apply", "true_computation",
                                                                           "false_computation")] + ins.branches:
                        if c in self.comps:
                            visit(c, m, depth + 1)

        visit(self.entry, 1)
        return dict(mult)

    def top_level(self) -> Iterable[tuple[Instr, int]]:
        """Every op that runs as its own kernel (fusions whole), with how many times it runs."""
        for comp, m in self.multiplicities().items():
            for ins in self.instrs.get(comp, []):
                if ins.opcode not in _FREE_OPS and ins.opcode not in ("while", "call", "conditional"):
                    yield ins, m

    def op_bytes(self, ins: Instr, tiled: bool = True) -> float:
        """XLA's bytes model for one op: its operands and its result."""
        return _shape_bytes(ins.shape, tiled) + sum(_shape_bytes(self.shapes.get(o, ""), tiled) for o in ins.operands)


def pallas_kernels(module: Module) -> dict[str, float]:
    """Pallas (Mosaic) kernel calls per run and their FLOPs, counted analytically from operand shapes
    (splash attention: q `[..., N, T, H]`, k `[..., N, S, H]`), loops multiplied."""
    calls, flops = 0, 0.0
    for ins, m in module.top_level():
        if ins.opcode != "custom-call" or 'custom_call_target="tpu_custom_call"' not in ins.line:
            continue
        calls += m
        dims = [[int(d) for d in a.split(",") if d] for o in ins.operands
                for t, a, _ in _ARRAY.findall(module.shapes.get(o, "")) if t in ("f32", "bf16", "f16")]
        dims = [d for d in dims if len(d) >= 3]
        if len(dims) < 2:
            continue
        q, k = dims[0], dims[1]
        factor = next(f for key, f in _SPLASH_FLOPS if key in ins.name or key == "splash")
        flops += m * factor * math.prod(q) * k[-2]
    return {"pallas_calls": calls, "pallas_flops": flops}


_INT8 = ("s8", "u8")


def _op_flops(ins: "Instr", lhs: str, rhs: str) -> float:
    """XLA's generic cost model's FLOPs of one dot / convolution on its own (a module of just it): the
    target's rewritten convolutions (TPU splits windows into extra dimensions) are costed as XLA costs them."""
    import jaxlib._hlo as hlo
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    call = ins.line.index(f" {ins.opcode}(") + len(ins.opcode) + 2
    attrs = ins.line[ins.line.index(")", call) + 1:]  # (operands are %names: no parentheses in them)
    attrs = re.sub(r", metadata=\{[^}]*\}", "", attrs).split(", backend_config=")[0].rstrip()
    text = (f"HloModule one_op\n\nENTRY e {{\n  a = {lhs} parameter(0)\n  b = {rhs} parameter(1)\n"
            f"  ROOT r = {ins.shape} {ins.opcode}(a, b){attrs}\n}}\n")
    mod = hlo.hlo_module_from_text(text)
    return _cost_dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend(), mod))["flops"]


def int8_flops(module: Module) -> float:
    """FLOPs of the dots and convolutions whose operands are both int8 (the MXU's int8 rate applies to
    them), top-level or inside fusions, loops multiplied; each costed by XLA's model on its own."""
    total, cache = 0.0, {}
    for ins, m in module.top_level():
        inner = [ins] + [i for c in ins.callees.values() if ins.opcode == "fusion" for i in module.instrs.get(c, [])]
        for op in inner:
            if op.opcode not in ("dot", "convolution") or len(op.operands) < 2:
                continue
            lhs, rhs = (module.shapes.get(o, "") for o in op.operands[:2])
            if not (lhs.split("[")[0].strip() in _INT8 and rhs.split("[")[0].strip() in _INT8):
                continue
            key = (lhs, rhs, op.shape, op.opcode, re.sub(r", metadata=\{[^}]*\}", "", op.line.split(" = ", 1)[-1]))
            if key not in cache:
                cache[key] = _op_flops(op, lhs, rhs)
            total += m * cache[key]
    return total


def collectives(module: Module) -> dict[str, int]:
    """Collective ops per run (async start/done pairs counted once), by kind."""
    out: dict[str, int] = defaultdict(int)
    for ins, m in module.top_level():
        op = ins.opcode.removesuffix("-start")
        if op in _COLLECTIVES and not ins.opcode.endswith("-done"):
            out[op] += m
    return dict(out)


def collective_bytes(module: Module) -> float:
    """Bytes the collectives deliver to each chip per run: every collective's result (an async pair's
    `-done`), times its loop count. What crosses the chips' interconnect, which the roofline leaves out."""
    total = 0.0
    for ins, m in module.top_level():
        op = ins.opcode.removesuffix("-start").removesuffix("-done")
        if op in _COLLECTIVES and not ins.opcode.endswith("-start"):
            total += m * _shape_bytes(ins.shape)
    return total


def _cost_dict(ca) -> dict:
    if isinstance(ca, (list, tuple)):  # older JAX: one dict per program
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {k: float(ca.get(k, 0.0)) for k in _COST_KEYS}


def module_text(compiled) -> str:
    """The optimised HLO of a compiled program, with metadata and constants in full (parses back)."""
    import jaxlib._hlo as hlo

    module = compiled.runtime_executable().hlo_modules()[0]
    opts = hlo.HloPrintOptions()
    opts.print_large_constants = True  # "{...}" would not parse back
    return module.to_string(opts)


def loop_aware_cost(compiled, text: str | None = None) -> dict:
    """`compiled.cost_analysis()` with every `while` body counted as often as it runs.

    Returns flops / bytes accessed / transcendentals (loop-aware), the same three as XLA reports
    them ("raw_*": loop bodies once), how many loops had no readable trip count (counted once) and
    whether the loop-aware count could be made (`loop_aware`; if not, the raw figures).
    T(c) = X(c) + sum over the loops w run by c of (n_w * T(body_w) - X(body_w)), where X(c) is
    the cost model of computation c alone (the entry of a module of c and what it calls), which
    counts each loop body inside c once.
    """
    raw = _cost_dict(compiled.cost_analysis())
    out = dict(raw, **{f"raw_{k}": v for k, v in raw.items()}, unknown_trip_loops=0, loop_aware=False)
    try:
        import jaxlib._hlo as hlo
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        text = module_text(compiled) if text is None else text
        module = Module.parse(re.sub(r", metadata=\{[^}]*\}", "", text))
        backend = xla_bridge.get_backend()
    except Exception as e:  # noqa: BLE001 - keep XLA's own figures
        out["loop_aware_error"] = repr(e)
        return out
    comps, order, entry = module.comps, module.order, module.entry
    refs = {n: {r for r in re.findall(r"%([\w.\-]+)", body) if r in comps and r != n} for n, body in comps.items()}
    unknown = [0]
    xcache: dict = {}
    tcache: dict = {}

    def cost_alone(name: str) -> dict:
        if name == entry:
            return raw
        if name not in xcache:
            keep, todo = {name}, [name]
            while todo:
                for r in refs[todo.pop()]:
                    if r not in keep:
                        keep.add(r)
                        todo.append(r)
            parts = [comps[n] for n in order if n in keep and n != name]
            parts.append("ENTRY " + comps[name])  # callees first, as XLA prints them
            mod = hlo.hlo_module_from_text("HloModule loop_body\n\n" + "\n".join(parts))
            xcache[name] = _cost_dict(_jax.hlo_module_cost_analysis(backend, mod))
        return xcache[name]

    def loops(name: str, seen: set) -> list:
        """(body, trip count) of the loops run by `name` itself or by computations it calls."""
        found = []
        for ins in module.instrs.get(name, []):
            if ins.opcode == "while":
                found.append((ins.callees["body"], module.trip_count(ins)))
            for r in [v for k, v in ins.callees.items() if k not in ("body", "condition")] + ins.branches:
                if r in comps and r not in seen:
                    seen.add(r)
                    found += loops(r, seen)
        return found

    def total(name: str) -> dict:
        if name not in tcache:
            tot = dict(cost_alone(name))
            for body, n in loops(name, {name}):
                if n is None:
                    unknown[0] += 1
                    n = 1
                tb, xb = total(body), cost_alone(body)
                for k in tot:
                    tot[k] += n * tb[k] - xb[k]
            tcache[name] = tot
        return tcache[name]

    try:
        out.update(total(entry))
    except Exception as e:  # noqa: BLE001 - a module text that does not parse back: XLA's figures
        out.update(raw)
        out["loop_aware_error"] = repr(e)
        return out
    out["unknown_trip_loops"] = unknown[0]
    out["loop_aware"] = True
    return out


def breakdown(text: str, depth: int = 6, top: int = 20) -> list[dict[str, Any]]:
    """Where the bytes go: top-level ops grouped by the first `depth` parts of their JAX op name
    (`jit(step)/jvp(UNet3D)/down_0/...`), bytes per run (tile-padded, loops multiplied), largest first."""
    module = Module.parse(text)
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])
    for ins, m in module.top_level():
        parts = [p for p in ins.op_name.split("/") if p and not p.startswith("jit(")] or [f"<{ins.opcode}>"]
        key = "/".join(parts[:depth])
        g = groups[key]
        b = module.op_bytes(ins)
        g[0] += m * b
        g[1] += m
        g[2] += m * module.op_bytes(ins, tiled=False)
    rows = [{"op": k, "bytes": v[0], "untiled_bytes": v[2], "ops": v[1]} for k, v in groups.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]
