"""The headline programs compiled for TPU slices by `animatediff-jax compile` (libtpu, no TPU): per-chip
memory, FLOPs, modelled bytes and roofline time, as a Markdown table for BENCHMARKS.md.

    pip install "jax[tpu]"
    python bench/tpu_bench.py --out runs/tpu_bench            # every row (an hour and more on 2 cores)
    python bench/tpu_bench.py --only s2_v5e-1,sample_v5e-1_b4  # some rows
    python bench/tpu_bench.py --out runs/tpu_bench --table     # the table from the JSON already there

Each row is one `animatediff-jax compile ... --quick --json` in its own process (one at a time: libtpu
and the 2-core host). Rows whose JSON exists are not compiled again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

S2 = ["train", "--config", "configs/train/stage2_motion_module.py"]
SAMPLE = ["sample", "--config", "configs/sample/v2_motion_lora_zoom_in.py"]
S2_SDXL = ["train", "--config", "configs/train/sdxl_stage2_motion_module.py"]

# name: (what, topology, overrides); stage 2 at the original's 4 clips per chip, sampling 16x512², 25 steps.
ROWS = {
    "s2_v5e-1": (S2, "v5e-1", ["--config.train.batch_size=4"]),
    "s2_v5e-1_b8": (S2, "v5e-1", ["--config.train.batch_size=8"]),
    "s2_v5e-1_b4_dots": (S2, "v5e-1", ["--config.train.batch_size=4",
                                       "--config.parallel.remat=dots_with_no_batch_dims_saveable"]),
    "s2_v5e-1_b2_dots": (S2, "v5e-1", ["--config.train.batch_size=2",
                                       "--config.parallel.remat=dots_with_no_batch_dims_saveable"]),
    "s2_cache_v5e-1": (S2, "v5e-1", ["--config.data.source=cache", "--config.train.batch_size=4"]),
    "s2_v5e-8": (S2, "v5e-8", ["--config.train.batch_size=32"]),
    "s2_v5e-256": (S2, "v5e-256", ["--config.train.batch_size=1024"]),
    "s2_v5p-8": (S2, "v5p-8", ["--config.train.batch_size=16"]),
    "s2_v5p-128": (S2, "v5p-128", ["--config.train.batch_size=256"]),
    "s2_v6e-1": (S2, "v6e-1", ["--config.train.batch_size=4"]),
    "s2_v6e-8": (S2, "v6e-8", ["--config.train.batch_size=32"]),
    # SDXL stage 2 (configs/train/sdxl_stage2_motion_module.py: 16x512², remat full, bf16 frozen base).
    "s2_sdxl_v5e-1": (S2_SDXL, "v5e-1", ["--config.train.batch_size=1"]),
    "s2_sdxl_v5p-8_b16": (S2_SDXL, "v5p-8", ["--config.train.batch_size=16"]),
    "s2_sdxl_1024_v5p-8_b16": (S2_SDXL, "v5p-8", ["--config.train.batch_size=16", "--config.train.resolution=1024"]),
    "s3_v5e-1": (["train", "--config", "configs/train/stage3_motion_lora.py"], "v5e-1",
                 ["--config.train.batch_size=4"]),
    "s1_v5e-1": (["train", "--config", "configs/train/stage1_domain_adapter.py"], "v5e-1", []),
    "sample_v5e-1_b4": (SAMPLE, "v5e-1", ["--config.batch_size=4"]),
    "sample_v5e-1_b8": (SAMPLE, "v5e-1", ["--config.batch_size=8"]),
    # The spatial UNet in int8 (models.quantize): weights only, and weights + activations.
    "sample_v5e-1_b4_int8w": (SAMPLE, "v5e-1", ["--config.batch_size=4", "--config.quantize=int8_weights"]),
    "sample_v5e-1_b4_int8": (SAMPLE, "v5e-1", ["--config.batch_size=4", "--config.quantize=int8"]),
    "sample_v5e-8_b32": (SAMPLE, "v5e-8", ["--config.batch_size=32"]),
    "sample_v5p-8_b16": (SAMPLE, "v5p-8", ["--config.batch_size=16"]),
    "sample_v6e-1_b4": (SAMPLE, "v6e-1", ["--config.batch_size=4"]),
    # SDXL + AnimateDiff-SDXL beta, the original's example: 16 frames at 1024², CFG (configs/sample/sdxl_beta.py).
    "sample_sdxl_v5e-1_b1": (["sample", "--config", "configs/sample/sdxl_beta.py"], "v5e-1",
                             ["--config.batch_size=1", "--config.steps=25"]),
    "sample_sdxl_v5p-8_b4": (["sample", "--config", "configs/sample/sdxl_beta.py"], "v5p-8",
                             ["--config.batch_size=4", "--config.steps=25"]),
    # One long video: its frames over 4 / 8 chips (context parallelism) against context windows on one chip.
    "sample_cp64_v5e-4": (SAMPLE, "v5e-4", ["--config.batch_size=1", "--config.L=64", "--config.context_parallel=4",
                                            "--config.pe_stretch=(32, 64)"]),
    "sample_win64_v5e-1": (SAMPLE, "v5e-1", ["--config.batch_size=1", "--config.L=64",
                                             "--config.context_windows.length=16"]),
    "sample_cp128_v5e-8": (SAMPLE, "v5e-8", ["--config.batch_size=1", "--config.L=128",
                                             "--config.context_parallel=8", "--config.pe_stretch=(32, 128)"]),
    "sample_win128_v5e-1": (SAMPLE, "v5e-1", ["--config.batch_size=1", "--config.L=128",
                                              "--config.context_windows.length=16"]),
}


def compile_row(name: str, out: str) -> None:
    what, topology, overrides = ROWS[name]
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        return
    cmd = [sys.executable, "-m", "animatediff_jax.cli", "compile", *what, "--topology", topology, "--quick",
           "--json", path, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    lines = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if ln.startswith(("error:", "  ", "s", "m"))]
    print(f"== {name} ({time.perf_counter() - t0:.0f} s, rc {proc.returncode})")
    print("\n".join(ln for ln in lines if "error:" in ln or ln.startswith("  ")), flush=True)
    if proc.returncode == 2:  # does not fit: keep the reason as the row
        err = next((ln for ln in proc.stderr.splitlines() if ln.startswith("error:")), "error")
        with open(path, "w") as f:
            json.dump([{"name": name, "error": err[len("error: "):]}], f)


def table(out: str) -> str:
    head = ("| row | program | topology | per chip | args / temp / out − alias = total GiB (of HBM) | TFLOP (Pallas) "
            "| GiB accessed | roofline per run | per item per chip | XLA optimal s | Pallas / collectives (to each chip) "
            "| compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, (what, topology, overrides) in ROWS.items():
        path = os.path.join(out, f"{name}.json")
        if not os.path.exists(path):
            continue
        for r in json.load(open(path)):
            if "error" in r:
                lines.append(f"| {name} | | {topology} | | does not fit: {r['error'][:160]} | | | | | | | |")
                continue
            coll = sum(r["collectives"].values())
            coll = f"{coll} ({r.get('collective_gib', 0):.0f} GiB)" if coll else "0"
            lines.append(
                f"| {name} | {r['name']} | {topology} | {r['items_per_chip']:g} {r['unit']} | "
                f"{r['arg_gib']:.2f} / {r['temp_gib']:.2f} / {r['out_gib']:.2f} − {r['alias_gib']:.2f} = "
                f"**{r['total_gib']:.2f}** ({r['hbm_gib']:g}) | {r['tflop']:.1f} ({r['pallas_tflop']:.1f}) | "
                f"{r['gib_accessed']:.0f} | {r['roofline_s'] * 1e3:.0f} ms ({'compute' if r['compute_s'] >= r['memory_s'] else 'memory'}) | "
                f"{r['roofline_s'] / r['items_per_chip'] * 1e3:.0f} ms | {r['optimal_s'] or 0:.3f} | "
                f"{r['pallas_calls']} / {coll} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tpu_bench")
    p.add_argument("--only", default="", help="comma-separated row names (default: all)")
    p.add_argument("--table", action="store_true", help="only print the table of the JSON in --out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        print(f"error: unknown rows {unknown}; rows: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if not args.table:
        for name in names:
            compile_row(name, args.out)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
