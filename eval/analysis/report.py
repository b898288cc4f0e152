"""`python -m eval.analysis report`: per-layer attention-sink and activation-outlier analysis of trained runs.

    python -m eval.analysis report --workdir runs/lm_softmax --workdir runs/lm_gated \
        --output benchmarks/results/analysis_lm_tiny_cpu.json [--batch-size 8] [--step N] [--no-plot]

(`python -m eval.analysis --workdir ...`, without a tool name, runs this report too.)

For each workdir: loads the latest (or `--step`) checkpoint with the config saved inside it (`train.run.load_run`),
runs ONE fixed validation batch (the first `--batch-size` rows of the config's "valid" split at the training
length, the same for every run of the same data) and reports per layer:

  first_key_mass            mean attention probability on the first token (the attention sink; from
                            `attn.attention_stats`), with its largest per-head value
  entropy                   mean attention entropy in nats (log Tk = uniform)
  attention_output.*        max_abs, rms, kurtosis, kurtosis_max of the attention sublayer's output [B, T, E]
  residual.*                the same for the residual stream after the block

(kurtosis: per-token Pearson kurtosis over the features, averaged over tokens; see eval.analysis.stats).
Mechanisms without a probability matrix have no first_key_mass / entropy. The JSON also holds, per run, the
uniform-causal first-key mass mean_i 1/(i+1): what a model with no sink would show.

Writes the JSON to --output and a PNG next to it (same stem): grouped per-layer bars, one colour per run.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from attn import attention_stats

from ..trainer_api import Run, load_run
from . import stats
from .evaluator import write_json

# (key in a layer entry, y label) of the plot's panels, in order
PANELS = (
    ("first_key_mass", "attention mass on token 0"),
    ("entropy", "attention entropy (nats)"),
    ("attention_output.max_abs", "attention output max abs"),
    ("attention_output.kurtosis", "attention output kurtosis"),
    ("residual.max_abs", "residual max abs"),
    ("residual.kurtosis", "residual kurtosis"),
)


def validation_batch(run: Run, batch_size: int) -> dict[str, np.ndarray]:
    """The first `batch_size` rows of the config's validation split at the training length (host arrays; the same
    rows on every process)."""
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    source = run.data("valid", batch_size=batch_size, per_process=False)
    return {key: np.asarray(value) for key, value in source.next_batch().items()}


def capture(run: Run, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """The "intermediates" of one deterministic forward of the run's parameters: sown attention weights plus
    block/attention outputs."""

    def forward(params, batch):
        _, collections = run.task.apply({"params": params}, batch, mutable=["intermediates"])
        return collections.get("intermediates", {})

    with run.tracing(), stats.capture_outputs():
        return jax.jit(forward)(run.params, batch)


def layer_report(intermediates: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per layer (sorted): layer, [first_key_mass, first_key_mass_max_head, entropy],
    attention_output {...}, residual {...} as Python floats."""
    probs = attention_stats.attention_weights_by_layer(intermediates)
    outputs = attention_stats.sown_by_layer(intermediates, stats.ATTENTION_OUTPUT)
    residual = attention_stats.sown_by_layer(intermediates, stats.BLOCK_OUTPUT)
    entries = []
    for layer in sorted(set(probs) | set(outputs) | set(residual)):
        entry: dict[str, Any] = {}
        if layer in probs:
            entry.update(attention_stats.layer_stats(probs[layer]))
            entry["first_key_mass_max_head"] = jax.numpy.max(stats.first_key_mass_by_head(probs[layer]))
        if layer in outputs:
            entry["attention_output"] = stats.activation_stats(outputs[layer])
        if layer in residual:
            entry["residual"] = stats.activation_stats(residual[layer])
        entries.append({"layer": layer, **jax.tree.map(float, jax.device_get(entry))})
    return entries


