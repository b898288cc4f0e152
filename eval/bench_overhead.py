"""`python -m eval.bench --suite overhead`: the project's XLA paths against their plain-JAX counterparts, as ratios.

Each case compiles both functions on the same inputs, then runs `repeats` rounds; a round times `calls` calls of
each (median per function), the order alternating between rounds (ours first on even rounds, the baseline first
on odd ones), and the reported ratio is the median of the per-round ratios ours / baseline, so a load spike on
the shared host lands in one round and not in one side. Memory is the ratio of the compiled executables'
temp + argument + output bytes (`.lower().compile().memory_analysis()`).

Cases (float32, B=1, H=8, D=64 unless stated):
  softmax      `F.softmax_attention(implementation="xla")` vs `jax.nn.dot_product_attention(implementation="xla")`,
               causal, forward and forward+backward, T 512-4096; at T=1024 also with padding (q/kv lengths),
               a sliding window of 128, GQA (8 query heads over 2 kv heads) and an additive bias.
  linear       `F.linear_attention` (chunked, chunk 64, causal) vs a plain chunkwise `lax.scan` carrying the
               [B, H, D, D] state (below), forward and forward+backward, T 2K-16K.
  neighborhood `F.neighborhood_attention` 7x7 vs `jax.nn.dot_product_attention` under the equivalent dense
               [N, N] mask (NATTEN windows clamped at the borders), forward, small grids (B=1, H=4, D=32).
  train_step   the lm_tiny trainer's compiled train step vs `benchmarks.minimal_decoder` (same parameters, same
               optimizer, the same 16 x 128 batch), each jitted with the state donated.
Targets: softmax <= 1.05x time and 1.00x memory, linear <= 1.05x, train step <= 1.03x.
--quick: one small size per family, for smoke runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from attn.core.masks import Mask

from .bench import Bench, compiled_bytes, sum_grads

BATCH, HEADS, HEAD_DIM = 1, 8, 64
SOFTMAX_LENGTHS, QUICK_SOFTMAX_LENGTHS = (512, 1024, 2048, 4096), (256,)
VARIANT_LENGTH, QUICK_VARIANT_LENGTH = 1024, 256
LINEAR_LENGTHS, QUICK_LINEAR_LENGTHS = (2048, 4096, 8192, 16384), (512,)
NEIGHBORHOOD_SIDES, QUICK_NEIGHBORHOOD_SIDES = (8, 16, 24), (8,)
NEIGHBORHOOD_KERNEL = 7
CHUNK = 64
WINDOW = 128
TARGETS = {"softmax": 1.05, "linear": 1.05, "train_step": 1.03}


# ---------------------------------------------------------------------------------------------- timing
def _median_call_seconds(compiled: Callable[..., Any], args: tuple, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_ratio(
    ours: Callable[..., Any], baseline: Callable[..., Any], args: tuple, *, rounds: int, calls: int, warmup: int
) -> dict[str, Any]:
    """Median over `rounds` of (median of `calls` timed calls of jit(ours)) / (same for jit(baseline)), the order
    alternating each round; plus both compiled footprints and their ratio."""
    if rounds < 1 or calls < 1:
        raise ValueError(f"rounds={rounds} and calls={calls} must both be >= 1")
    compiled = [jax.jit(f).lower(*args).compile() for f in (ours, baseline)]
    for c in compiled:
        for _ in range(warmup):
            jax.block_until_ready(c(*args))
    ratios, ours_s, base_s = [], [], []
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        seconds = [0.0, 0.0]
        for i in order:
            seconds[i] = _median_call_seconds(compiled[i], args, calls)
        ours_s.append(seconds[0])
        base_s.append(seconds[1])
        ratios.append(seconds[0] / seconds[1])
    memory = [compiled_bytes(c) for c in compiled]
    return {
        "status": "ok",
        "ratio": statistics.median(ratios),
        "rounds": rounds,
        "round_ratios": ratios,
        "ours_ms": 1e3 * statistics.median(ours_s),
        "baseline_ms": 1e3 * statistics.median(base_s),
        "ours_memory_bytes": memory[0],
        "baseline_memory_bytes": memory[1],
        "memory_ratio": memory[0] / memory[1] if None not in memory else None,
    }


# ---------------------------------------------------------------------------------------------- baselines
def plain_chunk_scan(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """Causal linear attention o_t = q_t sum_{s<=t} k_s v_s^T as the plainest chunkwise `lax.scan`: the
    [B, H, D, Dv] state is the carry; each step does one chunk (masked q k^T v inside, q S from before).
    q, k [B, T, H, D], v [B, T, H, Dv], T a multiple of chunk -> [B, T, H, Dv]."""
    batch, length, heads, _ = q.shape
    n = length // chunk
    q_, k_, v_ = (x.reshape(batch, n, chunk, heads, x.shape[-1]).transpose(1, 0, 3, 2, 4) for x in (q, k, v))
    tri = jnp.tril(jnp.ones((chunk, chunk), q.dtype))

    def step(state, x):
        qc, kc, vc = x
        inside = jnp.einsum("bhcs,bhse->bhce", jnp.einsum("bhcd,bhsd->bhcs", qc, kc) * tri, vc)
        out = inside + jnp.einsum("bhcd,bhde->bhce", qc, state)
        return state + jnp.einsum("bhsd,bhse->bhde", kc, vc), out

    state = jnp.zeros((batch, heads, q.shape[-1], v.shape[-1]), q.dtype)
    _, out = jax.lax.scan(step, state, (q_, k_, v_))
    return out.transpose(1, 0, 3, 2, 4).reshape(batch, length, heads, v.shape[-1])


def neighborhood_dense_mask(side: int, kernel: int) -> np.ndarray:
    """bool [side^2, side^2]: query (i, j) sees the kernel x kernel keys of its NATTEN window, which is centred
    on the query and shifted inside the grid at the borders (start = clip(i - kernel // 2, 0, side - kernel))."""
    start = np.clip(np.arange(side) - kernel // 2, 0, side - kernel)
    rows = (np.arange(side)[None, :] >= start[:, None]) & (np.arange(side)[None, :] < start[:, None] + kernel)
    return (rows[:, None, :, None] & rows[None, :, None, :]).reshape(side * side, side * side)


# ---------------------------------------------------------------------------------------------- cases
def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    return jax.device_put(rng.standard_normal(shape, dtype=np.float32))


def _softmax_cases(quick: bool, rng: np.random.Generator) -> list[tuple[str, dict, Callable, Callable, tuple]]:
    """(variant, fields, ours(q, k, v, *extra), baseline(q, k, v, *extra), args)."""
    cases = []
    ours = lambda q, k, v: F.softmax_attention(q, k, v, causal=True, implementation="xla")  # noqa: E731
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")  # noqa: E731
    for length in QUICK_SOFTMAX_LENGTHS if quick else SOFTMAX_LENGTHS:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        cases.append(("causal", {"T": length}, ours, plain, tuple(_normal(rng, shape) for _ in range(3))))
    length = QUICK_VARIANT_LENGTH if quick else VARIANT_LENGTH
    shape = (BATCH, length, HEADS, HEAD_DIM)
    qkv = tuple(_normal(rng, shape) for _ in range(3))
    lengths = jnp.array([length - length // 4], jnp.int32)
    cases.append(
        (
            "padding",
            {"T": length, "valid": int(lengths[0])},
            lambda q, k, v, n: F.softmax_attention(
                q, k, v, mask=Mask(causal=True, q_lengths=n, kv_lengths=n), implementation="xla"
            ),
            lambda q, k, v, n: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n, implementation="xla"
            ),
            qkv + (lengths,),
        )
    )
    cases.append(
        (
            "window",
            {"T": length, "window": WINDOW},
            lambda q, k, v: F.softmax_attention(q, k, v, causal=True, window=(WINDOW, 0), implementation="xla"),
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(WINDOW, 0), implementation="xla"
            ),
            qkv,
        )
    )
    kv_shape = (BATCH, length, 2, HEAD_DIM)
    cases.append(
        ("gqa", {"T": length, "kv_heads": 2}, ours, plain, (qkv[0], _normal(rng, kv_shape), _normal(rng, kv_shape)))
    )
    cases.append(
        (
            "bias",
            {"T": length},
            lambda q, k, v, b: F.softmax_attention(q, k, v, causal=True, bias=b, implementation="xla"),
            lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b, is_causal=True, implementation="xla"),
            qkv + (_normal(rng, (1, HEADS, length, length)),),
        )
    )
    return cases


def _train_step_ratio(bench: Bench, rounds: int) -> dict[str, Any]:
    """lm_tiny's compiled trainer step vs the minimal decoder's, both with donated state on the same batch."""
    from benchmarks import minimal_decoder
    from configs import lm_tiny

    from .trainer_api import build_run, make_optimizer

    config = lm_tiny.get_config()
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(config, workdir)
    ours_step, _ = run.train_step()
    state = run.init_state(jax.random.key(config.seed))
    step_rng = jax.random.key(config.seed)
    batch = run.next_train_batch()
    length = run.tokens_per_example
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    params = minimal_decoder.init_params(jax.random.key(config.seed), config.batch_size, length)
    minimal = jax.jit(minimal_decoder.make_train_step(tx), donate_argnums=(0, 1))
    tokens = jax.random.randint(jax.random.key(1), (config.batch_size, length + 1), 0, minimal_decoder.VOCAB)
    minimal_state = [params, tx.init(params)]
    minimal_compiled = minimal.lower(*minimal_state, tokens).compile()
    calls = 3

    def time_ours() -> float:
        nonlocal state
        times = []
        with run.tracing():
            for _ in range(calls):
                start = time.perf_counter()
                state, metrics = ours_step(state, batch, step_rng)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def time_minimal() -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            params, opt_state, loss = minimal_compiled(*minimal_state, tokens)
            minimal_state[:] = [params, opt_state]
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for _ in range(max(bench.warmup, 1)):
        time_ours(), time_minimal()
    ratios, ours_s, base_s = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            a = time_ours()
            b = time_minimal()
        else:
            b = time_minimal()
            a = time_ours()
        ours_s.append(a)
        base_s.append(b)
        ratios.append(a / b)
    memory = [compiled_bytes(ours_step), compiled_bytes(minimal_compiled)]
    return {
        "status": "ok",
        "ratio": statistics.median(ratios),
        "rounds": rounds,
        "round_ratios": ratios,
        "ours_ms": 1e3 * statistics.median(ours_s),
        "baseline_ms": 1e3 * statistics.median(base_s),
        "ours_memory_bytes": memory[0],
        "baseline_memory_bytes": memory[1],
        "memory_ratio": memory[0] / memory[1] if None not in memory else None,
        "params": run.num_params,
        "batch": [config.batch_size, length],
        "calls_per_round": calls,
    }


def run(bench: Bench) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rounds, records = bench.repeats, []

    def add(family: str, variant: str, pass_: str, fields: dict, result: dict) -> None:
        target = TARGETS.get(family)
        met = None if target is None or result.get("ratio") is None else result["ratio"] <= target
        records.append(
            {
                "name": f"{family}/{variant}/{pass_}",
                "family": family,
                "variant": variant,
                "pass": pass_,
                "target": target,
                "target_met": met,
                **fields,
                **result,
            }
        )

    for variant, fields, ours, plain, args in _softmax_cases(bench.quick, rng):
        calls = 1 if fields["T"] >= 4096 else 3
        for pass_, a, b in (("fwd", ours, plain), ("fwd+bwd", sum_grads(ours), sum_grads(plain))):
            result = interleaved_ratio(a, b, args, rounds=rounds, calls=calls, warmup=bench.warmup)
            add("softmax", variant, pass_, {**fields, "calls_per_round": calls}, result)

    linear = lambda q, k, v: F.linear_attention(q, k, v, causal=True, chunk_size=CHUNK, implementation="xla")  # noqa: E731
    scan = lambda q, k, v: plain_chunk_scan(q, k, v, CHUNK)  # noqa: E731
    for length in QUICK_LINEAR_LENGTHS if bench.quick else LINEAR_LENGTHS:
        args = tuple(_normal(rng, (BATCH, length, HEADS, HEAD_DIM)) for _ in range(3))
        for pass_, a, b in (("fwd", linear, scan), ("fwd+bwd", sum_grads(linear), sum_grads(scan))):
            result = interleaved_ratio(a, b, args, rounds=rounds, calls=3, warmup=bench.warmup)
            add("linear", "causal", pass_, {"T": length, "chunk": CHUNK, "calls_per_round": 3}, result)

    for side in QUICK_NEIGHBORHOOD_SIDES if bench.quick else NEIGHBORHOOD_SIDES:
        shape = (1, side, side, 4, 32)
        args = tuple(_normal(rng, shape) for _ in range(3))
        mask = jnp.asarray(neighborhood_dense_mask(side, NEIGHBORHOOD_KERNEL))

        def dense(q, k, v, side=side, mask=mask):
            flat = [x.reshape(1, side * side, 4, 32) for x in (q, k, v)]
            return jax.nn.dot_product_attention(*flat, mask=mask, implementation="xla").reshape(q.shape)

        na = lambda q, k, v: F.neighborhood_attention(q, k, v, kernel_size=NEIGHBORHOOD_KERNEL, implementation="xla")  # noqa: E731
        result = interleaved_ratio(na, dense, args, rounds=rounds, calls=3, warmup=bench.warmup)
        add(
            "neighborhood",
            f"{NEIGHBORHOOD_KERNEL}x{NEIGHBORHOOD_KERNEL}",
            "fwd",
            {"T": side * side, "side": side},
            result,
        )

    add("train_step", "lm_tiny", "fwd+bwd+update", {"T": 128}, _train_step_ratio(bench, rounds))
    return records


# ---------------------------------------------------------------------------------------------- report
def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| case | T | pass | time ratio (ours / plain) | ours ms | plain ms | memory ratio | target | met |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        memory = "—" if r.get("memory_ratio") is None else f"{r['memory_ratio']:.2f}"
        target = "—" if r["target"] is None else f"≤ {r['target']:.2f}"
        met = {True: "yes", False: "no", None: "—"}[r["target_met"]]
        lines.append(
            f"| {r['family']} {r['variant']} | {r['T']} | {r['pass']} | {r['ratio']:.2f} | {r['ours_ms']:.2f} | "
            f"{r['baseline_ms']:.2f} | {memory} | {target} | {met} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Time ratio (left) and memory ratio (right) against T, one line per (family, variant, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in report["records"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    groups = list(dict.fromkeys(r["name"] for r in records))
    for axis, key, title in (
        (axes[0], "ratio", "time ours / plain JAX"),
        (axes[1], "memory_ratio", "compiled memory ours / plain JAX"),
    ):
        for index, name in enumerate(groups):
            rows = sorted((r["T"], r[key]) for r in records if r["name"] == name and r.get(key) is not None)
            if rows:
                xs, ys = zip(*rows, strict=True)
                style = "-" if len(xs) > 1 else "none"
                axis.plot(xs, ys, marker="o", linestyle=style, color=plt.cm.tab20(index % 20), label=name)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xscale="log", xlabel="sequence length T (tokens)", ylabel="ratio", title=title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"overhead — {report['device']} — jax {report['jax_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
