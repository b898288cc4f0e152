"""`python -m eval.techniques`: a training technique side by side with the baseline, same seed, data and steps.

    python -m eval.techniques --config configs/lm_techniques.py             # σReparam vs baseline
    python -m eval.techniques --config configs/lm_techniques.py:entropy_reg --name techniques_entropy_reg
    python -m eval.techniques --config configs/lm_techniques.py --set optimizer.learning_rate=0.03
    python -m eval.techniques --config configs/mil_tiny.py --presets ,aem,acmil,mhim --name techniques_mil_cpu
    python -m eval.techniques --config configs/vit_tiny.py --presets sweep,tap_adl --steps 300 \
        --probe patch_corruption --name techniques_tap_adl
    python -m eval.techniques --config configs/aspect_tiny.py --separately --probe aspect_evidence \
        --set "techniques=[{'name': 'attention_at'}, {'name': 'attention_iat'}]"
    python -m eval.techniques --config configs/aspect_tiny.py:pss --steps 2000 --probe pss_attention \
        --name pss_aspect_tiny
    python -m eval.techniques --config configs/vit_tiny.py --presets sweep,adl --steps 300 \
        --probe patch_corruption --name adl_vit_tiny

The config names the technique(s) in `config.techniques`; the baseline is the same config with `techniques = []`.
Both runs go through the trainer (`train.run.train`) in temporary workdirs; the evaluator reads their logged
metrics: the train loss every `log_every` steps, and the validation loss and the per-layer attention entropy on the
probe batch every `eval_every` steps ("attention/entropy/layer_<i>", mean over rows, heads and queries, nats).

Writes benchmarks/results/<name>.json (config, device, per-step series of both runs, a summary: the lowest
per-layer entropy each run reached and the final losses, and whether a run diverged) and <name>.png (entropy per
layer over steps, both runs, and the train loss). A run that diverges (nan/inf loss) is recorded up to its last
logged step, with `diverged_at`.

With `--presets a,b,...` it instead trains each preset of the config file (the empty name is the config's default)
with the same seed, data and steps — for techniques that come with their own model fields, such as ACMIL's
attention branches — and records every preset's eval metrics over steps ("eval/<name>", e.g. the MIL task's
accuracy, instance_auc, top1_hit, positive_mass); the PNG shows the final eval metrics side by side and the eval
accuracy over steps.

`--separately` trains each technique of `config.techniques` alone against the one baseline (runs labelled by the
technique's name). `--probe <name>` runs a probe of eval.technique_probes on every run's final checkpoint (patch
corruption of images, the aspect task's evidence attention and embedding noise, PSS's aspect-attention report) and
records it under each run's "probe" (the record names the probe and the validation rows it used, "probe_rows").
`--out_dir` applies to both modes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any

import jax
import ml_collections

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


@dataclasses.dataclass
class TechniqueComparison:
    """Trains `config` with and without its techniques and records both runs.

    Attributes:
      config: a training config whose `techniques` list is not empty.
      name: output file stem under `out_dir`.
      out_dir: where the JSON and PNG go.
      probe: an eval.technique_probes name run on each final checkpoint (None: none).
      separately: train each technique of the list alone (runs labelled by its name) instead of all together
        (the run labelled "technique").
    """

    config: ml_collections.ConfigDict
    name: str = "techniques"
    out_dir: str = RESULTS
    probe: str | None = None
    separately: bool = False

    def __post_init__(self) -> None:
        if not list(self.config.get("techniques") or []):
            raise ValueError("config.techniques=[] names no technique to compare with the baseline")
        _check_probe(self.probe)

    def run(self) -> dict[str, Any]:
        """The baseline and the technique run(s); returns the record (also written as JSON + PNG)."""
        runs = {}
        entries = list(self.config.techniques)
        variants = [("technique", entries)]
        if self.separately:
            variants = [(_plain(entry)["name"], [entry]) for entry in entries]
        for label, entries in [("baseline", []), *variants]:
            config = ml_collections.ConfigDict(self.config.to_dict())
            config.techniques = entries
            runs[label] = _train_and_read(config, self.probe)
        record = {
            "evaluator": "eval.techniques",
            "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores",
            "jax": jax.__version__,
            "techniques": [dict(e) for e in _plain(self.config.techniques)],
            "config": _plain(self.config.to_dict()),
            "runs": runs,
            "summary": {label: _summary(run) for label, run in runs.items()},
            **_probe_record(self.probe),
        }
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"{self.name}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        plot(record, os.path.join(self.out_dir, f"{self.name}.png"))
        return record


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _train_and_read(config: ml_collections.ConfigDict, probe: str | None = None) -> dict[str, Any]:
    """Trains `config` in a temporary workdir; {"train_loss": {step: v}, "eval_loss": {...}, "entropy": {layer:
    {step: v}}, "seconds", "diverged_at", "probe": {metric: v} of eval.technique_probes' `probe` on the final
    checkpoint (None without a probe or after a divergence)}."""
    from .run_metrics import read_metric_rows
    from .technique_probes import PROBES
    from .trainer_api import TrainingDiverged, load_run, train

    started = time.perf_counter()
    diverged_at = None
    with tempfile.TemporaryDirectory() as workdir:
        try:
            train(config, workdir)
        except TrainingDiverged as error:
            diverged_at = str(error)
        rows = read_metric_rows(workdir)
        probed = PROBES[probe](load_run(workdir)) if probe is not None and diverged_at is None else None
    out: dict[str, Any] = {"train_loss": {}, "eval_loss": {}, "entropy": {}, "technique_scalars": {}, "eval": {}}
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            if key.startswith("eval/"):
                out["eval"].setdefault(key.removeprefix("eval/"), {})[step] = value
        if "train/loss" in row:
            out["train_loss"][step] = row["train/loss"]
        if "eval/loss" in row:
            out["eval_loss"][step] = row["eval/loss"]
        for key, value in row.items():
            if key.startswith("attention/entropy/layer_"):
                layer = key.rsplit("_", 1)[1]
                out["entropy"].setdefault(layer, {})[step] = value
            elif key.startswith("train/technique/"):
                out["technique_scalars"].setdefault(key.removeprefix("train/"), {})[step] = value
    out["seconds"] = time.perf_counter() - started
    out["diverged_at"] = diverged_at
    out["probe"] = probed
    return out


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    def last(series: dict[int, float]) -> float | None:
        return series[max(series)] if series else None

    entropy = run["entropy"]
    return {
        "final_train_loss": last(run["train_loss"]),
        "final_eval_loss": last(run["eval_loss"]),
        "min_entropy_per_layer": {layer: min(series.values()) for layer, series in entropy.items()},
        "final_entropy_per_layer": {layer: last(series) for layer, series in entropy.items()},
        "diverged": run["diverged_at"] is not None,
        "seconds": run["seconds"],
        "probe": run["probe"],
    }


def _probe_record(probe: str | None) -> dict[str, Any]:
    """{"probe": name, "probe_rows": validation rows it evaluates} for a record with a probe, else {}."""
    from .technique_probes import PROBE_ROWS

    return {} if probe is None else {"probe": probe, "probe_rows": PROBE_ROWS}


def _check_probe(probe: str | None) -> None:
    from .technique_probes import PROBES

    if probe is not None and probe not in PROBES:
        raise ValueError(f"probe={probe!r} is unknown; expected one of {sorted(PROBES)}")


def plot(record: dict[str, Any], path: str) -> None:
    """Entropy per layer over steps (one colour per run, one line style per layer) and the train loss of every
    run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = "+".join(t["name"] for t in record["techniques"])
    styles = ("-", "--", ":", "-.")
    for index, (label, run) in enumerate(record["runs"].items()):
        shown = names if label == "technique" else label
        color = colors[index % len(colors)]
        for layer_index, (layer, series) in enumerate(sorted(run["entropy"].items())):
            steps = sorted(series, key=int)
            left.plot(
                [int(s) for s in steps],
                [series[s] for s in steps],
                styles[layer_index % len(styles)],
                color=color,
                label=f"{shown} layer {layer}",
            )
        steps = sorted(run["train_loss"], key=int)
        values = [run["train_loss"][s] if math.isfinite(run["train_loss"][s]) else float("nan") for s in steps]
        right.plot([int(s) for s in steps], values, color=color, label=shown)
    left.set(xlabel="step", ylabel="attention entropy (nats, probe batch)", title="attention entropy per layer")
    right.set(xlabel="step", ylabel="train loss (nats)", title="train loss")
    left.legend(fontsize=7)
    right.legend(fontsize=8)
    fig.suptitle(f"{names} vs baseline, same seed and steps ({record['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclasses.dataclass
class PresetComparison:
    """Trains several presets of one config file, same seed and steps, and records their eval metrics.

    Attributes:
      config_path: the config file (`get_config(preset)`).
      presets: preset names ("" = the default).
      name: output file stem under `out_dir`.
      out_dir: where the JSON and PNG go.
      overrides: FIELD=VALUE strings applied to every preset (as --set).
      probe: an eval.technique_probes name run on each final checkpoint (None: none).
    """

    config_path: str
    presets: tuple[str, ...]
    name: str = "techniques_presets"
    out_dir: str = RESULTS
    overrides: tuple[str, ...] = ()
    probe: str | None = None

    def __post_init__(self) -> None:
        if len(self.presets) < 2:
            raise ValueError(f"presets={self.presets!r} must name at least two presets to compare")
        _check_probe(self.probe)

    def run(self) -> dict[str, Any]:
        """Every preset's run; returns the record (also written as JSON + PNG)."""
        from .trainer_api import load_config_file

        runs, configs = {}, {}
        for preset in self.presets:
            config = load_config_file(f"{self.config_path}:{preset}" if preset else self.config_path)
            for override in self.overrides:
                _override(config, override)
            label = preset or "default"
            configs[label] = _plain(config.to_dict())
            runs[label] = _train_and_read(config, self.probe)
        record = {
            "evaluator": "eval.techniques --presets",
            "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores",
            "jax": jax.__version__,
            "config": self.config_path,
            "overrides": list(self.overrides),
            "configs": configs,
            "runs": runs,
            "summary": {label: _preset_summary(run) for label, run in runs.items()},
            **_probe_record(self.probe),
        }
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"{self.name}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        plot_presets(record, os.path.join(self.out_dir, f"{self.name}.png"))
        return record


def _preset_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The final value of every eval metric, the final train loss, and the run's time and divergence."""
    final = {name: series[max(series)] for name, series in run["eval"].items() if series}
    train = run["train_loss"]
    return {
        "final_eval": final,
        "final_train_loss": train[max(train)] if train else None,
        "diverged": run["diverged_at"] is not None,
        "seconds": run["seconds"],
        "probe": run["probe"],
    }


def plot_presets(record: dict[str, Any], path: str) -> None:
    """Left: the final eval metrics in [0, 1] (accuracy, localisation) per preset, grouped bars; right: eval
    accuracy over steps per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(record["runs"])
    finals = [
        record["summary"][label]["final_eval"]
        | {f"probe/{k}": v for k, v in (record["summary"][label].get("probe") or {}).items()}
        for label in labels
    ]
    metrics = sorted({m for final in finals for m, v in final.items() if m != "loss" and 0.0 <= v <= 1.0})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(labels), 1)
    for index, (label, final) in enumerate(zip(labels, finals, strict=True)):
        xs = [m + index * width for m in range(len(metrics))]
        left.bar(xs, [final.get(name, float("nan")) for name in metrics], width, label=label)
    left.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics, fontsize=8, rotation=20, ha="right")
    left.set(ylabel="final eval value", ylim=(0, 1), title="final evaluation")
    for label in labels:
        series = record["runs"][label]["eval"].get("accuracy", {})
        steps = sorted(series, key=int)
        right.plot([int(s) for s in steps], [series[s] for s in steps], marker="o", label=label)
    right.set(xlabel="step", ylabel="eval accuracy", title="eval accuracy over steps")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"{record['config']}: presets side by side, same seed and steps ({record['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets `dotted.field=value` (value a Python literal, else a string); ValueError naming an unknown field."""
    from .trainer_api import unknown_override_message

    dotted, sep, text = override.partition("=")
    if not sep:
        raise ValueError(f"--set {override!r} must be FIELD=VALUE, e.g. --set optimizer.learning_rate=0.03")
    message = unknown_override_message(config, dotted, flag="--set ")
    if message:
        raise ValueError(message)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m eval.techniques", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/lm_techniques.py", help="config file[:preset] with techniques")
    parser.add_argument("--name", default=None, help="output stem (default techniques_<technique names>)")
    parser.add_argument("--steps", type=int, default=None, help="override total_steps")
    parser.add_argument("--out_dir", default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (Python literal)"
    )
    parser.add_argument(
        "--presets", default=None, help="compare these presets of --config instead (comma-separated, '' = default)"
    )
    parser.add_argument("--probe", default=None, help="eval.technique_probes probe run on each final checkpoint")
    parser.add_argument(
        "--separately", action="store_true", help="train each technique of config.techniques alone vs the baseline"
    )
    args = parser.parse_args(argv)
    from .trainer_api import load_config_file

    if args.presets is not None:
        overrides = tuple(args.set)
        if args.steps is not None:
            overrides += (f"total_steps={args.steps}", f"checkpoint_every={args.steps}")
        presets = tuple(name.strip() for name in args.presets.split(","))
        comparison = PresetComparison(
            args.config,
            presets,
            name=args.name or "techniques_presets",
            out_dir=args.out_dir,
            overrides=overrides,
            probe=args.probe,
        )
        record = comparison.run()
        print(json.dumps(record["summary"], indent=1))
        return record

    config = load_config_file(args.config)
    for override in args.set:
        _override(config, override)
    if args.steps is not None:
        config.total_steps = args.steps
        config.checkpoint_every = args.steps
    names = "_".join(_plain(entry)["name"] for entry in config.techniques)
    comparison = TechniqueComparison(
        config,
        name=args.name or f"techniques_{names}",
        out_dir=args.out_dir,
        probe=args.probe,
        separately=args.separately,
    )
    record = comparison.run()
    print(json.dumps(record["summary"], indent=1))
    return record


if __name__ == "__main__":
    main()
