"""The evaluator interface every `python -m eval.analysis <tool>` implements, and the helpers the tools share.

An evaluator is a frozen dataclass whose fields are the tool's options (its config; bad values raise ValueError at
construction). `evaluate(model, params, batches)` runs it and returns a JSON-ready dict: the tool's own
quantities (`run`) under a header naming the tool, its paper, the fidelity record and the options. `write(result,
output)` writes that dict as JSON and, unless told not to, the tool's PNG next to it (same stem).

    tool = SinkRate(epsilon=0.3)
    result = tool.evaluate(model, params, [{"inputs": tokens}])        # tokens int [B, T]
    tool.write(result, "out/sink_rate.json")                           # + out/sink_rate.png

`model`: a flax module called as `model.apply(variables, inputs)` (e.g. a DecoderLM: tokens int [B, T] -> logits
[B, T, V]), or a training task (`train.run.Run.task`), called as `task.apply(variables, batch)`, so image models work
through their task. `params`: the "params" collection (boxed or not). `batches`: a sequence of dicts holding "inputs"
(int [B, T] tokens) and, for language models, optionally "targets" [B, T] and "weights" [B, T] (default: next-token
targets from "inputs", weight 1); each batch is one forward.

Fidelity records say what a tool was checked against: "paper" (the paper's equations), "official-code", "peer"
(a widely used implementation), or "reconstructed" (from the paper's description where it leaves details open).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.interventions import run_with_cache

from ..machine import machine_record

_LAYER = re.compile(r"(?:^|/)layers_(\d+)/attention$")


@dataclasses.dataclass(frozen=True)
class Evaluator(abc.ABC):
    """Base of the analysis tools: subclasses are frozen dataclasses of options and set the class attributes.

    name: the tool's command name. paper: the catalog citation. fidelity / reference: what the tool was checked
    against (see the module docstring).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    fidelity: ClassVar[str]
    reference: ClassVar[str]

    @abc.abstractmethod
    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The tool's quantities (JSON-ready: lists, floats, ints, strings)."""

    @abc.abstractmethod
    def plot(self, result: dict[str, Any], path: str) -> None:
        """Writes the tool's PNG for `result` (what `evaluate` returned) to `path`."""

    def evaluate(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """{"tool", "paper", "fidelity", "reference", "options", **run(...)}."""
        header = {
            "tool": self.name,
            "paper": self.paper,
            "fidelity": self.fidelity,
            "reference": self.reference,
            "options": {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)},
        }
        return {**header, **self.run(model, unboxed(params), check_batches(batches, needs_inputs=not is_task(model)))}

    def write(self, result: dict[str, Any], output: str, *, plot: bool = True) -> list[str]:
        """Writes `result` to `output` (JSON, with the device record: `write_json`) and its PNG (same stem) unless
        plot=False; returns the paths."""
        write_json(result, output)
        paths = [output]
        if plot:
            paths.append(os.path.splitext(output)[0] + ".png")
            self.plot(result, paths[-1])
        return paths


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def write_json(record: Mapping[str, Any], output: str) -> None:
    """Writes `record` to `output` as indented JSON (creating its folder) with `eval.machine.machine_record()` added
    at the end, unless the record already names its "device" (a result read back keeps the machine it was measured
    on, and gets nothing of this one). Every analysis JSON (each tool's `write` and `python -m eval.analysis report`)
    goes through here."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a dict (an analysis result); got {type(record).__name__}")
    machine = {} if "device" in record else machine_record()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump({**record, **machine}, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------- inputs
def unboxed(params: Any) -> Any:
    """`params` without flax's logical-partitioning boxes."""
    return nn.meta.unbox(params)


def check_batches(batches: Sequence[Mapping[str, Any]], *, needs_inputs: bool = True) -> list[dict[str, Any]]:
    """The batches as a list of dicts; ValueError for an empty sequence, a batch that is not a dict, or (with
    needs_inputs, what a flax module is called with) a batch without "inputs"."""
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or not batches:
        raise ValueError(f"batches must be a non-empty sequence of dicts with 'inputs'; got {type(batches).__name__}")
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or (needs_inputs and "inputs" not in batch):
            raise ValueError(f"batches[{i}] must be a dict with 'inputs' (e.g. int tokens [B, T])")
        out.append(dict(batch))
    return out


def is_task(model: Any) -> bool:
    """True for a training task (train.tasks.Task: `apply(variables, batch)`), False for a flax module."""
    return hasattr(model, "loss_sums") and hasattr(model, "model")


