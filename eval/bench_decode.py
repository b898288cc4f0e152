"""Decode attention on a KV cache: ms per token of today's dense masked decode against split-KV decoding.

    python -m eval.bench_decode            (= python -m eval.bench --suite decode; same flags)

One decoded query (batch 1, 8 heads over 8 kv heads, head_dim 64, float32) attends to a cache holding `length`
tokens, lengths 1K..32K. A case runs STEPS decode-attention calls inside one jitted `lax.fori_loop` (a different
query each step), so ms_per_token = time / STEPS. Cases:

  dense       `reference_softmax_attention` with the layer's decode mask (causal, kv_lengths = filled), what
              `softmax_attention` runs for a decode call on CPU today: every slot of the cache is scored
  split       `attn.core.split_kv_decode.split_kv_attention` with its default partition (512-slot splits)
  split_S     the same with num_splits = S (S in SPLITS: splits of capacity / S slots)
  auto        `attn.core.kv_cache.decode_attention` with implementation=None: what the layer's decode runs now

Two allocations: "full" (capacity = length, as eval.bench_cache's dense cache) and "max_len" (capacity CAPACITY
= 32K, filled to `length`: what `attn.models.generate` allocates, a cache sized for the whole generation).
--quick: lengths 256 and 512, capacity 1K, 2 steps.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import kv_cache
from attn.core.masks import Mask
from attn.core.reference import reference_softmax_attention
from attn.core.split_kv_decode import split_kv_attention

from .bench import Bench, main, plot_report

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (256, 512)
CAPACITY, QUICK_CAPACITY = 32768, 1024
SPLITS = (16,)  # split_S cases besides `split` (the default partition: 512-slot splits)
STEPS, QUICK_STEPS = 8, 2
BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 8, 8, 64


def attention_case(name: str):
    """fn(q [B, 1, H, D], keys, values, filled) -> out for the case `name`."""

    def fn(q, keys, values, filled):
        mask = Mask(causal=True, kv_lengths=jnp.full((q.shape[0],), filled, jnp.int32))
        q_offset = filled - 1
        if name == "dense":
            return reference_softmax_attention(q, keys, values, mask=mask, q_offset=q_offset)
        if name == "auto":
            return kv_cache.decode_attention(q, keys, values, mask=mask, q_offset=q_offset)
        num_splits = int(name.split("_")[1]) if "_" in name else None
        return split_kv_attention(q, keys, values, mask=mask, q_offset=q_offset, num_splits=num_splits)

    return fn


def decode_loop(fn, steps: int):
    """(queries [B, steps, H, D], keys, values, filled) -> sum of `steps` decode-attention outputs."""

    def loop(queries, keys, values, filled):
        def step(i, total):
            q = jax.lax.dynamic_slice_in_dim(queries, i, 1, axis=1)
            return total + jnp.sum(fn(q, keys, values, filled))

        return jax.lax.fori_loop(0, steps, step, jnp.zeros((), jnp.float32))

    return loop


def run(bench: Bench) -> list[dict[str, Any]]:
    steps = QUICK_STEPS if bench.quick else STEPS
    capacity = QUICK_CAPACITY if bench.quick else CAPACITY
    rng = np.random.default_rng(0)
    names = ["dense", "split", *(f"split_{s}" for s in SPLITS), "auto"]
    records = []
    for length in QUICK_LENGTHS if bench.quick else LENGTHS:
        queries = jnp.asarray(rng.standard_normal((BATCH, steps, HEADS, HEAD_DIM), dtype=np.float32))
        for allocation, slots in (("full", length), ("max_len", capacity)):
            if slots < length:
                continue
            shape = (BATCH, slots, KV_HEADS, HEAD_DIM)
            keys = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
            values = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
            filled = jnp.asarray(length, jnp.int32)
            for name in names:
                record = bench.measure(
                    f"{name} ({allocation})",
                    decode_loop(attention_case(name), steps),
                    queries,
                    keys,
                    values,
                    filled,
                    flops=steps * BATCH * 4.0 * HEADS * HEAD_DIM * length,
                    case=name,
                    allocation=allocation,
                    length=length,
                    capacity=slots,
                    steps=steps,
                )
                record["ms_per_token"] = record["median_ms"] / steps if record["status"] == "ok" else None
                record["best_ms_per_token"] = record["min_ms"] / steps if record["status"] == "ok" else None
                records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| length | allocation | case | ms / token (median) | ms / token (best) | vs dense (best) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    best = {(r["length"], r["allocation"]): r["best_ms_per_token"] for r in records if r["case"] == "dense"}
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['length']} | {r['allocation']} | {r['case']} | skipped: {r['reason']} | — | — |")
            continue
        dense = best.get((r["length"], r["allocation"]))
        ratio = f"{dense / r['best_ms_per_token']:.2f}x" if dense else "—"
        lines.append(
            f"| {r['length']} | {r['allocation']} | {r['case']} | {r['ms_per_token']:.3f} | "
            f"{r['best_ms_per_token']:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    def per_token(axis, records):
        for name in dict.fromkeys(r["name"] for r in records):
            rows = sorted((r["length"], r["best_ms_per_token"]) for r in records if r["name"] == name)
            axis.plot(*zip(*rows, strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="filled cache length", ylabel="ms / token (best)")
        axis.set_title("decode attention per token")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6)

    plot_report(report, path, x="length", xlabel="filled cache length", extra=per_token)


if __name__ == "__main__":
    main(["--suite", "decode", *sys.argv[1:]])
