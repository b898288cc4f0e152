"""Decoding with a cache policy: decode time per token and cache bytes against the generated length, for the dense
KV cache (`softmax`) and StreamingLLM (`streaming`, budget 256: 4 sinks + 252 recent tokens).

    python -m eval.bench --suite cache

Grid: generated lengths 1K, 2K, 4K, 8K, 16K; one attention layer (8 heads, head_dim 64, embed 512, RoPE, float32,
batch 1). A case decodes STEPS tokens one at a time inside one jitted `lax.fori_loop` (as `attn.models.generate`
does: the cache is the loop carry, updated in place), starting from a cache that already holds length - STEPS
tokens, so `ms_per_token` = median time / STEPS is the cost of a token at that length. The dense cache is allocated
at the length (it attends over all of it); the streaming cache at its budget, full and evicting at every step.
`cache_bytes` = bytes of the layer's "cache" collection (keys, values, index; streaming adds per-head lengths and
positions); `streaming_int8` stores the same cache as 8-bit per-token codes. The table gives the median and the best
of the repeats per token. FLOPs: 4 H D per visible key per token
(q.k and w.v) plus the projections, 8 E H D.
--quick: lengths 128 and 256, budget 64, 4 steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn

from .bench import Bench, plot_report

LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (128, 256)
BUDGET, QUICK_BUDGET, SINKS = 256, 64, 4
STEPS, QUICK_STEPS = 32, 4
BATCH, HEADS, HEAD_DIM, EMBED = 1, 8, 64, 512
CASES = {
    "dense": ("softmax", {}),
    "streaming": ("streaming", {"sinks": SINKS}),
    "streaming_int8": ("streaming", {"sinks": SINKS, "cache_bits": 8}),
}


def filled_cache(cache: dict[str, Any], length: int, rng: np.random.Generator) -> dict[str, Any]:
    """`cache` (zeros from the creating call) holding random keys/values for the `length` tokens seen so far."""

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "cache_index" in name:
            return jnp.asarray(length, jnp.int32)
        if "cache_lengths" in name:  # a full streaming cache: budget entries per (batch, kv head)
            return jnp.full(leaf.shape, cache["cache_positions"].shape[-1], jnp.int32)
        if "cache_positions" in name:
            capacity = leaf.shape[-1]
            kept = np.concatenate([np.arange(SINKS), np.arange(length - (capacity - SINKS), length)])
            return jnp.broadcast_to(jnp.asarray(kept, jnp.int32), leaf.shape)
        if leaf.dtype == jnp.uint8:
            return jnp.asarray(rng.integers(0, 256, leaf.shape, dtype=np.uint8))
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32))

    return jax.tree_util.tree_map_with_path(fill, cache)


def created_cache(layer: Any, params: Any, length: int) -> dict[str, Any]:
    """The zero cache of the creating decode call over `length` tokens (the dense cache is allocated at the length,
    a policy's at its budget); shapes from jax.eval_shape, so no forward runs."""

    def create(tokens):
        return layer.apply(params, tokens, decode=True, mutable=["cache"])[1]["cache"]

    shapes = jax.eval_shape(create, jax.ShapeDtypeStruct((BATCH, length, EMBED), jnp.float32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_steps(layer: Any, params: Any, steps: int):
    """fn(x [B, steps, E], *cache leaves) -> sum of the outputs of `steps` single-token decode calls."""

    def fn(x, treedef, *leaves):
        def step(i, carry):
            cache, total = carry
            token = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
            y, state = layer.apply({**params, "cache": cache}, token, decode=True, mutable=["cache"])
            return state["cache"], total + jnp.sum(y)

        cache = jax.tree_util.tree_unflatten(treedef, leaves)
        return jax.lax.fori_loop(0, steps, step, (cache, jnp.zeros((), jnp.float32)))[1]

    return fn


def run(bench: Bench) -> list[dict[str, Any]]:
    budget = QUICK_BUDGET if bench.quick else BUDGET
    steps = QUICK_STEPS if bench.quick else STEPS
    rng = np.random.default_rng(0)
    records = []
    for length in QUICK_LENGTHS if bench.quick else LENGTHS:
        x = jnp.asarray(0.1 * rng.standard_normal((BATCH, steps, EMBED), dtype=np.float32))
        for name, (mechanism, options) in CASES.items():
            extra = {} if mechanism == "softmax" else {"budget": budget}
            layer = attn.build(mechanism, num_heads=HEADS, head_dim=HEAD_DIM, **options, **extra)
            params = layer.init(jax.random.key(0), x[:, :1])
            cache = filled_cache(created_cache(layer, params, length), length - steps, rng)
            leaves, treedef = jax.tree_util.tree_flatten(cache)
            visible = length if mechanism == "softmax" else budget
            flops = steps * BATCH * (4.0 * HEADS * HEAD_DIM * visible + 8.0 * EMBED * HEADS * HEAD_DIM)
            fn = decode_steps(layer, params, steps)
            cache_bytes = sum(int(leaf.size) * leaf.dtype.itemsize for leaf in leaves)
            record = bench.measure(
                name,
                lambda x, *leaves, fn=fn, treedef=treedef: fn(x, treedef, *leaves),
                x,
                *leaves,
                flops=flops,
                generated_length=length,
                budget=None if mechanism == "softmax" else budget,
                steps=steps,
                cache_bytes=cache_bytes,
            )
            record["ms_per_token"] = record["median_ms"] / steps if record["status"] == "ok" else None
            records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| generated length | cache | ms / token (median) | ms / token (best) | cache KiB | compiled MiB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        ok = r["status"] == "ok"
        # the best of the repeats is the steadier figure on a loaded machine
        timing = f"{r['ms_per_token']:.2f} | {r['min_ms'] / r['steps']:.2f}" if ok else f"skipped: {r['reason']} | —"
        compiled = f"{r['peak_memory_bytes'] / 2**20:.1f}" if ok and r.get("peak_memory_bytes") else "—"
        lines.append(
            f"| {r['generated_length']} | {r['name']} | {timing} | {r['cache_bytes'] / 1024:.0f} | {compiled} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    def cache_panel(axis, records):
        for name in dict.fromkeys(r["name"] for r in records):
            rows = sorted((r["generated_length"], r["cache_bytes"] / 2**20) for r in records if r["name"] == name)
            axis.plot(*zip(*rows, strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="generated length", ylabel="cache MiB")
        axis.set_title("cache bytes (flat = O(budget))")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
        axis.figure.axes[0].set_title(f"time of {report['records'][0]['steps']} decode steps")

    plot_report(report, path, x="generated_length", xlabel="generated length", extra=cache_panel)
