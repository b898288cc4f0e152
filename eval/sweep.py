"""Side-by-side training of several mechanisms on one config: the same task, model size, steps and seed.

    python -m eval.sweep --config configs/vit_tiny.py:sweep \\
        --mechanisms softmax,neighborhood,window,halo --workdir-root runs/sweep_vit \\
        [--output benchmarks/results/vit_spatial_cpu.json] \\
        [--set model.pool=mean] [--option neighborhood.kernel_size=5] [--no-plot]
    python -m eval.sweep --from-json benchmarks/results/vit_spatial_cpu.json   # table + PNG again, no run

Each mechanism trains in `<workdir-root>/<name>` through `train.run.train` (so an interrupted sweep resumes
where it stopped, and a finished run is read back, not retrained). `--set` overrides any config field for all
runs; `--option name.key=value` passes an `attn.build` option to one mechanism. The report holds, per mechanism,
the final evaluation metrics, the last training loss, the wall time of this invocation and the steps trained,
plus the chance level of the task (1 / num_classes for classification) so "beats chance" can be read off.

Before anything trains, every mechanism's config is built as the trainer builds it (name, options and their
values, data, model traced on one example with no compilation); any problem is listed, one line per mechanism,
and the sweep exits 2. A run that fails while training (e.g. divergence) is recorded with its error, the sweep
goes on, and it exits 1 at the end.

Output: the JSON report (default `<workdir-root>/sweep.json`) and a PNG bar chart next to it of the evaluation
accuracy (or loss) per mechanism, with the chance level drawn; the Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from .run_metrics import last_metrics
from .trainer_api import build_run, load_config_file, train, unknown_override_message


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal when it parses as one (3, 0.5, (4, 4), 'x'), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_assignment(arg: str, flag: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', parsed value); ValueError naming the flag otherwise."""
    key, sep, value = arg.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} {arg!r}: expected key=value")
    return key.strip(), parse_value(value.strip())


def set_field(config: Any, dotted: str, value: Any) -> None:
    """Sets config.<dotted> = value; ValueError naming the field (and the closest one) when it does not exist."""
    message = unknown_override_message(config, dotted, flag="--set ")
    if message:
        raise ValueError(message)
    config.update_from_flattened_dict({dotted: value})


