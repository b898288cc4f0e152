"""Flash attention kernels vs cuDNN, XLA and JAX's own Pallas op; Lightning (linear) attention vs flash.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m eval.bench --suite kernels --memory-limit-gib 70   # H100 80 GB
    python -m eval.bench --suite kernels --quick                   # any machine: tiny wiring check (CPU: interpret)
    python -m eval.bench --from-json benchmarks/results/kernels_gpu.json   # table + PNG again, no run

On an H100 the full grid writes benchmarks/results/kernels_gpu.{json,png}; the two settings let the XLA case run
up to the lengths whose [B, H, T, T] logits fit (JAX preallocates 75% of the GPU by default, the limit is 8 GiB).

Grid: bfloat16, batch 4 x 16 heads x head_dim 128, lengths 1K, 2K, 4K, 8K, 16K, 32K, causal and non-causal,
forward ("fwd": out = attention(q, k, v)) and forward+backward ("fwd+bwd": out and its VJP against a random dO, i.e.
dq, dk, dv). Layout [B, T, H, D] everywhere (JAX's TPU op is fed transposed [B, H, T, D] views). Implementations:

  flash       ours, `pallas_kernels.flash_attention(q, k, v, causal=...)`, backend from the platform (Triton on
              GPU, Mosaic on TPU), default block sizes. On CPU it runs only under --quick, with interpret=True
              (a check of the wiring, not a speed measurement).
  cudnn       `jax.nn.dot_product_attention(q, k, v, is_causal=..., implementation="cudnn")` (NVIDIA GPU only).
  xla         `jax.nn.dot_product_attention(..., implementation="xla")`: materialises the [B, H, T, T] logits, so
              it is skipped at the lengths whose compiled footprint exceeds --memory-limit-gib.
  jax_pallas  JAX's Pallas op: GPU `jax.experimental.pallas.ops.gpu.attention.mha(q, k, v, segment_ids=None,
              sm_scale=D**-0.5, causal=...)` (Triton, [B, T, H, D], default BlockSizes); TPU
              `jax.experimental.pallas.ops.tpu.flash_attention.flash_attention` ([B, H, T, D]). None on CPU.
  lightning   ours, `pallas_kernels.lightning_attention(q, k, v, decay=lambda_h)`: causal linear attention with
              TransNormerLLM's per-head decay (`attn.linear.lightning.tnl_decay(16, 0, 1)`), the kernel's default
              chunk C (GPU 64, TPU 128). Causal fwd+bwd only (it has no non-causal form), compared with flash
              causal fwd+bwd. It computes a different function: the comparison is of cost, not of outputs.

Every case runs in its own try/except: a case that cannot run (no cuDNN off GPU, no JAX Pallas op on CPU, a
compiled footprint over the memory limit, an out-of-memory or lowering error) is recorded as skipped with the reason
and the suite goes on.

Record fields (JSON; the framework adds device, jax/jaxlib versions, settings, shapes and dtype):
  name         the implementation (above); `direction` "fwd" | "fwd+bwd"; `causal`; `seq_len`; batch/heads/head_dim
  median_ms    median wall time of `repeats` calls of the compiled function (min_ms too)
  flops        softmax attention (all four softmax implementations, the same count so TFLOP/s compare work done):
               forward 4 B H T^2 D, halved when causal; backward 2.5x forward, so fwd+bwd = 3.5x forward (the
               FlashAttention-2 convention; recomputation in the backward is not counted).
               lightning: its own chunked count, forward 4 B H T (C D + D^2) (masked C x C intra-chunk products over
               full tiles, plus Q S and K^T V against the D x D state); fwd+bwd = 3x forward (each product has two
               gradient products). `flop_count` names the formula used.
  tflops       flops / median time
  peak_memory_bytes  the framework's: on GPU/TPU the process-wide high-water mark after the case (monotone over the
               run, so `peak_memory_exact` says whether this case raised it, i.e. whether the number is its own);
               on CPU the compiled footprint
  memory_bytes the compiled executable's argument + output + temporary bytes (per case, what XLA allocates for it;
               Pallas kernels keep their tiles on chip): the memory column of the table
  time_vs_cudnn  this median / cuDNN's median in the same (direction, causal, length) (< 1: faster than cuDNN);
               None where either did not run. `ms_per_1k_tokens` = median ms / (T / 1024).

Table (Markdown, stdout): one table per direction, one row per (length, causal), one column per implementation
("ms · TFLOP/s · MiB/GiB" of compiled memory, or "skipped [n]" with the reason listed under the table). Then the
performance targets per length:
  flash fwd speed / cuDNN   cuDNN ms / flash ms, forward (causal and not): target >= 0.9 from 4K up (H100)
  flash causal fwd+bwd / cuDNN   flash ms / cuDNN ms: target <= 1.5
  lightning / flash         lightning ms / flash ms, causal fwd+bwd: target < 1 from 4K up
  lightning ms per 1K tokens  target flat: the ratio of the largest to the smallest from 4K up is shown (<= 1.2 read
                            as flat)
Plot: median time vs length (log-log), one line per implementation (solid causal, dashed non-causal), fwd and
fwd+bwd panels.

--quick: batch 1 x 2 heads x head_dim 64, lengths 128 and 256, float32; on CPU the XLA implementation runs compiled
and flash/lightning in interpret mode, cudnn and jax_pallas are recorded as skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import dispatch
from attn.linear.lightning import tnl_decay

from .bench import Bench

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (128, 256)
BATCH, HEADS, HEAD_DIM = 4, 16, 128
QUICK_BATCH, QUICK_HEADS, QUICK_HEAD_DIM = 1, 2, 64
DTYPE, QUICK_DTYPE = jnp.bfloat16, jnp.float32
DIRECTIONS = ("fwd", "fwd+bwd")
# Table column order. Within a (length, direction, causal) group the cases run in MEASURE_ORDER: the O(T^2)-memory
# XLA case last, so the process-wide peak of the O(T) kernels measured before it is still their own.
IMPLEMENTATIONS = ("flash", "cudnn", "xla", "jax_pallas", "lightning")
MEASURE_ORDER = ("flash", "jax_pallas", "cudnn", "lightning", "xla")
FWD_BWD_FACTOR = 3.5  # backward = 2.5x forward
LIGHTNING_FWD_BWD_FACTOR = 3.0
TARGET_FROM = 4096
FLAT_TOLERANCE = 1.2
REASON_CHARS = 300


# ---------------------------------------------------------------------------------------------- FLOP counts
def attention_flops(batch: int, heads: int, length: int, head_dim: int, *, causal: bool, direction: str) -> float:
    """Standard softmax-attention FLOPs: 4 B H T^2 D forward (QK^T and PV), halved when causal; fwd+bwd 3.5x."""
    _check_direction(direction)
    forward = 4.0 * batch * heads * length * length * head_dim / (2.0 if causal else 1.0)
    return forward * (FWD_BWD_FACTOR if direction == "fwd+bwd" else 1.0)


def lightning_flops(batch: int, heads: int, length: int, head_dim: int, chunk: int, *, direction: str) -> float:
    """Chunked linear-attention FLOPs: 4 B H T (C D + D^2) forward (intra-chunk tiles + state products); fwd+bwd 3x."""
    _check_direction(direction)
    forward = 4.0 * batch * heads * length * (chunk * head_dim + head_dim * head_dim)
    return forward * (LIGHTNING_FWD_BWD_FACTOR if direction == "fwd+bwd" else 1.0)


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {DIRECTIONS}")


# ---------------------------------------------------------------------------------------------- implementations
def _flash(causal: bool, interpret: bool) -> Callable:
    from pallas_kernels import flash_attention

    if interpret:
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="gpu", interpret=True)
    return lambda q, k, v: flash_attention(q, k, v, causal=causal)


def _dot_product(causal: bool, implementation: str) -> Callable:
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def _jax_pallas(causal: bool, platform: str, *, interpret: bool = False) -> Callable:
    """JAX's own Pallas attention on `platform`; interpret=True (GPU op only) lets tests check the wiring on CPU."""
    if platform == "gpu" or interpret:
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        def attend(q, k, v):
            # mha's sm_scale defaults to 1.0, not D^-0.5; pass it so it computes the same attention as the others
            return gpu_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal, interpret=interpret)

        return attend
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

    def attend(q, k, v):
        heads_major = [x.swapaxes(1, 2) for x in (q, k, v)]  # the TPU op takes [B, H, T, D]
        out = tpu_attention.flash_attention(*heads_major, causal=causal, sm_scale=q.shape[-1] ** -0.5)
        return out.swapaxes(1, 2)

    return attend


