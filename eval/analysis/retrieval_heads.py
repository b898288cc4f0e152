"""`python -m eval.analysis retrieval_heads`: retrieval score per head and the retrieval drop when the top heads are
masked ([37]).

"Retrieval Head Mechanistically Explains Long-Context Factuality" (Wu et al., 2024, arXiv 2404.15574) finds the heads
that copy-paste a needle from a long context: while the model generates the answer of a needle-in-a-haystack query,
a head copies at a decoding step when its argmax attention lands inside the needle on a token equal to the token
being generated. Per context,

    retrieval_score^{l,h} = |{answer steps t : argmax_j A^{l,h}[t, j] in needle and x_j == g_t}| / |needle|

(g_t: the model's greedy token at step t, x_j the context token at key j), averaged over the contexts the model
answers (ROUGE-1 recall of the answer > 50% in the paper); heads scoring above 0.1 are retrieval heads. Masking the
top-k heads makes retrieval fail while masking k random other heads barely changes it (the paper's section 4).

Here a batch is teacher-forced: its "weights" mark the answer positions (the queries whose targets are the answer
tokens, as the passkey task of train.data marks them), g_t is the model's argmax there, and the needle is the last
occurrence of the answer tokens (contiguous, in order) before the first answer position. A row counts when more
than `min_recall` of its answer tokens are predicted right; rows without a needle are reported and skipped. Masking
zeroes the heads' outputs (an `attn.interventions` hook on `head_outputs`, as `ablate_heads` does); `accuracy` is
the teacher-forced token accuracy at the answer positions over all rows, for the top-k heads masked and for k random
heads outside the top k (mean of `random_trials` draws).

Reported: `retrieval_score` [L][H], `retrieval_heads` (score > `threshold`, descending), `ranking` (all heads,
descending), `rows`, `rows_scored`, `rows_without_needle`, `accuracy` (unmasked) and `masked` ({k, top_accuracy,
random_accuracy}).

Fidelity: official-code for the score (nightdessert/Retrieval_Head, retrieval_calculate), read on teacher-forced
batches; the masking is a zeroed head output (the official masking code was not checked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn.interventions import hook

from .evaluator import (
    Evaluator,
    attention_maps,
    forward,
    is_task,
    layer_head_heatmap,
    layer_of,
    lm_targets,
    pyplot,
)


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def find_needle(inputs: np.ndarray, answer: np.ndarray, before: int) -> int | None:
    """Start of the last occurrence of `answer` (int [d]) in `inputs` (int [T]) ending at or before index `before`
    (exclusive), or None."""
    d = len(answer)
    for start in range(before - d, -1, -1):
        if np.array_equal(inputs[start : start + d], answer):
            return start
    return None


def copy_paste_hits(
    argmax_keys: np.ndarray, inputs: np.ndarray, generated: np.ndarray, start: int, length: int
) -> np.ndarray:
    """Copy-paste steps per head: argmax_keys int [H, S] (each head's argmax key at the S answer steps), inputs int [T],
    generated int [S], needle [start, start + length) -> int [H], the steps whose argmax key lies in the needle and
    holds the generated token."""
    inside = (argmax_keys >= start) & (argmax_keys < start + length)
    same = inputs[argmax_keys] == generated[None, :]
    return (inside & same).sum(axis=-1)


def masked_predictions(model: Any, layers: Sequence[int]) -> Any:
    """A jitted (params, batch, keep float [L, H]) -> argmax tokens int [B, T]: the model's teacher-forced greedy
    tokens with each head's output multiplied by keep[layer row, head] (0: masked; `layers` names the rows). One
    compilation serves every mask: the rule is entered inside the traced function (attn.interventions' jit rule)."""
    rows = {layer: i for i, layer in enumerate(layers)}

    @jax.jit
    def predict(params: Any, batch: Mapping[str, Any], keep: jax.Array) -> jax.Array:
        def scale(value: jax.Array, path: str) -> jax.Array:  # head outputs [B, T, H, Dv]
            layer = layer_of(path)
            if layer not in rows:
                return value
            return value * keep[rows[layer]][:, None].astype(value.dtype)

        with attn.intervene(hook("head_outputs", scale, module="*/attention")):
            logits = forward(model, params, batch)
        logits, _, _ = lm_targets(batch, jnp.asarray(logits, jnp.float32))
        return jnp.argmax(logits, axis=-1)

    return predict


@dataclasses.dataclass(frozen=True)
class RetrievalHeads(Evaluator):
    """Options: threshold (retrieval-head score, paper 0.1); min_recall (fraction of the answer a row must get right
    to be scored, paper 0.5); mask_top (the k values: mask the top-k heads); random_trials (random k-head masks per
    k); seed (of the random masks)."""

    threshold: float = 0.1
    min_recall: float = 0.5
    mask_top: tuple[int, ...] = dataclasses.field(default=(1, 2, 4), metadata={"parse": _parse_ints})
    random_trials: int = 3
    seed: int = 0

    name = "retrieval_heads"
    paper = "[37] Retrieval Head Mechanistically Explains Long-Context Factuality (arXiv 2404.15574)"
    fidelity = "official-code"
    reference = (
        "the retrieval score of nightdessert/Retrieval_Head retrieval_head_detection.py (retrieval_calculate: top-1 "
        "attention of the generating query inside the needle span on a token equal to the generated one adds "
        "1 / needle length; accumulated only for answers with ROUGE-1 recall > 50, then averaged), read on a "
        "teacher-forced batch; masking zeroes head outputs (the official masking code was not checked)"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must be in [0, 1]")
        if not 0.0 <= self.min_recall < 1.0:
            raise ValueError(f"min_recall={self.min_recall!r} must be in [0, 1)")
        if not all(isinstance(k, int) and k >= 1 for k in self.mask_top):
            raise ValueError(f"mask_top={tuple(self.mask_top)!r} must hold positive ints")
        if not (isinstance(self.random_trials, int) and self.random_trials >= 0):
            raise ValueError(f"random_trials={self.random_trials!r} must be a non-negative int")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model) and model.kind != "decoder":
            raise ValueError(f"retrieval_heads reads decoder language models; the run holds a {model.kind!r} model")
        for i, batch in enumerate(batches):
            if "targets" not in batch or "weights" not in batch:
                raise ValueError(
                    f"batches[{i}] needs 'targets' and 'weights' marking the answer positions (e.g. the passkey task); "
                    f"it has {sorted(batch)}"
                )
        maps = attention_maps(model, params, batches)  # {layer: [N, H, T, T]}
        layers = list(maps)
        num_heads = next(iter(maps.values())).shape[1]
        total = len(layers) * num_heads
        too_many = [k for k in self.mask_top if k > total]
        if too_many:
            raise ValueError(f"mask_top={tuple(self.mask_top)} holds {too_many}: the model has {total} heads")
        argmax = np.stack([maps[layer].argmax(axis=-1) for layer in layers], axis=1)  # [N, L, H, T]
        guess = masked_predictions(model, layers)
        keep_all = np.ones((len(layers), num_heads), np.float32)
        predicted = np.concatenate([np.asarray(guess(params, batch, keep_all)) for batch in batches])
        inputs = np.concatenate([np.asarray(b["inputs"]) for b in batches])
        targets = np.concatenate([np.asarray(b["targets"]) for b in batches])
        weights = np.concatenate([np.asarray(b["weights"]) for b in batches]) > 0

        scores, scored, no_needle = np.zeros((len(layers), num_heads)), 0, 0
        for row in range(inputs.shape[0]):
            steps = np.flatnonzero(weights[row])
            if steps.size == 0:
                continue
            answer = targets[row, steps]
            start = find_needle(inputs[row], answer, int(steps[0]))
            if start is None:
                no_needle += 1
                continue
            if np.mean(predicted[row, steps] == answer) <= self.min_recall:
                continue
            scored += 1
            keys = argmax[row][..., steps].reshape(len(layers) * num_heads, steps.size)
            hits = copy_paste_hits(keys, inputs[row], predicted[row, steps], start, len(answer))
            scores += hits.reshape(len(layers), num_heads) / len(answer)
        scores = scores / max(scored, 1)
        order = np.argsort(-scores, axis=None, kind="stable")
        ranking = [(layers[i // num_heads], int(i % num_heads)) for i in order.tolist()]

        def accuracy(masked: Sequence[tuple[int, int]]) -> float:
            keep = keep_all.copy()
            for layer, head in masked:
                keep[layers.index(layer), head] = 0.0
            guesses = np.concatenate([np.asarray(guess(params, batch, keep)) for batch in batches])
            return float(np.mean(guesses[weights] == targets[weights]))

        rng = np.random.default_rng(self.seed)
        top_accuracy, random_accuracy = [], []
        for k in self.mask_top:
            top_accuracy.append(accuracy(ranking[:k]))
            others = ranking[k:]
            draws = []
            for _ in range(self.random_trials if len(others) >= k else 0):
                picks = rng.choice(len(others), size=k, replace=False)
                draws.append(accuracy([others[i] for i in picks]))
            random_accuracy.append(float(np.mean(draws)) if draws else None)
        return {
            "layers": layers,
            "rows": int(inputs.shape[0]),
            "rows_scored": scored,
            "rows_without_needle": no_needle,
            "retrieval_score": scores.tolist(),
            "retrieval_heads": [
                list(head) for head in ranking if scores[layers.index(head[0]), head[1]] > self.threshold
            ],
            "ranking": [list(head) for head in ranking],
            "accuracy": float(np.mean(predicted[weights] == targets[weights])),
            "masked": {"k": list(self.mask_top), "top_accuracy": top_accuracy, "random_accuracy": random_accuracy},
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        layer_head_heatmap(axes[0], result["retrieval_score"], "retrieval score", "score", vmin=0, vmax=1)
        axes[0].set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
        masked = result["masked"]
        axes[1].plot(masked["k"], masked["top_accuracy"], "o-", label="top-k retrieval heads masked")
        random = [np.nan if v is None else v for v in masked["random_accuracy"]]
        axes[1].plot(masked["k"], random, "s--", label="k random other heads masked")
        axes[1].axhline(result["accuracy"], color="k", lw=0.8, label="no mask")
        axes[1].set(xlabel="k heads masked", ylabel="answer-token accuracy", ylim=(-0.02, 1.02))
        axes[1].set_title("retrieval accuracy when heads are masked")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"retrieval_heads [37]: {result['rows_scored']} of {result['rows']} rows scored")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
