"""Block-sparse attention (XLA path) against density: forward time as a ratio to dense and to the FLOP bound.

    python -m eval.bench_block_sparse [--quick] [--repeats 3]   # this suite and softmax_memory, 3 GiB limit
    python -m eval.bench --suite block_sparse

Grid: lengths 4K, 8K, 16K, batch 1, 4 heads, head_dim 64, float32, block 128, forward only. Each (head, query
block) selects `density * num_k_blocks` distinct key blocks at random (not causal), so the work is exactly the
density times the dense work. Cases per length:

  block_sparse_<p>pct   `attn.functional.block_sparse_attention(..., block_indices=...)` at density p%
  softmax_xla           `attn.functional.softmax_attention(..., implementation="xla")`: the dense jnp reference
                        (skipped when its compiled footprint exceeds the memory limit)
  softmax_xla_blockwise `attn.functional.softmax_attention(..., implementation="xla_blockwise")`: the online-softmax
                        dense path, the same work as block_sparse_100pct without the gathers

FLOPs 4 B H Tq (density Tk) D. `speedup_vs_full` = time of block_sparse_100pct / time at this density;
`fraction_of_bound` = speedup_vs_full / (1 / density) (1.0: time exactly proportional to the kept blocks);
`speedup_vs_dense_xla` = time of softmax_xla / time. --quick: lengths 256 and 512, block 64.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F

from .bench import GIB, Bench, get_suite, plot_report, render_table, run_suite

LENGTHS = (4096, 8192, 16384)
QUICK_LENGTHS = (256, 512)
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
BLOCK, QUICK_BLOCK = 128, 64
BATCH, HEADS, HEAD_DIM = 1, 4, 64
DTYPE = np.float32
MEMORY_LIMIT_GIB = 3.0


def attention_flops(length: int, keys_per_query: float) -> float:
    """QK^T and PV: 4 B H D per (query, key) pair."""
    return 4.0 * BATCH * HEADS * length * keys_per_query * HEAD_DIM


def random_indices(rng: np.random.Generator, num_blocks: int, selected: int) -> np.ndarray:
    """int32 [1, H, num_blocks, selected]: distinct random key blocks per (head, query block)."""
    picks = [rng.permutation(num_blocks)[:selected] for _ in range(HEADS * num_blocks)]
    return np.asarray(picks, np.int32).reshape(1, HEADS, num_blocks, selected)


def run(bench: Bench) -> list[dict[str, Any]]:
    records = []
    rng = np.random.default_rng(0)
    block = QUICK_BLOCK if bench.quick else BLOCK
    for length in QUICK_LENGTHS if bench.quick else LENGTHS:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        q, k, v = (jax.device_put(rng.standard_normal(shape, dtype=DTYPE)) for _ in range(3))
        num_blocks = -(-length // block)
        common = dict(seq_len=length, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, block_size=block)
        rows = []
        for density in DENSITIES:
            selected = max(1, round(density * num_blocks))
            indices = jnp.asarray(random_indices(rng, num_blocks, selected))
            rows.append(
                bench.measure(
                    f"block_sparse_{round(100 * density)}pct",
                    lambda q, k, v, indices=indices: F.block_sparse_attention(
                        q, k, v, block_indices=indices, block_size=block
                    ),
                    q,
                    k,
                    v,
                    flops=attention_flops(length, selected * block),
                    density=selected / num_blocks,
                    **common,
                )
            )
        for implementation in ("xla", "xla_blockwise"):
            rows.append(
                bench.measure(
                    f"softmax_{implementation}",
                    lambda q, k, v, implementation=implementation: F.softmax_attention(
                        q, k, v, implementation=implementation
                    ),
                    q,
                    k,
                    v,
                    flops=attention_flops(length, length),
                    density=1.0,
                    **common,
                )
            )
        _add_ratios(rows)
        records.extend(rows)
    return records


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_full, fraction_of_bound and speedup_vs_dense_xla on the records of one length."""

    def time_of(name):
        row = next((r for r in rows if r["name"] == name and r["status"] == "ok"), None)
        return None if row is None else row["median_ms"]

    full, dense = time_of("block_sparse_100pct"), time_of("softmax_xla")
    for r in rows:
        ok = r["status"] == "ok"
        r["speedup_vs_full"] = full / r["median_ms"] if ok and full else None
        sparse = r["name"].startswith("block_sparse") and r["speedup_vs_full"]
        r["fraction_of_bound"] = r["speedup_vs_full"] * r["density"] if sparse else None
        r["speedup_vs_dense_xla"] = dense / r["median_ms"] if ok and dense else None


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| T | case | density | median ms | speedup vs 100% | fraction of 1/density bound | speedup vs dense XLA |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        timing = f"{r['median_ms']:.1f}" if r["status"] == "ok" else f"skipped: {r['reason']}"
        cells = [_fmt(r.get(key)) for key in ("speedup_vs_full", "fraction_of_bound", "speedup_vs_dense_xla")]
        lines.append(f"| {r['seq_len']} | {r['name']} | {r['density']:.3f} | {timing} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def plot(report: dict[str, Any], path: str) -> None:
    def against_density(axis, records):
        for length in sorted({r["seq_len"] for r in records}):
            rows = sorted(
                (r["density"], r["fraction_of_bound"])
                for r in records
                if r["seq_len"] == length and r["name"].startswith("block_sparse") and r.get("fraction_of_bound")
            )
            if rows:
                axis.plot(*zip(*rows, strict=True), marker="o", label=f"T={length}")
        axis.axhline(0.8, color="grey", linestyle="--", linewidth=1, label="goal 0.8")
        axis.set(xscale="log", xlabel="density (kept key blocks)", ylabel="speedup vs 100% / (1 / density)")
        axis.set_title("fraction of the FLOP bound")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    plot_report(report, path, x="seq_len", xlabel="sequence length T", extra=against_density)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs this suite and the softmax_memory suite (a 3 GiB memory limit), writing both JSON + PNG reports."""
    parser = argparse.ArgumentParser(prog="python -m eval.bench_block_sparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grids (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    bench = Bench(warmup=1, repeats=args.repeats, memory_limit_bytes=int(MEMORY_LIMIT_GIB * GIB), quick=args.quick)
    for name in ("block_sparse", "softmax_memory"):
        report = run_suite(name, bench, args.output_dir)
        print(render_table(get_suite(name), report["records"]))
        print(f"\nwrote {report['json_path']} and {report['png_path']}\n")


if __name__ == "__main__":
    main()
