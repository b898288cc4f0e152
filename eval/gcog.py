"""gCOG ([47]) accuracies of trained runs: in distribution and on each out-of-distribution test.

    python -m eval.gcog --workdir runs/gcog_cross [runs/gcog_prefix ...] [--batches 4] [--batch-size 64]
        [--distractors 10,20,30,40] [--output benchmarks/results/gcog_cpu.json] [--no-plot]
    python -m eval.gcog --from-json benchmarks/results/gcog_cpu.json        # table + PNG again, no run

Each workdir holds a run of a "gcog" config (configs/gcog_tiny.py). Its data options come from the run's saved config;
the tests are the "valid" split of that source: "in_distribution" (ood=False: fresh rows of the training
distribution) and, with ood=True, the run's generalisation test(s): for generalization="all" every one of
distractor (one record per --distractors count), systematic, systematic_tree and productive; otherwise the one it
names. Accuracy is the paper's: the share of questions whose answer token (the argmax over the whole vocabulary at
the answer position) is right. "majority" is the share of the test's most frequent answer (what answering the
commonest word scores).

Output: the JSON report (device, versions, load average, settings, one record per (run, test) with accuracy,
majority, questions and the test's fidelity: paper / official-code / reconstructed, as train.data.gcog.FIDELITY
states) and a PNG of accuracy per test and run, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .machine import load_average, machine_record
from .results import rerender_report, write_report
from .trainer_api import load_run, make_source, source_class

OOD_TESTS = ("distractor", "systematic", "systematic_tree", "productive")
BATCHES, BATCH_SIZE = 4, 64


def run_label(config: Any) -> str:
    """A run's name in the report: its fusion and the mechanism that reads the stimulus (cross or self)."""
    model = config.model
    if model.fusion == "cross":
        return f"cross:{model.cross_attention}"
    return f"prefix:{model.attention}"


def tests_of(options: dict[str, Any], distractor_counts: Sequence[int] | None) -> list[tuple[str, dict[str, Any]]]:
    """(test name, source options) of every test of a run whose data options are `options`."""
    generalization = options.get("generalization", "all")
    names = OOD_TESTS if generalization == "all" else (generalization,)
    tests = [("in_distribution", {**options, "ood": False})]
    for name in names:
        if name == "distractor":
            for count in distractor_counts or (options.get("test_distractors", 40),):
                test = {**options, "ood": True, "ood_test": "distractor", "test_distractors": int(count)}
                tests.append((f"distractor_{count}", test))
        else:
            tests.append((name, {**options, "ood": True, "ood_test": name}))
    return tests