def analyze_run(workdir: str, *, batch_size: int = 8, step: int | None = None) -> dict[str, Any]:
    """Report of one run: workdir, step, attention, options, seq_len, batch, per-layer entries."""
    run = load_run(workdir, step)
    if not run.task.is_language_model or run.task.kind != "decoder":
        raise ValueError(f"workdir={workdir!r} holds a {run.task.kind!r} model; eval.analysis reads decoder LMs")
    batch = validation_batch(run, batch_size)
    layers = layer_report(capture(run, batch))
    return {
        "workdir": os.path.abspath(workdir),
        "label": os.path.basename(os.path.normpath(workdir)),
        "step": run.step,
        "attention": run.config.model.attention,
        "attention_options": _plain(run.config.model.get("attention_options")),
        "seq_len": run.config.seq_len,
        "batch_shape": list(batch["inputs"].shape),
        "uniform_causal_first_key_mass": stats.uniform_causal_first_key_mass(run.config.seq_len),
        "layers": layers,
        "means": layer_means(layers),
    }


def _plain(options: Any) -> dict[str, Any]:
    if not options:
        return {}
    return options.to_dict() if hasattr(options, "to_dict") else dict(options)


def layer_means(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over layers of every panel quantity the layers have."""
    means = {}
    for key, _ in PANELS:
        values = [v for v in (_get(entry, key) for entry in layers) if v is not None]
        if values:
            means[key] = float(np.mean(values))
    return means


def _get(entry: dict[str, Any], dotted: str) -> float | None:
    value: Any = entry
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per (run, layer) with the panel quantities."""
    head = "| run | attention | layer | " + " | ".join(label for _, label in PANELS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(PANELS)]
    for run in report["runs"]:
        for entry in [*run["layers"], {"layer": "mean", **_unflatten(run["means"])}]:
            cells = [_fmt(_get(entry, key)) for key, _ in PANELS]
            lines.append(f"| {run['label']} | {run['attention']} | {entry['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _unflatten(flat: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def plot(report: dict[str, Any], path: str) -> None:
    """PNG: one panel per PANELS quantity, per-layer bars grouped by run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    width = 0.8 / max(len(runs), 1)
    for axis, (key, label) in zip(axes.flat, PANELS, strict=True):
        for i, run in enumerate(runs):
            rows = [(e["layer"], _get(e, key)) for e in run["layers"] if _get(e, key) is not None]
            if rows:
                layers, values = zip(*rows, strict=True)
                axis.bar(np.asarray(layers) + (i - (len(runs) - 1) / 2) * width, values, width, label=run["label"])
        if key == "first_key_mass" and runs:
            axis.axhline(runs[0]["uniform_causal_first_key_mass"], color="k", ls="--", lw=0.8, label="uniform")
        axis.set(xlabel="layer", ylabel=label, xticks=[e["layer"] for e in runs[0]["layers"]] if runs else [])
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"eval.analysis — {report['platform']} — batch of validation text, seq_len {runs[0]['seq_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `python -m eval.analysis report`; returns the report written."""
    parser = argparse.ArgumentParser(prog="python -m eval.analysis report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", action="append", required=True, help="a trained run (repeat for several)")
    parser.add_argument("--output", required=True, help="JSON path; the PNG gets the same stem")
    parser.add_argument("--batch-size", type=int, default=8, help="validation rows in the fixed batch")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: each run's latest)")
    parser.add_argument("--no-plot", action="store_true", help="write only the JSON")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    runs = [analyze_run(w, batch_size=args.batch_size, step=args.step) for w in args.workdir]
    report = {
        "tool": "eval.analysis",
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {"batch_size": args.batch_size, "step": args.step},
        "runs": runs,
    }
    write_json(report, args.output)
    if not args.no_plot:
        report["png_path"] = os.path.splitext(args.output)[0] + ".png"
        plot(report, report["png_path"])
    print(table(report))
    print(f"\nwrote {args.output}" + (f" and {report['png_path']}" if "png_path" in report else ""))
    return report
