"""`python -m eval.analysis head_attribution`: which heads matter for arithmetic — patching, ablation and attention
to operands and operators ([78]).

"Interpreting and Improving Large Language Models in Arithmetic Calculation" (Zhang et al.; ICML 2024, arXiv
2409.01659) finds that a small fraction (< 5%) of heads carry arithmetic: patching a head's output from a
counterfactual prompt (other operands) into the clean run moves the answer's logit, these heads attend from the
last position to the operands and the operator, and ablating them breaks the calculation. Here, on prompts
"a op b =" whose target at "=" is the first token of the answer (and counterfactual prompts with other operands):

    LD            mean over rows of logit[clean answer] - logit[counterfactual answer] at "=" (rows whose two
                  answers differ)
    patching      (LD with the head's output from the counterfactual run - LD) / |LD|     (noising, per head)
    ablation      (LD with the head's output zeroed - LD) / |LD|                          (per head)
    attention     mean attention weight from "=" to the first operand, the operator and the second operand [L][H]
    accuracy      top-1 at "=" of the clean model, with the `top` heads of largest |patching| zeroed together, and
                  with as many heads of smallest |patching| zeroed (the control)

Prompts: generated (`operator`, `digits`: operands of exactly that many digits, a >= b for "-", `rows`, `seed`,
`encoding` "bytes" (ASCII digits and signs: a byte-level model) or "compact" (digits 0-9 are ids 0-9, "+", "-",
"*", "=" are 10-13)) unless the batches already hold "corrupted" — then they are used as given: "inputs" and
"corrupted" int [B, T], "targets"/"corrupted_targets" int [B, T], "weights" [B, T] (1 at the answer position) and
"roles" int [B, T] (1 first operand, 2 operator, 3 second operand, 0 other). A workdir's validation text is not
arithmetic, so `python -m eval.analysis head_attribution --workdir W` always generates its prompts.

Reported: `clean` (LD), `patching`, `ablation`, `attention_to` {operand_1, operator, operand_2} [L][H], `ranking`
(heads by |patching|), `key_heads` (|patching| >= threshold), `accuracy` {clean, top_ablated, bottom_ablated}.

Fidelity: reconstructed (the paper's head identification and its attention observation as its abstract and
summaries describe them; one-step activation patching of each head, not the paper's path patching; its fine-tuning
of the identified heads is not part of this tool).
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
    captured,
    forward,
    is_task,
    layer_head_heatmap,
    layer_of,
    pyplot,
)
from .head_patching import patched_logit_difference
from .icl_layer import check_positive

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
ENCODINGS = ("bytes", "compact")
ROLES = ("operand_1", "operator", "operand_2")


def encode(text: str, encoding: str) -> list[int]:
    """Token ids of an arithmetic string: ASCII bytes, or compact ids (digits 0-9, then "+", "-", "*", "=")."""
    if encoding == "bytes":
        return list(text.encode("ascii"))
    return [int(c) if c.isdigit() else 10 + "+-*=".index(c) for c in text]


def arithmetic_batch(rows: int, operator: str, digits: int, encoding: str, seed: int) -> dict[str, np.ndarray]:
    """Prompts "a op b =" [rows, 2 digits + 2] with counterfactual operands: inputs, corrupted, targets,
    corrupted_targets (the answers' first tokens at "="), weights (1 at "=" where the two answers' first tokens
    differ) and roles (1, 2, 3 on the first operand, the operator, the second operand)."""
    rng = np.random.default_rng(seed)
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits

    def operands() -> tuple[np.ndarray, np.ndarray]:
        a, b = rng.integers(low, high, rows), rng.integers(low, high, rows)
        return (np.maximum(a, b), np.minimum(a, b)) if operator == "-" else (a, b)

    def prompts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.array([encode(f"{x}{operator}{y}=", encoding) for x, y in zip(a, b, strict=True)])
        first = np.array(
            [encode(str(OPERATORS[operator](int(x), int(y)))[0], encoding)[0] for x, y in zip(a, b, strict=True)]
        )
        targets = np.zeros(tokens.shape, np.int32)
        targets[:, -1] = first
        return tokens.astype(np.int32), targets

    clean, targets = prompts(*operands())
    corrupted, corrupted_targets = prompts(*operands())
    weights = np.zeros(clean.shape, np.float32)
    weights[:, -1] = targets[:, -1] != corrupted_targets[:, -1]
    roles = np.zeros(clean.shape, np.int32)
    roles[:, :digits], roles[:, digits], roles[:, digits + 1 : 2 * digits + 1] = 1, 2, 3
    return {
        "inputs": clean,
        "corrupted": corrupted,
        "targets": targets,
        "corrupted_targets": corrupted_targets,
        "weights": weights,
        "roles": roles,
    }


@dataclasses.dataclass(frozen=True)
class HeadAttribution(Evaluator):
    """Options: operator ("+", "-", "*"), digits, rows, seed, encoding ("bytes", "compact") of the generated prompts;
    threshold (|patching| of a key head); top (heads ablated together for the accuracy check)."""

    operator: str = "+"
    digits: int = 2
    rows: int = 64
    seed: int = 0
    encoding: str = "bytes"
    threshold: float = 0.1
    top: int = 1

    name = "head_attribution"
    paper = "[78] Interpreting and Improving Large Language Models in Arithmetic Calculation (arXiv 2409.01659)"
    fidelity = "reconstructed"
    reference = (
        "the paper's identification of arithmetic heads (patching from counterfactual operands, attention to "
        "operands and operators, ablation) as its abstract and summaries describe it; full text and code not read; "
        "one-step activation patching per head, not path patching"
    )

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"operator={self.operator!r} must be one of {tuple(OPERATORS)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r} must be one of {ENCODINGS}")
        for name in ("digits", "rows", "top"):
            check_positive(name, getattr(self, name))
        check_positive("threshold", self.threshold, float)

    def prompts(self) -> dict[str, np.ndarray]:
        """The generated arithmetic batch of these options (see arithmetic_batch)."""
        return arithmetic_batch(self.rows, self.operator, self.digits, self.encoding, self.seed)

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model) and model.kind != "decoder":
            raise ValueError(f"head_attribution reads decoder language models; the run holds a {model.kind!r} model")
        given = all("corrupted" in batch for batch in batches)
        batch = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]} if given else None
        batch = batch if given else self.prompts()
        for key in ("targets", "corrupted_targets", "weights", "roles"):
            if key not in batch:
                raise ValueError(f"batches with 'corrupted' also need {key!r} (see the module docstring)")
        weights = np.asarray(batch["weights"], np.float32)
        if not weights.any():
            raise ValueError("no row has an answer position with different clean and counterfactual answers")
        clean = {key: batch[key] for key in ("inputs", "targets", "weights")}
        corrupted = {"inputs": batch["corrupted"], "targets": batch["corrupted_targets"], "weights": weights}
        heads_of = jax.jit(lambda p, b: captured(model, p, b, "head_outputs"))
        clean_heads, corrupt_heads = heads_of(params, clean), heads_of(params, corrupted)
        layers = sorted(clean_heads)
        vocab = int(jax.eval_shape(lambda p: forward(model, p, clean), params).shape[-1])
        largest = int(max(np.max(batch["targets"]), np.max(batch["corrupted_targets"])))
        if largest >= vocab:
            raise ValueError(
                f"the prompts' answer token {largest} is out of range for the model's vocabulary of {vocab} "
                f"(encoding={self.encoding!r}: 'compact' needs >= 14 tokens, 'bytes' >= 62)"
            )
        num_heads = clean_heads[layers[0]].shape[2]
        zeros = {layer: np.zeros_like(value) for layer, value in clean_heads.items()}
        ld = patched_logit_difference(model, layers)
        labels = (batch["targets"], batch["corrupted_targets"], weights)
        none = np.zeros((len(layers), num_heads), np.float32)
        base = float(ld(params, clean, clean_heads, none, *labels))
        if abs(base) < 1e-9:
            raise ValueError("the clean logit difference is 0: the model does not tell the two answers apart")
        patching, ablation = np.zeros(none.shape), np.zeros(none.shape)
        for i, j in np.ndindex(none.shape):
            mask = none.copy()
            mask[i, j] = 1.0
            patching[i, j] = (float(ld(params, clean, corrupt_heads, mask, *labels)) - base) / abs(base)
            ablation[i, j] = (float(ld(params, clean, zeros, mask, *labels)) - base) / abs(base)
        order = np.argsort(-np.abs(patching), axis=None, kind="stable")
        ranking = [[layers[int(k) // num_heads], int(k) % num_heads] for k in order]
        top = min(self.top, len(ranking))
        logits = masked_logits(model, layers)
        scored = weights > 0

        def accuracy(mask: np.ndarray) -> float:  # top-1 at the scored positions with the masked heads zeroed
            predicted = np.asarray(logits(params, clean, zeros, mask)).argmax(axis=-1)
            return float((predicted == np.asarray(batch["targets"]))[scored].mean())

        accuracy = {
            "clean": accuracy(none),
            "top_ablated": accuracy(_mask(order[:top], none)),
            "bottom_ablated": accuracy(_mask(order[::-1][:top], none)),
        }
        return {
            "layers": layers,
            "prompts": "given" if given else "generated",
            "rows": int(weights.shape[0]),
            "scored_rows": int((weights > 0).any(axis=1).sum()),
            "clean": base,
            "patching": patching.tolist(),
            "ablation": ablation.tolist(),
            "attention_to": self._attention(model, params, clean, batch["roles"], weights, layers),
            "ranking": ranking,
            "key_heads": [
                head for head, k in zip(ranking, order, strict=True) if abs(patching.flat[k]) >= self.threshold
            ],
            "accuracy": accuracy,
        }

    @staticmethod
    def _attention(model: Any, params: Any, clean: dict, roles: np.ndarray, weights: np.ndarray, layers: list) -> dict:
        """{role: [L][H]} mean attention weight from the scored positions to the keys of each role."""
        maps = attention_maps(model, params, [clean])  # {layer: [B, H, T, T]}
        rows, queries = np.nonzero(weights > 0)
        out = {}
        for index, role in enumerate(ROLES, start=1):
            keys = (np.asarray(roles)[rows] == index).astype(np.float64)  # [Q, T]
            out[role] = [
                (np.einsum("qht,qt->qh", maps[layer][rows, :, queries, :], keys).mean(axis=0)).tolist()
                for layer in layers
            ]
        return out

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 5, figsize=(26, 4.5))
        for axis, key in zip(axes[:2], ("patching", "ablation"), strict=True):
            values = np.asarray(result[key])
            bound = max(float(np.abs(values).max()), 1e-12)
            layer_head_heatmap(
                axis,
                values,
                f"{key}: relative change of LD",
                "(LD' - LD) / |LD|",
                cmap="RdBu_r",
                vmin=-bound,
                vmax=bound,
            )
        for axis, role in zip(axes[2:], ROLES, strict=True):
            layer_head_heatmap(
                axis, result["attention_to"][role], f"attention from '=' to {role}", "weight", vmin=0, vmax=1
            )
        for axis in axes:
            axis.set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
        accuracy = result["accuracy"]
        fig.suptitle(
            f"head_attribution [78]: accuracy {accuracy['clean']:.2f}, top-{self.top} heads ablated "
            f"{accuracy['top_ablated']:.2f}, bottom-{self.top} ablated {accuracy['bottom_ablated']:.2f}; "
            f"key heads {result['key_heads'][:6]}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _mask(indices: Sequence[int], none: np.ndarray) -> np.ndarray:
    mask = none.copy()
    mask.flat[np.asarray(indices, int)] = 1.0
    return mask


def masked_logits(model: Any, layers: Sequence[int]) -> Any:
    """A jitted (params, batch, sources {layer: head outputs [B, T, H, Dv]}, mask float [L, H]) -> logits [B, T, V]
    of the model on `batch` with each masked head's output replaced by the source's."""
    rows = {layer: i for i, layer in enumerate(layers)}

    @jax.jit
    def run(params: Any, batch: Mapping[str, Any], sources: Mapping[int, Any], mask: jax.Array) -> jax.Array:
        def replace(value: jax.Array, path: str) -> jax.Array:
            layer = layer_of(path)
            if layer not in rows:
                return value
            where = mask[rows[layer]][None, None, :, None] > 0
            return jnp.where(where, sources[layer].astype(value.dtype), value)

        with attn.intervene(hook("head_outputs", replace, module="*/attention")):
            return forward(model, params, batch)

    return run
