"""Speed and memory benchmarks: one entry point, one suite per module.

    python -m eval.bench --suite neighborhood [--quick] [--warmup 1] [--repeats 5] [--memory-limit-gib 8]
        [--output-dir benchmarks/results] [--no-plot]
    python -m eval.bench --list
    python -m eval.bench --from-json benchmarks/results/neighborhood_cpu.json   # table + PNG again, no run

A suite is a module `eval/bench_<suite>.py` (found by name, nothing to register) with

    def run(bench: Bench) -> list[dict]          # records, built with bench.measure / bench.skip
    def table(records: list[dict]) -> str        # optional: Markdown table (default: generic columns)
    def plot(report: dict, path: str) -> None    # optional: PNG (default: time and memory vs record["x"])

`Bench.measure` jits the function, compiles it, skips the case when its compiled footprint exceeds the memory
limit (recorded, not run), runs `warmup` calls, then times `repeats` calls with `jax.block_until_ready` and keeps
the median. Peak memory: on GPU/TPU `device.memory_stats()["peak_bytes_in_use"]` after the case (the process-wide
high-water mark, so suites run cases smallest first); on CPU, which keeps no allocator statistics, the compiled
executable's `memory_analysis()` temp + argument + output bytes. The report says which (`memory_source`).

Output: `<output-dir>/<suite>_<platform>.json` (device, jax version, settings, records with shapes, dtype, median
ms, TFLOP/s, peak memory) and `<suite>_<platform>.png`; the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import statistics
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core import dispatch

from .machine import load_average, machine_record

SUITE_PREFIX = "bench_"
GIB = 2**30


# ---------------------------------------------------------------------------------------------- suites
def available_suites() -> list[str]:
    """Names of the suites: the modules eval/bench_<name>.py."""
    package = importlib.import_module(__package__)
    return sorted(
        m.name[len(SUITE_PREFIX) :] for m in pkgutil.iter_modules(package.__path__) if m.name.startswith(SUITE_PREFIX)
    )


def get_suite(name: str) -> ModuleType:
    """The suite module `eval.bench_<name>`; ValueError listing the known suites otherwise."""
    known = available_suites()
    if name not in known:
        raise ValueError(f"unknown suite {name!r}; available suites: {', '.join(known) or '(none)'}")
    module = importlib.import_module(f"{__package__}.{SUITE_PREFIX}{name}")
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"suite module eval.{SUITE_PREFIX}{name} has no run(bench) function")
    return module


# ---------------------------------------------------------------------------------------------- measuring
def memory_source(platform: str | None = None) -> str:
    platform = platform or dispatch.platform()
    if platform == "cpu":
        return "compiled.memory_analysis(): temp + argument + output bytes (CPU keeps no allocator statistics)"
    return "device.memory_stats()['peak_bytes_in_use'] after the case (process-wide high-water mark)"


def compiled_bytes(compiled: Any) -> int | None:
    """temp + argument + output bytes of a compiled executable, or None when the backend does not say."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # backends without the analysis
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def shape_summary(args: Sequence[Any]) -> list[list[int]]:
    return [list(np.shape(a)) for a in args]


def record_dtype(args: Sequence[Any]) -> str | None:
    """The compute dtype of a case: the common type of its floating-point arguments. Integer arguments (lengths,
    indices) are left out: numpy promotes float32 with int32 to float64, which no case computes in."""
    dtypes = [np.dtype(a.dtype) for a in args if hasattr(a, "dtype")]
    floating = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return str(np.result_type(*(floating or dtypes))) if dtypes else None


def sum_grads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn(q, k, v, *extra) -> (dq, dk, dv) of sum(fn(...)): one forward and one backward pass, for fwd+bwd cases."""

    def grads(q, k, v, *extra):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, *extra)), argnums=(0, 1, 2))(q, k, v)

    return grads


@dataclasses.dataclass
class Bench:
    """Timing and memory harness passed to a suite's run()."""

    warmup: int = 1
    repeats: int = 5
    memory_limit_bytes: int = 8 * GIB
    quick: bool = False

    def __post_init__(self):
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")
        if self.memory_limit_bytes <= 0:
            raise ValueError(f"memory_limit_bytes={self.memory_limit_bytes} must be positive")

    def skip(self, name: str, reason: str, **fields: Any) -> dict[str, Any]:
        """A record for a case that is not run."""
        return {"name": name, "status": "skipped", "reason": reason, "median_ms": None, "tflops": None, **fields}

    def measure(self, name: str, fn: Callable[..., Any], *args: Any, flops: float, **fields: Any) -> dict[str, Any]:
        """Times jit(fn)(*args). Returns a record with name, status, shapes, dtype, flops, median_ms, min_ms,
        tflops, peak_memory_bytes, compiled_memory_bytes and the suite's `fields`."""
        dtype = record_dtype(args)
        record: dict[str, Any] = {"name": name, "shapes": shape_summary(args), "dtype": dtype, "flops": flops, **fields}
        compiled = jax.jit(fn).lower(*args).compile()
        footprint = compiled_bytes(compiled)
        record["compiled_memory_bytes"] = footprint
        if footprint is not None and footprint > self.memory_limit_bytes:
            limit = self.memory_limit_bytes / GIB
            reason = f"compiled footprint {footprint / GIB:.2f} GiB exceeds the memory limit {limit:.2f} GiB"
            return {**record, "status": "skipped", "reason": reason, "median_ms": None, "tflops": None}
        for _ in range(self.warmup):
            jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        record.update(
            status="ok",
            median_ms=1e3 * median,
            min_ms=1e3 * min(times),
            tflops=flops / median / 1e12 if median > 0 else None,
            peak_memory_bytes=self.peak_memory(footprint),
        )
        return record

    @staticmethod
    def peak_memory(footprint: int | None) -> int | None:
        device = jax.devices()[0]
        if device.platform != "cpu":
            stats = device.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                return int(stats["peak_bytes_in_use"])
        return footprint


