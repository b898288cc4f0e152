"""`python -m eval.analysis head_patching`: activation patching of each head's output between clean and corrupted
inputs, the circuit of heads it finds, and the circuit overlap across tasks ([31]).

"Circuit Component Reuse Across Tasks in Transformer Language Models" (Merullo, Eickhoff, Pavlick; ICLR 2024, arXiv
2310.08744) finds the heads of a task's circuit by patching (the path patching of Wang et al. 2022, IOI): a head's
output on a corrupted prompt replaces its output on the clean prompt, and the change of the logit difference between
the clean answer and the corrupted answer measures how much the head carries the information the corruption removed.
Scores are relative changes of the clean logit difference; the heads with the largest effects form the circuit, and
the circuits of two tasks (IOI, Colored Objects) overlap by about 78% of their heads.

Here, for each (layer, head), one forward with that head's per-head output (the `head_outputs` stage, every position)
taken from the other run (`attn.interventions` hook, exactly `patch(cache, "head_outputs", ...)`), and

    LD(run) = mean over rows and answer positions of logit[clean target] - logit[corrupted target]
    noising   (corrupted head into the clean run):  P = LD(patched clean run)
    denoising (clean head into the corrupted run):  P = LD(patched corrupted run)
    effect = (P - base) / |base|        normalisation "clean" (the paper's relative change; base: the run patched)
    effect = (P - base) / (C - R)       normalisation "gap" (C = LD(clean), R = LD(corrupted); -1 / +1: the head
                                        alone carries the whole difference when noising / denoising)

The circuit of a task is the heads with |effect| >= `threshold` (the paper keeps the top 2% per path-patching stage;
path patching through specific receivers is not part of this tool). Circuit overlap between tasks A and B:
intersection over union, and |A & B| / min(|A|, |B|).

Batches: "inputs" int [B, T] (clean) and optionally "corrupted" int [B, T] (default: the batch's rows rolled by one,
a resample corruption), "targets"/"weights" (answer positions; default: next tokens, every position) and
"corrupted_targets" (needed with "targets" and "corrupted"; default with rolled rows: the rolled targets), and "task"
(a name; batches of several tasks give one circuit each and their overlaps).

Reported: per task {`clean`, `corrupted` (LD), `patched` [L][H], `effect` [L][H], `circuit`}, `overlap` (pairs of
tasks: iou, fraction of the smaller circuit), `layers`.

Fidelity: reconstructed from the abstract and summaries of the paper and Wang et al.'s patching (full text and
code not read); one-step activation patching of each head, not path patching through chosen receivers.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.interventions import hook

from .evaluator import Evaluator, captured, forward, is_task, layer_head_heatmap, layer_of, pyplot

DIRECTIONS = ("noising", "denoising")
NORMALISATIONS = ("clean", "gap")


def circuit_overlap(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]]) -> dict[str, float]:
    """{"iou": |A & B| / |A | B|, "shared": |A & B| / min(|A|, |B|)} of two head sets ([layer, head] pairs);
    0 where a set is empty (1 for two empty sets' IoU is not claimed: 0)."""
    a, b = {tuple(h) for h in first}, {tuple(h) for h in second}
    both, either = len(a & b), len(a | b)
    return {
        "iou": both / either if either else 0.0,
        "shared": both / min(len(a), len(b)) if a and b else 0.0,
    }


def clean_and_corrupted(batch: Mapping[str, Any]) -> dict[str, Any]:
    """{"clean", "corrupted"} batches (explicit "targets" [B, T] and "weights" [B, T]) and the labels of the logit
    difference: "clean_targets", "corrupted_targets" int [B, T], "weights" float [B, T] (see the module docstring)."""
    inputs = np.asarray(batch["inputs"])
    if "targets" in batch:
        targets = np.asarray(batch["targets"])
        weights = np.asarray(batch.get("weights", np.ones(targets.shape)), np.float32)
    else:  # next-token prediction: the last position has no target
        targets = np.concatenate([inputs[:, 1:], inputs[:, -1:]], axis=1)
        weights = np.ones(inputs.shape, np.float32)
        weights[:, -1] = 0.0
    if "corrupted" in batch:
        corrupted = np.asarray(batch["corrupted"])
        if corrupted.shape != inputs.shape:
            raise ValueError(f"corrupted has shape {corrupted.shape}; it must match inputs {inputs.shape}")
        if "corrupted_targets" in batch:
            corrupted_targets = np.asarray(batch["corrupted_targets"])
        elif "targets" in batch:
            raise ValueError("a batch with 'targets' and 'corrupted' needs 'corrupted_targets' (the corrupted answers)")
        else:
            corrupted_targets = np.concatenate([corrupted[:, 1:], corrupted[:, -1:]], axis=1)
    else:
        if inputs.shape[0] < 2:
            raise ValueError("a batch without 'corrupted' needs >= 2 rows (its rows rolled by one are the corruption)")
        corrupted, corrupted_targets = np.roll(inputs, 1, axis=0), np.roll(targets, 1, axis=0)
    clean = {key: value for key, value in batch.items() if key not in ("corrupted", "corrupted_targets", "task")}
    clean.update(targets=targets, weights=weights)
    other = {**clean, "inputs": corrupted, "targets": corrupted_targets}
    return {
        "clean": clean,
        "corrupted": other,
        "clean_targets": targets,
        "corrupted_targets": corrupted_targets,
        "weights": weights,
    }


def patched_logit_difference(model: Any, layers: Sequence[int]) -> Any:
    """A jitted (params, batch, sources {layer: head outputs [B, T, H, Dv]}, mask float [L, H], clean_targets,
    corrupted_targets, weights) -> LD: the weighted mean of logit[clean] - logit[corrupted] of the model on `batch`
    with each masked head's output replaced by the source's. One compilation serves every mask."""
    rows = {layer: i for i, layer in enumerate(layers)}

    @jax.jit
    def run(params, batch, sources, mask, clean_targets, corrupted_targets, weights):
        def replace(value: jax.Array, path: str) -> jax.Array:
            layer = layer_of(path)
            if layer not in rows:
                return value
            where = mask[rows[layer]][None, None, :, None] > 0
            return jnp.where(where, sources[layer].astype(value.dtype), value)

        with attn.intervene(hook("head_outputs", replace, module="*/attention")):
            logits = jnp.asarray(forward(model, params, batch), jnp.float32)
        if logits.ndim != 3:
            raise ValueError(f"the model returns logits of shape {logits.shape}; head_patching needs [B, T, V]")
        pick = lambda t: jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]  # noqa: E731
        difference = pick(clean_targets) - pick(corrupted_targets)
        return jnp.sum(difference * weights) / jnp.maximum(jnp.sum(weights), 1e-9)

    return run


