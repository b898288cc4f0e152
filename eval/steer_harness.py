"""What the steering entry points share (`python -m eval.steer`, its `--vlm` part in eval/steer_vlm.py, and
`python -m eval.token_reduction`): the model trained in a workdir, held-out rows of its data, the answer accuracy,
the systems' fidelity records, the accuracy bar chart, and the command line's run and output.

    trained_model(workdir, config)            (model, params, info), training an empty workdir first
    held_out_source(name, config_data, ...)   a validation-split source configured as the run's data
    question_rows(config_data, count, seed)   one batch of held-out image_questions
    answer_accuracy(logits, batch)            share of last-position argmax answers equal to the target
    system_records(names)                     {name: paper, fidelity, reference, no_op} of attn.steer systems
    accuracy_bars(axis, names, values, ...)   accuracy per system as labelled bars
    check_rows(args, names)                   --rows-like flags >= 1
    measured(argv, parse, measure)            (args, result): bad input -> one line on stderr, exit status 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.steer import STEERERS

from .analysis.evaluator import unboxed
from .trainer_api import make_source, source_class

DEVICE = "CPU, 2 cores shared with other jobs"


def trained_model(workdir: str, config: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, params, info) of the run in `workdir`, trained there first from `config` (a config file, with an
    optional ":preset") when it holds no checkpoint. info: workdir, config, step, config_data (and train_seconds)."""
    from .trainer_api import load_config_file, load_run, train

    info: dict[str, Any] = {"workdir": os.path.abspath(workdir), "config": config}
    checkpoints = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        start = time.perf_counter()
        train(load_config_file(config), workdir)
        info["train_seconds"] = round(time.perf_counter() - start, 1)
    run = load_run(workdir)
    info.update(step=run.step, config_data=run.config.data.to_dict())
    return run.task.model, unboxed(run.model_params), info


def held_out_source(name: str, config_data: dict[str, Any], count: int, seed: int, **overrides: Any) -> Any:
    """The data source `name` on the validation split, `count` rows per batch from `seed`, with the options of the
    run's data config (`config_data`: those the source takes) and `overrides`."""
    options = {k: v for k, v in config_data.items() if k in source_class(name).OPTIONS}
    return make_source(name, split="valid", batch_size=count, seed=seed, **{**options, **overrides})


def question_rows(config_data: dict[str, Any], count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` held-out image questions (one batch) from seed `seed`: images, inputs, targets."""
    return held_out_source("image_questions", config_data, count, seed).next_batch()


def answer_accuracy(logits: jax.Array, batch: dict[str, np.ndarray]) -> float:
    """Share of rows whose last-position argmax is the answer batch["targets"][:, -1] (logits [B, V] or
    [B, T, V])."""
    last = logits[:, -1] if logits.ndim == 3 else logits
    return float(np.mean(np.asarray(jnp.argmax(last, axis=-1)) == batch["targets"][:, -1]))


def system_records(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{name: {"paper", "fidelity", "reference", "no_op"}} of the attn.steer systems `names`."""
    fields = ("paper", "fidelity", "reference", "no_op")
    return {name: {k: getattr(STEERERS[name], k) for k in fields} for name in names}


# ---------------------------------------------------------------------------------------------------- output
def accuracy_bars(
    axis: Any, names: Sequence[str], values: Sequence[float], colors: Sequence[str], *, rotation: float, **labels: Any
) -> None:
    """Accuracy per system as bars on `axis`, each labelled with its value; y in [0, 1]; `labels`: ylabel, title."""
    axis.bar(range(len(values)), values, color=list(colors))
    axis.set_xticks(range(len(values)), names, rotation=rotation, ha="right", fontsize=8)
    axis.set(ylim=(0, 1), **labels)
    for i, v in enumerate(values):
        axis.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)


def check_rows(args: argparse.Namespace, names: Sequence[str]) -> None:
    """ValueError unless each of the row-count flags `names` (argparse dests) is >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")


def measured(
    argv: Sequence[str] | None,
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    measure: Callable[[argparse.Namespace], dict[str, Any]],
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(args, result) of parse(argv) and measure(args), with result["measure_seconds"]. Bad input (ValueError,
    FileNotFoundError) ends with one line on stderr and exit status 2."""
    try:
        args = parse(argv)
        start = time.perf_counter()
        result = measure(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    result["measure_seconds"] = round(time.perf_counter() - start, 1)
    return args, result