def forward(model: Any, params: Any, batch: Mapping[str, Any], **kwargs: Any) -> Any:
    """`model.apply({"params": params}, ...)` on `batch` (a task takes the batch, a module its "inputs")."""
    variables = {"params": params}
    if is_task(model):
        return model.apply(variables, batch, **kwargs)
    return model.apply(variables, batch["inputs"], **kwargs)


def layer_of(path: str) -> int | None:
    """The block index of a self-attention module path (".../layers_3/attention" -> 3), else None."""
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def captured(model: Any, params: Any, batch: Mapping[str, Any], name: str) -> dict[int, jax.Array]:
    """{layer: the `name` capture of its self-attention} for one forward of `batch` (see attn.interventions),
    e.g. name "attention_weights" -> [B, H, Tq, Tk], "head_outputs" -> [B, T, H, Dv]. ValueError when no layer
    has it (e.g. attention weights of a linear mechanism)."""
    if is_task(model):
        _, cache = run_with_cache(model, {"params": params}, dict(batch), names=(name,))
    else:
        _, cache = run_with_cache(model, {"params": params}, batch["inputs"], names=(name,))
    out = {layer_of(path): entry[name] for path, entry in cache.items() if layer_of(path) is not None}
    if not out:
        raise ValueError(
            f"the model's self-attention layers record no {name!r} (a mechanism without it, e.g. no attention "
            "probability matrix in the linear family, cannot be analysed by this tool)"
        )
    return dict(sorted(out.items()))


def attention_maps(model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[int, np.ndarray]:
    """{layer: attention weights float64 [N, H, Tq, Tk]} over all batches (rows concatenated; equal lengths)."""
    per_batch = [jax.device_get(captured(model, params, batch, "attention_weights")) for batch in batches]
    return {layer: np.concatenate([np.asarray(b[layer], np.float64) for b in per_batch]) for layer in per_batch[0]}


def check_selection(name: str, values: tuple[int, ...] | None, size: int, what: str) -> tuple[int, ...]:
    """`values` (None: all of range(size)) checked to lie in [0, size); ValueError naming `name` otherwise."""
    if values is None:
        return tuple(range(size))
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise ValueError(
            f"{name}={tuple(values)} holds {bad}, out of range: the model has {size} {what} (0..{size - 1})"
        )
    return tuple(values)


def lm_targets(batch: Mapping[str, Any], logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [B, T', V], targets int [B, T'], weights float32 [B, T']) for next-token prediction: the batch's
    "targets"/"weights" when present, else inputs shifted by one (T' = T - 1)."""
    if logits.ndim != 3:
        raise ValueError(
            f"the model returns logits of shape {logits.shape}; this tool needs a language model's [B, T, V]"
        )
    if "targets" in batch:
        targets = jnp.asarray(batch["targets"])
        weights = jnp.asarray(batch.get("weights", jnp.ones(targets.shape)), jnp.float32)
        return logits, targets, weights
    inputs = jnp.asarray(batch["inputs"])
    return logits[:, :-1], inputs[:, 1:], jnp.ones(inputs[:, 1:].shape, jnp.float32)


# ---------------------------------------------------------------------------------------------------- plots
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", "-.", ":")


def series_style(index: int) -> dict[str, Any]:
    """Line keywords (color, marker, linestyle) for the `index`-th series of a plot, distinct for the first 280:
    matplotlib's default cycle repeats its 10 colours, so a leaderboard of 15 policies showed pairs alike."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return {
        "color": f"C{index % 10}",
        "marker": _MARKERS[(index // 10) % len(_MARKERS)],
        "linestyle": _LINESTYLES[(index // (10 * len(_MARKERS))) % len(_LINESTYLES)],
    }


def layer_head_heatmap(axis: Any, matrix: Any, title: str, label: str, **imshow: Any) -> None:
    """A layer x head heatmap of `matrix` [L, H] on `axis`, values written in the cells when small enough."""
    values = np.asarray(matrix, np.float64)
    image = axis.imshow(values, aspect="auto", cmap=imshow.pop("cmap", "viridis"), **imshow)
    axis.figure.colorbar(image, ax=axis, label=label)
    axis.set(xlabel="head", ylabel="layer", title=title, xticks=range(values.shape[1]), yticks=range(values.shape[0]))
    if values.size <= 256:
        for (layer, head), value in np.ndenumerate(values):
            axis.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize=7, color="w")