def _lightning(heads: int, interpret: bool) -> Callable:
    from pallas_kernels import lightning_attention

    decay = jnp.asarray(tnl_decay(heads, 0, 1))  # [H] per-head constant decay in (0, 1)
    if interpret:
        return lambda q, k, v: lightning_attention(q, k, v, decay=decay, backend="gpu", interpret=True)
    return lambda q, k, v: lightning_attention(q, k, v, decay=decay)


def lightning_chunk(length: int, *, interpret: bool) -> int:
    """The chunk the lightning kernel picks by default on this platform (interpret mode emulates the GPU kernel)."""
    from pallas_kernels.linear.gpu import gpu_chunk_size
    from pallas_kernels.linear.tpu import tpu_chunk_size

    return (
        tpu_chunk_size(None, length) if dispatch.platform() == "tpu" and not interpret else gpu_chunk_size(None, length)
    )


def unavailable(name: str, *, platform: str, quick: bool) -> str | None:
    """Why implementation `name` cannot run this case on `platform` (None: it can, or at least it is tried)."""
    if name == "cudnn" and platform != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU; platform is {platform}"
    if name == "jax_pallas" and platform not in ("gpu", "tpu"):
        return f"JAX's Pallas attention op needs a GPU (ops.gpu.attention.mha) or TPU; platform is {platform}"
    if name in ("flash", "lightning") and platform not in ("gpu", "tpu") and not quick:
        return f"no compiled Pallas kernel on {platform} (interpret mode runs only under --quick, as a wiring check)"
    return None


