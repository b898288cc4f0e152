"""KV-cache compression: quality against cache budget for every cache policy, on a decoder trained here.

    python -m eval.kv --workdir runs/kv_retrieval --policies h2o,streaming,tova,snapkv,kivi \\
        --budgets 1.0,0.5,0.25,0.1 [--context 512] [--prompt 32] [--rows 8] [--output F]

How a policy is applied to a trained softmax checkpoint, without retraining: every policy layer (attn/kv/*.py) is a
`PolicyAttention`, a subclass of the softmax layer with the same projections, so the run's DecoderLM is cloned with
`attention=<policy>` and the policy's options (`model.clone(attention=..., attention_options=...)`) and applied to
the run's parameters unchanged. Only the decode path differs: the cache the policy keeps.

For every policy x budget, on `--rows` sequences of `--context` tokens per task:
  prefill   the first `--prompt` tokens in one decode call (prompt-compressing policies compress them);
  decode    the remaining tokens one per call, teacher-forced (the true token is fed, whatever the model predicted),
            through the compressed cache, so eviction happens at every step once the cache is full;
  score     next-token loss (perplexity) and accuracy over the decoded positions with the task's weights (text: every
            position; mqar: the recalled values; passkey: the passkey digits);
  memory    bytes of the cache arrays allocated after decoding (`attn.core.cache.nbytes` of the "cache" collection:
            keys, values or their codes and scales, positions, statistics) and their ratio to the full cache's;
  speed     decode milliseconds per step (one token for each of the rows), the compiled decode loop timed alone.

Tasks: the run's own validation data (its `data.name`: "text" perplexity on held-out bytes, "mqar" recall, ...), plus
any of "mqar" and "passkey" (train.data's synthetic retrieval tasks, built at the model's vocabulary) named in
`--tasks`. A model only retrieves what it was trained to: a task it never saw scores near chance at every budget.

Budgets are fractions of the context: a token policy keeps round(budget * context) entries per (batch, kv head) (the
prompt-compressing ones split them between the prompt and the generated tokens, see `policy_options`). The memory of
KIVI and ZipCache is set by their bits, not by a token budget: each runs once per spec (`kivi`, `kivi:bits=4`), at
every budget the same.
Options of a policy: `name:option=value:option=value` (e.g. `streaming:sinks=0`, the window without sinks). The full
cache (the run's softmax attention) is always measured first; the plot's x axis is the measured cache-byte ratio.

`--workdir` takes several runs separated by commas (e.g. a text model for perplexity and a retrieval model): one
report, every entry naming its run. Writes JSON to <workdir>/eval_kv.json (and --output), and the leaderboard PNG next
to each (score against cache bytes, one line per policy, one panel per run and task). Contexts of 2K-4K decode too
slowly on a 2-core CPU (every token of every policy x budget is a separate step): use a GPU there.

`--checkpoint HF_DIR` (a Hugging Face directory) is not wired yet: `attn.pretrained.load` imports GPT-2 and Llama
checkpoints, but this evaluator does not yet tokenise held-out text with the checkpoint's tokenizer; the flag exits
with that message.
"""

from __future__ import annotations

import ast
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.core import cache as cache_lib
from attn.models.generate import init_cache
from eval.analysis.evaluator import pyplot, unboxed
from eval.lm import open_run, quiet_logs
from train.run import make_source

FULL = "full"
RETRIEVAL_TASKS = ("mqar", "passkey")
PROMPT_COMPRESSING = ("snapkv", "pyramidkv", "adakv")
# Policies whose memory is not a token budget: one run per spec.
BUDGET_FREE = ("kivi", "zipcache")


# ---------------------------------------------------------------------------------------------------- policies
def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """A spec "name:option=value:..." -> (name, {option: value}); values are Python literals or bare strings.
    ValueError for an unregistered name, a policy outside the "kv" family, or a malformed option."""
    name, *parts = spec.strip().split(":")
    known = attn.list_mechanisms(family="kv")
    if name not in known:
        raise ValueError(f"policies holds {spec!r}: {name!r} is not a KV-cache policy; expected one of {known}")
    options = {}
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep or not key:
            raise ValueError(f"policies holds {spec!r}: option {part!r} must be option=value")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return name, options