def mechanism_options(options: Sequence[str], mechanisms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--option name.key=value` flags grouped by mechanism; ValueError for a mechanism not in the sweep."""
    grouped: dict[str, dict[str, Any]] = {name: {} for name in mechanisms}
    for arg in options:
        key, value = split_assignment(arg, "--option")
        name, sep, option = key.partition(".")
        if not sep or name not in grouped:
            raise ValueError(f"--option {arg!r}: expected <mechanism>.<option>=value with a mechanism of {mechanisms}")
        grouped[name][option] = value
    return grouped


def chance_level(config: Any) -> float | None:
    """Accuracy of guessing for classification tasks (1 / num_classes), None where it is not defined."""
    num_classes = config.model.get("num_classes") if "model" in config else None
    return 1.0 / num_classes if num_classes else None


def mechanism_config(config: Any, name: str, options: Mapping[str, Any]) -> Any:
    """A copy of `config` whose every layer uses mechanism `name` with `options` added to model.attention_options."""
    config = config.copy_and_resolve_references()
    config.model.attention = name
    for key, value in options.items():
        config.model.attention_options[key] = value
    return config


def check_mechanisms(config: Any, options: Mapping[str, Mapping[str, Any]], workdir_root: str) -> list[str]:
    """One line per mechanism of `options` (name -> its options) whose run could not start, [] when all can.

    Each config is built as the trainer builds it (`train.run.build_run`: config checks, data, the model traced on
    one example, state shapes), without compiling or training anything.
    """
    problems = []
    for name, mechanism_options_ in options.items():
        try:
            build_run(mechanism_config(config, name, mechanism_options_), os.path.join(workdir_root, name))
        except (ValueError, KeyError, TypeError) as error:
            detail = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            detail = next((line.strip() for line in str(detail).splitlines() if line.strip()), type(error).__name__)
            problems.append(f"{name}: {detail}")
    return problems


def run_one(config: Any, name: str, options: Mapping[str, Any], workdir: str) -> dict[str, Any]:
    """Trains (or resumes / reads back) one mechanism; a record for the report."""
    config = mechanism_config(config, name, options)
    record: dict[str, Any] = {"mechanism": name, "options": dict(options), "workdir": workdir}
    start = time.perf_counter()
    try:
        result = train(config, workdir)
        record["steps"] = result.step
        record["start_step"] = result.start_step
    except Exception as error:  # noqa: BLE001 - recorded; one broken mechanism must not end the sweep
        record["error"] = f"{type(error).__name__}: {error}"
    record["wall_s"] = round(time.perf_counter() - start, 2)
    record["eval"], record["train"] = last_metrics(workdir)
    return record


def table(report: Mapping[str, Any]) -> str:
    """Markdown table of the sweep: eval accuracy / loss, last train loss, steps, wall time."""
    chance = report.get("chance")
    lines = [
        "| mechanism | eval accuracy | eval loss | train loss | steps | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        acc = r["eval"].get("eval/accuracy")
        acc_text = "—" if acc is None else f"{acc:.3f}" + (" (above chance)" if chance and acc > chance else "")
        loss = r["eval"].get("eval/loss")
        train_loss = r["train"].get("train/loss")
        cells = [
            r["mechanism"] + (f" — {r['error']}" if "error" in r else ""),
            acc_text,
            "—" if loss is None else f"{loss:.3f}",
            "—" if train_loss is None else f"{train_loss:.3f}",
            str(r.get("steps", r["eval"].get("step", "—"))),
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if chance:
        lines.append(f"\nchance level: {chance:.3f}")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
    """Bar chart of the final evaluation accuracy (loss when there is no accuracy), chance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    metric = "eval/accuracy" if any("eval/accuracy" in r["eval"] for r in records) else "eval/loss"
    names = [r["mechanism"] for r in records]
    values = [r["eval"].get(metric, float("nan")) for r in records]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    ax.bar(names, values, color="tab:blue")
    if report.get("chance") and metric == "eval/accuracy":
        ax.axhline(report["chance"], color="tab:red", linestyle="--", label=f"chance {report['chance']:.2f}")
        ax.legend()
    ax.set_ylabel(metric)
    ax.set_title(f"{report['config']} — {report['device']}")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep (or redraws `--from-json`) and returns the report. SystemExit(2) naming every mechanism whose
    config cannot be built, before any training; SystemExit(1) after the report is written when a run failed."""
    parser = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file[:preset], as for python -m train")
    parser.add_argument("--mechanisms", help="comma-separated registry names")
    parser.add_argument("--workdir-root", default="runs/sweep", help="one run directory per mechanism under it")
    parser.add_argument(
        "--output", help="JSON report path, default <workdir-root>/sweep.json (the PNG goes next to it)"
    )
    parser.add_argument("--set", action="append", default=[], help="config override for every run: a.b=value")
    parser.add_argument("--option", action="append", default=[], help="attn.build option: mechanism.key=value")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--from-json", help="print the table (and redraw the PNG) of an existing report")
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        if not args.config or not args.mechanisms:
            parser.error("--config and --mechanisms are required (or --from-json)")
        args.output = args.output or os.path.join(args.workdir_root, "sweep.json")
        mechanisms = [name.strip() for name in args.mechanisms.split(",") if name.strip()]
        try:
            config = load_config_file(args.config)
            for arg in args.set:
                set_field(config, *split_assignment(arg, "--set"))
            options = mechanism_options(args.option, mechanisms)
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None
        problems = check_mechanisms(config, options, args.workdir_root)
        if problems:
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            print(f"nothing trained: fix the {len(problems)} mechanism(s) above", file=sys.stderr)
            raise SystemExit(2)
        report = {
            "tool": "eval.sweep",
            "config": args.config,
            "overrides": list(args.set),
            "device": jax.devices()[0].device_kind,
            "platform": jax.default_backend(),
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()),
            "chance": chance_level(config),
            "records": [],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        for name in mechanisms:
            report["records"].append(run_one(config, name, options[name], os.path.join(args.workdir_root, name)))
            with open(args.output, "w") as f:  # rewritten after every run: a long sweep keeps what it has
                json.dump(report, f, indent=2)
    print(table(report))
    path = args.output or args.from_json
    if not args.no_plot:
        plot(report, os.path.splitext(path)[0] + ".png")
    failed = [r["mechanism"] for r in report["records"] if "error" in r]
    if failed and not args.from_json:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; report in {path}", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
