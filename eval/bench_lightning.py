"""Lightning-style chunked causal linear attention vs causal softmax attention: forward+backward time per token
and memory across lengths (the "constant speed" claim of Lightning Attention).

    python -m eval.bench --suite lightning

Grid: lengths 256, 512, 1K, 2K, 4K, 8K, 16K, 32K, batch 1, 8 heads, head_dim 64, float32, forward+backward (gradients of
sum(out) w.r.t. q, k, v). Cases:

  lightning_chunk<C>  `attn.functional.linear_attention(q, k, v, causal=True, decay=lambda_h, form="chunked",
                      chunk_size=C)` with TransNormerLLM's per-head decay (`attn.linear.lightning.tnl_decay` of a
                      one-layer model: lambda_h = exp(-2^(-8h/H))), no feature map: the Lightning Attention-2
                      tiling, O(T (C D + D^2)) time, no T x T array
  softmax             `attn.functional.softmax_attention(q, k, v, causal=True, implementation="xla")`:
                      O(T^2 D) time, the [H, T, T] probabilities materialised

FLOPs (forward; x3 for forward+backward): linear 4 H T (C D + D^2) (masked intra-chunk attention over full C x C
tiles, plus Q S and K^T V against the D x D state); softmax 4 H T^2 D (the XLA reference computes all T^2 pairs).
`ms_per_1k_tokens` = median ms / (T / 1024): flat for a linear-time method. Cases whose compiled footprint
exceeds the memory limit are recorded as skipped (softmax at the longest lengths).
--quick: lengths 128 and 256, chunk 64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.linear.lightning import tnl_decay

from .bench import Bench, plot_report, sum_grads
from .bench_kernels import lightning_flops

# 256 and 512 locate the crossover, which lies below 1K on CPU
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (128, 256)
CHUNK = 64
BATCH, HEADS, HEAD_DIM = 1, 8, 64
DTYPE = np.float32


def linear_flops(length: int, chunk: int) -> float:
    """Forward+backward (3x forward) FLOPs of chunked linear attention (the kernel suite's count)."""
    return lightning_flops(BATCH, HEADS, length, HEAD_DIM, chunk, direction="fwd+bwd")


def softmax_flops(length: int) -> float:
    """Forward+backward (3x forward) FLOPs of dense softmax attention over all T^2 pairs."""
    return 3.0 * 4.0 * BATCH * HEADS * length * length * HEAD_DIM


def run(bench: Bench) -> list[dict[str, Any]]:
    decay = jnp.asarray(tnl_decay(HEADS, 0, 1))  # [H], per-head constant decay in (0, 1)
    lightning = sum_grads(
        lambda q, k, v: F.linear_attention(q, k, v, causal=True, decay=decay, chunk_size=CHUNK, form="chunked")
    )
    softmax = sum_grads(lambda q, k, v: F.softmax_attention(q, k, v, causal=True, implementation="xla"))
    records = []
    rng = np.random.default_rng(0)
    for length in QUICK_LENGTHS if bench.quick else LENGTHS:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        # small inputs keep the undecayed-in-chunk sums well inside float32 range
        q, k, v = (jax.device_put(0.1 * rng.standard_normal(shape, dtype=DTYPE)) for _ in range(3))
        common = dict(seq_len=length, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, passes="fwd+bwd")
        cases = (
            (f"lightning_chunk{CHUNK}", lightning, linear_flops(length, CHUNK), {"chunk_size": CHUNK}),
            ("softmax", softmax, softmax_flops(length), {"chunk_size": None}),
        )
        for name, fn, flops, extra in cases:
            record = bench.measure(name, fn, q, k, v, flops=flops, **common, **extra)
            record["ms_per_1k_tokens"] = record["median_ms"] / (length / 1024) if record["status"] == "ok" else None
            records.append(record)
        _add_speedup(records, length)
    return records


def _add_speedup(records: list[dict[str, Any]], length: int) -> None:
    """softmax time / lightning time at `length` (> 1: linear is faster), on the lightning record."""
    rows = [r for r in records if r["seq_len"] == length]
    soft = next((r for r in rows if r["name"] == "softmax"), None)
    for r in rows:
        both = soft is not None and soft["status"] == "ok" and r["status"] == "ok" and r is not soft
        r["softmax_time_over_this"] = soft["median_ms"] / r["median_ms"] if both else None


def crossover(records: list[dict[str, Any]]) -> int | None:
    """The shortest measured length from which lightning is faster than softmax at every measured length."""
    ratios = [(r["seq_len"], r["softmax_time_over_this"]) for r in records if r.get("softmax_time_over_this")]
    lengths = sorted({n for n, _ in ratios})
    faster = {n for n, ratio in ratios if ratio > 1}
    for n in lengths:
        if all(m in faster for m in lengths if m >= n):
            return n
    return None


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| T | attention | fwd+bwd ms | ms per 1K tokens | peak MiB | softmax time / this |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        ok = r["status"] == "ok"
        timing = f"{r['median_ms']:.1f} | {r['ms_per_1k_tokens']:.2f}" if ok else f"skipped: {r['reason']} | —"
        peak = f"{r['peak_memory_bytes'] / 2**20:.0f}" if ok else "—"
        speed = "—" if r.get("softmax_time_over_this") is None else f"{r['softmax_time_over_this']:.2f}"
        lines.append(f"| {r['seq_len']} | {r['name']} | {timing} | {peak} | {speed} |")
    cross = crossover(records)
    lines.append("")
    lines.append(
        "lightning faster than softmax from T = " + (str(cross) if cross else "— (not within the measured lengths)")
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    def per_token(axis, records):
        for name in dict.fromkeys(r["name"] for r in records):
            rows = sorted((r["seq_len"], r["ms_per_1k_tokens"]) for r in records if r["name"] == name)
            if rows:
                axis.plot(*zip(*rows, strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms per 1K tokens (fwd+bwd)")
        axis.set_title("time per token (flat = linear time)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
        # plot_report titles its first panel "forward time"; every case here is forward+backward
        axis.figure.axes[0].set_title("forward+backward time")

    plot_report(report, path, x="seq_len", xlabel="sequence length T", extra=per_token)
