"""Decode of a cache-policy layer: ms per token with the explicit stages against split-KV (attn/kv/policy_layer.py).

    python -m eval.bench --suite decode_policy [--quick]

One token per decode call (batch 1, embed 512, 8 heads over KV_HEADS kv heads, head_dim 64, RoPE, float32) through
a policy layer (the whole layer: projections, candidates, attention, the policy's statistics and its keep/gather)
whose cache holds `budget` entries, filled as after a prefill (random keys and values at positions 0..budget-1,
random statistics), so every call evicts. STEPS calls run in one jitted `lax.fori_loop` with the cache as the carry;
ms_per_token = time / STEPS. Cases per policy and budget:

  dense   implementation="xla": the explicit stages, a dense per-head mask [B, H, 1, budget + 1] and the softmax
          pipeline over every candidate
  split   implementation="split_kv": split-KV over the cached entries' per-head lengths merged with the token by
          log-sum-exp; statistics p = exp(s - lse) (StreamingLLM's window hides its oldest recent entry from the
          query once the cache is full, so its calls run the explicit stages inside the run-time switch)

--quick: budgets 64 and 128, 2 steps.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn

from .bench import Bench, main
from .bench_decode import add_per_token, per_token_plot, per_token_table

POLICIES = {
    "h2o": {"recent": 32},
    "tova": {},
    "snapkv": {"observation_window": 16, "decode_budget": 32},
    "streaming": {"sinks": 4},
}
BUDGETS, QUICK_BUDGETS = (256, 1024, 4096), (64, 128)
STEPS, QUICK_STEPS = 16, 2
EMBED, HEADS, KV_HEADS, HEAD_DIM = 512, 8, 2, 64
CASES = {"dense": "xla", "split": "split_kv"}


def filled_cache(shapes: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A full cache of the creating call's cache shapes (ShapeDtypeStructs): keys / values standard normal, float
    statistics squared normal, lengths the capacity, positions 0..C-1, index C, anything else zero."""
    capacity = shapes["cached_key"].shape[1]
    out = {}
    for name, leaf in shapes.items():
        if name in ("cached_key", "cached_value"):
            out[name] = jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
        elif name.endswith(("key_mass", "key_recent")):
            out[name] = jnp.asarray(rng.standard_normal(leaf.shape) ** 2, leaf.dtype)
        elif name == "cache_lengths":
            out[name] = jnp.full(leaf.shape, capacity, leaf.dtype)
        elif name == "cache_positions":
            out[name] = jnp.broadcast_to(jnp.arange(capacity, dtype=leaf.dtype), leaf.shape)
        elif name == "cache_index":
            out[name] = jnp.asarray(capacity, leaf.dtype)
        else:
            out[name] = jnp.zeros(leaf.shape, leaf.dtype)
    return out


def decode_loop(layer: Any, steps: int):
    """(params, cache, tokens [1, steps, E]) -> sum of the `steps` one-token decode outputs (cache carried)."""

    def loop(params, cache, tokens):
        def step(i, carry):
            cache, total = carry
            x = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
            y, state = layer.apply({**params, "cache": cache}, x, decode=True, mutable=["cache"])
            return state["cache"], total + jnp.sum(y)

        return jax.lax.fori_loop(0, steps, step, (cache, jnp.zeros((), jnp.float32)))[1]

    return loop


def run(bench: Bench) -> list[dict[str, Any]]:
    steps = QUICK_STEPS if bench.quick else STEPS
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.standard_normal((1, steps, EMBED)), jnp.float32)
    records, params = [], None
    for policy, options in POLICIES.items():
        for budget in QUICK_BUDGETS if bench.quick else BUDGETS:
            for case, implementation in CASES.items():
                layer = attn.build(
                    policy, num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, budget=budget,
                    implementation=implementation, **options,
                )  # fmt: skip
                if params is None:  # every policy layer has the softmax layer's projections: one init
                    params = jax.jit(layer.init)(jax.random.key(0), tokens[:, :1])
                create = functools.partial(layer.apply, decode=True, mutable=["cache"])
                shapes = jax.eval_shape(create, params, tokens[:, :1])[1]["cache"]
                cache = filled_cache(shapes, np.random.default_rng(1))
                capacity = cache["cached_key"].shape[1]
                record = bench.measure(
                    f"{policy} {case}",
                    decode_loop(layer, steps),
                    params,
                    cache,
                    tokens,
                    flops=steps * 4.0 * HEADS * HEAD_DIM * (capacity + 1),
                    policy=policy,
                    case=case,
                    implementation=implementation,
                    budget=budget,
                    capacity=capacity,
                    steps=steps,
                )
                records.append(add_per_token(record, steps))
    return records


def table(records: list[dict[str, Any]]) -> str:
    return per_token_table(records, ("policy", "budget"))


def plot(report: dict[str, Any], path: str) -> None:
    per_token_plot(
        report, path, x="budget", xlabel="cache budget (entries per kv head)", title="policy layer decode per token"
    )


if __name__ == "__main__":
    main(["--suite", "decode_policy", *sys.argv[1:]])
