"""`python -m eval.steer`: the effects of the steering systems (attn.steer) on a decoder trained here.

    python -m eval.steer [--workdir runs/steer_emphasis] [--output benchmarks/results/steer_cpu.json]
    python -m eval.steer --vlm [--workdir runs/steer_vlm] [--output benchmarks/results/steer_vlm_cpu.json]

With --vlm it measures the vision-language systems (var, vhr, damro, imbalance_fix, carve) on the prefix VLM of
configs/steer_vlm.py instead (eval/steer_vlm.py says what).

The model is the 2-layer decoder of configs/steer_emphasis.py, trained on the emphasis_qa task (train/data/
emphasis.py) into --workdir when it holds no checkpoint (2.6 CPU-minutes measured on 2 shared cores). Measured on
held-out `answer_conflict` rows (two sentences hold the queried key with different values, the marked one is meant;
the model never saw a conflict in a value question while training), with and without each system:

  accuracy        the answer is the marked sentence's value; `distractor` counts answers with the other value
  pasta           steering toward the marked sentence (the span given), heads by per-head profiling
  autopasta       the model names the key sentence itself (the same context with the which-sentence question),
                  the span of the sentence it names is steered, heads by coarse-to-fine profiling
  act             heads from the calibration search; the hidden-sink mass (attention on keys j > 0 whose mean
                  received attention exceeds the threshold) before and after, per layer and head; also with every
                  head calibrated, so the mass moved is reported even where the search keeps no head
  soft_injection  on rows without a conflict: the question token removed (PLAIN in its place), the task conveyed
                  instead by the mean last-token head outputs of prompts with it (QA: answer the value, QW: name
                  the sentence), mixing fitted on other rows; accuracy without / with the injection, and with the
                  question token (the prompt-based reference)

Head selection uses its own rows (`--profile-rows`, a different seed from the `--rows` measured). Output: the JSON
and a PNG with the same stem. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, Act, AutoPasta, Pasta, SoftInjection
from attn.steer import act as act_lib
from attn.steer import autopasta as autopasta_lib
from attn.steer import pasta as pasta_lib
from attn.steer import soft_injection as soft_lib
from attn.steer.common import HeadConfig

from . import steer_vlm
from .analysis.evaluator import layer_head_heatmap, layer_of, pyplot
from .results import write_report
from .steer_harness import (
    DEVICE,
    accuracy_bars,
    answer_accuracy,
    check_rows,
    held_out_source,
    measured,
    system_records,
    trained_model,
)
from .trainer_api import source_class

EmphasisSource = source_class("emphasis_qa")

CONFIG = "configs/steer_emphasis.py"


# ---------------------------------------------------------------------------------------------------- model
def rows(config: dict[str, Any], fmt: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` emphasis_qa rows of format `fmt` (one batch) from seed `seed`, with their "source"."""
    seq_len = 3 * config["num_sentences"] + 3 * config["num_questions"] - 1
    source = held_out_source("emphasis_qa", config, count, seed, seq_len=seq_len, format=fmt)
    return {**source.next_batch(), "source": source}


def last_logits(model: Any, params: Any, inputs: Any, make_rules: Any = None, *arrays: Any) -> jax.Array:
    """The logits of the last position [B, V] with the rules make_rules(*arrays) active. One jitted call: the
    rules are entered inside the trace, with `arrays` (spans, embeddings) as its arguments (a rule set applied op by
    op would re-compile every op for every rule set)."""

    @jax.jit
    def run(params: Any, inputs: jax.Array, *arrays: Any) -> jax.Array:
        with attn.intervene(*(make_rules(*arrays) if make_rules else ())):
            return model.apply({"params": params}, inputs)[:, -1]

    return run(params, jnp.asarray(inputs), *arrays)


