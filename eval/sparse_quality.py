"""Quality against density for the dynamic sparse systems of `attn.sparse`, the way SeerAttention and HiP report it.

    python -m train --config configs/sparse_long.py --workdir runs/sparse_long
    python -m eval.sparse_quality --workdir runs/sparse_long [--densities 0.5,0.25,0.1] [--num-batches N]
        [--seer-workdir runs/sparse_long_seer]

Loads the run's latest checkpoint (a decoder trained with dense causal softmax) and swaps every layer's attention
for each training-free system of attn.sparse, with the trained q/k/v/o weights and the system's selector at a
budget of k = max(1, round(density * T / block)) key blocks of `block` tokens per query block
(`system_options`). Next to them:

  dense           the trained model as it is (its loss equals `python -m eval.lm` at 1x on the same batches)
  window_sinks    a static sliding window with an attention sink at the same budget: key block 0 plus the k - 1
                  most recent blocks (the diagonal one included) per query block, through the same block-sparse
                  core (`window_sink_indices`; the layer is `top_m` with its selection replaced)

Per (system, density): validation loss / perplexity / next-byte accuracy on the run's held-out text (the run's valid
split, the batches eval.lm reads), and passkey accuracy on `--passkey-rows` rows of held-out text with a passkey at
depths spread over [0, 1] (train.data.text_passkey; the answer digits teacher-forced: "digit_accuracy" per digit,
"accuracy_by_digit" for each position of the key, "digit_nll" the mean NLL of the answer digits (chance: ln 10),
"key_accuracy" all digits right). Selector overhead (block selectors only): the median time of the selection alone
(`select_with_values` on the layer's q, k, v) over the median time of the whole layer's forward, one layer of the
run's shape at T = seq_len, fresh parameters.

Systems that cannot run here are listed with the reason (`NEEDS_TRAINING`, `NOT_PREFILL`). `seer` has no gate in a
softmax checkpoint; its gate at its identity initialisation (pooled q against pooled k, no training) is its
parameter-free mode and is measured as "seer_identity_gate". With `--seer-workdir`, a run of
configs/sparse_long.py:seer_gate (the gates trained by self-distillation on this run, its other weights frozen), the
trained gate is measured too, as "seer" (that run's parameters, distill off, top_k = the budget). Every cell where a
system scores worse than the static window at the same density (loss, passkey key or digit accuracy, digit NLL) is
listed under "loses_to_window".

Writes <output-dir>/sparse_quality_cpu.json and .png (default benchmarks/results) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import attn
from attn.models.fields import per_layer_options
from attn.sparse.selector_layer import BlockSelectorLayer
from attn.sparse.top_m import TopMAttention

from .analysis.evaluator import pyplot
from .lm import open_run, quiet_logs
from .passkey_rows import in_batches, passkey_rows

DENSITIES = (0.5, 0.25, 0.1)
BLOCK = 32  # selection block (tokens): 32 blocks at T = 1024, so 10% is 3 blocks
# Systems measured, in the table's order: the training-free selectors of attn.sparse (and seer's untrained gate).
SYSTEMS = ("hip", "flexprefill", "longheads", "top_m", "hcam", "hyper", "seer_identity_gate")
NEEDS_TRAINING = {
    "seer": "the AttnGate is trained by self-distillation (configs/seer_gate.py); measured untrained as "
    "seer_identity_gate",
    "dma": "the value-derived key bias (dt_proj, A) is trained; at its zero init every key ties and the selection is "
    "arbitrary",
    "sparsifiner": "the low-rank connectivity predictor is trained (and sized to one sequence length)",
    "landmark": "landmark tokens must be inserted and trained with grouped softmax",
}
NOT_PREFILL = {
    "recycled": "a decode-time cache policy (full steps alternate with the last full step's top-k keys); a "
    "teacher-forced forward pass is dense",
    "tidal": "decode-time token selection reused across layers; a teacher-forced forward pass is dense",
    "rettention": "corrects sparse attention across diffusion denoising steps (visual generation)",
}
MECHANISM = {"seer_identity_gate": "seer", "window_sinks": "top_m"}
FRESH = ("seer_identity_gate",)  # systems with parameters the checkpoint lacks (given their initial values)


def block_budget(density: float, seq_len: int, block: int) -> int:
    """Key blocks kept per query block at `density`: max(1, round(density * ceil(seq_len / block)))."""
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return max(1, int(round(density * -(-seq_len // block))))


def system_options(system: str, density: float, seq_len: int, head_dim: int, block: int = BLOCK) -> dict[str, Any]:
    """attn.build options of `system` at `density` (1.0 gives each system's setting that equals causal softmax)."""
    num_blocks = -(-seq_len // block)
    k = block_budget(density, seq_len, block)
    full = k >= num_blocks
    if system == "hip":
        return {"block_size": block, "top_k": k}
    if system == "flexprefill":
        # max_budget caps the vertical and slash blocks; query-aware heads add the blocks that reach gamma
        return (
            {"block_size": block, "min_budget": num_blocks, "gamma": 1.0}
            if full
            else {
                "block_size": block,
                "max_budget": k,
            }
        )
    if system == "longheads":
        return {"block_size": block, "num_chunks": max(3, k)}
    if system in ("top_m", "window_sinks"):
        return {"block_size": block, "m": k}
    if system == "hcam":
        # top_k over all chunks is a mixture of per-chunk softmaxes; HCAM's dense reduction is a single chunk
        return {"block_size": seq_len, "top_k": 1} if full else {"block_size": block, "top_k": k}
    if system == "hyper":
        # sortLSH blocks plus as many sampled columns, half the budget each; lengths <= min_seq_len are exact
        half = max(1, int(round(density * seq_len / 2)))
        return {"min_seq_len": seq_len} if full else {"block_size": half, "sample_size": half, "min_seq_len": half}
    if system == "seer_identity_gate":
        return {"block_size": block, "top_k": k, "gate_dim": head_dim}
    raise ValueError(f"system={system!r} is not measured here; expected one of {(*SYSTEMS, 'window_sinks')}")


def window_sink_indices(num_q_blocks: int, budget: int) -> np.ndarray:
    """int32 [num_q_blocks, budget]: key block 0 (the sink) and the budget - 1 most recent blocks r, r-1, ... of
    query block r, distinct, padded with -1 (all of 0..r when r < budget)."""
    out = np.full((num_q_blocks, budget), -1, np.int32)
    for r in range(num_q_blocks):
        kept = list(range(r, max(r - budget + 1, 0) - 1, -1)) if r < budget else [0, *range(r, r - budget + 1, -1)]
        out[r, : len(kept)] = kept
    return out


def _static_selection(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """Flax method interceptor: `top_m`'s selection replaced by the static window with a sink (same budget m)."""
    if context.method_name == "select" and isinstance(context.module, TopMAttention):
        module, q = context.module, args[0]
        indices = window_sink_indices(-(-q.shape[1] // module.block_size), module.m)
        return jnp.broadcast_to(jnp.asarray(indices), (q.shape[0], q.shape[2], *indices.shape))
    return next_fun(*args, **kwargs)


def swapped_model(model: Any, system: str, options: Mapping[str, Any]) -> Any:
    """The run's DecoderLM with every layer's attention replaced by `system` (same q/k/v/o parameters)."""
    name = MECHANISM.get(system, system)
    layers = per_layer_options(model.attention_options, model.num_layers)
    return model.clone(attention=name, attention_options=tuple({**layer, **options} for layer in layers))


def with_fresh_extras(model: Any, params: Any, tokens: jax.Array) -> Any:
    """`params` plus the initial values of any parameter `model` has and `params` lacks (seer's gate)."""
    init = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    flat = traverse_util.flatten_dict(init)
    flat.update(traverse_util.flatten_dict(nn.meta.unbox(params)))
    return traverse_util.unflatten_dict(flat)


def seer_model(run: Any, seer_run: Any) -> Any:
    """The seer run's model (its gates trained on `run`, configs/sparse_long.py:seer_gate), checked against `run`:
    attention "seer", the same length and the same frozen weights (so its rows differ from dense by the gate only)."""
    model = seer_run.task.model
    if model.attention != "seer":
        raise ValueError(f"--seer-workdir={seer_run.workdir!r} trains attention {model.attention!r}; expected 'seer'")
    if seer_run.config.seq_len != run.config.seq_len:
        raise ValueError(
            f"--seer-workdir={seer_run.workdir!r} has seq_len {seer_run.config.seq_len}; expected the run's "
            f"{run.config.seq_len}"
        )
    base = traverse_util.flatten_dict(nn.meta.unbox(run.model_params))
    seer = traverse_util.flatten_dict(nn.meta.unbox(seer_run.model_params))
    differ = [k for k, v in base.items() if k not in seer or not np.array_equal(np.asarray(v), np.asarray(seer[k]))]
    if differ:
        raise ValueError(
            f"--seer-workdir={seer_run.workdir!r}: its weight {'/'.join(differ[0])} differs from the run's; expected "
            "a seer_gate run initialised from this run with only the gates trained"
        )
    return model


def lm_sums(logits: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Weighted sums over a batch: loss_sum (nats), correct (argmax hits) and weight; logits [B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets, weights = jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"], jnp.float32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(nll * weights), "correct": jnp.sum(hits * weights), "weight": jnp.sum(weights)}


def evaluate_model(
    apply: Callable[[jax.Array], jax.Array],
    text: Sequence[Mapping[str, Any]],
    passkey: Sequence[Mapping[str, Any]],
) -> dict[str, float]:
    """loss / perplexity / accuracy over the `text` batches; on the `passkey` batches digit / key accuracy, the
    accuracy of each answer digit by its position in the key, and the mean NLL (nats) of the answer digits."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight": 0.0}
    for batch in text:
        for key, value in lm_sums(apply(jnp.asarray(batch["inputs"])), batch).items():
            totals[key] += float(value)
    loss = totals["loss_sum"] / totals["weight"]
    right, nll = [], []
    for b in passkey:
        logp = np.asarray(jax.nn.log_softmax(apply(jnp.asarray(b["inputs"]))[:, b["answer"]].astype(jnp.float32)))
        answer = np.asarray(b["targets"])[:, b["answer"]]  # [rows, digits]
        right.append(logp.argmax(axis=-1) == answer)
        nll.append(-np.take_along_axis(logp, answer[..., None], axis=-1)[..., 0])
    hits = np.concatenate(right)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": totals["correct"] / totals["weight"],
        "passkey_digit_accuracy": float(hits.mean()),
        "passkey_key_accuracy": float(hits.all(axis=1).mean()),
        "passkey_accuracy_by_digit": [float(v) for v in hits.mean(axis=0)],
        "passkey_digit_nll": float(np.concatenate(nll).mean()),
    }


def text_batches(run: Any, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` validation batches of the run (the batches `eval.lm` reads at 1x)."""
    source = run.data("valid", per_process=False)
    source.reset()
    count = num_batches if source.num_batches is None else min(num_batches, source.num_batches)
    return [source.next_batch() for _ in range(count)]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def selector_overhead(
    system: str, options: Mapping[str, Any], model: Any, rows: int, seq_len: int, repeats: int
) -> dict[str, Any]:
    """Median seconds of one layer's forward and of its selection alone, and their ratio (block selectors only)."""
    name = MECHANISM.get(system, system)
    heads, width = model.num_heads, model.d_model
    head_dim = model.head_dim or width // heads
    layer = attn.build(name, num_heads=heads, head_dim=head_dim, **options)
    if not isinstance(layer, BlockSelectorLayer) or system == "window_sinks":
        return {"selector_share": None, "note": "selection not separable from the layer's attend"}
    if system in (*FRESH, "seer"):
        return {"selector_share": None, "note": "the selection builds the gate's submodules: not callable alone"}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, seq_len, width)), jnp.float32)
    qkv = [jnp.asarray(rng.standard_normal((rows, seq_len, heads, head_dim)), jnp.float32) for _ in range(3)]
    mask = attn.Mask(causal=True)
    params = jax.jit(layer.init)(jax.random.key(0), x, mask=mask)
    forward = jax.jit(lambda p, x: layer.apply(p, x, mask=mask))

    def select(p, q, k, v):
        return layer.apply(p, q, k, v, causal=True, q_offset=0, method=type(layer).select_with_values)

    select_jit = jax.jit(select)
    layer_s = median_seconds(lambda: forward(params, x), repeats)
    select_s = median_seconds(lambda: select_jit(params, *qkv), repeats)
    return {"layer_ms": 1000 * layer_s, "selector_ms": 1000 * select_s, "selector_share": select_s / layer_s}


def measure(
    run: Any,
    densities: Sequence[float] = DENSITIES,
    systems: Sequence[str] = SYSTEMS,
    *,
    num_batches: int | None = None,
    passkey_count: int = 16,
    repeats: int = 3,
    overhead: bool = True,
    log: Callable[[str], None] = print,
    partial_path: str | None = None,
    seer_run: Any = None,
) -> dict[str, Any]:
    """The report dict: dense, window_sinks and every system at every density (see the module docstring); with
    `seer_run` (a configs/sparse_long.py:seer_gate run on this one) also its trained gate as "seer"."""
    model, params = run.task.model, run.model_params
    trained_seer = None if seer_run is None else seer_model(run, seer_run)
    seq_len = run.config.seq_len
    head_dim = model.head_dim or model.d_model // model.num_heads
    text = text_batches(run, num_batches or run.config.eval.num_batches)
    size = len(text[0]["inputs"])  # passkey rows rounded up to whole batches of the text batches' shape
    passkey = in_batches(passkey_rows(run, -(-passkey_count // size) * size), size)
    rows: list[dict[str, Any]] = []
    done = {}  # rows an interrupted run of the same workdir already measured (partial_path), reused
    if partial_path is not None and os.path.exists(partial_path):
        with open(partial_path, encoding="utf-8") as f:
            done = {(r["system"], r["density"]): r for r in json.load(f)}

    def score(system: str, density: float, swapped: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        if (system, density) in done:
            return done[(system, density)]
        with run.tracing():
            if system == "seer":
                full = seer_run.model_params
            elif system in FRESH:
                full = with_fresh_extras(swapped, params, jnp.asarray(text[0]["inputs"][:1]))
            else:
                full = params
            apply = jax.jit(lambda tokens: swapped.apply({"params": full}, tokens))
            if system == "window_sinks":
                with nn.intercept_methods(_static_selection):
                    metrics = evaluate_model(apply, text, passkey)
            else:
                metrics = evaluate_model(apply, text, passkey)
        row = {"system": system, "density": density, "options": dict(options), **metrics}
        if overhead and system != "dense":
            row.update(selector_overhead(system, options, model, run.config.batch_size, seq_len, repeats))
        if partial_path is not None:  # the rows so far, so an interrupted run keeps what it measured
            with open(partial_path, "w", encoding="utf-8") as f:
                json.dump([*rows, row], f, indent=1)
        log(
            f"{system:>20} density {density:.2f}: loss {metrics['loss']:.4f}, passkey key accuracy "
            f"{metrics['passkey_key_accuracy']:.3f} (digits {metrics['passkey_digit_accuracy']:.3f}, digit NLL "
            f"{metrics['passkey_digit_nll']:.3f})"
        )
        return row

    rows.append(score("dense", 1.0, model, {}))
    for density in densities:
        budget = block_budget(density, seq_len, BLOCK)
        for system in ("window_sinks", *systems):
            options = system_options(system, density, seq_len, head_dim)
            row = score(system, density, swapped_model(model, system, options), options)
            row["budget_blocks"] = budget
            rows.append(row)
        if trained_seer is not None:
            options = {"top_k": budget, "distill": False}
            row = score("seer", density, swapped_model(trained_seer, "seer", options), options)
            row["budget_blocks"] = budget
            rows.append(row)
    return {
        "benchmark": "sparse_quality",
        "workdir": os.path.abspath(run.workdir),
        "step": run.step,
        "seer_workdir": None if seer_run is None else os.path.abspath(seer_run.workdir),
        "seer_step": None if seer_run is None else seer_run.step,
        "seq_len": seq_len,
        "block": BLOCK,
        "densities": list(densities),
        "device": jax.devices()[0].device_kind,
        "records": rows,
        "loses_to_window": losses_to_window(rows),
        "needs_training": {k: v for k, v in NEEDS_TRAINING.items() if k != "seer" or seer_run is None},
        "not_prefill": NOT_PREFILL,
    }


# (metric, +1 when higher is worse / -1 when lower is worse): what losses_to_window compares against the window
WINDOW_METRICS = (
    ("loss", 1),
    ("passkey_key_accuracy", -1),
    ("passkey_digit_accuracy", -1),
    ("passkey_digit_nll", 1),
)


def losses_to_window(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every (system, density, metric) where the system is worse than window_sinks at that density: a higher loss,
    a lower passkey key or digit accuracy, or a higher answer-digit NLL (a model that retrieves only part of the key
    shows its losses in the digits, not in whole keys)."""
    window = {r["density"]: r for r in rows if r["system"] == "window_sinks"}
    out = []
    for r in rows:
        w = window.get(r["density"])
        if w is None or r["system"] in ("window_sinks", "dense"):
            continue
        for metric, sign in WINDOW_METRICS:
            if metric in r and metric in w and sign * (r[metric] - w[metric]) > 0:
                out.append(
                    {
                        "system": r["system"],
                        "density": r["density"],
                        "metric": metric,
                        "value": r[metric],
                        "window": w[metric],
                    }
                )
    return out


def table(report: Mapping[str, Any]) -> str:
    lines = [
        "| system | density | loss | accuracy | passkey keys | passkey digits | digit 1 | digit NLL | selector share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["records"]:
        share = r.get("selector_share")
        lines.append(
            f"| {r['system']} | {r['density']:.2f} | {r['loss']:.4f} | {r['accuracy']:.4f} | "
            f"{r['passkey_key_accuracy']:.3f} | {r['passkey_digit_accuracy']:.3f} | "
            f"{r['passkey_accuracy_by_digit'][0]:.3f} | {r['passkey_digit_nll']:.3f} | "
            f"{'—' if share is None else f'{share:.2f}'} |"
        )
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
    """Four panels against density: held-out loss, whole-key accuracy, first-digit accuracy (what a model that
    retrieves only part of the key shows) and the answer digits' NLL; the static window dashed, dense dotted."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(20, 4))
    dense = next(r for r in report["records"] if r["system"] == "dense")
    panels = (
        (lambda r: r["loss"], "validation loss (nats/byte)"),
        (lambda r: r["passkey_key_accuracy"], "passkey accuracy (all digits)"),
        (lambda r: r["passkey_accuracy_by_digit"][0], "passkey first-digit accuracy (chance 0.1)"),
        (lambda r: r["passkey_digit_nll"], "passkey answer-digit NLL (nats, chance 2.30)"),
    )
    systems = dict.fromkeys(r["system"] for r in report["records"] if r["system"] != "dense")
    for axis, (value, label) in zip(axes, panels, strict=True):
        for system in systems:
            points = sorted((r["density"], value(r)) for r in report["records"] if r["system"] == system)
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if system == "window_sinks" else {}
            axis.plot(*zip(*points, strict=True), marker="o", label=system, **style)
        axis.axhline(value(dense), color="grey", linestyle=":", label="dense")
        axis.set(xscale="log", xlabel="density (kept key blocks / all)", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=7)
    figure.suptitle(f"quality against density, T={report['seq_len']}, step {report['step']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(report: Mapping[str, Any], output_dir: str) -> tuple[str, str]:
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "sparse_quality_cpu.json")
    png_path = os.path.join(output_dir, "sparse_quality_cpu.png")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    plot(report, png_path)
    return json_path, png_path


def parse_densities(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1 for v in values):
        raise SystemExit(f"error: --densities={text!r} must be numbers in (0, 1], e.g. 0.5,0.25,0.1")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.sparse_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory (configs/sparse_long.py)")
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--num-batches", type=int, default=None, help="validation batches (default: eval.num_batches)")
    parser.add_argument("--passkey-rows", type=int, default=16, help="passkey rows, depths evenly over [0, 1]")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of the overhead measurement")
    parser.add_argument("--no-overhead", action="store_true", help="skip the selector-overhead timing")
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"))
    parser.add_argument(
        "--seer-workdir", default=None, help="a configs/sparse_long.py:seer_gate run on --workdir: its trained gate"
    )
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"error: --systems={args.systems!r}: unknown {unknown}; expected names from {SYSTEMS}")
    if args.passkey_rows < 1:
        raise SystemExit(f"error: --passkey-rows={args.passkey_rows} must be >= 1")
    quiet_logs()
    run = open_run(args.workdir)
    seer_run = None if args.seer_workdir is None else open_run(args.seer_workdir)
    report = measure(
        run,
        parse_densities(args.densities),
        systems,
        num_batches=args.num_batches,
        passkey_count=args.passkey_rows,
        repeats=args.repeats,
        overhead=not args.no_overhead,
        partial_path=os.path.join(args.workdir, "sparse_quality_partial.json"),
        seer_run=seer_run,
    )
    print(table(report))
    paths = write(report, args.output_dir)
    print(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