def fwd_bwd(attend: Callable) -> Callable:
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    return run


# ---------------------------------------------------------------------------------------------- running
def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _peak_now() -> int | None:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    return (device.memory_stats() or {}).get("peak_bytes_in_use")


def measure_record(
    bench: Bench, name: str, fn: Callable, args: tuple, *, flops: float, **fields: Any
) -> dict[str, Any]:
    """bench.measure with every failure turned into a skipped record carrying the reason."""
    before = _peak_now()
    try:
        record = bench.measure(name, fn, *args, flops=flops, **fields)
    except Exception as error:  # one case must never end the suite (lowering errors, OOM, missing cuDNN ...)
        return bench.skip(name, _reason(error), flops=flops, **fields)
    record["memory_bytes"] = record.get("compiled_memory_bytes")
    if record["status"] == "ok":
        peak = record.get("peak_memory_bytes")
        record["peak_memory_exact"] = before is None or (peak is not None and peak > before)
    return record


def _inputs(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, ...]:
    """q, k, v and a dO, all [B, T, H, D] standard normal in `dtype`, drawn on the device (no host copy)."""
    return tuple(jax.random.normal(part, shape, dtype) for part in jax.random.split(key, 4))


def run(bench: Bench) -> list[dict[str, Any]]:
    """The grid; records ordered by length, direction, causal, then MEASURE_ORDER."""
    platform = dispatch.platform()
    quick = bench.quick
    lengths = QUICK_LENGTHS if quick else LENGTHS
    batch, heads, head_dim = (QUICK_BATCH, QUICK_HEADS, QUICK_HEAD_DIM) if quick else (BATCH, HEADS, HEAD_DIM)
    dtype = QUICK_DTYPE if quick else DTYPE
    interpret = quick and platform not in ("gpu", "tpu")
    key = jax.random.key(0)
    records: list[dict[str, Any]] = []
    for length in lengths:
        q, k, v, d_out = _inputs(jax.random.fold_in(key, length), (batch, length, heads, head_dim), dtype)
        for direction in DIRECTIONS:
            for causal in (False, True):
                group = []
                for name in MEASURE_ORDER:
                    if name == "lightning" and not (causal and direction == "fwd+bwd"):
                        continue  # causal-only, and compared with flash on fwd+bwd: not a case of the grid
                    fields = dict(
                        direction=direction,
                        causal=causal,
                        seq_len=length,
                        batch=batch,
                        heads=heads,
                        head_dim=head_dim,
                        interpret=interpret and name in ("flash", "lightning"),
                    )
                    reason = unavailable(name, platform=platform, quick=quick)
                    if name == "lightning":
                        chunk = lightning_chunk(length, interpret=interpret)
                        flops = lightning_flops(batch, heads, length, head_dim, chunk, direction=direction)
                        fields.update(chunk_size=chunk, flop_count="lightning chunked: 4BHT(CD+D^2), fwd+bwd 3x")
                    else:
                        flops = attention_flops(batch, heads, length, head_dim, causal=causal, direction=direction)
                        fields.update(flop_count="softmax: 4BHT^2D (causal /2), fwd+bwd 3.5x")
                    if reason is not None:
                        group.append(bench.skip(name, reason, flops=flops, **fields))
                        continue
                    try:
                        attend = _build(name, causal=causal, platform=platform, interpret=interpret, heads=heads)
                    except Exception as error:  # e.g. an op module that fails to import on this install
                        group.append(bench.skip(name, _reason(error), flops=flops, **fields))
                        continue
                    fn, args = (attend, (q, k, v)) if direction == "fwd" else (fwd_bwd(attend), (q, k, v, d_out))
                    group.append(measure_record(bench, name, fn, args, flops=flops, **fields))
                _add_ratios(group, length)
                records.extend(group)
        del q, k, v, d_out
    return records


