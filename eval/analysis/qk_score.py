"""`python -m eval.analysis qk_score`: QK-score and attention score of option tokens per head for multiple-choice
questions, the select-and-copy heads that pick the right option ([179]).

"Listening to the Wise Few: Select-and-Copy Attention Heads for Multiple-Choice QA" (Tulchinskii et al., 2024, arXiv
2410.02343) reads a multiple-choice answer out of single heads: with q the query vector of the token where the model
answers (the last one) and k_i the key vector of option i's end-of-line token (the token closing the option's text),

    S_QK^{l,h}(i) = q^{l,h} . k_i^{l,h}            S_Att^{l,h}(i) = A^{l,h}[query, t_i]

and the head's prediction is argmax_i; heads whose prediction is accurate across datasets are the select-and-copy
heads, and on a validation split the best head is chosen. Here the QK-score is read from the layer's attention
logits before the softmax (the `attention_logits` capture: q . k with the position encoding applied, times the
layer's positive logit scale, 1/sqrt(head_dim) by default; argmax and accuracy are those of q . k), the attention
score from its weights. A tie for the top option is not a correct pick.

Batches (multiple-choice rows): "inputs" int [B, T]; "option_positions" int [B, K] (the key position of each option's
closing token, before the query); "answer" int [B] (index of the right option); optionally "query_position" (int or
int [B]; default the last position) and "option_tokens" int [B, K] (the options' label tokens: `model_accuracy` is
then the accuracy of the model's own logits restricted to them, the baseline the paper improves on).

Reported per head [L][H]: `qk_accuracy`, `attention_accuracy`, `correlation` (Pearson correlation over all (row,
option) pairs between the row-centred QK-score and the row-centred indicator of the right option; None when a head's
scores do not vary), `qk_correct` / `qk_other` (mean QK-score of the right option / of the others); `best_head`,
`ranking` (heads by QK accuracy), `chance` (1 / K) and `model_accuracy` (None without option tokens).

Fidelity: reconstructed from the abstract and summaries of the paper (method section and code not read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .evaluator import (
    Evaluator,
    captured,
    check_selection,
    forward,
    layer_head_heatmap,
    pyplot,
)


def _parse_indices(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def picks(scores: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """bool [...]: scores [..., K] has a unique maximum at index `answer` [...]."""
    top = scores.max(axis=-1, keepdims=True)
    unique = (scores == top).sum(axis=-1) == 1
    return unique & (scores.argmax(axis=-1) == answer)


def centred_correlation(scores: np.ndarray, answer: np.ndarray) -> float | None:
    """Pearson correlation of scores [N, K] (each row centred) with the one-hot of `answer` [N] (each row centred);
    None when the centred scores are all 0."""
    onehot = np.eye(scores.shape[-1])[answer]
    x = scores - scores.mean(axis=-1, keepdims=True)
    y = onehot - onehot.mean(axis=-1, keepdims=True)
    norm = np.sqrt((x**2).sum() * (y**2).sum())
    if not np.isfinite(norm) or norm < 1e-12 * max(1.0, float(np.abs(scores).max())):
        return None
    return float((x * y).sum() / norm)


@dataclasses.dataclass(frozen=True)
class QKScore(Evaluator):
    """Options: layers / heads (None: all) to score."""

    layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"parse": _parse_indices})
    heads: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"parse": _parse_indices})

    name = "qk_score"
    paper = "[179] Listening to the Wise Few: Select-and-Copy Attention Heads for Multiple-Choice QA (2410.02343)"
    fidelity = "reconstructed"
    reference = (
        "the QK-score (query of the answering token . key of each option's end-of-line token) and attention score "
        "with argmax over options per head, as the paper's abstract and summaries of its method state them (arXiv "
        "2410.02343); its method section and code were not read; scores are read from the layer's pre-softmax "
        "logits, which differ from q . k by the positive logit scale only"
    )

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = [self._rows(model, params, i, batch) for i, batch in enumerate(batches)]
        layer_ids = rows[0]["layer_ids"]
        qk = np.concatenate([r["qk"] for r in rows], axis=2)  # [L, H, N, K]
        att = np.concatenate([r["attention"] for r in rows], axis=2)
        answer = np.concatenate([r["answer"] for r in rows])
        num_layers, num_heads = qk.shape[:2]
        correct = np.eye(qk.shape[-1], dtype=bool)[answer]  # [N, K]
        qk_accuracy = picks(qk, answer).mean(axis=-1)
        correlation = [[centred_correlation(qk[i, j], answer) for j in range(num_heads)] for i in range(num_layers)]
        qk_correct = np.where(correct, qk, 0.0).sum(axis=(-2, -1)) / correct.sum()
        qk_other = np.where(~correct, qk, 0.0).sum(axis=(-2, -1)) / max(int((~correct).sum()), 1)
        order = np.argsort(-qk_accuracy, axis=None, kind="stable")
        ranking = [[layer_ids[i // num_heads], rows[0]["heads"][i % num_heads]] for i in order.tolist()]
        baseline = [r["model_correct"] for r in rows]
        return {
            "layers": layer_ids,
            "heads": rows[0]["heads"],
            "rows": int(answer.shape[0]),
            "options": int(qk.shape[-1]),
            "chance": 1.0 / qk.shape[-1],
            "qk_accuracy": qk_accuracy.tolist(),
            "attention_accuracy": picks(att, answer).mean(axis=-1).tolist(),
            "correlation": correlation,
            "qk_correct": qk_correct.tolist(),
            "qk_other": qk_other.tolist(),
            "best_head": ranking[0],
            "ranking": ranking,
            "model_accuracy": None if any(b is None for b in baseline) else float(np.concatenate(baseline).mean()),
        }

    def _rows(self, model: Any, params: Any, index: int, batch: Mapping[str, Any]) -> dict[str, Any]:
        """QK and attention scores [L, H, B, K] of one batch, its answers [B] and the model's own picks."""
        for key in ("option_positions", "answer"):
            if key not in batch:
                raise ValueError(
                    f"batches[{index}] has no {key!r}: qk_score needs multiple-choice rows (option_positions int "
                    f"[B, K], answer int [B]); it has {sorted(batch)}"
                )
        inputs = np.asarray(batch["inputs"])
        batch_size, length = inputs.shape[:2]
        options = np.asarray(batch["option_positions"])
        answer = np.asarray(batch["answer"])
        if options.ndim != 2 or options.shape[0] != batch_size or answer.shape != (batch_size,):
            raise ValueError(
                f"batches[{index}]: option_positions {options.shape} must be [B, K] and answer {answer.shape} [B] "
                f"with B = {batch_size}"
            )
        query = np.broadcast_to(np.asarray(batch.get("query_position", length - 1)), (batch_size,)) % length
        if np.any(answer < 0) or np.any(answer >= options.shape[1]):
            raise ValueError(
                f"batches[{index}]: answer holds {answer.tolist()}, expected indices in [0, {options.shape[1]})"
            )
        if np.any(options < 0) or np.any(options >= query[:, None]):
            raise ValueError(
                f"batches[{index}]: option_positions {options.tolist()} must lie before the query positions "
                f"{query.tolist()} (causal attention)"
            )
        both = jax.jit(lambda p, b: [captured(model, p, b, name) for name in ("attention_logits", "attention_weights")])
        logits, weights = jax.device_get(both(params, dict(batch)))
        all_layers = list(logits)
        layer_pick = check_selection("layers", self.layers, len(all_layers), "attention layers")
        num_heads = np.shape(logits[all_layers[0]])[1]
        heads = check_selection("heads", self.heads, num_heads, "heads per layer")
        layer_ids = [all_layers[i] for i in layer_pick]
        b = np.arange(batch_size)[:, None]

        def at_options(maps: Mapping[int, Any]) -> np.ndarray:  # -> [L, H, B, K]
            out = []
            for layer in layer_ids:
                values = np.asarray(maps[layer], np.float64)[:, list(heads)]  # [B, H, Tq, Tk]
                out.append(np.moveaxis(values[b, :, query[:, None], options], -1, 0))  # [H, B, K]
            return np.stack(out)

        model_correct = None
        if "option_tokens" in batch:
            out = np.asarray(forward(model, params, batch), np.float64)  # [B, T, V]
            if out.ndim != 3:
                raise ValueError(
                    f"option_tokens needs a language model's logits [B, T, V]; the model returns {out.shape}"
                )
            tokens = np.asarray(batch["option_tokens"])
            model_correct = picks(out[np.arange(batch_size)[:, None], query[:, None], tokens], answer)
        return {
            "layer_ids": layer_ids,
            "heads": list(heads),
            "qk": at_options(logits),
            "attention": at_options(weights),
            "answer": answer,
            "model_correct": model_correct,
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, key, title in (
            (axes[0], "qk_accuracy", "QK-score accuracy"),
            (axes[1], "attention_accuracy", "attention-score accuracy"),
        ):
            layer_head_heatmap(axis, result[key], title, "accuracy", vmin=0, vmax=1)
            axis.set(xticks=range(len(result["heads"])), xticklabels=result["heads"])
            axis.set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
        baseline = result["model_accuracy"]
        suffix = "" if baseline is None else f", model's own pick {baseline:.2f}"
        fig.suptitle(f"qk_score [179]: best head {result['best_head']}, chance {result['chance']:.2f}{suffix}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