@dataclasses.dataclass(frozen=True)
class HeadPatching(Evaluator):
    """Options: direction ("noising": corrupted heads into the clean run, the paper's; "denoising"); normalisation
    ("clean": relative change of the patched run's logit difference, the paper's; "gap"); threshold (|effect| of a
    circuit head)."""

    direction: str = "noising"
    normalisation: str = "clean"
    threshold: float = 0.1

    name = "head_patching"
    paper = "[31] Circuit Component Reuse Across Tasks in Transformer Language Models (arXiv 2310.08744)"
    fidelity = "reconstructed"
    reference = (
        "the paper's head-level patching as its abstract and summaries describe it (after Wang et al. 2022: "
        "corrupted head outputs into the clean run, relative change of the clean-vs-corrupted logit difference; "
        "circuit overlap of head sets); full text and code not read; one-step activation patching, not path "
        "patching through receivers"
    )

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r} must be one of {DIRECTIONS}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation={self.normalisation!r} must be one of {NORMALISATIONS}")
        if not self.threshold > 0:
            raise ValueError(f"threshold={self.threshold!r} must be > 0")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model) and model.kind != "decoder":
            raise ValueError(f"head_patching reads decoder language models; the run holds a {model.kind!r} model")
        tasks: dict[str, list[dict[str, Any]]] = {}
        for batch in batches:
            tasks.setdefault(str(batch.get("task", "task")), []).append(clean_and_corrupted(batch))
        first = next(iter(tasks.values()))[0]
        layers = sorted(jax.eval_shape(lambda p: captured(model, p, first["clean"], "head_outputs"), params))
        results = {name: self._task(model, params, pairs, layers) for name, pairs in tasks.items()}
        overlap = [
            {"tasks": [a, b], **circuit_overlap(results[a]["circuit"], results[b]["circuit"])}
            for a, b in itertools.combinations(results, 2)
        ]
        return {"layers": layers, "tasks": results, "overlap": overlap}

    def _task(self, model: Any, params: Any, pairs: Sequence[dict[str, Any]], layers: list[int]) -> dict[str, Any]:
        run = patched_logit_difference(model, layers)
        heads_of = jax.jit(lambda p, b: captured(model, p, b, "head_outputs"))
        clean_sum = corrupt_sum = weight = 0.0
        patched = None
        for pair in pairs:
            clean_heads, corrupt_heads = heads_of(params, pair["clean"]), heads_of(params, pair["corrupted"])
            num_heads = clean_heads[layers[0]].shape[2]
            none = np.zeros((len(layers), num_heads), np.float32)
            labels = (pair["clean_targets"], pair["corrupted_targets"], pair["weights"])
            w = float(np.sum(pair["weights"]))
            clean_sum += w * float(run(params, pair["clean"], clean_heads, none, *labels))
            corrupt_sum += w * float(run(params, pair["corrupted"], corrupt_heads, none, *labels))
            into, sources = (
                (pair["clean"], corrupt_heads) if self.direction == "noising" else (pair["corrupted"], clean_heads)
            )
            values = np.zeros((len(layers), num_heads))
            for i, j in np.ndindex(values.shape):
                mask = none.copy()
                mask[i, j] = 1.0
                values[i, j] = float(run(params, into, sources, mask, *labels))
            patched = w * values if patched is None else patched + w * values
            weight += w
        weight = max(weight, 1e-9)
        clean, corrupted, patched = clean_sum / weight, corrupt_sum / weight, patched / weight
        base = clean if self.direction == "noising" else corrupted
        scale = abs(base) if self.normalisation == "clean" else clean - corrupted
        if abs(scale) < 1e-9:
            raise ValueError(
                f"the {self.normalisation!r} normalisation is 0 (clean LD {clean:.3g}, corrupted LD {corrupted:.3g}): "
                "the corruption does not change the answer's logit difference"
            )
        effect = (patched - base) / scale
        order = np.argsort(-np.abs(effect), axis=None, kind="stable")
        heads = effect.shape[1]
        circuit = [
            [layers[i // heads], int(i % heads)] for i in order.tolist() if abs(effect.flat[i]) >= self.threshold
        ]
        return {
            "clean": clean,
            "corrupted": corrupted,
            "patched": patched.tolist(),
            "effect": effect.tolist(),
            "circuit": circuit,
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        names = list(result["tasks"])
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
        for axis, name in zip(axes[0], names, strict=True):
            effect = np.asarray(result["tasks"][name]["effect"])
            bound = max(float(np.abs(effect).max()), 1e-12)
            label = "(P - base) / |base|" if self.normalisation == "clean" else "(P - base) / (clean - corrupted)"
            circuit = len(result["tasks"][name]["circuit"])
            title = f"{name}: patch effect ({circuit} heads with |effect| >= {self.threshold})"
            layer_head_heatmap(axis, effect, title, label, cmap="RdBu_r", vmin=-bound, vmax=bound)
            axis.set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
        pairs = "; ".join(f"{a}/{b} IoU {o['iou']:.2f}" for o in result["overlap"] for a, b in [o["tasks"]])
        fig.suptitle(f"head_patching [31] ({self.direction}) {pairs}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
