"""The Long-Context Attention Benchmark's grid ([62], LongCA-bench): kernel efficiency over mask patterns and lengths,
and distributed attention (ring vs Ulysses context parallelism) over the context-parallel degree.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m eval.lca [--quick] [--part kernels|distributed|all]
        [--lengths 512,1024,2048] [--cp-length 2048] [--degrees 1,2,4,8] [--warmup 1] [--repeats 3]
        [--memory-limit-gib 8] [--output-dir benchmarks/results] [--no-plot]
    python -m eval.lca --from-json benchmarks/results/lca_cpu.json      # table + PNG again, no run

Output: <output-dir>/lca_<platform>.json and .png through eval.bench's harness (device, versions, settings, load
average, records), the Markdown tables on stdout.

(1) Kernel efficiency. Mask patterns (the paper's catalogue, shared-prefix left out), T tokens, causal where said:
  full            no mask
  causal          keys at or before the query
  sliding_window  causal, the query and its `T // 8` previous keys (window (T // 8, 0))
  block_sparse    non-causal block mask (block B): per query block its diagonal block, the first block (a sink) and
                  a fixed random quarter of the others
  document        causal within packed documents (segment ids; document lengths drawn once, seed 0, 1/8..3/8 of T)
Implementations (each cell "ok", "skipped" (a failure or the memory limit, with the reason) or "not_supported"
(the pattern is not expressible with this implementation, with the reason); no cell is dropped):
  softmax_xla            F.softmax_attention(implementation="xla"): dense [B, H, T, T] scores
  softmax_xla_blockwise  F.softmax_attention(implementation="xla_blockwise"): online softmax, memory-efficient XLA
  flash_pallas           F.softmax_attention(implementation="pallas"): the Pallas flash kernel (GPU/TPU only)
  block_sparse_xla       F.block_sparse_attention(block_mask=..., block_size=B): gathers the kept key blocks
  neighborhood           F.neighborhood_attention(kernel_size=T // 8 + 1, causal=True): the sliding window only
  lightning              F.linear_attention(causal=True, decay=TNL's per-head decay): causal only
  linear                 F.linear_attention(causal=...): full and causal (no mask description beyond causality)
lightning and linear compute a different function (no softmax): their cells compare cost, not outputs. Every other
"ok" forward cell up to CHECK_MAX_LENGTH records `max_abs_error`, the largest difference from the dense masked
reference (F.softmax_attention, implementation "xla", with the pattern as a dense boolean mask).
Directions: "fwd" (out = attention(q, k, v)) and "fwd+bwd" (out and its VJP against a random dO).
FLOPs: softmax family 4 B H D x (attended (query, key) pairs of the pattern), fwd+bwd 3.5x forward (the
FlashAttention-2 convention), so TFLOP/s count useful work whatever the implementation computes; linear family
4 B H T (C D + D^2) causal (chunk C = 64), 4 B H T D^2 non-causal, fwd+bwd 3x. Memory: eval.bench's (on CPU the
compiled executable's temp + argument + output bytes, on GPU/TPU the device's peak bytes in use).

(2) Distributed. `attn.core.context_parallel.ring_attention` (zig-zag load balance) and `ulysses_attention`
(all-to-all over heads) with q/k/v sharded along T on a 1-D mesh of P devices (the `context` axis), P in 1, 2, 4, 8,
patterns full, causal and document, fwd and fwd+bwd, at one length. Memory per device is the SPMD program's compiled
memory. On the 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) every device shares the same
cores: memory per device is real, times say nothing about scaling. A degree must divide the device count and the
sequence into 2 P zig-zag chunks (ValueError otherwise); Ulysses needs the heads divisible by P (not_supported
otherwise).

--quick: batch 1, 2 heads (distributed: 8), head_dim 16, T = 64, block 16, distributed T = 64: the wiring check the
tests run (with --warmup 0 --repeats 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn import functional as F
from attn.core import dispatch
from attn.core.context_parallel import ring_attention, ulysses_attention
from attn.core.masks import Mask
from attn.linear.lightning import tnl_decay

from .bench import GIB, Bench, draw_report, run_suite
from .bench_kernels import fwd_bwd, lightning_flops, measure_record

NAME = "lca"
PATTERNS = ("full", "causal", "sliding_window", "block_sparse", "document")
IMPLEMENTATIONS = (
    "softmax_xla",
    "softmax_xla_blockwise",
    "flash_pallas",
    "block_sparse_xla",
    "neighborhood",
    "lightning",
    "linear",
)
LINEAR_FAMILY = ("lightning", "linear")
DIRECTIONS = ("fwd", "fwd+bwd")
CP_METHODS = ("ring", "ulysses")
CP_PATTERNS = ("full", "causal", "document")

LENGTHS = (512, 1024, 2048, 4096)
QUICK_LENGTHS = (64,)
BATCH, HEADS, HEAD_DIM, BLOCK = 1, 4, 64, 64
QUICK_HEADS, QUICK_HEAD_DIM, QUICK_BLOCK = 2, 16, 16
CP_LENGTH, QUICK_CP_LENGTH, CP_HEADS = 2048, 64, 8
DEGREES = (1, 2, 4, 8)
LINEAR_CHUNK = 64
BLOCK_SPARSE_KEEP = 0.25  # fraction of the off-diagonal, non-sink key blocks each query block keeps
CHECK_MAX_LENGTH = 1024
SOFTMAX_FWD_BWD, LINEAR_FWD_BWD = 3.5, 3.0


# ---------------------------------------------------------------------------------------------- mask patterns
@dataclasses.dataclass(frozen=True)
class Pattern:
    """One mask pattern at one length: its structured description and the dense boolean mask [T, T] it means."""

    name: str
    length: int
    block: int
    causal: bool = False
    window: tuple[int, int] | None = None
    segment_ids: np.ndarray | None = None  # int32 [T]
    block_mask: np.ndarray | None = None  # bool [T / block, T / block]

    @property
    def window_left(self) -> int:
        return self.length // 8

    def dense(self) -> np.ndarray:
        """bool [T, T]: True where query i attends key j (built with explicit index comparisons)."""
        i = np.arange(self.length)[:, None]
        j = np.arange(self.length)[None, :]
        keep = np.ones((self.length, self.length), bool)
        if self.causal:
            keep &= j <= i
        if self.window is not None:
            keep &= (i - j <= self.window[0]) & (j - i <= self.window[1])
        if self.segment_ids is not None:
            keep &= self.segment_ids[:, None] == self.segment_ids[None, :]
        if self.block_mask is not None:
            keep &= np.repeat(np.repeat(self.block_mask, self.block, 0), self.block, 1)
        return keep

    def pairs(self) -> int:
        """Attended (query, key) pairs."""
        return int(self.dense().sum())


def document_ids(length: int, seed: int = 0) -> np.ndarray:
    """int32 [T]: ids of packed documents with lengths drawn in [T/8, 3T/8] (the last one takes the rest)."""
    rng = np.random.default_rng(seed)
    ids, start, doc = np.zeros(length, np.int32), 0, 0
    while start < length:
        size = int(rng.integers(max(1, length // 8), max(2, 3 * length // 8) + 1))
        ids[start : start + size] = doc
        start, doc = start + size, doc + 1
    return ids


def sparse_block_mask(num_blocks: int, seed: int = 0) -> np.ndarray:
    """bool [n, n]: the diagonal, the first column (sink) and a random BLOCK_SPARSE_KEEP of the other blocks."""
    rng = np.random.default_rng(seed)
    keep = rng.random((num_blocks, num_blocks)) < BLOCK_SPARSE_KEEP
    keep[np.arange(num_blocks), np.arange(num_blocks)] = True
    keep[:, 0] = True
    return keep


def make_pattern(name: str, length: int, block: int) -> Pattern:
    """The mask pattern `name` (one of PATTERNS) at `length` tokens; block-sparse blocks of `block` tokens."""
    if name not in PATTERNS:
        raise ValueError(f"pattern={name!r}; expected one of {PATTERNS}")
    if length % block:
        raise ValueError(f"length={length} must be a multiple of the block size {block}")
    if name == "full":
        return Pattern(name, length, block)
    if name == "causal":
        return Pattern(name, length, block, causal=True)
    if name == "sliding_window":
        return Pattern(name, length, block, causal=True, window=(length // 8, 0))
    if name == "block_sparse":
        return Pattern(name, length, block, block_mask=sparse_block_mask(length // block))
    return Pattern(name, length, block, causal=True, segment_ids=document_ids(length))


# ---------------------------------------------------------------------------------------------- implementations
class NotSupported(Exception):
    """The implementation cannot express the pattern (the message says why)."""


def build(name: str, pattern: Pattern, *, heads: int, platform: str) -> Callable[..., jax.Array]:
    """attend(q, k, v) -> out [B, T, H, D] of implementation `name` under `pattern`; NotSupported if it has no form."""
    if name in ("softmax_xla", "softmax_xla_blockwise", "flash_pallas"):
        if name == "flash_pallas" and platform not in ("gpu", "tpu"):
            raise NotSupported(f"the Pallas flash kernel is compiled for GPU/TPU only; platform is {platform}")
        implementation = {"softmax_xla": "xla", "softmax_xla_blockwise": "xla_blockwise", "flash_pallas": "pallas"}
        mask = None
        if pattern.block_mask is not None:
            mask = Mask(block_mask=jnp.asarray(pattern.block_mask), block_size=(pattern.block, pattern.block))
        segment_ids = None if pattern.segment_ids is None else jnp.asarray(pattern.segment_ids)[None]

        def softmax(q, k, v):
            return F.softmax_attention(
                q,
                k,
                v,
                causal=pattern.causal,
                window=pattern.window,
                mask=mask,
                segment_ids=segment_ids,
                implementation=implementation[name],
            )

        return softmax
    if name == "block_sparse_xla":
        blocks = pattern.length // pattern.block
        if pattern.name == "full":
            block_mask = np.ones((blocks, blocks), bool)
        elif pattern.name == "causal":
            block_mask = np.tril(np.ones((blocks, blocks), bool))
        elif pattern.name == "block_sparse":
            block_mask = pattern.block_mask
        else:
            raise NotSupported(
                f"block_sparse_attention takes a block mask and causality; the {pattern.name} pattern is token-granular"
            )
        keep = jnp.asarray(block_mask)[None, None]  # [1, 1, nq, nk]: every batch row and head
        return lambda q, k, v: F.block_sparse_attention(
            q, k, v, block_mask=keep, block_size=pattern.block, causal=pattern.causal
        )
    if name == "neighborhood":
        if pattern.name != "sliding_window":
            raise NotSupported(f"neighborhood attention is a fixed-size window; the {pattern.name} pattern is not one")
        size = pattern.window_left + 1
        return lambda q, k, v: F.neighborhood_attention(q, k, v, kernel_size=size, causal=True)
    if name == "lightning":
        if pattern.name != "causal":
            raise NotSupported(
                f"lightning attention is causal linear attention with decay; not the {pattern.name} mask"
            )
        decay = jnp.asarray(tnl_decay(heads, 0, 1))
        return lambda q, k, v: F.linear_attention(q, k, v, causal=True, decay=decay, chunk_size=LINEAR_CHUNK)
    if name == "linear":
        if pattern.name not in ("full", "causal"):
            raise NotSupported(f"linear attention has a causal and a non-causal form only; not the {pattern.name} mask")
        causal = pattern.causal
        return lambda q, k, v: F.linear_attention(q, k, v, causal=causal, chunk_size=LINEAR_CHUNK)
    raise ValueError(f"implementation={name!r}; expected one of {IMPLEMENTATIONS}")


def kernel_flops(name: str, pattern: Pattern, *, pairs: int, heads: int, head_dim: int, direction: str) -> float:
    """FLOPs of one cell (module docstring)."""
    if name in LINEAR_FAMILY:
        if pattern.causal:
            return lightning_flops(BATCH, heads, pattern.length, head_dim, LINEAR_CHUNK, direction=direction)
        forward = 4.0 * BATCH * heads * pattern.length * head_dim * head_dim
        return forward * (LINEAR_FWD_BWD if direction == "fwd+bwd" else 1.0)
    forward = 4.0 * BATCH * heads * head_dim * pairs
    return forward * (SOFTMAX_FWD_BWD if direction == "fwd+bwd" else 1.0)


def not_supported(bench: Bench, name: str, reason: str, **fields: Any) -> dict[str, Any]:
    return {**bench.skip(name, reason, **fields), "status": "not_supported"}


def run_kernels(bench: Bench, lengths: Sequence[int]) -> list[dict[str, Any]]:
    """The kernel grid: length x pattern x direction x implementation, every cell recorded."""
    platform = dispatch.platform()
    heads, head_dim, block = (QUICK_HEADS, QUICK_HEAD_DIM, QUICK_BLOCK) if bench.quick else (HEADS, HEAD_DIM, BLOCK)
    key = jax.random.key(0)
    records = []
    for length in lengths:
        shape = (BATCH, length, heads, head_dim)
        q, k, v, d_out = (
            jax.random.normal(part, shape) for part in jax.random.split(jax.random.fold_in(key, length), 4)
        )
        for pattern_name in GRID.select(PATTERNS, GRID.patterns):
            pattern = make_pattern(pattern_name, length, block)
            dense = pattern.dense()
            pairs = int(dense.sum())
            reference = None
            if length <= CHECK_MAX_LENGTH:
                reference = F.softmax_attention(q, k, v, mask=jnp.asarray(dense)[None, None], implementation="xla")
            for direction in GRID.select(DIRECTIONS, GRID.directions):
                for name in GRID.select(IMPLEMENTATIONS, GRID.implementations):
                    fields = dict(
                        part="kernels",
                        pattern=pattern_name,
                        direction=direction,
                        seq_len=length,
                        batch=BATCH,
                        heads=heads,
                        head_dim=head_dim,
                        block_size=block,
                        density=pairs / length**2,
                    )
                    flops = kernel_flops(
                        name, pattern, pairs=pairs, heads=heads, head_dim=head_dim, direction=direction
                    )
                    try:
                        attend = build(name, pattern, heads=heads, platform=platform)
                    except NotSupported as reason:
                        records.append(not_supported(bench, name, str(reason), flops=flops, **fields))
                        continue
                    fn, args = (attend, (q, k, v)) if direction == "fwd" else (fwd_bwd(attend), (q, k, v, d_out))
                    record = measure_record(bench, name, fn, args, flops=flops, **fields)
                    if record["status"] == "ok" and direction == "fwd" and reference is not None:
                        if name in LINEAR_FAMILY:
                            record["max_abs_error"] = None  # a different function: no softmax
                        else:
                            record["max_abs_error"] = float(jnp.max(jnp.abs(jax.jit(attend)(q, k, v) - reference)))
                    records.append(record)
        del q, k, v, d_out
    return records


# ---------------------------------------------------------------------------------------------- distributed
def check_degrees(degrees: Sequence[int], *, devices: int, length: int) -> None:
    """ValueError naming the first context-parallel degree that does not divide `devices` or split `length` into
    2 P zig-zag chunks."""
    for degree in degrees:
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree={degree!r}: context-parallel degrees must be positive ints")
        if degree > devices or devices % degree:
            raise ValueError(
                f"degree={degree}: a context-parallel degree must divide the device count {devices} "
                "(XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8 CPU devices)"
            )
        if length % (2 * degree):
            raise ValueError(
                f"degree={degree} with seq_len={length}: seq_len must be a multiple of 2 x degree = {2 * degree} "
                "(ring attention's zig-zag layout splits it into 2 P chunks)"
            )


def run_distributed(bench: Bench, degrees: Sequence[int], length: int) -> list[dict[str, Any]]:
    """Ring vs Ulysses over the degrees, patterns CP_PATTERNS and both directions; every cell recorded."""
    check_degrees(degrees, devices=len(jax.devices()), length=length)
    head_dim = QUICK_HEAD_DIM if bench.quick else HEAD_DIM
    shape = (BATCH, length, CP_HEADS, head_dim)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    records = []
    for degree in degrees:
        mesh = Mesh(np.array(jax.devices()[:degree]), ("context",))
        sharding = NamedSharding(mesh, PartitionSpec(None, "context"))
        q, k, v, d_out = (jax.device_put(x, sharding) for x in arrays)
        for pattern_name in GRID.select(CP_PATTERNS, GRID.patterns):
            pattern = make_pattern(pattern_name, length, 1)
            pairs = pattern.pairs()
            segment_ids = None
            if pattern.segment_ids is not None:
                segment_ids = jax.device_put(
                    pattern.segment_ids[None], NamedSharding(mesh, PartitionSpec(None, "context"))
                )
            for direction in GRID.select(DIRECTIONS, GRID.directions):
                for method in CP_METHODS:
                    fields = dict(
                        part="distributed",
                        pattern=pattern_name,
                        direction=direction,
                        seq_len=length,
                        devices=degree,
                        batch=BATCH,
                        heads=CP_HEADS,
                        head_dim=head_dim,
                    )
                    flops = (
                        4.0 * BATCH * CP_HEADS * head_dim * pairs * (SOFTMAX_FWD_BWD if direction == "fwd+bwd" else 1)
                    )
                    if method == "ulysses" and CP_HEADS % degree:
                        reason = f"Ulysses splits the {CP_HEADS} heads over the devices; {degree} does not divide them"
                        records.append(not_supported(bench, method, reason, flops=flops, **fields))
                        continue
                    attention = ring_attention if method == "ring" else ulysses_attention

                    def attend(q, k, v, attention=attention, mesh=mesh, pattern=pattern, segment_ids=segment_ids):
                        return attention(q, k, v, mesh=mesh, causal=pattern.causal, segment_ids=segment_ids)

                    fn, args = (attend, (q, k, v)) if direction == "fwd" else (fwd_bwd(attend), (q, k, v, d_out))
                    records.append(measure_record(bench, method, fn, args, flops=flops, **fields))
    return records


# ---------------------------------------------------------------------------------------------- suite interface
@dataclasses.dataclass
class Grid:
    """What `run` measures (set by main before eval.bench's harness calls run)."""

    parts: tuple[str, ...] = ("kernels", "distributed")
    lengths: tuple[int, ...] | None = None
    cp_length: int | None = None
    degrees: tuple[int, ...] = DEGREES
    patterns: tuple[str, ...] | None = None  # None: all (PATTERNS; the distributed part takes those in CP_PATTERNS)
    implementations: tuple[str, ...] | None = None  # None: all IMPLEMENTATIONS
    directions: tuple[str, ...] | None = None  # None: both DIRECTIONS

    @staticmethod
    def select(known: Sequence[str], chosen: Sequence[str] | None) -> tuple[str, ...]:
        """`known` in its order, restricted to `chosen` (None: all)."""
        return tuple(known) if chosen is None else tuple(x for x in known if x in chosen)


GRID = Grid()


def run(bench: Bench) -> list[dict[str, Any]]:
    """Records of the configured parts (GRID), kernels first."""
    records = []
    if "kernels" in GRID.parts:
        records += run_kernels(bench, GRID.lengths or (QUICK_LENGTHS if bench.quick else LENGTHS))
    if "distributed" in GRID.parts:
        cp_length = GRID.cp_length or (QUICK_CP_LENGTH if bench.quick else CP_LENGTH)
        records += run_distributed(bench, GRID.degrees, cp_length)
    return records


def _cell(r: dict[str, Any] | None, notes: list[str]) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        if r["reason"] not in notes:
            notes.append(r["reason"])
        label = "not supported" if r["status"] == "not_supported" else "skipped"
        return f"{label} [{notes.index(r['reason']) + 1}]"
    memory = r.get("memory_bytes") or r.get("peak_memory_bytes")
    tflops = "—" if r.get("tflops") is None else f"{r['tflops']:.3g} TF/s"
    mib = "—" if memory is None else f"{memory / 2**20:.3g} MiB"
    return f"{r['median_ms']:.3g} ms · {tflops} · {mib}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per (pattern, direction) a table of length x implementation; then the distributed table."""
    notes: list[str] = []
    lines: list[str] = []
    kernels = [r for r in records if r.get("part") == "kernels"]
    for pattern in PATTERNS:
        for direction in DIRECTIONS:
            rows = [r for r in kernels if r["pattern"] == pattern and r["direction"] == direction]
            if not rows:
                continue
            lines += [f"**{pattern}, {direction}** (median ms · TFLOP/s · memory)", ""]
            lines.append("| T | " + " | ".join(IMPLEMENTATIONS) + " |")
            lines.append("|---:|" + "---|" * len(IMPLEMENTATIONS))
            for length in sorted({r["seq_len"] for r in rows}):
                found = {r["name"]: r for r in rows if r["seq_len"] == length}
                lines.append(f"| {length} | " + " | ".join(_cell(found.get(n), notes) for n in IMPLEMENTATIONS) + " |")
            lines.append("")
    distributed = [r for r in records if r.get("part") == "distributed"]
    if distributed:
        lines += ["**distributed** (median ms on fake devices · TFLOP/s · memory per device)", ""]
        columns = [(m, d) for m in CP_METHODS for d in DIRECTIONS]
        lines.append("| pattern | P | " + " | ".join(f"{m} {d}" for m, d in columns) + " |")
        lines.append("|---|---:|" + "---|" * len(columns))
        for pattern in CP_PATTERNS:
            for degree in sorted({r["devices"] for r in distributed}):
                found = {
                    (r["name"], r["direction"]): r
                    for r in distributed
                    if (r["pattern"], r["devices"]) == (pattern, degree)
                }
                if found:
                    cells = [_cell(found.get(c), notes) for c in columns]
                    lines.append(f"| {pattern} | {degree} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "not run:"] + [f"[{i + 1}] {reason}" for i, reason in enumerate(notes)]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Row 1: forward time vs T per pattern; row 2: fwd+bwd; row 3: distributed memory per device and time vs P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["records"] if r["status"] == "ok"]
    fig, axes = plt.subplots(3, len(PATTERNS), figsize=(4.2 * len(PATTERNS), 10.5), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(IMPLEMENTATIONS + CP_METHODS)}
    for row, direction in enumerate(DIRECTIONS):
        for col, pattern in enumerate(PATTERNS):
            axis = axes[row][col]
            for name in IMPLEMENTATIONS:
                points = sorted(
                    (r["seq_len"], r["median_ms"])
                    for r in ok
                    if r.get("part") == "kernels"
                    and (r["name"], r["pattern"], r["direction"]) == (name, pattern, direction)
                )
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", color=colors[name], label=name)
            axis.set(xscale="log", yscale="log", xlabel="T", ylabel="median ms", title=f"{pattern} — {direction}")
            lengths = sorted({r["seq_len"] for r in ok if r.get("part") == "kernels"})
            axis.set_xticks(lengths, [str(n) for n in lengths])
            axis.minorticks_off()
            axis.grid(True, which="both", alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=6)
    distributed = [r for r in ok if r.get("part") == "distributed"]
    for col, (key, label) in enumerate((("memory_bytes", "MiB per device"), ("median_ms", "median ms (fake devices)"))):
        axis = axes[2][col]
        for method in CP_METHODS:
            for pattern, style in zip(CP_PATTERNS, ("-", "--", ":"), strict=True):
                points = sorted(
                    (r["devices"], r[key] / (2**20 if key == "memory_bytes" else 1))
                    for r in distributed
                    if (r["name"], r["pattern"], r["direction"]) == (method, pattern, "fwd+bwd") and r.get(key)
                )
                if points:
                    axis.plot(
                        *zip(*points, strict=True), style, marker="o", color=colors[method], label=f"{method} {pattern}"
                    )
        axis.set(
            xscale="log", yscale="log", xlabel="context-parallel degree P", ylabel=label, title=f"fwd+bwd: {label}"
        )
        degrees = sorted({r["devices"] for r in distributed})
        axis.set_xticks(degrees, [str(d) for d in degrees])
        axis.minorticks_off()
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    for col in range(2, len(PATTERNS)):
        axes[2][col].axis("off")
    counts = {s: sum(r["status"] == s for r in report["records"]) for s in ("not_supported", "skipped")}
    axes[2][2].text(
        0.0,
        0.9,
        f"{len(ok)} cells measured, {counts['not_supported']} not supported, {counts['skipped']} skipped\n"
        "(reasons in the JSON and the table)",
        fontsize=9,
        va="top",
    )
    fig.suptitle(f"LCA-bench grid — {report['device']} — jax {report['jax_version']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry point
def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated ints") from None
    if not values or any(x < 1 for x in values):
        raise ValueError(f"{flag}={text!r}: expected comma-separated positive ints")
    return values


def _names(text: str | None, known: Sequence[str], flag: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise ValueError(f"{flag}={text!r}: expected comma-separated names from {tuple(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `python -m eval.lca`; returns the report."""
    parser = argparse.ArgumentParser(prog="python -m eval.lca", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny grid (tests, smoke runs)")
    parser.add_argument("--part", choices=("kernels", "distributed", "all"), default="all")
    parser.add_argument("--lengths", default=None, help="kernel grid lengths, e.g. 512,1024 (default: the grid's)")
    parser.add_argument("--cp-length", type=int, default=None, help="sequence length of the distributed part")
    parser.add_argument("--degrees", default=",".join(map(str, DEGREES)), help="context-parallel degrees")
    parser.add_argument("--patterns", default=None, help=f"subset of {','.join(PATTERNS)} (default: all)")
    parser.add_argument("--implementations", default=None, help="subset of the implementations (default: all)")
    parser.add_argument("--directions", default=None, help="subset of fwd,fwd+bwd (default: both)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit-gib", type=float, default=8.0)
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--from-json", default=None, help="re-render the table and PNG of a saved report; no run")
    args = parser.parse_args(argv)
    module = sys.modules[__name__]
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        if not args.no_plot:
            draw_report(module, report, os.path.splitext(args.from_json)[0] + ".png")
        print(table(report["records"]))
        return report
    GRID.parts = ("kernels", "distributed") if args.part == "all" else (args.part,)
    GRID.lengths = _ints(args.lengths, "--lengths") if args.lengths else None
    GRID.cp_length = args.cp_length
    GRID.degrees = _ints(args.degrees, "--degrees")
    GRID.patterns = _names(args.patterns, PATTERNS, "--patterns")
    GRID.implementations = _names(args.implementations, IMPLEMENTATIONS, "--implementations")
    GRID.directions = _names(args.directions, DIRECTIONS, "--directions")
    if "distributed" in GRID.parts:  # fail before any measurement
        cp_length = args.cp_length or (QUICK_CP_LENGTH if args.quick else CP_LENGTH)
        check_degrees(GRID.degrees, devices=len(jax.devices()), length=cp_length)
    bench = Bench(
        warmup=args.warmup, repeats=args.repeats, memory_limit_bytes=int(args.memory_limit_gib * GIB), quick=args.quick
    )
    report = run_suite(NAME, bench, args.output_dir, plot=not args.no_plot, module=module)
    print(table(report["records"]))
    print(f"\nwrote {report['json_path']}" + (f" and {report['png_path']}" if "png_path" in report else ""))
    return report


if __name__ == "__main__":
    main()
