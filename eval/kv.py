"""KV-cache compression: quality against cache budget for every cache policy, on a decoder trained here or imported.

    python -m eval.kv --workdir runs/kv_retrieval --policies h2o,streaming,tova,snapkv,kivi \\
        --budgets 1.0,0.5,0.25,0.1 [--context 512] [--prompt 32] [--rows 8] [--output F]
    python -m eval.kv --checkpoint HF_DIR --output F [--tasks passkey] [--text_path P] [same flags]

How a policy is applied to a trained softmax checkpoint, without retraining: every policy layer (attn/kv/*.py) is a
`PolicyAttention`, a subclass of the softmax layer with the same projections, so the run's DecoderLM is cloned with
`attention=<policy>` and the policy's options (`model.clone(attention=..., attention_options=...)`) and applied to
the run's parameters unchanged. Only the decode path differs: the cache the policy keeps.

For every policy x budget, on `--rows` sequences of `--context` tokens per task:
  prefill   the first `--prompt` tokens in one decode call (prompt-compressing policies compress them);
  decode    the remaining tokens one per call, teacher-forced (the true token is fed, whatever the model predicted),
            through the compressed cache, so eviction happens at every step once the cache is full;
  score     next-token loss (perplexity) and accuracy over the decoded positions with the task's weights (text: every
            position; mqar: the recalled values; passkey: the passkey digits); when every row scores the same few
            positions, also "accuracy_by_position" (the passkey's 1st..5th digit, MQAR's 1st..nth query);
  memory    bytes of the cache arrays allocated after decoding (`attn.core.cache.nbytes` of the "cache" collection:
            keys, values or their codes and scales, positions, statistics) and their ratio to the full cache's;
  speed     decode milliseconds per step (one token for each of the rows), the compiled decode loop timed alone.

Tasks: the run's own validation data (its `data.name`: "text" perplexity on held-out bytes, "mqar" recall, ...), plus
any of "mqar" and "passkey" (train.data's synthetic retrieval tasks, built at the model's vocabulary) named in
`--tasks`. A model only retrieves what it was trained to: a task it never saw scores near chance at every budget.
On a run trained on "text_passkey" (configs/sparse_long.py), "passkey" is that run's own needle in held-out text
(eval.passkey_rows: depths evenly over the row, the 5 answer digits scored); pass `--prompt` = the context - 5 to
prefill (and compress) everything up to the answer and decode only the digits, as kvpress compresses a question
(`--norun_task` leaves out the run's own text, which such a prompt would score on 5 bytes only).

Budgets are fractions of the context: a token policy keeps round(budget * context) entries per (batch, kv head) (the
prompt-compressing ones split them between the prompt and the generated tokens, see `policy_options`). The memory of
KIVI and ZipCache is set by their bits, not by a token budget: each runs once per spec (`kivi`, `kivi:bits=4`), at
every budget the same.
Options of a policy: `name:option=value:option=value` (e.g. `streaming:sinks=0`, the window without sinks). The full
cache (the run's softmax attention) is always measured first; the plot's x axis is the measured cache-byte ratio.

`--workdir` takes several runs separated by commas (e.g. a text model for perplexity and a retrieval model): one
report, every entry naming its run. Writes JSON to <workdir>/eval_kv.json (and --output), and the leaderboard PNG next
to each (score against cache bytes, one line per policy, one panel per run and task). Every decoded token of every
policy x budget is a separate step, so at 2K-4K on a CPU prefill most of the context (`--prompt`): the README's 2K
grids (2048 bytes, prefill 2043 or 1792) take 11-12 minutes on 2 cores.

`--checkpoint HF_DIR` (a Hugging Face directory: GPT-2, Llama, Qwen2 or Mistral, loaded by `attn.pretrained.load`
with its tokenizer.json) runs the same grid on an imported model, the policies swapped into its softmax layers the
same way (a sliding window of Mistral / Qwen2 layers stays: the policy's visibility is intersected with it). Tasks:
"text", perplexity on the held-out split of train.data.text's corpus (the Python standard library sources by default,
`--text_path` for another) tokenised by the checkpoint's tokenizer, one window of `--context` + 1 tokens per row from
evenly spaced offsets; and "passkey" (`--tasks passkey`), filler from the same held-out text with the sentence
" The pass key is NNNNN. Remember it. " at a random depth and " The pass key is NNNNN." at the end (a random
five-digit key per row), every part tokenised by the checkpoint's tokenizer, scored on the final tokens that spell
the digits. `--context` defaults to min(512, the checkpoint's maximum length).
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.core import cache as cache_lib
from attn.models.fields import per_layer_mechanisms, per_layer_options
from attn.models.generate import init_cache

from .analysis.evaluator import pyplot, series_style, unboxed
from .lm import open_run, quiet_logs
from .passkey_rows import in_batches, passkey_rows
from .trainer_api import make_source

FULL = "full"
RETRIEVAL_TASKS = ("mqar", "passkey")
CHECKPOINT_TASKS = ("text", "passkey")  # the tasks of an imported checkpoint (tokenised by its tokenizer)
PROMPT_COMPRESSING = ("snapkv", "pyramidkv", "adakv")
# Policies whose memory is not a token budget: one run per spec.
BUDGET_FREE = ("kivi", "zipcache", "zipvl_cache")


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


def policy_options(name: str, budget: int, prompt: int, head_dim: int, decoded: int | None = None) -> dict[str, Any]:
    """The options that give policy `name` a cache of `budget` entries per (batch, kv head) after a prompt of
    `prompt` tokens (the user's spec options override them).

    streaming: 4 sinks + window; h2o, a2sf: half heavy hitters, half recent (H2O's default split); tova: budget;
    d2o: as h2o, 4 of the heavy-hitter slots for sinks (one uniform budget for every layer); ems: an eighth recent,
    the rest by Global-Local score;
    scissorhands: a quarter recent, drops of an eighth, a 32-step history; a2ats: `budget` entries read per decoded
    token (a quarter local window, min(4, budget / 8) sinks, the rest retrieved by codeword score; w = 256, half the
    512-token context of the runs here; prompt / 2 codewords fitted on the prompt), every token stored;
    snapkv / pyramidkv / adakv: half the budget for the prompt (an observation window of up to 16 tokens), half for
    generated tokens (when only `decoded` < half the budget are generated, e.g. a passkey's 5 digits, those many
    slots and the rest for the prompt); kivi: groups of min(32, head_dim) channels and a residual of one group (its
    memory is set by `bits`); zipcache: the paper's 4-bit salient / 2-bit other tokens, 40% at 2 bits, a
    full-precision window of min(64, budget / 8) tokens (its memory is set by its bits; it runs at the first budget
    only); zipvl_cache: the same bits and window, the 4-bit share per layer from tau = 0.975 of the attention (the
    paper's; no cap)."""
    if name == "streaming":
        return {"budget": budget, "sinks": min(4, budget - 1)}
    if name in ("h2o", "a2sf"):
        return {"budget": budget, "recent": budget // 2}
    if name == "tova":
        return {"budget": budget}
    if name == "ems":
        return {"budget": budget, "recent": budget // 8}
    if name == "attention_gate":  # needs a run trained with its gates (configs/kv_attention_gate.py)
        return {"budget": budget}
    if name == "a2ats":  # reads a quarter window, sinks and retrieved tokens; stores every token (see its docstring)
        window, sinks = max(1, budget // 4), min(4, budget // 8)
        return {
            "budget": max(1, budget - window - sinks),
            "local_window": window,
            "sinks": sinks,
            "relative_position": 256,
            "codebook_size": max(2, prompt // 2),
        }
    if name == "d2o":
        return {"budget": budget, "recent": budget // 2, "sinks": min(4, budget - budget // 2)}
    if name == "scissorhands":
        drop = max(1, budget // 8)
        return {"budget": budget, "recent": min(budget // 4, budget - drop), "drop": drop, "history": 32}
    if name in PROMPT_COMPRESSING:
        prompt_budget = max(2, budget // 2)
        if decoded is not None and decoded < budget - prompt_budget:  # a short answer: the rest goes to the prompt
            prompt_budget = max(2, budget - max(1, decoded))
        window = max(1, min(16, prompt_budget // 2))
        return {"budget": prompt_budget, "observation_window": window, "decode_budget": budget - prompt_budget}
    if name == "kivi":
        group = min(32, head_dim)
        return {"bits": 2, "group_size": group, "residual": group}
    if name == "zipcache":
        return {"bits_high": 4, "bits_low": 2, "low_ratio": 0.4, "gap": max(1, min(64, budget // 8))}
    if name == "zipvl_cache":
        return {"bits_high": 4, "bits_low": 2, "tau": 0.975, "gap": max(1, min(64, budget // 8))}
    raise ValueError(f"policies names {name!r}, which eval.kv has no budget rule for; add one to policy_options")


def policy_model(model: Any, name: str, options: Mapping[str, Any]) -> Any:
    """The run's DecoderLM with every layer's attention replaced by policy `name` (same parameters); per-layer
    options (an imported checkpoint's sliding windows) stay per layer."""
    layers = per_layer_options(model.attention_options, model.num_layers)
    if all(layer == layers[0] for layer in layers):
        return model.clone(attention=name, attention_options={**layers[0], **options})
    return model.clone(attention=name, attention_options=tuple({**layer, **options} for layer in layers))


# ---------------------------------------------------------------------------------------------------- tasks
def task_batches(run: Any, task: str, rows: int, context: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    """`num_batches` batches {"inputs", "targets", "weights"} [rows, context] of `task`: the run's validation data
    when task is its data source, else train.data's synthetic task at the model's vocabulary."""
    if task == "passkey" and run.config.data.name == "text_passkey":  # a byte model trained on hidden passkeys
        if context != run.config.seq_len:
            raise ValueError(
                f"context={context}: the passkey rows of a text_passkey run are built at its seq_len "
                f"{run.config.seq_len}; leave --context out"
            )
        rows_ = passkey_rows(run, rows * num_batches, seed=run.config.seed)
        return [{key: part[key] for key in ("inputs", "targets", "weights")} for part in in_batches(rows_, rows)]
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


# ---------------------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, params, tokenizer, config.json) of a Hugging Face decoder directory (`attn.pretrained.load`);
    ValueError naming the directory when it holds an encoder or no tokenizer.json."""
    from attn import pretrained
    from attn.models import DecoderLM

    model, params, tokenizer, hf_config = pretrained.load(path)
    if not isinstance(model, DecoderLM):
        raise ValueError(f"checkpoint={path!r} holds a {type(model).__name__}; eval.kv evaluates decoder LMs")
    if tokenizer is None:
        raise ValueError(f"checkpoint={path!r} has no tokenizer.json; eval.kv tokenises its held-out text with it")
    return model, params, tokenizer, hf_config


def held_out_text(path: str | None = None) -> str:
    """The held-out split of train.data.text's corpus (None: the Python standard library sources) as text."""
    from .trainer_api import corpus_text

    return corpus_text(path, "valid")


def text_ids(tokenizer: Any, text: str, start: int, count: int) -> list[int]:
    """At least `count` token ids of `text` from character `start` on (wrapping around the text)."""
    span = 8 * count
    while True:
        piece = (text[start:] + text)[:span]
        ids = tokenizer.encode(piece, add_special_tokens=False).ids
        if len(ids) >= count or span >= 2 * len(text):
            break
        span *= 2
    if len(ids) < count:
        raise ValueError(f"the held-out text tokenises to {len(ids)} tokens; the context needs {count}")
    return ids[:count]


def encoded_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """(ids of `text`, per id whether its characters overlap one of `spans` (start, stop))."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    marked = [any(a < stop and b > start for start, stop in spans) for a, b in encoding.offsets]
    return encoding.ids, marked


def checkpoint_batches(
    tokenizer: Any, task: str, rows: int, context: int, num_batches: int, *, seed: int = 0, text: str | None = None
) -> list[dict[str, np.ndarray]]:
    """`num_batches` batches {"inputs", "targets", "weights"} [rows, context] of `task` ("text" or "passkey", see the
    module docstring) in the tokenizer's vocabulary; `text` is the held-out text (default `held_out_text()`)."""
    if task not in CHECKPOINT_TASKS:
        raise ValueError(f"tasks holds {task!r}; a checkpoint is evaluated on {CHECKPOINT_TASKS}")
    for name, value, low in (("rows", rows, 1), ("num_batches", num_batches, 1), ("context", context, 2)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    text = held_out_text() if text is None else text
    rng = np.random.default_rng(seed)
    first = tokenizer.encode("", add_special_tokens=True).ids  # what the tokenizer puts first (Llama's BOS)
    total = rows * num_batches
    starts = [round(i * len(text) / total) for i in range(total)]
    sequences, marks = [], []
    for start in starts:
        if task == "text":
            sequences.append(first + text_ids(tokenizer, text, start, context + 1 - len(first)))
            marks.append([True] * context)
            continue
        key = f"{rng.integers(10000, 100000)}"
        needle = f" The pass key is {key}. Remember it. "
        needle_ids = tokenizer.encode(needle, add_special_tokens=False).ids
        tail = f" The pass key is {key}."
        digits = tail.rindex(key)
        tail_ids, tail_marked = encoded_spans(tokenizer, tail, [(digits, digits + len(key))])
        filler = context + 1 - len(first) - len(needle_ids) - len(tail_ids)
        if filler < 1:
            raise ValueError(
                f"context={context} is too short for a passkey row ({len(needle_ids) + len(tail_ids)} tokens of "
                "needle and question); use a longer --context"
            )
        filler_ids = text_ids(tokenizer, text, start, filler)
        depth = int(rng.integers(0, filler + 1))
        ids = first + filler_ids[:depth] + needle_ids + filler_ids[depth:] + tail_ids
        marked = [False] * (len(ids) - len(tail_ids)) + tail_marked
        sequences.append(ids)
        marks.append(marked[1:])  # target t is token t + 1
    inputs = np.asarray([ids[:context] for ids in sequences], np.int32)
    targets = np.asarray([ids[1 : context + 1] for ids in sequences], np.int32)
    weights = np.asarray(marks, np.float32)
    return [
        {
            "inputs": inputs[b * rows : (b + 1) * rows],
            "targets": targets[b * rows : (b + 1) * rows],
            "weights": weights[b * rows : (b + 1) * rows],
        }
        for b in range(num_batches)
    ]


def checkpoint_grid(
    path: str,
    policies: Sequence[str],
    budgets: Sequence[float],
    tasks: Sequence[str],
    *,
    context: int | None = None,
    prompt: int | None = None,
    rows: int = 8,
    num_batches: int = 1,
    text_path: str | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid of `run_grid` on the Hugging Face decoder at `path`: (its "runs" record, its entries, each naming the
    checkpoint). context None: min(512, the checkpoint's maximum length); prompt None: context // 16."""
    model, params, tokenizer, hf_config = load_checkpoint(path)
    context = min(512, model.max_len) if context is None else context
    if not 0 < context <= model.max_len:
        raise ValueError(
            f"context={context} must be in [1, {model.max_len}] (the checkpoint's max_position_embeddings or "
            "n_positions)"
        )
    prompt = max(1, context // 16) if prompt is None else prompt
    if not 0 < prompt < context:
        raise ValueError(f"prompt={prompt} must be in [1, context={context}) (decoding needs tokens after)")
    text = held_out_text(text_path)
    batches = {task: checkpoint_batches(tokenizer, task, rows, context, num_batches, text=text) for task in tasks}
    entries = grid(model, params, batches, policies, budgets, context=context, prompt=prompt, log=log)
    name = os.path.basename(os.path.normpath(path))
    record = {
        "run": name,
        "checkpoint": os.path.abspath(path),
        "architecture": (hf_config.get("architectures") or [hf_config.get("model_type")])[0],
        "model": {
            field: getattr(model, field)
            for field in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "max_len")
        },
        "dtype": str(jnp.dtype(model.param_dtype)),
        "text": text_path or "python standard library (held-out split)",
        "context": context,
        "prompt": prompt,
    }
    return record, [{"run": name, "checkpoint": record["checkpoint"], **entry} for entry in entries]


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


MAX_ANSWER_POSITIONS = 64  # answers of up to this many scored positions per row also get accuracy per position


def score(logits: jax.Array, batch: Mapping[str, np.ndarray], prompt: int) -> dict[str, Any]:
    """Loss sum, correct count and weight over the decoded positions (>= prompt) of one batch; when every row scores
    the same number n <= MAX_ANSWER_POSITIONS of positions (a passkey's digits, MQAR's queries), also "by_position":
    correct counts float64 [n] of the rows' 1st, 2nd, ... scored position (None otherwise)."""
    logits = np.asarray(logits[:, prompt:], np.float64)
    targets, weights = batch["targets"][:, prompt:], batch["weights"][:, prompt:]
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    nll = logz - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = logits.argmax(axis=-1) == targets
    counts = (weights > 0).sum(axis=1)
    by_position = None
    if len(counts) and (counts == counts[0]).all() and 0 < counts[0] <= MAX_ANSWER_POSITIONS:
        by_position = np.stack([correct[row][weights[row] > 0] for row in range(len(counts))]).sum(axis=0)
    return {
        "loss_sum": float((nll * weights).sum()),
        "correct": float((correct * weights).sum()),
        "weight": float(weights.sum()),
        "by_position": by_position,
        "rows": len(counts),
    }


def evaluate_policy(
    model: Any, params: Any, batches: Sequence[Mapping[str, np.ndarray]], prompt: int
) -> dict[str, Any]:
    """{"loss", "perplexity", "accuracy", "cache_bytes", "decode_ms_per_step"} of `model` over `batches`, and
    "accuracy_by_position" (accuracy of each row's 1st, 2nd, ... scored position) when every row scores the same
    few positions (see `score`)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight": 0.0}
    by_position, rows = [], 0
    seconds, steps, nbytes = 0.0, 0, 0
    for batch in batches:
        logits, cache, elapsed = decode_through_cache(model, params, jnp.asarray(batch["inputs"]), prompt)
        scored = score(logits, batch, prompt)
        for key in totals:
            totals[key] += scored[key]
        by_position.append(scored["by_position"])
        rows += scored["rows"]
        seconds += elapsed
        steps += batch["inputs"].shape[1] - prompt
        nbytes = cache_lib.nbytes(cache)
    if totals["weight"] == 0:
        raise ValueError(f"prompt={prompt} covers every scored position of the task; use a shorter --prompt")
    loss = totals["loss_sum"] / totals["weight"]
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": totals["correct"] / totals["weight"],
        "cache_bytes": nbytes,
        "decode_ms_per_step": 1000.0 * seconds / steps,
    }
    if all(b is not None for b in by_position) and len({len(b) for b in by_position}) == 1:
        metrics["accuracy_by_position"] = [float(c) / rows for c in np.sum(by_position, axis=0)]
    return metrics


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
    batches = {task: task_batches(run, task, rows, context, num_batches) for task in tasks}
    params = unboxed(run.model_params)
    return grid(
        run.task.model, params, batches, policies, budgets, context=context, prompt=prompt, log=log, tracing=run.tracing
    )


def grid(
    model: Any,
    params: Any,
    batches: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    policies: Sequence[str],
    budgets: Sequence[float],
    *,
    context: int,
    prompt: int,
    log: Any = print,
    tracing: Callable[[], Any] = contextlib.nullcontext,
) -> list[dict[str, Any]]:
    """`run_grid` on a softmax DecoderLM `model` with `params` ("params" collection) and, per task, its batches
    {"inputs", "targets", "weights"} [rows, context]; `tracing` gives the context every apply runs in. A model
    trained with a cache policy (configs/kv_attention_gate.py) is measured with that policy only, its "full" entry
    the policy at a budget of the whole context."""
    head_dim = model.head_dim or model.d_model // model.num_heads
    parsed = [(spec, *parse_policy(spec)) for spec in policies]
    trained = set(per_layer_mechanisms(model.attention, model.num_layers))
    full_model = model
    if trained != {"softmax"}:  # a run trained with a policy (attention_gate): that policy only, "full" = no cap
        own = next(iter(trained)) if len(trained) == 1 else None
        if own not in attn.list_mechanisms(family="kv") or any(name != own for _, name, _ in parsed):
            raise ValueError(
                f"the model's attention is {model.attention!r}; eval.kv swaps cache policies into a softmax decoder "
                "(every policy layer is a softmax layer with a managed cache), or measures the one policy a run was "
                f"trained with against a budget of the whole context (--policies {own})"
            )
        full_model = policy_model(model, own, policy_options(own, context, prompt, head_dim))
    entries = []
    for task, task_batches_ in batches.items():
        with tracing():
            full = evaluate_policy(full_model, params, task_batches_, prompt)
        entries.append({"task": task, "policy": FULL, "options": {}, "budget": 1.0, "budget_entries": context, **full})
        log(f"{task:8s} {FULL:22s} budget 1.00: {summary(task, full)}")
        for spec, name, overrides in parsed:
            for budget in budgets if name not in BUDGET_FREE else budgets[:1]:
                entries_kept = max(2, round(budget * context))
                options = {**policy_options(name, entries_kept, prompt, head_dim, context - prompt), **overrides}
                with tracing():
                    metrics = evaluate_policy(policy_model(model, name, options), params, task_batches_, prompt)
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
    first = metrics.get("accuracy_by_position")
    return (
        f"ppl {metrics['perplexity']:.3f} acc {metrics['accuracy']:.3f}"
        + (f" (1st {first[0]:.3f})" if first else "")
        + f" cache {metrics['cache_bytes']} B {metrics['decode_ms_per_step']:.2f} ms/step"
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
        policies = dict.fromkeys(entry["policy"] for entry in mine if entry["policy"] != FULL)
        for index, policy in enumerate(policies):
            points = sorted((e["cache_ratio"], e[metric]) for e in mine if e["policy"] == policy)
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, label=policy, **series_style(index))
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
    if args.workdir is None and args.checkpoint is None:
        raise SystemExit("error: give --workdir (runs trained here) and/or --checkpoint (a Hugging Face directory)")
    workdirs = split_list("workdir", args.workdir) if args.workdir is not None else []
    if not workdirs and not args.output:
        raise SystemExit("error: --output is required with --checkpoint alone (eval.kv does not write into it)")
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
        extra = split_list("tasks", args.tasks) if args.tasks else []
        tasks = list(dict.fromkeys([run.config.data.name, *extra] if args.run_task else extra))
        if not tasks:
            raise SystemExit("error: --norun_task needs --tasks (no task left to measure)")
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
    if args.checkpoint is not None:
        extra = split_list("tasks", args.tasks) if args.tasks else []
        tasks = list(dict.fromkeys(["text", *extra]))
        try:
            record, grid_entries = checkpoint_grid(
                args.checkpoint,
                policies,
                budgets,
                tasks,
                context=args.context,
                prompt=args.prompt,
                rows=args.rows,
                num_batches=args.batches,
                text_path=args.text_path,
            )
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"error: {error}") from None
        runs.append(record)
        results += grid_entries
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
    flags.DEFINE_string("checkpoint", None, "A Hugging Face decoder directory (GPT-2, Llama, Qwen2, Mistral).")
    flags.DEFINE_string("text_path", None, "--checkpoint: held-out text file or directory (default: the stdlib).")
    flags.DEFINE_string("policies", "h2o,streaming,tova,snapkv,kivi", "Comma-separated policy specs, name[:opt=val].")
    flags.DEFINE_string("budgets", "1.0,0.5,0.25,0.1", "Cache budgets as fractions of the context.")
    flags.DEFINE_string("tasks", None, "Extra tasks besides the run's own data: mqar, passkey (--checkpoint: passkey).")
    flags.DEFINE_bool("run_task", True, "Measure the run's own validation data too (--norun_task: --tasks only).")
    flags.DEFINE_integer("context", None, "Tokens per sequence (default: the run's seq_len; checkpoint: <= 512).")
    flags.DEFINE_integer("prompt", None, "Tokens prefilled in one call before token-by-token decoding (default: 1/16).")
    flags.DEFINE_integer("rows", 8, "Sequences per batch.")
    flags.DEFINE_integer("batches", 1, "Batches per task.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("output", None, "Also write the JSON (and its PNG) here.")
    app.run(main)
