"""Memory-efficient (blockwise) softmax attention on XLA against the dense reference and lightning-style linear
attention: compiled memory and forward time against length.

    python -m eval.bench_block_sparse                # runs this suite after block_sparse, 3 GiB memory limit
    python -m eval.bench --suite softmax_memory --memory-limit-gib 3

Grid: lengths 1K .. 32K, batch 1, 8 heads, head_dim 64, float32, causal. Cases:

  softmax_xla            `F.softmax_attention(..., causal=True, implementation="xla")`: dense [B, H, T, T] scores
  softmax_xla_blockwise  `F.softmax_attention(..., causal=True, implementation="xla_blockwise")`: online softmax
                         over key blocks, causal blocks above the diagonal skipped, O(T) memory
  lightning_chunk64      `F.linear_attention(..., causal=True, decay=TransNormerLLM's per-head decay,
                         form="chunked", chunk_size=64)`: linear time and memory (a different model, shown as the
                         linear-memory yardstick)

Timed: the forward pass (median of `repeats`) up to `TIMED_UP_TO` = 8K for the two softmax paths (a forward pass
of causal softmax at 16K, 8 heads, is ~0.3 TFLOP: over a minute per call on 2 shared cores; those cases are
recorded as "not timed" with their compiled memory), at every length for lightning. Memory:
`compiled_memory_bytes` of the forward and `train_compiled_memory_bytes` of forward+backward (gradients of
sum(out) w.r.t. q, k, v; compiled, not run), both from `compiled.memory_analysis()` (temp + arguments + outputs).
A case whose forward footprint exceeds the memory limit is recorded as skipped with its footprint.
--quick: lengths 256 and 512.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.linear.lightning import tnl_decay

from .bench import Bench, compiled_bytes, plot_report, sum_grads

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (256, 512)
TIMED_UP_TO = 8192
CHUNK = 64
BATCH, HEADS, HEAD_DIM = 1, 8, 64
DTYPE = np.float32


def causal_flops(length: int) -> float:
    """Forward FLOPs of causal softmax attention counting the T (T + 1) / 2 visible pairs."""
    return 4.0 * BATCH * HEADS * length * (length + 1) / 2 * HEAD_DIM


def run(bench: Bench) -> list[dict[str, Any]]:
    decay = jnp.asarray(tnl_decay(HEADS, 0, 1))
    cases = {
        "softmax_xla": lambda q, k, v: F.softmax_attention(q, k, v, causal=True, implementation="xla"),
        "softmax_xla_blockwise": lambda q, k, v: F.softmax_attention(
            q, k, v, causal=True, implementation="xla_blockwise"
        ),
        f"lightning_chunk{CHUNK}": lambda q, k, v: F.linear_attention(
            q, k, v, causal=True, decay=decay, chunk_size=CHUNK, form="chunked"
        ),
    }
    records = []
    rng = np.random.default_rng(0)
    for length in QUICK_LENGTHS if bench.quick else LENGTHS:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        q, k, v = (jax.device_put(0.1 * rng.standard_normal(shape, dtype=DTYPE)) for _ in range(3))
        for name, fn in cases.items():
            fields = dict(flops=causal_flops(length), seq_len=length, batch=BATCH, heads=HEADS)
            if length <= TIMED_UP_TO or name.startswith("lightning"):
                record = bench.measure(name, fn, q, k, v, **fields)
            else:
                reason = f"not timed above T={TIMED_UP_TO} (over a minute per call on this host); memory compiled"
                forward = jax.jit(fn).lower(q, k, v).compile()
                record = bench.skip(name, reason, compiled_memory_bytes=compiled_bytes(forward), **fields)
            train = jax.jit(sum_grads(fn)).lower(q, k, v).compile()
            record["train_compiled_memory_bytes"] = compiled_bytes(train)
            records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| T | attention | forward ms | forward MiB (compiled) | fwd+bwd MiB (compiled) |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in records:
        timing = f"{r['median_ms']:.1f}" if r["status"] == "ok" else f"skipped: {r['reason']}"
        memory = [_mib(r.get(key)) for key in ("compiled_memory_bytes", "train_compiled_memory_bytes")]
        lines.append(f"| {r['seq_len']} | {r['name']} | {timing} | {' | '.join(memory)} |")
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def plot(report: dict[str, Any], path: str) -> None:
    def train_memory(axis, records):
        every = report["records"]  # skipped cases still have their compiled footprints
        for name in dict.fromkeys(r["name"] for r in every):
            rows = sorted(
                (r["seq_len"], r["train_compiled_memory_bytes"] / 2**20)
                for r in every
                if r["name"] == name and r.get("train_compiled_memory_bytes")
            )
            if rows:
                axis.plot(*zip(*rows, strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="MiB")
        axis.set_title("forward+backward compiled memory")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    plot_report(report, path, x="seq_len", xlabel="sequence length T", extra=train_memory)