# ---------------------------------------------------------------------------------------------- reporting
def generic_table(records: list[dict[str, Any]]) -> str:
    lines = ["| name | status | shapes | median ms | TFLOP/s | peak MiB |", "|---|---|---|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['status']} | {r.get('shapes', '')} | {_fmt(r.get('median_ms'), '.2f')} | "
            f"{_fmt(r.get('tflops'), '.4f')} | {_fmt(_mib(r.get('peak_memory_bytes')), '.1f')} |"
        )
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def plot_report(
    report: dict[str, Any], path: str, *, x: str, xlabel: str, extra: Callable[[Any, list[dict]], None] | None = None
) -> None:
    """PNG with median time and peak memory against record[x], one line per record name (log-log). `extra`, if
    given, draws a third panel: extra(axis, records)."""
    from .analysis.evaluator import pyplot, series_style

    plt = pyplot()

    records = [r for r in report["records"] if r["status"] == "ok"]
    panels = 3 if extra else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    names = list(dict.fromkeys(r["name"] for r in records))
    for axis, key, ylabel in ((axes[0], "median_ms", "median time (ms)"), (axes[1], "peak_memory_bytes", "MiB")):
        for index, name in enumerate(names):
            rows = sorted((r[x], r[key]) for r in records if r["name"] == name and r.get(key) is not None)
            if rows:
                xs, ys = zip(*rows, strict=True)
                ys = [y / 2**20 for y in ys] if key == "peak_memory_bytes" else ys
                axis.plot(xs, ys, label=name, **series_style(index))
        axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_title("forward time")
    axes[1].set_title("peak memory" + (" (compiled)" if report["platform"] == "cpu" else ""))
    if extra:
        extra(axes[2], records)
    skipped = [r for r in report["records"] if r["status"] != "ok"]
    if skipped:
        notes = "; ".join(f"{r['name']} at {x}={r.get(x)}: {r.get('reason', 'skipped')}" for r in skipped)
        fig.text(0.01, 0.01, "not run: " + notes, fontsize=7, wrap=True)
    fig.suptitle(f"{report['suite']} — {report['device']} — jax {report['jax_version']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if skipped else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry point
def run_suite(
    name: str, bench: Bench, output_dir: str, *, plot: bool = True, module: ModuleType | None = None
) -> dict[str, Any]:
    """Runs suite `name`, writes <output_dir>/<name>_<platform>.json (+ .png); returns the report. `module` (default:
    eval.bench_<name>) lets an entry point outside the suites (eval.lca) reuse the harness with its own run/plot."""
    module = get_suite(name) if module is None else module
    platform = dispatch.platform()
    load_before = load_average()
    records = module.run(bench)
    report = {
        "suite": name,
        "description": (module.__doc__ or "").strip().split("\n\n")[0],
        **machine_record(),
        "platform": platform,
        # other processes competing for the host skew timings; kept so a reader can judge them
        "load_average": {"before": load_before, "after": load_average()},
        "settings": {
            "warmup": bench.warmup,
            "repeats": bench.repeats,
            "memory_limit_bytes": bench.memory_limit_bytes,
            "quick": bench.quick,
            "timing": "median of `repeats` calls of the compiled function, each ended by jax.block_until_ready",
        },
        "memory_source": memory_source(platform),
        "records": records,
    }
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, f"{name}_{platform}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    report["json_path"] = stem + ".json"
    if plot:
        draw_report(module, report, stem + ".png")
        report["png_path"] = stem + ".png"
    return report


def draw_report(module: ModuleType, report: dict[str, Any], path: str) -> None:
    """The suite's plot(report, path), or the generic time/memory plot against record["x"]."""
    draw = getattr(module, "plot", None)
    if draw is None:
        plot_report(report, path, x="x", xlabel="x")
    else:
        draw(report, path)


def render_table(module: ModuleType, records: list[dict[str, Any]]) -> str:
    return (getattr(module, "table", None) or generic_table)(records)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Entry point of `python -m eval.bench`; returns the report (None with --list)."""
    parser = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", help="suite to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--quick", action="store_true", help="the suite's tiny grid (for tests and smoke runs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    parser.add_argument(
        "--memory-limit-gib", type=float, default=8.0, help="skip cases whose compiled footprint is larger"
    )
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"), help="where JSON and PNG go")
    parser.add_argument("--no-plot", action="store_true", help="write only the JSON")
    parser.add_argument("--from-json", default=None, help="re-render the table and PNG of a saved report; no run")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        module = get_suite(report["suite"])
        if not args.no_plot:
            draw_report(module, report, os.path.splitext(args.from_json)[0] + ".png")
        print(render_table(module, report["records"]))
        return report
    if args.list:
        for name in available_suites():
            print(f"{name}: {(get_suite(name).__doc__ or '').strip().splitlines()[0]}")
        return None
    if not args.suite:
        parser.error(f"--suite is required; available suites: {', '.join(available_suites())}")
    bench = Bench(
        warmup=args.warmup,
        repeats=args.repeats,
        memory_limit_bytes=int(args.memory_limit_gib * GIB),
        quick=args.quick,
    )
    report = run_suite(args.suite, bench, args.output_dir, plot=not args.no_plot)
    print(render_table(get_suite(args.suite), report["records"]))
    print(f"\nwrote {report['json_path']}" + (f" and {report['png_path']}" if "png_path" in report else ""))
    return report


if __name__ == "__main__":
    main()
