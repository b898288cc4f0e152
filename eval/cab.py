"""CAB's grid ([143], Comprehensive Attention Benchmark): the four attention patterns x every registered mechanism
that supports the pattern, trained briefly on small procedural stand-ins for CAB's task families, with quality,
efficiency and CAB's compositional index per pattern.

    python -m eval.cab [--quick] [--steps 100] [--mechanisms softmax,linear,...] [--tasks lm,seq2seq_cross]
        [--output benchmarks/results/cab_cpu.json] [--no-plot]
    python -m eval.cab --from-json benchmarks/results/cab_cpu.json       # table + PNG again, no run

Patterns (CAB's taxonomy, {noncausal, causal} x {self, cross}) and the tasks that stand in for its families here
(each a config of configs/ with the mechanism swapped into one field; CAB's own tasks are TTS, summarisation,
long-sequence time-series forecasting, point-cloud completion, LM, MLM and super-resolution on real data):
  noncausal_self   classification  configs/aspect_tiny.py  (sequence classification, encoder `attention`)
                   mlm             configs/encoder_tiny.py (masked LM on local text, encoder `attention`)
                   image           configs/vit_tiny.py     (procedural relation images, ViT `attention`)
  causal_self      lm              configs/lm_tiny.py      (byte-level LM on local text, decoder `attention`)
                   seq2seq_self    configs/seq2seq_tiny.py (digit reversal, the decoder's causal self-attention)
  noncausal_cross  seq2seq_cross   configs/seq2seq_tiny.py (digit reversal, the decoder's cross-attention)
  causal_cross     (none)          no model here offers a causal cross mask (query i sees context positions <= f(i),
                                   CAB's streaming TTS / summarisation): every cell is recorded as not supported
CAB's time-series forecasting (a noncausal cross task) has no stand-in yet: there is no time-series source in
train.data.

Support comes from the registry specs: noncausal self needs input kind "sequence" ("spatial" too for the image task);
causal self "sequence" with supports_causal; noncausal cross input kind "cross" or "sequence" (a sequence layer that
refuses a context is recorded as not supported with its error). Every (pattern, task, registered mechanism) cell is in
the JSON: "ok", "not_supported" (with the reason), "not_run" (supported but outside --mechanisms) or "failed" (the
error).

A cell: the config's trainer setup through the run API (train.run.build_run: the same model, data, optimizer and
compiled, sharded train step as `python -m train`), `--steps` training steps from seed 0, then the validation
metrics over `eval_batches` batches. Quality: eval accuracy (higher is better) and eval loss (lower is better).
Efficiency: median train-step ms over the steps after the first, tokens/s, and the compiled train step's memory
(temp + argument + output bytes).

Compositional index (CAB's CI, as its scripts/compositional_index computes it): within a pattern, every metric m of
a task is standardised over the mechanisms of that pattern, z = w_m (x - mean) / std (w = +1 for accuracy, -1 for
loss; std over the mechanisms with a value, population std); a task's score is the mean z over its metrics, and a
mechanism's CI in the pattern is the mean over the pattern's tasks it has. CAB fixes mean and std from its nine
attentions; here they come from the mechanisms measured in the same run (so a CI compares the run's mechanisms
only). CI 0 = the run's average; a pattern with fewer than two measured mechanisms has no CI.

--quick: the configs' smoke presets (toy models, tiny batches), 2 steps, 1 eval batch (the tests' wiring check).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import attn

from .bench import compiled_bytes
from .machine import load_average, machine_record
from .results import rerender_report, write_report
from .trainer_api import build_run, load_config_file

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
CAUSAL_CROSS_REASON = (
    "causal cross attention (query i attends context positions <= f(i)) has no model here: the encoder-decoder and "
    "VLM cross-attention sublayers take a padding mask only"
)
# Metric -> direction (+1: higher is better).
METRICS = {"accuracy": 1.0, "loss": -1.0}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STEPS, QUICK_STEPS = 100, 2
EVAL_BATCHES, QUICK_EVAL_BATCHES = 4, 1


@dataclasses.dataclass(frozen=True)
class Task:
    """A stand-in task: a config file, the model field that takes the mechanism, and what it stands in for."""

    name: str
    pattern: str
    config: str  # file in configs/
    field: str  # config.model.<field> = mechanism name
    input_kinds: tuple[str, ...]
    needs_causal: bool
    stands_for: str
    overrides: tuple[tuple[str, Any], ...] = ()  # full-run overrides of the default preset (not --quick)


TASKS = (
    Task(
        "classification",
        "noncausal_self",
        "aspect_tiny.py",
        "attention",
        ("sequence",),
        False,
        "long-sequence classification",
        (("batch_size", 16),),
    ),
    Task(
        "mlm",
        "noncausal_self",
        "encoder_tiny.py",
        "attention",
        ("sequence",),
        False,
        "masked language modelling",
        (("batch_size", 8), ("seq_len", 64), ("model.num_layers", 2)),
    ),
    Task(
        "image",
        "noncausal_self",
        "vit_tiny.py",
        "attention",
        ("sequence", "spatial"),
        False,
        "image (super-resolution in CAB; classification here)",
        (("batch_size", 16), ("model.num_layers", 2)),
    ),
    Task(
        "lm",
        "causal_self",
        "lm_tiny.py",
        "attention",
        ("sequence",),
        True,
        "language modelling",
        (("batch_size", 8), ("seq_len", 64), ("model.num_layers", 2)),
    ),
    Task(
        "seq2seq_self",
        "causal_self",
        "seq2seq_tiny.py",
        "attention",
        ("sequence",),
        True,
        "summarisation / TTS decoder self-attention",
        (("batch_size", 16),),
    ),
    Task(
        "seq2seq_cross",
        "noncausal_cross",
        "seq2seq_tiny.py",
        "cross_attention",
        ("cross", "sequence"),
        False,
        "summarisation / TTS / forecasting cross-attention",
        (("batch_size", 16),),
    ),
)
TASK_NAMES = tuple(t.name for t in TASKS)


# ---------------------------------------------------------------------------------------------- support
def support(task: Task, name: str) -> str | None:
    """Why mechanism `name` cannot fill `task`'s field according to its registry spec (None: it can)."""
    spec = attn.get(name)
    if spec.input_kind not in task.input_kinds:
        return f"input kind {spec.input_kind!r}; {task.pattern} ({task.name}) takes {list(task.input_kinds)}"
    if task.needs_causal and not spec.supports_causal:
        return f"the spec says supports_causal=False; {task.pattern} needs a causal mask"
    return None