def answer_stats(logits: jax.Array, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """accuracy (the marked sentence's value) and distractor (the other conflicting value) of answers [B, V]."""
    predicted = np.asarray(jnp.argmax(logits, axis=-1))
    target = batch["targets"][:, -1]
    source = batch["source"]
    pairs = batch["inputs"][:, 2 : 3 * source.num_sentences : 3] - source.first_pair  # [B, n] k * s + v
    keys = source.first_key + pairs // source.num_symbols
    values = source.first_value + pairs % source.num_symbols
    query = batch["inputs"][:, -1:]
    holders = keys == query  # the key sentence and the distractor
    other = np.where(holders & (values != target[:, None]), values, -1).max(axis=1)
    return {"accuracy": float(np.mean(predicted == target)), "distractor": float(np.mean(predicted == other))}


def identification_prompts(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The same contexts with the which-sentence question instead of the value question: int [B, T]."""
    prompts = batch["inputs"].copy()
    prompts[:, -2] = EmphasisSource.QW
    return prompts


# ---------------------------------------------------------------------------------------------------- sinks
def sink_mass(model: Any, params: Any, inputs: Any, threshold: float, make_rules: Any = None) -> dict[str, Any]:
    """Per layer and head, the mean over rows and queries of the attention on hidden sinks (S from the weights the
    model used, the rules make_rules() active) and on the first token: {"hidden": [L][H], "first": [L][H]}."""

    @jax.jit
    def weights(params: Any, inputs: jax.Array) -> Any:
        with attn.intervene(*(make_rules() if make_rules else ())):
            return run_with_cache(model, {"params": params}, inputs, names=("attention_weights",))[1]

    cache = weights(params, jnp.asarray(inputs))
    maps = {layer_of(path): entry["attention_weights"] for path, entry in cache.items() if layer_of(path) is not None}
    hidden, first = [], []
    for layer in sorted(maps):
        weights = maps[layer]  # [B, H, T, T]
        sinks = act_lib.hidden_sinks(weights, threshold)[..., None, :]
        hidden.append(np.asarray(jnp.sum(jnp.where(sinks, weights, 0.0), axis=-1).mean(axis=(0, 2))).tolist())
        first.append(np.asarray(weights[..., 0].mean(axis=(0, 2))).tolist())
    return {"hidden": hidden, "first": first}


# ---------------------------------------------------------------------------------------------------- systems
def _config(config: HeadConfig) -> dict[str, list[int]]:
    return {str(layer): list(heads) for layer, heads in config.items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model, params, info = trained_model(args.workdir, args.config)
    data = info["config_data"]
    profile = rows(data, "answer_conflict", args.profile_rows, seed=args.seed)
    test = rows(data, "answer_conflict", args.rows, seed=args.seed + 1)
    train_mix = rows(data, "mixed", args.rows, seed=args.seed + 2)
    seq_len = test["inputs"].shape[1]
    n = data["num_sentences"]
    result: dict[str, Any] = {"tool": "steer", "device": DEVICE, "model": info, "options": vars(args)}
    result["systems"] = system_records(list(STEERERS))
    result["training_mixture_accuracy"] = answer_accuracy(last_logits(model, params, train_mix["inputs"]), train_mix)
    result["baseline"] = answer_stats(last_logits(model, params, test["inputs"]), test)

    # pasta: the marked sentence is the emphasised span
    def steered(config: HeadConfig, batch: dict[str, Any], spans: Any, alpha: float = args.alpha) -> dict[str, float]:
        logits = last_logits(model, params, batch["inputs"], lambda e: Pasta(config, alpha).rules(model, e), spans)
        return answer_stats(logits, batch)

    heads, scores = pasta_lib.select_heads(
        lambda c: steered(c, profile, profile["emphasis"])["accuracy"], model, args.k
    )
    result["pasta"] = {
        "heads": _config(heads),
        "head_scores": scores.tolist(),
        **steered(heads, test, test["emphasis"]),
    }
    result["pasta"]["alpha_sweep"] = {
        str(alpha): steered(heads, test, test["emphasis"], alpha)["accuracy"] for alpha in (1.0, 0.5, 0.1, 0.01, 0.001)
    }

    # autopasta: the model names the key sentence itself
    def auto(config: HeadConfig) -> AutoPasta:
        sentences = [test["source"].sentence_span(i) for i in range(n)]
        return AutoPasta(config, sentences, [EmphasisSource.FIRST_ID + i for i in range(n)], args.alpha)

    def own_spans(batch: dict[str, Any]) -> tuple[np.ndarray, jax.Array]:
        """The sentence the model names for each row, and its span (AutoPasta.identify and .spans; the naming does
        not depend on the steered heads, so it runs once per batch)."""
        steer = auto({})
        named = jax.jit(lambda p, x: steer.identify(model, p, x))(params, jnp.asarray(identification_prompts(batch)))
        return np.asarray(named), steer.spans(named, seq_len)

    _, profile_spans = own_spans(profile)
    named, test_spans = own_spans(test)
    heads, search = autopasta_lib.select_heads(
        lambda c: steered(c, profile, profile_spans)["accuracy"], model, top_layers=args.top_layers, k=args.k
    )
    result["autopasta"] = {
        "heads": _config(heads),
        "layer_scores": search["layer_scores"].tolist(),
        "head_scores": np.where(np.isnan(search["head_scores"]), None, search["head_scores"]).tolist(),
        "identification_accuracy": float(np.mean(named == test["key_sentence"])),
        **steered(heads, test, test_spans),
    }

    # act: calibration search, accuracy, hidden-sink mass before / after
    def calibrated(config: HeadConfig, batch: dict[str, Any]) -> dict[str, float]:
        rules = lambda: Act(config, args.beta, args.threshold).rules(model)  # noqa: E731
        return answer_stats(last_logits(model, params, batch["inputs"], rules), batch)

    heads, gains = act_lib.search_heads(lambda c: calibrated(c, profile)["accuracy"], model)
    every = {layer: tuple(range(model.num_heads)) for layer in range(model.num_layers)}
    result["act"] = {
        "heads": _config(heads),
        "search_gains": gains.tolist(),
        **calibrated(heads, test),
        "all_heads_accuracy": calibrated(every, test)["accuracy"],
        "sinks_before": sink_mass(model, params, test["inputs"], args.threshold),
        "sinks_after_all_heads": sink_mass(
            model, params, test["inputs"], args.threshold, lambda: Act(every, args.beta, args.threshold).rules(model)
        ),
    }
    result["soft_injection"] = soft_injection_effect(model, params, data, args)
    return result


# ---------------------------------------------------------------------------------------------------- task prompts
def task_prompts(data: dict[str, Any], count: int, seed: int) -> dict[str, np.ndarray]:
    """Rows without a conflict on the last question, as three prompts of the same context and key: "QA" (the
    value question), "QW" (the which-sentence question) and "none" (no question token: PLAIN in its place), with
    the answers "value" and "id" int [N]."""
    batch = rows(data, "mixed", 2 * count, seed)
    source = batch["source"]
    pairs = batch["inputs"][:, 2 : 3 * source.num_sentences : 3] - source.first_pair
    keys = source.first_key + pairs // source.num_symbols
    holders = keys == batch["inputs"][:, -1:]
    keep = np.flatnonzero(holders.sum(axis=1) == 1)[:count]
    sentence = np.argmax(holders[keep], axis=1)
    out: dict[str, np.ndarray] = {
        "value": source.first_value + pairs[keep, sentence] % source.num_symbols,
        "id": source.FIRST_ID + sentence,
    }
    for name, token in (("QA", source.QA), ("QW", source.QW), ("none", source.PLAIN)):
        prompts = batch["inputs"][keep].copy()
        prompts[:, -2] = token
        out[name] = prompts
    return out


def soft_injection_effect(model: Any, params: Any, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per task (QA: answer the value, QW: name the sentence), accuracy on prompts without the question token, with
    and without the task embedding injected, and with the question token present (the prompt-based reference)."""
    embed, fit, valid, test = (task_prompts(data, n, args.seed + 10 + i) for i, n in enumerate((64, 128, 128, 256)))
    result: dict[str, Any] = {}
    for task, answer in (("QA", "value"), ("QW", "id")):
        embeddings = soft_lib.task_embeddings(model, params, embed[task])
        mixing, history = soft_lib.fit_mixing(
            model, params, embeddings, (fit["none"], fit[answer]), (valid["none"], valid[answer]), steps=args.fit_steps
        )
        inject = (lambda e, m: SoftInjection(e, m).rules(model), embeddings, mixing)

        def accuracy(prompts: np.ndarray, rules: Sequence[Any] = (), answers: np.ndarray = test[answer]) -> float:
            logits = last_logits(model, params, prompts, *rules)
            return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == answers))

        result[task] = {
            "answer": answer,
            "no_question_token": accuracy(test["none"]),
            "no_question_token_injected": accuracy(test["none"], inject),
            "with_question_token": accuracy(test[task]),
            "mixing": np.asarray(mixing).round(3).tolist(),
            "validation_losses": history,
        }
    return result