def accuracy(
    run: Any, predict: Any, options: dict[str, Any], *, batches: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """{"accuracy", "majority", "questions"} of `run` on `batches` batches of the gcog valid source with `options`;
    `predict(params, batch)` gives the argmax tokens int [B, L]."""
    source = make_source("gcog", split="valid", batch_size=batch_size, seed=seed, **options)
    right, answers = 0, collections.Counter()
    for step in range(batches):
        batch = source.batch_at(step)
        predicted = np.asarray(predict(run.params, batch))
        where = batch["weights"] > 0
        right += int((predicted[where] == batch["targets"][where]).sum())
        answers.update(batch["targets"][where].tolist())
    total = sum(answers.values())
    return {"accuracy": right / total, "majority": max(answers.values()) / total, "questions": total}


def evaluate_runs(
    workdirs: Sequence[str], *, batches: int, batch_size: int, distractor_counts: Sequence[int] | None, seed: int = 0
) -> list[dict[str, Any]]:
    """One record per (run, test): {"run", "workdir", "step", "test", "accuracy", "majority", "questions"}."""
    records = []
    for workdir in workdirs:
        run = load_run(workdir)
        if run.config.data.name != "gcog":
            raise ValueError(f"--workdir {workdir!r} is a run of data source {run.config.data.name!r}, expected 'gcog'")
        options = {k: v for k, v in run.config.data.to_dict().items() if k != "name"}
        predict = jax.jit(lambda params, batch, task=run.task: task.apply({"params": params}, batch).argmax(-1))
        module = importlib.import_module(source_class("gcog").__module__)  # FIDELITY, REFERENCE
        for name, test in tests_of(options, distractor_counts):
            result = accuracy(run, predict, test, batches=batches, batch_size=batch_size, seed=seed)
            fidelity = module.FIDELITY[test["ood_test"] if test["ood"] else options.get("generalization", "all")]
            record = {"run": run_label(run.config), "workdir": workdir, "step": run.step, "test": name, **result}
            records.append({**record, "fidelity": fidelity, "reference": module.REFERENCE})
    return records


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per run, one column per test (accuracy, the majority share in parentheses)."""
    records = report["records"]
    tests = list(dict.fromkeys(r["test"] for r in records))
    runs = list(dict.fromkeys((r["run"], r["workdir"]) for r in records))
    found = {(r["run"], r["workdir"], r["test"]): r for r in records}
    lines = ["| run | step | " + " | ".join(tests) + " |", "|---" * (len(tests) + 2) + "|"]
    for label, workdir in runs:
        cells = []
        for test in tests:
            r = found.get((label, workdir, test))
            cells.append("" if r is None else f"{r['accuracy']:.3f} ({r['majority']:.2f})")
        step = next(r["step"] for r in records if r["workdir"] == workdir)
        lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Grouped bars: accuracy per test, one bar per run, the majority share as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    tests = list(dict.fromkeys(r["test"] for r in records))
    runs = list(dict.fromkeys((r["run"], r["workdir"]) for r in records))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tests) + 2), 4.2))
    for i, (label, workdir) in enumerate(runs):
        mine = {r["test"]: r for r in records if r["workdir"] == workdir}
        xs = [j + i * width for j, t in enumerate(tests) if t in mine]
        ax.bar(xs, [mine[t]["accuracy"] for t in tests if t in mine], width, label=label, color=f"C{i % 10}")
        ax.scatter(xs, [mine[t]["majority"] for t in tests if t in mine], marker="_", color="black", s=120)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tests))], tests, rotation=20, fontsize=8)
    ax.set(ylabel="accuracy (tick: majority answer)", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.set_title(f"gCOG — {report['device']} — jax {report['jax_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _counts(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise ValueError(f"--distractors={text!r}: expected comma-separated non-negative ints, e.g. 10,20,30,40")
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `python -m eval.gcog`; returns the report."""
    parser = argparse.ArgumentParser(prog="python -m eval.gcog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", nargs="+", default=None, help="run directories of gcog configs")
    parser.add_argument("--batches", type=int, default=BATCHES, help="test batches per test")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="questions per batch")
    parser.add_argument("--distractors", default=None, help="distractor-test counts (default: the run's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test rows")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gcog_<platform>.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--from-json", default=None, help="re-render the table and PNG of a saved report; no run")
    args = parser.parse_args(argv)
    if args.from_json:
        return rerender_report(args.from_json, plot=None if args.no_plot else plot, table=table)
    if not args.workdir:
        raise ValueError("--workdir: expected at least one run directory (or --from-json)")
    if args.batches < 1 or args.batch_size < 1:
        raise ValueError(f"--batches={args.batches} and --batch-size={args.batch_size} must be positive")
    counts = _counts(args.distractors)
    platform = jax.devices()[0].platform
    load_before = load_average()
    start = time.perf_counter()
    records = evaluate_runs(
        args.workdir, batches=args.batches, batch_size=args.batch_size, distractor_counts=counts, seed=args.seed
    )
    report = {
        "suite": "gcog",
        **machine_record(),
        "load_average": {"before": load_before, "after": load_average()},
        "wall_s": time.perf_counter() - start,
        "settings": {
            "batches": args.batches,
            "batch_size": args.batch_size,
            "distractors": list(counts) if counts else "each run's test_distractors",
            "seed": args.seed,
            "workdirs": list(args.workdir),
        },
        "records": records,
    }
    path = args.output or os.path.join("benchmarks", "results", f"gcog_{platform}.json")
    return write_report(report, path, plot=None if args.no_plot else plot, table=table)


if __name__ == "__main__":
    main()