# ---------------------------------------------------------------------------------------------- one cell
def task_config(task: Task, mechanism: str, *, steps: int, quick: bool, eval_batches: int) -> Any:
    """The ml_collections config of `task` with `mechanism` in its field (smoke preset under --quick)."""
    config = load_config_file(os.path.join(CONFIG_DIR, task.config) + (":smoke" if quick else ""))
    if not quick:
        config.update_from_flattened_dict(dict(task.overrides))
    config.total_steps = steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.eval.num_batches = eval_batches
    config.model[task.field] = mechanism
    return config


def measure_cell(task: Task, mechanism: str, *, steps: int, quick: bool, eval_batches: int) -> dict[str, Any]:
    """Trains `mechanism` on `task` for `steps` steps; returns the cell's quality and efficiency fields."""
    config = task_config(task, mechanism, steps=steps, quick=quick, eval_batches=eval_batches)
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(config, workdir)
    train_step, compile_seconds = run.train_step()
    state = run.init_state(jax.random.key(config.seed))
    rng = jax.random.key(config.seed + 1)
    times, losses = [], []
    with run.tracing():
        for step in range(steps):
            batch = run.next_train_batch()
            start = time.perf_counter()
            state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]) if "loss" in metrics else None)
    evaluation = run.evaluate(run.data("valid"), eval_batches, params=state.params)
    timed = times[1:] or times
    median = statistics.median(timed)
    tokens = config.batch_size * run.tokens_per_example
    return {
        "accuracy": evaluation.get("accuracy"),
        "loss": evaluation.get("loss"),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "steps": steps,
        "batch_size": config.batch_size,
        "tokens_per_example": run.tokens_per_example,
        "params": run.num_params,
        "compile_s": compile_seconds,
        "step_ms": 1e3 * median,
        "tokens_per_s": tokens / median,
        "train_step_memory_bytes": compiled_bytes(train_step),
    }