def policy_options(name: str, budget: int, prompt: int, head_dim: int) -> dict[str, Any]:
    """The options that give policy `name` a cache of `budget` entries per (batch, kv head) after a prompt of
    `prompt` tokens (the user's spec options override them).

    streaming: 4 sinks + window; h2o, a2sf: half heavy hitters, half recent (H2O's default split); tova: budget;
    d2o: as h2o, 4 of the heavy-hitter slots for sinks (one uniform budget for every layer);
    scissorhands: a quarter recent, drops of an eighth, a 32-step history; snapkv / pyramidkv / adakv: half the budget
    for the prompt (an observation window of up to 16 tokens), half for generated tokens; kivi: groups of
    min(32, head_dim) channels and a residual of one group (its memory is set by `bits`); zipcache: the paper's 4-bit
    salient / 2-bit other tokens, 40% at 2 bits, a full-precision window of min(64, budget / 8) tokens (its memory is
    set by its bits; it runs at the first budget only)."""
    if name == "streaming":
        return {"budget": budget, "sinks": min(4, budget - 1)}
    if name in ("h2o", "a2sf"):
        return {"budget": budget, "recent": budget // 2}
    if name == "tova":
        return {"budget": budget}
    if name == "d2o":
        return {"budget": budget, "recent": budget // 2, "sinks": min(4, budget - budget // 2)}
    if name == "scissorhands":
        drop = max(1, budget // 8)
        return {"budget": budget, "recent": min(budget // 4, budget - drop), "drop": drop, "history": 32}
    if name in PROMPT_COMPRESSING:
        prompt_budget = max(2, budget // 2)
        window = max(1, min(16, prompt_budget // 2))
        return {"budget": prompt_budget, "observation_window": window, "decode_budget": budget - prompt_budget}
    if name == "kivi":
        group = min(32, head_dim)
        return {"bits": 2, "group_size": group, "residual": group}
    if name == "zipcache":
        return {"bits_high": 4, "bits_low": 2, "low_ratio": 0.4, "gap": max(1, min(64, budget // 8))}
    raise ValueError(f"policies names {name!r}, which eval.kv has no budget rule for; add one to policy_options")


def policy_model(model: Any, name: str, options: Mapping[str, Any]) -> Any:
    """The run's DecoderLM with every layer's attention replaced by policy `name` (same parameters)."""
    base = dict(model.attention_options or {})
    return model.clone(attention=name, attention_options={**base, **options})


# ---------------------------------------------------------------------------------------------------- tasks
def task_batches(run: Any, task: str, rows: int, context: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    """`num_batches` batches {"inputs", "targets", "weights"} [rows, context] of `task`: the run's validation data
    when task is its data source, else train.data's synthetic task at the model's vocabulary."""
    if task == run.config.data.name:
        source = run.data("valid", batch_size=rows, seq_len=context, per_process=False)
    elif task in RETRIEVAL_TASKS:
        source = make_source(
            task,
            split="valid",
            batch_size=rows,
            seq_len=context,
            seed=run.config.seed,
            vocab_size=run.task.model.vocab_size,
        )
    else:
        raise ValueError(f"tasks holds {task!r}; expected the run's data {run.config.data.name!r} or {RETRIEVAL_TASKS}")
    batches = []
    for _ in range(num_batches):
        batch = source.next_batch()
        inputs = np.asarray(batch["inputs"])
        targets = np.asarray(batch["targets"]) if "targets" in batch else np.roll(inputs, -1, axis=1)
        if "weights" in batch:
            weights = np.asarray(batch["weights"], np.float32)
        else:
            weights = np.ones(inputs.shape, np.float32)
            if "targets" not in batch:
                weights[:, -1] = 0.0  # the last token has no next token
        batches.append({"inputs": inputs, "targets": targets, "weights": weights})
    return batches


# ---------------------------------------------------------------------------------------------------- decoding
def decode_through_cache(model: Any, params: Any, tokens: jax.Array, prompt: int) -> tuple[jax.Array, Any, float]:
    """Teacher-forced decoding of tokens int [B, T]: one prefill call on tokens[:, :prompt], then one call per token.
    Returns (logits float32 [B, T, V], the final "cache" collection, seconds of the decode loop alone, compiled
    beforehand)."""
    rows, length = tokens.shape
    cache = init_cache(model, params, rows, length)

    def prefill(cache: Any, chunk: jax.Array) -> tuple[jax.Array, Any]:
        logits, state = model.apply({"params": params, "cache": cache}, chunk, decode=True, mutable=["cache"])
        return logits, state["cache"]

    def loop(cache: Any, rest: jax.Array) -> tuple[jax.Array, Any]:
        def step(cache: Any, token: jax.Array) -> tuple[Any, jax.Array]:
            logits, cache = prefill(cache, token[:, None])
            return cache, logits[:, 0]

        cache, logits = jax.lax.scan(step, cache, jnp.swapaxes(rest, 0, 1))
        return jnp.swapaxes(logits, 0, 1), cache

    head, cache = jax.jit(prefill)(cache, tokens[:, :prompt])
    rest = tokens[:, prompt:]
    compiled = jax.jit(loop).lower(cache, rest).compile()
    start = time.perf_counter()
    tail, cache = compiled(cache, rest)
    tail = jax.block_until_ready(tail)
    seconds = time.perf_counter() - start
    return jnp.concatenate([head, tail], axis=1), cache, seconds


def score(logits: jax.Array, batch: Mapping[str, np.ndarray], prompt: int) -> dict[str, float]:
    """Loss sum, correct count and weight over the decoded positions (>= prompt) of one batch."""
    logits = np.asarray(logits[:, prompt:], np.float64)
    targets, weights = batch["targets"][:, prompt:], batch["weights"][:, prompt:]
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    nll = logz - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = logits.argmax(axis=-1) == targets
    return {
        "loss_sum": float((nll * weights).sum()),
        "correct": float((correct * weights).sum()),
        "weight": float(weights.sum()),
    }


def evaluate_policy(
    model: Any, params: Any, batches: Sequence[Mapping[str, np.ndarray]], prompt: int
) -> dict[str, float | int]:
    """{"loss", "perplexity", "accuracy", "cache_bytes", "decode_ms_per_step"} of `model` over `batches`."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight": 0.0}
    seconds, steps, nbytes = 0.0, 0, 0
    for batch in batches:
        logits, cache, elapsed = decode_through_cache(model, params, jnp.asarray(batch["inputs"]), prompt)
        for key, value in score(logits, batch, prompt).items():
            totals[key] += value
        seconds += elapsed
        steps += batch["inputs"].shape[1] - prompt
        nbytes = cache_lib.nbytes(cache)
    if totals["weight"] == 0:
        raise ValueError(f"prompt={prompt} covers every scored position of the task; use a shorter --prompt")
    loss = totals["loss_sum"] / totals["weight"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": totals["correct"] / totals["weight"],
        "cache_bytes": nbytes,
        "decode_ms_per_step": 1000.0 * seconds / steps,
    }


def run_grid(
    run: Any,
    policies: Sequence[str],
    budgets: Sequence[float],
    tasks: Sequence[str],
    *,
    context: int,
    prompt: int,
    rows: int,
    num_batches: int,
    log: Any = print,
) -> list[dict[str, Any]]:
    """One entry per task x (the full cache, then every policy x budget): the policy, its options, the budget
    (fraction and entries), the task's metrics, cache bytes and their ratio to the full cache's."""
    model = run.task.model
    if model.attention != "softmax":
        raise ValueError(
            f"the run's model.attention is {model.attention!r}; eval.kv swaps cache policies into a softmax decoder "
            "(every policy layer is a softmax layer with a managed cache)"
        )
    head_dim = model.head_dim or model.d_model // model.num_heads
    params = unboxed(run.model_params)
    parsed = [(spec, *parse_policy(spec)) for spec in policies]
    entries = []
    for task in tasks:
        batches = task_batches(run, task, rows, context, num_batches)
        with run.tracing():
            full = evaluate_policy(model, params, batches, prompt)
        entries.append({"task": task, "policy": FULL, "options": {}, "budget": 1.0, "budget_entries": context, **full})
        log(f"{task:8s} {FULL:22s} budget 1.00: {summary(task, full)}")
        for spec, name, overrides in parsed:
            for budget in budgets if name not in BUDGET_FREE else budgets[:1]:
                entries_kept = max(2, round(budget * context))
                options = {**policy_options(name, entries_kept, prompt, head_dim), **overrides}
                with run.tracing():
                    metrics = evaluate_policy(policy_model(model, name, options), params, batches, prompt)
                entry = {
                    "task": task,
                    "policy": spec,
                    "options": options,
                    "budget": budget if name not in BUDGET_FREE else None,
                    "budget_entries": entries_kept if name not in BUDGET_FREE else None,
                    **metrics,
                    "cache_ratio": metrics["cache_bytes"] / full["cache_bytes"],
                }
                entries.append(entry)
                shown = f"{budget:.2f}" if name not in BUDGET_FREE else "  - "
                log(f"{task:8s} {spec:22s} budget {shown}: {summary(task, metrics)} ({entry['cache_ratio']:.3f} bytes)")
    return entries


def summary(task: str, metrics: Mapping[str, Any]) -> str:
    return (
        f"ppl {metrics['perplexity']:.3f} acc {metrics['accuracy']:.3f} cache {metrics['cache_bytes']} B "
        f"{metrics['decode_ms_per_step']:.2f} ms/step"
    )


METRICS = ("perplexity", "accuracy")  # the plotted scores


# ---------------------------------------------------------------------------------------------------- output
def plot(report: Mapping[str, Any], path: str) -> None:
    """The leaderboard: per run and task (columns), perplexity and accuracy (rows) against the measured cache-byte
    ratio, one line per policy."""
    plt = pyplot()
    entries = report["results"]
    panels = list(dict.fromkeys((entry.get("run", ""), entry["task"]) for entry in entries))
    figure, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 9), squeeze=False)
    cells = [(axes[row, col], panel, metric) for col, panel in enumerate(panels) for row, metric in enumerate(METRICS)]
    for axis, (name, task), metric in cells:
        mine = [entry for entry in entries if entry.get("run", "") == name and entry["task"] == task]
        full = next(entry for entry in mine if entry["policy"] == FULL)
        axis.axhline(full[metric], color="black", linestyle="--", label=f"full cache ({full[metric]:.3g})")
        for policy in dict.fromkeys(entry["policy"] for entry in mine if entry["policy"] != FULL):
            points = sorted((e["cache_ratio"], e[metric]) for e in mine if e["policy"] == policy)
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, marker="o", label=policy)
        axis.set_xscale("log")
        title = f"{name}: {task} {metric}" if name else f"{task}: {metric}"
        axis.set(xlabel="cache bytes / full cache bytes (measured)", ylabel=metric, title=title)
        if metric == "perplexity":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    contexts = sorted({run["context"] for run in report.get("runs", [])})
    figure.suptitle(f"KV-cache policies against cache bytes (context {', '.join(map(str, contexts))})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(report: Mapping[str, Any], paths: Sequence[str]) -> list[str]:
    """Writes the JSON to every path and the PNG next to each; returns the written paths."""
    written = []
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        image = os.path.splitext(path)[0] + ".png"
        plot(report, image)
        written += [path, image]
    return written


def split_list(flag: str, text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SystemExit(f"error: --{flag}={text!r} must be a comma-separated list")
    return items


def main(argv: Sequence[str]) -> None:
    """Entry point of `python -m eval.kv` (flags are defined below, only when run as a program)."""
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
    args = flags.FLAGS
    if args.checkpoint is not None:
        raise SystemExit(
            f"error: --checkpoint={args.checkpoint!r}: eval.kv does not read Hugging Face directories yet (it does not "
            "tokenise held-out text with the checkpoint's tokenizer); use --workdir with a run trained here, "
            "e.g. python -m train --config configs/kv_retrieval.py --workdir runs/kv_retrieval"
        )
    if args.workdir is None:
        raise SystemExit("error: --workdir is required (a run trained here)")
    workdirs = split_list("workdir", args.workdir)
    if args.step is not None and len(workdirs) > 1:
        raise SystemExit(f"error: --step={args.step} needs a single --workdir; got {workdirs}")
    policies = split_list("policies", args.policies)
    try:
        budgets = [float(b) for b in split_list("budgets", args.budgets)]
    except ValueError:
        raise SystemExit(f"error: --budgets={args.budgets!r} must be numbers in (0, 1], e.g. 1.0,0.5,0.25") from None
    if any(not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"error: --budgets={args.budgets!r} must be fractions of the context in (0, 1]")
    try:
        for spec in policies:
            parse_policy(spec)
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from None
    quiet_logs()
    runs, results = [], []
    for workdir in workdirs:
        run = open_run(workdir, args.step)
        if not run.task.is_language_model:
            raise SystemExit(f"error: eval.kv evaluates decoder language models; {workdir!r} has {run.task.kind!r}")
        context = args.context or run.config.seq_len
        prompt = args.prompt if args.prompt is not None else max(1, context // 16)
        if not 0 < prompt < context:
            raise SystemExit(
                f"error: --prompt={prompt} must be in [1, context={context}) (decoding needs tokens after)"
            )
        tasks = list(dict.fromkeys([run.config.data.name, *(split_list("tasks", args.tasks) if args.tasks else [])]))
        name = os.path.basename(os.path.normpath(workdir))
        try:
            grid = run_grid(
                run, policies, budgets, tasks, context=context, prompt=prompt, rows=args.rows, num_batches=args.batches
            )
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        results += [{"run": name, **entry} for entry in grid]
        runs.append(
            {
                "run": name,
                "workdir": os.path.abspath(workdir),
                "step": run.step,
                "model": {k: v for k, v in run.config.model.to_dict().items() if not isinstance(v, dict)},
                "data": run.config.data.to_dict(),
                "context": context,
                "prompt": prompt,
            }
        )
    report = {
        "runs": runs,
        "rows": args.rows,
        "batches": args.batches,
        "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores visible)",
        "results": results,
    }
    if jax.process_index() != 0:
        return
    paths = [os.path.join(workdir, "eval_kv.json") for workdir in workdirs] + ([args.output] if args.output else [])
    print(f"wrote {', '.join(write(report, paths))}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Run directories with checkpoints/ (softmax decoders trained here), commas.")
    flags.DEFINE_string(
        "checkpoint", None, "A Hugging Face checkpoint directory: not wired into eval.kv yet (exits with a message)."
    )
    flags.DEFINE_string("policies", "h2o,streaming,tova,snapkv,kivi", "Comma-separated policy specs, name[:opt=val].")
    flags.DEFINE_string("budgets", "1.0,0.5,0.25,0.1", "Cache budgets as fractions of the context.")
    flags.DEFINE_string("tasks", None, "Extra tasks besides the run's own data: mqar, passkey.")
    flags.DEFINE_integer("context", None, "Tokens per sequence (default: the run's seq_len).")
    flags.DEFINE_integer("prompt", None, "Tokens prefilled in one call before token-by-token decoding (default: 1/16).")
    flags.DEFINE_integer("rows", 8, "Sequences per batch.")
    flags.DEFINE_integer("batches", 1, "Batches per task.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("output", None, "Also write the JSON (and its PNG) here.")
    app.run(main)
