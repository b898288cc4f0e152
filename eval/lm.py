"""Language-model evaluation of a trained run, with length extrapolation.

    python -m eval.lm --workdir runs/lm_tiny [--output results.json] [--factors 1,2,4] [--step N]

Loads the latest (or `--step`) checkpoint of the workdir with the config saved inside it, and measures
validation loss, perplexity and next-token accuracy at 1x, 2x and 4x the training sequence length (the
factors are configurable). Longer sequences use proportionally fewer rows per batch, so every length sees
about the same number of tokens. Lengths a model cannot run (learned positions shorter than the length)
are reported with the reason instead of a number.

Writes JSON to <workdir>/eval_lm.json and, with --output, also to that path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax

from .trainer_api import CheckpointDamaged, Run, load_run


def open_run(workdir: str, step: int | None = None) -> Run:
    """`load_run(workdir, step)`, or SystemExit with one line when `workdir` holds no run to load (missing, empty,
    or without a finished checkpoint / that step). Shared by the `python -m eval.*` tools that read a run."""
    if not os.path.isdir(workdir):
        raise SystemExit(f"error: --workdir={workdir!r} does not exist; train a run there first (python -m train)")
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --workdir={workdir!r} holds no checkpoints/ folder; is it a training run's workdir?")
    # Finished checkpoints are folders named by their step (in-progress saves carry a temporary suffix). Checked
    # here, before the checkpoint manager starts its background clean-up, so the exit is immediate and quiet.
    steps = sorted(int(name) for name in os.listdir(folder) if name.isdigit())
    if not steps:
        raise SystemExit(
            f"error: --workdir={workdir!r} has no finished checkpoint yet; the first one is written at "
            "checkpoint_every steps, at the last step and on SIGTERM"
        )
    if step is not None and step not in steps:
        raise SystemExit(f"error: --step={step} is not a checkpoint of {workdir!r}; its checkpoints: {steps}")
    try:
        return load_run(workdir, step)
    except (FileNotFoundError, ValueError, CheckpointDamaged) as error:
        detail = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise SystemExit(f"error: --workdir={workdir!r}: {detail}") from None


def quiet_logs() -> None:
    """Checkpoint restores log tens of INFO lines through absl; keep warnings unless --verbosity was given."""
    from absl import flags, logging

    if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def rows_for_length(batch_size: int, factor: int, divisor: int) -> int:
    """Rows per batch at `factor` x the training length: batch_size / factor, a multiple of `divisor`."""
    rows = max(batch_size // factor, divisor)
    return max(rows // divisor * divisor, divisor)


def evaluate_lengths(run: Run, factors: Sequence[int], num_batches: int) -> list[dict[str, Any]]:
    """One result dict per factor: seq_len, rows, batches, and loss / perplexity / accuracy (or skipped)."""
    config = run.config
    results = []
    for factor in factors:
        seq_len = config.seq_len * factor
        entry: dict[str, Any] = {"factor": factor, "seq_len": seq_len}
        max_len = getattr(run.task.model, "max_len", None)
        if getattr(run.task.model, "position_embedding", "none") == "learned" and seq_len > max_len:
            entry["skipped"] = f"learned positions cover max_len={max_len} < seq_len={seq_len}"
            results.append(entry)
            continue
        rows = rows_for_length(config.batch_size, factor, run.batch_divisor)
        source = run.data("valid", batch_size=rows, seq_len=seq_len)
        # About as many tokens at every length as `num_batches` full training-size batches hold.
        batches = max(1, math.ceil(config.batch_size * num_batches / (rows * factor)))
        metrics = run.evaluate(source, batches)
        entry.update(rows=rows, batches=batches, **metrics)
        results.append(entry)
    return results


def main(argv: Sequence[str]) -> None:
    """Entry point of `python -m eval.lm` (flags are defined below, only when run as a program)."""
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
    args = flags.FLAGS
    factors = [int(f) for f in args.factors.split(",") if f.strip()]
    if not factors or any(f < 1 for f in factors):
        raise SystemExit(f"error: --factors={args.factors!r} must be positive integers, e.g. 1,2,4")
    quiet_logs()
    run = open_run(args.workdir, args.step)
    if not run.task.is_language_model:
        raise SystemExit(f"error: eval.lm evaluates language models; this run's model.kind is {run.task.kind!r}")
    results = evaluate_lengths(run, factors, args.num_batches or run.config.eval.num_batches)
    report = {
        "workdir": os.path.abspath(args.workdir),
        "step": run.step,
        "attention": run.config.model.attention,
        "train_seq_len": run.config.seq_len,
        "data": run.config.data.to_dict(),
        "results": results,
    }
    if jax.process_index() != 0:
        return
    paths = [os.path.join(args.workdir, "eval_lm.json")] + ([args.output] if args.output else [])
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    for entry in results:
        head = f"seq_len {entry['seq_len']:>6} ({entry['factor']}x):"
        if "skipped" in entry:
            print(f"{head} skipped, {entry['skipped']}")
        else:
            ppl = entry.get("perplexity", float("nan"))
            print(f"{head} loss {entry['loss']:.4f}, perplexity {ppl:.3f}, accuracy {entry['accuracy']:.4f}")
    print(f"wrote {', '.join(paths)}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ (required).")
    flags.DEFINE_string("output", None, "Also write the JSON here.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("factors", "1,2,4", "Multiples of the training sequence length.")
    flags.DEFINE_integer("num_batches", None, "Batches per length (default: the config's eval.num_batches).")
    flags.mark_flag_as_required("workdir")
    app.run(main)