def _error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text[:400]


def run_grid(
    mechanisms: Sequence[str] | None, tasks: Sequence[str], *, steps: int, quick: bool, eval_batches: int
) -> list[dict[str, Any]]:
    """Every (pattern, task, registered mechanism) cell; `mechanisms` None runs every supported one."""
    registered = attn.list_mechanisms()
    records = []
    for task in (t for t in TASKS if t.name in tasks):
        for name in registered:
            cell = {"pattern": task.pattern, "task": task.name, "mechanism": name, "family": attn.get(name).family}
            reason = support(task, name)
            if reason is not None:
                records.append({**cell, "status": "not_supported", "reason": reason})
                continue
            if mechanisms is not None and name not in mechanisms:
                records.append({**cell, "status": "not_run", "reason": "supported; outside --mechanisms of this run"})
                continue
            print(f"[cab] {task.pattern} / {task.name} / {name}", flush=True)
            try:
                fields = measure_cell(task, name, steps=steps, quick=quick, eval_batches=eval_batches)
            except Exception as error:  # one cell never ends the grid
                text = _error(error)
                refused = "cannot attend to a context" in text
                status = "not_supported" if refused else "failed"
                records.append({**cell, "status": status, "reason": text})
                continue
            records.append({**cell, "status": "ok", **fields})
    for pattern in PATTERNS:
        if not any(t.pattern == pattern for t in TASKS):
            for name in registered:
                records.append(
                    {
                        "pattern": pattern,
                        "task": None,
                        "mechanism": name,
                        "family": attn.get(name).family,
                        "status": "not_supported",
                        "reason": CAUSAL_CROSS_REASON,
                    }
                )
    return records