# ---------------------------------------------------------------------------------------------------- output
def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy per system, and the hidden-sink mass per layer x head before and after ACT (every head)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    names = ["no steering", "pasta (given span)", "autopasta (own span)", "act (searched heads)", "act (all heads)"]
    values = [
        result["baseline"]["accuracy"],
        result["pasta"]["accuracy"],
        result["autopasta"]["accuracy"],
        result["act"]["accuracy"],
        result["act"]["all_heads_accuracy"],
    ]
    colors = ["grey", "C0", "C1", "C2", "C2"]
    ylabel = "accuracy (marked sentence's value)"
    accuracy_bars(axes[0], names, values, colors, rotation=25, ylabel=ylabel, title="conflict questions")
    before, after = result["act"]["sinks_before"]["hidden"], result["act"]["sinks_after_all_heads"]["hidden"]
    top = max(max(map(max, before)), 1e-6)
    layer_head_heatmap(axes[1], before, "hidden-sink mass, no calibration", "mass", vmin=0, vmax=top)
    layer_head_heatmap(axes[2], after, f"after ACT (beta {result['options']['beta']})", "mass", vmin=0, vmax=top)
    soft = result["soft_injection"]
    labels = ["no question token", "+ injected task embedding", "question token (prompt)"]
    for offset, task in enumerate(("QA", "QW")):
        heights = [soft[task]["no_question_token"], soft[task]["no_question_token_injected"]]
        heights.append(soft[task]["with_question_token"])
        axes[3].bar(
            [offset * 4 + i for i in range(3)],
            heights,
            color=["grey", "C3", "C0"],
            label=labels if not offset else None,
        )
    axes[3].set_xticks([1, 5], ["QA (value)", "QW (sentence id)"])
    axes[3].set(ylim=(0, 1), ylabel="accuracy", title="soft injection: task without its prompt token")
    axes[3].legend(fontsize=7)
    fig.suptitle(f"attn.steer on the emphasis_qa decoder ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.steer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="trained run (trained here when empty; default runs/steer_emphasis)")
    parser.add_argument("--config", help=f"config file[:preset] used to train an empty workdir (default {CONFIG})")
    parser.add_argument("--output", help="JSON path (+ PNG; default benchmarks/results/steer_cpu.json)")
    parser.add_argument("--rows", type=int, default=512, help="conflict rows measured")
    parser.add_argument("--profile-rows", type=int, default=256, help="rows for head profiling / calibration")
    parser.add_argument("--seed", type=int, default=1, help="seed of the profiling rows (measured rows: seed + 1)")
    parser.add_argument("--alpha", type=float, default=0.01, help="PASTA / AutoPASTA coefficient")
    parser.add_argument("--k", type=int, default=2, help="heads PASTA / AutoPASTA steer")
    parser.add_argument("--top-layers", type=int, default=1, help="AutoPASTA's coarse step: layers kept")
    parser.add_argument("--beta", type=float, default=0.4, help="ACT's factor on hidden-sink attention")
    parser.add_argument("--threshold", type=float, default=0.1, help="ACT's hidden-sink threshold")
    parser.add_argument("--fit-steps", type=int, default=100, help="soft injection: head-selection Adam steps")
    parser.add_argument("--no-plot", action="store_true", help="write only the JSON")
    steer_vlm.add_arguments(parser)
    args = parser.parse_args(argv)
    defaults = steer_vlm.DEFAULTS if args.vlm else ("runs/steer_emphasis", CONFIG, "benchmarks/results/steer_cpu.json")
    for name, default in zip(("workdir", "config", "output"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    check_rows(args, ("rows", "profile_rows"))
    return args


def measure_any(args: argparse.Namespace) -> dict[str, Any]:
    """The decoder's systems (measure), or with --vlm the VLM's (eval.steer_vlm.measure_vlm); "device" added."""
    result = steer_vlm.measure_vlm(args, trained_model) if args.vlm else measure(args)
    result["device"] = DEVICE
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, result = measured(argv, parse, measure_any)
    systems = ("baseline", *steer_vlm.VLM_SYSTEMS) if args.vlm else ("baseline", "pasta", "autopasta", "act")
    summary = {k: result[k]["accuracy"] for k in systems}
    plot_fn = None if args.no_plot else (steer_vlm.plot_vlm if args.vlm else plot)
    return write_report(result, args.output, plot=plot_fn, table=lambda _: f"eval.steer: accuracy {summary}")


if __name__ == "__main__":
    main()