def _build(name: str, *, causal: bool, platform: str, interpret: bool, heads: int) -> Callable:
    if name == "flash":
        return _flash(causal, interpret)
    if name in ("cudnn", "xla"):
        return _dot_product(causal, name)
    if name == "jax_pallas":
        return _jax_pallas(causal, platform)
    if name == "lightning":
        return _lightning(heads, interpret)
    raise ValueError(f"implementation={name!r}; expected one of {IMPLEMENTATIONS}")


def _add_ratios(group: list[dict[str, Any]], length: int) -> None:
    cudnn = next((r for r in group if r["name"] == "cudnn" and r["status"] == "ok"), None)
    for r in group:
        ok = r["status"] == "ok"
        r["ms_per_1k_tokens"] = r["median_ms"] / (length / 1024) if ok else None
        r["time_vs_cudnn"] = r["median_ms"] / cudnn["median_ms"] if ok and cudnn is not None else None


# ---------------------------------------------------------------------------------------------- reporting
def _find(records: list[dict], name: str, direction: str, causal: bool, length: int) -> dict | None:
    for r in records:
        if (r["name"], r["direction"], r["causal"], r["seq_len"]) == (name, direction, causal, length):
            return r
    return None


def _ms(r: dict | None) -> float | None:
    return r["median_ms"] if r is not None and r["status"] == "ok" else None