# ---------------------------------------------------------------------------------------------- aggregate
def compositional_index(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{pattern: {mechanism: CI}} over the "ok" cells (see the module docstring)."""
    result: dict[str, dict[str, float]] = {}
    for pattern in PATTERNS:
        cells = [r for r in records if r["pattern"] == pattern and r["status"] == "ok"]
        task_scores: dict[str, list[float]] = {}
        for task in dict.fromkeys(r["task"] for r in cells):
            rows = [r for r in cells if r["task"] == task]
            per_mechanism: dict[str, list[float]] = {r["mechanism"]: [] for r in rows}
            for metric, sign in METRICS.items():
                values = [(r["mechanism"], r[metric]) for r in rows if r.get(metric) is not None]
                if len(values) < 2:
                    continue
                x = np.array([v for _, v in values], np.float64)
                std = x.std()
                for mechanism, value in values:
                    per_mechanism[mechanism].append(0.0 if std == 0 else sign * (value - x.mean()) / std)
            for mechanism, scores in per_mechanism.items():
                if scores:
                    task_scores.setdefault(mechanism, []).append(float(np.mean(scores)))
        if task_scores:
            result[pattern] = {m: float(np.mean(s)) for m, s in sorted(task_scores.items())}
    return result


# ---------------------------------------------------------------------------------------------- reporting
def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def table(report: dict[str, Any]) -> str:
    """Markdown: measured cells per pattern and task, the CI per pattern, and counts of the cells not measured."""
    records = report["records"]
    lines = [
        "| pattern | task | mechanism | eval accuracy | eval loss | step ms | tokens/s | train-step MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] == "ok":
            lines.append(
                f"| {r['pattern']} | {r['task']} | {r['mechanism']} | {_fmt(r['accuracy'], '.3f')} | "
                f"{_fmt(r['loss'], '.3f')} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{_fmt(_mib(r['train_step_memory_bytes']), '.1f')} |"
            )
        elif r["status"] == "failed":
            lines.append(f"| {r['pattern']} | {r['task']} | {r['mechanism']} | failed: {r['reason']} | | | | |")
    index = report.get("compositional_index", {})
    if index:
        names = sorted({m for scores in index.values() for m in scores})
        lines += ["", "**compositional index** (CAB's CI over the run's mechanisms; higher is better)", ""]
        lines.append("| mechanism | " + " | ".join(PATTERNS) + " |")
        lines.append("|---|" + "---:|" * len(PATTERNS))
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_fmt(index.get(p, {}).get(name), "+.2f") for p in PATTERNS) + " |")
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        counts[(r["pattern"], r["status"])] = counts.get((r["pattern"], r["status"]), 0) + 1
    lines += ["", "| pattern | ok | not supported | not run | failed |", "|---|---:|---:|---:|---:|"]
    for pattern in PATTERNS:
        cells = [str(counts.get((pattern, s), 0)) for s in ("ok", "not_supported", "not_run", "failed")]
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Left: eval accuracy per (task, mechanism); right: CI per pattern and mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["records"] if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    mechanisms = sorted({r["mechanism"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(mechanisms))
    for i, name in enumerate(mechanisms):
        found = {r["task"]: r.get("accuracy") for r in ok if r["mechanism"] == name}
        xs = [j + i * width for j, task in enumerate(tasks) if found.get(task) is not None]
        ys = [found[task] for task in tasks if found.get(task) is not None]
        axes[0].bar(xs, ys, width, label=name, color=f"C{i % 10}")
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20, fontsize=8)
    axes[0].set(ylabel="eval accuracy", title=f"quality after {report['settings']['steps']} steps")
    axes[0].legend(fontsize=7, ncol=2)
    index = report.get("compositional_index", {})
    patterns = [p for p in PATTERNS if p in index]
    for i, name in enumerate(mechanisms):
        xs = [j + i * width for j, p in enumerate(patterns) if name in index[p]]
        ys = [index[p][name] for p in patterns if name in index[p]]
        axes[1].bar(xs, ys, width, label=name, color=f"C{i % 10}")
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(patterns))], patterns, fontsize=8)
    axes[1].set(ylabel="compositional index", title="CAB compositional index per pattern (causal_cross: no model)")
    fig.suptitle(f"CAB grid — {report['device']} — jax {report['jax_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry point
def _names(text: str | None, known: Sequence[str], flag: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise ValueError(f"{flag}={text!r}: unknown {unknown}; expected comma-separated names from {list(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `python -m eval.cab`; returns the report."""
    parser = argparse.ArgumentParser(prog="python -m eval.cab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke presets, 2 steps (tests)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per cell (default {STEPS}; quick 2)")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches per cell")
    parser.add_argument("--mechanisms", default=None, help="comma-separated subset to run (default: every supported)")
    parser.add_argument("--tasks", default=None, help=f"subset of {','.join(TASK_NAMES)} (default: all)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/cab_<platform>.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--from-json", default=None, help="re-render the table and PNG of a saved report; no run")
    args = parser.parse_args(argv)
    if args.from_json:
        return rerender_report(args.from_json, plot=None if args.no_plot else plot, table=table)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    if steps < 1:
        raise ValueError(f"--steps={steps}: expected a positive number of training steps")
    eval_batches = args.eval_batches or (QUICK_EVAL_BATCHES if args.quick else EVAL_BATCHES)
    if eval_batches < 1:
        raise ValueError(f"--eval-batches={eval_batches}: expected a positive number of batches")
    mechanisms = _names(args.mechanisms, attn.list_mechanisms(), "--mechanisms")
    tasks = _names(args.tasks, TASK_NAMES, "--tasks") or TASK_NAMES
    platform = jax.devices()[0].platform
    load_before = load_average()
    start = time.perf_counter()
    records = run_grid(mechanisms, tasks, steps=steps, quick=args.quick, eval_batches=eval_batches)
    report = {
        "suite": "cab",
        **machine_record(),
        "load_average": {"before": load_before, "after": load_average()},
        "wall_s": time.perf_counter() - start,
        "settings": {
            "quick": args.quick,
            "steps": steps,
            "eval_batches": eval_batches,
            "mechanisms": list(mechanisms) if mechanisms is not None else "every supported",
            "tasks": {
                t.name: {"pattern": t.pattern, "config": t.config, "field": t.field, "stands_for": t.stands_for}
                for t in TASKS
                if t.name in tasks
            },
        },
        "records": records,
    }
    report["compositional_index"] = compositional_index(records)
    path = args.output or os.path.join("benchmarks", "results", f"cab_{platform}.json")
    return write_report(report, path, plot=None if args.no_plot else plot, table=table)


if __name__ == "__main__":
    main()
