"""Context parallelism: compiled memory per device of ring and Ulysses attention against the number of devices
P on the mesh's `context` axis, at a fixed length, next to single-device softmax attention.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m eval.bench --suite context_parallel

Grid: T = 4096 (quick: 512), batch 1, 8 heads, head_dim 64, float32, causal; P = 1, 2, 4, 8 (cases needing more
devices than the process has are recorded as skipped). Cases:

  softmax_xla   `F.softmax_attention(causal=True, implementation="xla")` on one device (P = 1)
  ring          `attn.core.context_parallel.ring_attention` (zig-zag layout), q/k/v sharded along T
  ulysses       `attn.core.context_parallel.ulysses_attention`, q/k/v sharded along T

Memory: `compiled_memory_bytes` of the forward and `train_compiled_memory_bytes` of forward + backward (gradients
of sum(out) w.r.t. q, k, v), both from `compiled.memory_analysis()` of the SPMD program, i.e. per device. On the
fake CPU devices every "device" shares the same cores, so the times say nothing about scaling: they are recorded
only to show the cases run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn import functional as F
from attn.core.context_parallel import ring_attention, ulysses_attention

from .bench import Bench, compiled_bytes, plot_report, sum_grads

LENGTH, QUICK_LENGTH = 4096, 512
PARTS = (1, 2, 4, 8)
BATCH, HEADS, HEAD_DIM = 1, 8, 64


def run(bench: Bench) -> list[dict[str, Any]]:
    length = QUICK_LENGTH if bench.quick else LENGTH
    rng = np.random.default_rng(0)
    shape = (BATCH, length, HEADS, HEAD_DIM)
    arrays = [0.1 * rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    flops = 4.0 * BATCH * HEADS * length * (length + 1) / 2 * HEAD_DIM
    records = []
    for parts in PARTS:
        fields = dict(flops=flops, seq_len=length, devices=parts, heads=HEADS)
        if parts > len(jax.devices()):
            for name in ("ring", "ulysses"):
                reason = f"needs {parts} devices, the process has {len(jax.devices())}"
                records.append(bench.skip(name, reason, **fields))
            continue
        if parts == 1:
            cases = {"softmax_xla": lambda q, k, v: F.softmax_attention(q, k, v, causal=True, implementation="xla")}
            q, k, v = (jax.device_put(x) for x in arrays)
        else:
            mesh = Mesh(np.array(jax.devices()[:parts]), ("context",))
            sharding = NamedSharding(mesh, PartitionSpec(None, "context"))
            q, k, v = (jax.device_put(x, sharding) for x in arrays)
            cases = {
                "ring": lambda q, k, v, mesh=mesh: ring_attention(q, k, v, mesh=mesh, causal=True),
                "ulysses": lambda q, k, v, mesh=mesh: ulysses_attention(q, k, v, mesh=mesh, causal=True),
            }
        for name, fn in cases.items():
            record = bench.measure(name, fn, q, k, v, **fields)
            record["train_compiled_memory_bytes"] = compiled_bytes(jax.jit(sum_grads(fn)).lower(q, k, v).compile())
            records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| P | attention | forward MiB per device | fwd+bwd MiB per device | forward ms (fake devices) |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['devices']} | {r['name']} | skipped: {r['reason']} | | |")
            continue
        memory = [f"{r[key] / 2**20:.1f}" for key in ("compiled_memory_bytes", "train_compiled_memory_bytes")]
        lines.append(f"| {r['devices']} | {r['name']} | {' | '.join(memory)} | {r['median_ms']:.0f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    def train_memory(axis, records):
        for name in dict.fromkeys(r["name"] for r in records):
            rows = sorted(
                (r["devices"], r["train_compiled_memory_bytes"] / 2**20)
                for r in records
                if r["name"] == name and r.get("train_compiled_memory_bytes")
            )
            if rows:
                axis.plot(*zip(*rows, strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="devices P on the context axis", ylabel="MiB per device")
        axis.set_title("forward+backward compiled memory")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    plot_report(report, path, x="devices", xlabel="devices P on the context axis", extra=train_memory)