def _cell(r: dict | None, notes: list[str]) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        if r["reason"] not in notes:
            notes.append(r["reason"])
        return f"skipped [{notes.index(r['reason']) + 1}]"
    memory = r.get("memory_bytes") or r.get("peak_memory_bytes")
    parts = [f"{r['median_ms']:.3g} ms", "—" if r.get("tflops") is None else f"{r['tflops']:.3g} TF/s"]
    if memory is None:
        parts.append("—")
    else:
        parts.append(f"{memory / 2**30:.3g} GiB" if memory >= 2**30 else f"{memory / 2**20:.3g} MiB")
    return " · ".join(parts)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def targets(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per length, the target ratios (None where a side did not run), and whether each target is met over
    the lengths it applies to (None when nothing was measured there)."""
    lengths = sorted({r["seq_len"] for r in records})
    rows = []
    for n in lengths:
        flash, cudnn = (
            {(d, c): _ms(_find(records, name, d, c, n)) for d in DIRECTIONS for c in (False, True)}
            for name in ("flash", "cudnn")
        )
        lightning = _find(records, "lightning", "fwd+bwd", True, n)
        rows.append(
            {
                "seq_len": n,
                "flash_fwd_speed_vs_cudnn": _ratio(cudnn[("fwd", False)], flash[("fwd", False)]),
                "flash_causal_fwd_speed_vs_cudnn": _ratio(cudnn[("fwd", True)], flash[("fwd", True)]),
                "flash_causal_fwd_bwd_time_vs_cudnn": _ratio(flash[("fwd+bwd", True)], cudnn[("fwd+bwd", True)]),
                "lightning_time_vs_flash": _ratio(_ms(lightning), flash[("fwd+bwd", True)]),
                "lightning_ms_per_1k_tokens": None if lightning is None else lightning.get("ms_per_1k_tokens"),
            }
        )
    late = [row for row in rows if row["seq_len"] >= TARGET_FROM]

    def verdict(keys: tuple[str, ...], ok: Callable[[float], bool], among: list[dict]) -> bool | None:
        values = [row[key] for row in among for key in keys if row[key] is not None]
        return all(ok(x) for x in values) if values else None

    per_token = [row["lightning_ms_per_1k_tokens"] for row in late if row["lightning_ms_per_1k_tokens"]]
    forward = ("flash_fwd_speed_vs_cudnn", "flash_causal_fwd_speed_vs_cudnn")
    return {
        "rows": rows,
        "flash_fwd_at_least_0.9_of_cudnn_from_4k": verdict(forward, lambda x: x >= 0.9, late),
        "flash_causal_fwd_bwd_within_1.5x_cudnn": verdict(
            ("flash_causal_fwd_bwd_time_vs_cudnn",), lambda x: x <= 1.5, rows
        ),
        "lightning_faster_than_flash_from_4k": verdict(("lightning_time_vs_flash",), lambda x: x < 1.0, late),
        "lightning_per_token_spread_from_4k": max(per_token) / min(per_token) if len(per_token) >= 2 else None,
    }


def table(records: list[dict[str, Any]]) -> str:
    notes: list[str] = []
    names = [n for n in IMPLEMENTATIONS if any(r["name"] == n for r in records)]
    lines = []
    for direction in DIRECTIONS:
        shown = [n for n in names if any(r["name"] == n and r["direction"] == direction for r in records)]
        lines += [f"**{direction}** (median ms · TFLOP/s · compiled memory)", ""]
        lines.append("| T | causal | " + " | ".join(shown) + " |")
        lines.append("|---:|---|" + "---|" * len(shown))
        for n in sorted({r["seq_len"] for r in records}):
            for causal in (False, True):
                cells = [_cell(_find(records, name, direction, causal, n), notes) for name in shown]
                if any(cells):
                    lines.append(f"| {n} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
        lines.append("")
    result = targets(records)
    lines += [
        "**targets**",
        "",
        "| T | flash fwd speed / cuDNN (non-causal) | (causal) | flash causal fwd+bwd time / cuDNN | "
        "lightning time / flash (causal fwd+bwd) | lightning ms per 1K tokens |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['seq_len']} | {_fmt(row['flash_fwd_speed_vs_cudnn'])} | "
            f"{_fmt(row['flash_causal_fwd_speed_vs_cudnn'])} | {_fmt(row['flash_causal_fwd_bwd_time_vs_cudnn'])} | "
            f"{_fmt(row['lightning_time_vs_flash'])} | {_fmt(row['lightning_ms_per_1k_tokens'])} |"
        )

    def met(value: bool | None) -> str:
        return "not measured" if value is None else ("met" if value else "NOT met")

    spread = result["lightning_per_token_spread_from_4k"]
    flat = "not measured" if spread is None else f"{spread:.2f}x ({'flat' if spread <= FLAT_TOLERANCE else 'NOT flat'})"
    lines += [
        "",
        f"- flash forward >= 0.9x cuDNN's speed from 4K: {met(result['flash_fwd_at_least_0.9_of_cudnn_from_4k'])}",
        f"- flash causal fwd+bwd <= 1.5x cuDNN's time: {met(result['flash_causal_fwd_bwd_within_1.5x_cudnn'])}",
        f"- lightning faster than flash from 4K: {met(result['lightning_faster_than_flash_from_4k'])}",
        f"- lightning time per token from 4K, largest / smallest: {flat}",
    ]
    if notes:
        lines += ["", "skipped:"] + [f"[{i + 1}] {reason}" for i, reason in enumerate(notes)]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in report["records"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    lengths = sorted({r["seq_len"] for r in report["records"]})
    colors = {name: f"C{i}" for i, name in enumerate(IMPLEMENTATIONS)}
    for axis, direction in zip(axes, DIRECTIONS, strict=True):
        for name in IMPLEMENTATIONS:
            for causal in (True, False):
                rows = sorted(
                    (r["seq_len"], r["median_ms"])
                    for r in records
                    if (r["name"], r["direction"], r["causal"]) == (name, direction, causal)
                )
                if rows:
                    label = f"{name} ({'causal' if causal else 'non-causal'})"
                    style = "-" if causal else "--"
                    axis.plot(*zip(*rows, strict=True), style, marker="o", color=colors[name], label=label)
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="median time (ms)")
        axis.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        axis.minorticks_off()
        axis.set_title(direction)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    skipped = len(report["records"]) - len(records)
    if skipped:
        fig.text(0.01, 0.01, f"{skipped} cases not run (reasons in the JSON and the table)", fontsize=8)
    fig.suptitle(f"{report['suite']} — {report['device']} — jax {report['jax_version']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
