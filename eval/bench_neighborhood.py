"""2-D neighborhood attention (7x7, 13x13) vs full self-attention over square token grids: forward time, peak
memory and the FLOP-reduction bound.

    python -m eval.bench --suite neighborhood

Grid: image sizes 32x32, 64x64, 96x96 and 128x128 tokens (N = side^2), batch 1, 4 heads, head_dim 32, float32,
forward only. Full attention is `attn.functional.softmax_attention` over the flattened tokens (the dense
reference: O(N^2) logits); neighborhood attention is `attn.functional.neighborhood_attention` (O(N k^2), never an
N x N array). FLOPs count the two matmuls, 4 B H D per attended (query, key) pair: 4 B H N^2 D for full attention
and 4 B H N k^2 D for a k x k neighborhood, so the FLOP-reduction bound is N^2 / (N k^2) = N / k^2 (the speedup a
kernel that only does the needed work could reach). `speedup_vs_full` is the measured ratio of median times at the
same size. Cases whose compiled footprint exceeds the memory limit (default 8 GiB) are recorded as skipped.
--quick uses 8x8 and 16x16 grids (13x13 does not fit 8x8 and is recorded as skipped).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from attn import functional as F

from .bench import Bench, plot_report

SIDES = (32, 64, 96, 128)
QUICK_SIDES = (8, 16)
KERNELS = (7, 13)
BATCH, HEADS, HEAD_DIM = 1, 4, 32
DTYPE = np.float32


def attention_flops(queries: int, keys_per_query: int) -> float:
    """QK^T and PV: 2 multiply-adds of head_dim per (query, key) pair and head."""
    return 4.0 * BATCH * HEADS * queries * keys_per_query * HEAD_DIM


def _full(q, k, v):
    batch, height, width, heads, dim = q.shape
    flat = [t.reshape(batch, height * width, heads, dim) for t in (q, k, v)]
    return F.softmax_attention(*flat).reshape(q.shape)


def run(bench: Bench) -> list[dict[str, Any]]:
    records = []
    rng = np.random.default_rng(0)
    for side in QUICK_SIDES if bench.quick else SIDES:
        tokens = side * side
        shape = (BATCH, side, side, HEADS, HEAD_DIM)
        q, k, v = (jax.device_put(rng.standard_normal(shape, dtype=DTYPE)) for _ in range(3))
        common = dict(image_size=side, tokens=tokens, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)
        full = bench.measure(
            "full",
            _full,
            q,
            k,
            v,
            flops=attention_flops(tokens, tokens),
            kernel_size=None,
            flop_reduction_bound=1.0,
            **common,
        )
        full["speedup_vs_full"] = 1.0 if full["status"] == "ok" else None
        records.append(full)
        for kernel in KERNELS:
            name = f"neighborhood_{kernel}x{kernel}"
            fields = dict(kernel_size=kernel, flop_reduction_bound=tokens / kernel**2, **common)
            if kernel > side:
                records.append(bench.skip(name, f"kernel_size {kernel} > image side {side}", **fields))
                continue
            record = bench.measure(
                name,
                lambda q, k, v, kernel=kernel: F.neighborhood_attention(q, k, v, kernel_size=kernel),
                q,
                k,
                v,
                flops=attention_flops(tokens, kernel**2),
                **fields,
            )
            both = record["status"] == "ok" and full["status"] == "ok"
            record["speedup_vs_full"] = full["median_ms"] / record["median_ms"] if both else None
            records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| image | tokens | attention | median ms | TFLOP/s | peak MiB | FLOP-reduction bound | measured speedup |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ok = r["status"] == "ok"
        mib = r.get("peak_memory_bytes") if ok else None
        lines.append(
            f"| {r['image_size']}x{r['image_size']} | {r['tokens']} | {r['name']} | "
            + (f"{r['median_ms']:.2f} | {r['tflops']:.4f} | " if ok else f"skipped: {r['reason']} | — | ")
            + ("—" if mib is None else f"{mib / 2**20:.1f}")
            + f" | {r['flop_reduction_bound']:.1f} | "
            + ("—" if r.get("speedup_vs_full") is None else f"{r['speedup_vs_full']:.1f}")
            + " |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    def speedups(axis, records):
        for kernel in KERNELS:
            name = f"neighborhood_{kernel}x{kernel}"
            rows = sorted(
                (r["tokens"], r["flop_reduction_bound"], r["speedup_vs_full"])
                for r in report["records"]
                if r["name"] == name and r["status"] == "ok"
            )
            if not rows:
                continue
            tokens, bound, measured = zip(*rows, strict=True)
            line = axis.plot(tokens, bound, linestyle="--", label=f"{kernel}x{kernel} bound N/k^2")[0]
            pairs = [(t, m) for t, m in zip(tokens, measured, strict=True) if m is not None]
            if pairs:
                axis.plot(
                    *zip(*pairs, strict=True), marker="o", color=line.get_color(), label=f"{kernel}x{kernel} measured"
                )
        axis.axhline(1.0, color="gray", linewidth=0.8)  # break-even with full attention
        axis.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="speedup over full attention")
        axis.set_title("FLOP-reduction bound vs measured")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    plot_report(report, path, x="tokens", xlabel="tokens N (image side^2)", extra=speedups)
