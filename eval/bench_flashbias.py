"""Causal softmax attention with an ALiBi bias: a dense [H, T, T] bias tensor vs FlashBias's rank-2 factors
folded into q and k, next to the same attention with no bias.

    python -m eval.bench --suite flashbias

Grid: lengths 1K, 2K, 4K, 8K, 16K, batch 1, 8 heads, head_dim 64, float32, causal. Three cases per length:

  no_bias          `attn.functional.softmax_attention(q, k, v, causal=True)` (the floor)
  dense_bias       the same with bias = `attn.core.positions.alibi_bias` [1, H, T, T], passed in as an input
                   (a model that keeps its bias as a tensor: H T^2 floats held and read every call)
  flashbias_rank2  `attn.softmax.flashbias.flashbias_attention` with the exact ALiBi factors of
                   `alibi_factors` (u [1, T, H, 2], w [1, T, 1, 2]; head dim 64 + 2 padded to 72): O(T) bias memory

Both biased cases compute the same attention (exact ALiBi on the visible pairs). Forward for every length;
forward+backward (gradients of sum(out) w.r.t. q, k, v) up to FWD_BWD_MAX_LEN tokens, to bound the CPU time.
On the XLA path every case still materialises the [H, T, T] logits, so the footprint saving is the bias tensor
(and its reads), not the logits: a fused kernel (cuDNN / Pallas flash) would drop those too. FLOPs: the two
matmuls over all T^2 pairs (the XLA reference does not skip the masked half), 4 B H T^2 D_qk-ish, with D + r for
the factored case; x3 for forward+backward. Cases whose compiled footprint exceeds the memory limit are recorded
as skipped. A T5 bias through `svd_factors` is not in the grid: its SVD of H [T, T] matrices costs far more than
the attention at these lengths on CPU.
--quick: lengths 64 and 128, forward+backward for both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core import positions as pos
from attn.softmax.flashbias import alibi_factors, flashbias_attention

from .bench import Bench, plot_report, sum_grads

LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (64, 128)
FWD_BWD_MAX_LEN = 4096
BATCH, HEADS, HEAD_DIM = 1, 8, 64
RANK = 2
DTYPE = np.float32
CASES = ("no_bias", "dense_bias", "flashbias_rank2")
PASSES = ("fwd", "fwd+bwd")


def attention_flops(length: int, qk_dim: int, *, backward: bool) -> float:
    """QK^T (width qk_dim) and PV (width HEAD_DIM) over all T^2 pairs; forward+backward counted as 3x."""
    forward = 2.0 * BATCH * HEADS * length * length * (qk_dim + HEAD_DIM)
    return 3.0 * forward if backward else forward


def _no_bias(q, k, v):
    return F.softmax_attention(q, k, v, causal=True, implementation="xla")


def _dense(q, k, v, bias):
    return F.softmax_attention(q, k, v, causal=True, bias=bias, implementation="xla")


def _factored(q, k, v, u, w):
    return flashbias_attention(q, k, v, u, w, causal=True, implementation="xla")


def run(bench: Bench) -> list[dict[str, Any]]:
    records = []
    rng = np.random.default_rng(0)
    lengths = QUICK_LENGTHS if bench.quick else LENGTHS
    for length in lengths:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        q, k, v = (jax.device_put(rng.standard_normal(shape, dtype=DTYPE)) for _ in range(3))
        idx = jnp.arange(length)
        inputs = {
            "no_bias": (_no_bias, (q, k, v), HEAD_DIM, 0),
            "dense_bias": (_dense, (q, k, v, pos.alibi_bias(HEADS, idx, idx)), HEAD_DIM, HEADS * length * length),
            "flashbias_rank2": (_factored, (q, k, v, *alibi_factors(HEADS, idx, idx)), HEAD_DIM + RANK, 4 * length),
        }
        for backward in (False, True):
            passes = PASSES[int(backward)]
            for name in CASES:
                fn, args, qk_dim, bias_floats = inputs[name]
                fields = dict(
                    seq_len=length,
                    passes=passes,
                    case=name,
                    batch=BATCH,
                    heads=HEADS,
                    head_dim=HEAD_DIM,
                    bias_bytes=4 * bias_floats,
                )
                label = f"{name} {passes}"
                if backward and length > FWD_BWD_MAX_LEN and not bench.quick:
                    records.append(bench.skip(label, f"forward+backward only up to {FWD_BWD_MAX_LEN} tokens", **fields))
                    continue
                flops = attention_flops(length, qk_dim, backward=backward)
                records.append(bench.measure(label, sum_grads(fn) if backward else fn, *args, flops=flops, **fields))
        _add_ratios(records, length)
    return records


def _add_ratios(records: list[dict[str, Any]], length: int) -> None:
    """time and memory of each case relative to dense_bias at the same length and passes."""
    for passes in PASSES:
        rows = {r["case"]: r for r in records if r["seq_len"] == length and r["passes"] == passes}
        dense = rows.get("dense_bias")
        for r in rows.values():
            both = dense is not None and dense["status"] == "ok" and r["status"] == "ok"
            r["time_vs_dense"] = r["median_ms"] / dense["median_ms"] if both else None
            r["memory_vs_dense"] = r["peak_memory_bytes"] / dense["peak_memory_bytes"] if both else None


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| T | passes | case | median ms | time / dense | peak MiB | memory / dense | bias MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ok = r["status"] == "ok"
        ratio = "—" if r.get("time_vs_dense") is None else f"{r['time_vs_dense']:.2f}"
        mem_ratio = "—" if r.get("memory_vs_dense") is None else f"{r['memory_vs_dense']:.2f}"
        peak = "—" if not ok else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        timing = f"{r['median_ms']:.1f}" if ok else f"skipped: {r['reason']}"
        lines.append(
            f"| {r['seq_len']} | {r['passes']} | {r['case']} | {timing} | {ratio} | {peak} | {mem_ratio} | "
            f"{r['bias_bytes'] / 2**20:.3f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    def ratios(axis, records):
        for name in CASES:
            for passes, style in zip(PASSES, ("-", "--"), strict=True):
                rows = sorted(
                    (r["seq_len"], r["time_vs_dense"])
                    for r in records
                    if r["case"] == name and r["passes"] == passes and r.get("time_vs_dense") is not None
                )
                if rows:
                    axis.plot(*zip(*rows, strict=True), style, marker="o", label=f"{name} {passes}")
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set(xscale="log", xlabel="sequence length T", ylabel="time / dense-bias time")
        axis.set_title("relative to the dense [H, T, T] bias")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
        # plot_report titles its first panel "forward time"; the records hold both passes (see their names)
        axis.figure.axes[0].set_title("time (fwd, and fwd+bwd up to 4K)")

    plot_report(report, path, x="seq_len", xlabel="sequence length T", extra=ratios)
