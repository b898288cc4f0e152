"""`python -m eval.bench --suite train`: training throughput of whole configs, through the real trainer.

For each config (lm_tiny on CPU; lm_125m too on a GPU/TPU) the suite builds the trainer's own setup, state
layout and compiled train step (sharded, donated, exactly what `python -m train` runs), then times
`repeats` steps after `warmup` steps on real batches from the config's data source. Records: ms/step,
tokens/s, model TFLOP/s (the trainer's 6N + 12 L H Dh T estimate), parameters, and memory: on GPU/TPU the
device's peak bytes in use, on CPU the compiled step's temp + argument + output bytes plus the process's
peak resident set size.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from typing import Any

import jax

from .bench import Bench, compiled_bytes
from .trainer_api import build_run

# (config module, preset, platforms it is run on)
CASES = (
    ("lm_tiny", "", ("cpu", "gpu", "tpu")),
    ("lm_125m", "", ("gpu", "tpu")),
)


def _config(module_name: str, preset: str) -> Any:
    module = __import__(f"configs.{module_name}", fromlist=["get_config"])
    return module.get_config(preset) if preset else module.get_config()


def measure_config(bench: Bench, module_name: str, preset: str) -> dict[str, Any]:
    """Times the compiled train step of one config; returns a record."""
    config = _config(module_name, preset)
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(config, workdir)
    train_step, compile_seconds = run.train_step()
    state = run.init_state(jax.random.key(config.seed))
    rng = jax.random.key(config.seed)
    num_params = run.num_params
    length = run.tokens_per_example
    tokens_per_step = config.batch_size * length
    flops = tokens_per_step * run.train_flops_per_token(length)

    def one_step(state):
        state, metrics = train_step(state, run.next_train_batch(), rng)
        jax.block_until_ready(metrics)
        return state

    times = []
    with run.tracing():
        for _ in range(bench.warmup):
            state = one_step(state)
        for _ in range(bench.repeats):
            start = time.perf_counter()
            state = one_step(state)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    device = jax.devices()[0]
    peak = Bench.peak_memory(compiled_bytes(train_step))
    return {
        "name": f"{module_name}{':' + preset if preset else ''}",
        "status": "ok",
        "config": module_name,
        "attention": config.model.attention,
        "params": num_params,
        "batch_size": config.batch_size,
        "seq_len": length,
        "dtype": config.precision.compute_dtype,
        "mesh": dict(run.mesh.shape),
        "compile_s": compile_seconds,
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(times),
        "tokens_per_s": tokens_per_step / median,
        "flops": flops,
        "tflops": flops / median / 1e12,
        "peak_memory_bytes": peak,
        "compiled_memory_bytes": compiled_bytes(train_step),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_kind": device.device_kind,
    }


def run(bench: Bench) -> list[dict[str, Any]]:
    platform = jax.devices()[0].platform
    records = []
    for module_name, preset, platforms in CASES:
        if platform not in platforms:
            records.append(bench.skip(module_name, f"not run on {platform}", config=module_name))
            continue
        records.append(measure_config(bench, module_name, preset))
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| config | params | batch x seq | dtype | ms/step | tokens/s | model TFLOP/s | peak memory MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | | | | {r['reason']} | | | |")
            continue
        peak = r["peak_memory_bytes"] / 2**20 if r["peak_memory_bytes"] else float("nan")
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['batch_size']} x {r['seq_len']} | {r['dtype']} | "
            f"{r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.4f} | {peak:.1f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in report["records"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["name"] for r in records], [r["tokens_per_s"] for r in records])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"train step throughput — {report.get('platform', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
