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
                records.append(add_per_token(record, steps))
    return records


def add_per_token(record: dict[str, Any], steps: int) -> dict[str, Any]:
    """Adds ms_per_token (median) and best_ms_per_token to a `Bench.measure` record of a `steps`-token loop."""
    ok = record["status"] == "ok"
    record["ms_per_token"] = record["median_ms"] / steps if ok else None
    record["best_ms_per_token"] = record["min_ms"] / steps if ok else None
    return record


def per_token_table(records: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Markdown table of per-token decode times: `columns` are the record fields that identify a row besides its
    `case`; the last column compares each row's best time with the "dense" case's of the same `columns`."""
    lines = [
        f"| {' | '.join(columns)} | case | ms / token (median) | ms / token (best) | dense / this (best) |",
        "|" + "---|" * (len(columns) + 1) + "---:|---:|---:|",
    ]
    best = {tuple(r[c] for c in columns): r["best_ms_per_token"] for r in records if r["case"] == "dense"}
    for r in records:
        keys = " | ".join(str(r[c]) for c in columns)
        if r["status"] != "ok":
            lines.append(f"| {keys} | {r['case']} | skipped: {r['reason']} | — | — |")
            continue
        dense = best.get(tuple(r[c] for c in columns))
        ratio = f"{dense / r['best_ms_per_token']:.2f}x" if dense else "—"
        lines.append(f"| {keys} | {r['case']} | {r['ms_per_token']:.3f} | {r['best_ms_per_token']:.3f} | {ratio} |")
    return "\n".join(lines)


def per_token_plot(report: dict[str, Any], path: str, *, x: str, xlabel: str, title: str) -> None:
    """The suite's plot plus a panel of best ms per token against `x`, one line per record name."""

    def per_token(axis, records):
        for name in dict.fromkeys(r["name"] for r in records):
            rows = sorted((r[x], r["best_ms_per_token"]) for r in records if r["name"] == name)
            axis.plot(*zip(*rows, strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="ms / token (best)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6)

    plot_report(report, path, x=x, xlabel=xlabel, extra=per_token)


def table(records: list[dict[str, Any]]) -> str:
    return per_token_table(records, ("length", "allocation"))


def plot(report: dict[str, Any], path: str) -> None:
    per_token_plot(report, path, x="length", xlabel="filled cache length", title="decode attention per token")


if __name__ == "__main__":
    main(["--suite", "decode", *sys.argv[1:]])
