"""G-Search and P-Sigmoid [169] ("Accelerating Multimodal Large Language Models by Searching Optimal Vision Token
Reduction", Zhao et al. 2024): a non-increasing number of image tokens kept per decoder layer, ranked in each layer
by the attention the text pays them.

Pruning, with r_0 >= r_1 >= ... >= r_{L-1} in (0, 1] the per-layer keep ratios and A^l [B, H, S, S] layer l's
attention (given the pruning of the layers before it):

    s^l_j = mean over heads h and text queries i of A^l[h, i, start + j]          j = 0..n-1 (the image span)
    K_{-1} = all n image tokens
    K_l    = the k_l = max(1, ceil(r_l n)) tokens of K_{l-1} with the largest s^l (ties: lower position)
    layer l attends over the text and K_l only (logit -inf on the other image keys, every query)

so a token dropped in layer l stays dropped in every later layer (K_l is a subset of K_{l-1}).

G-Search (the paper's scenario I, fewest tokens at no loss): from the shallowest layer to the deepest, give layer l
(and every deeper layer) the smallest candidate ratio <= r_{l-1} whose score on a calibration set stays within
`tolerance` of the unpruned score; `g_search` below. P-Sigmoid (scenario II, best schedule for a budget): the
schedule r_l = sigmoid(-steepness (l - c)), with c set so that the mean over layers equals the budget; the paper
tunes the curve's parameters by Bayesian optimisation, `p_sigmoid` takes the steepness and solves for c (a sweep
over steepness on a calibration set stands in for the optimiser).

No-op: every r_l = 1 (no rules; bit-identical logits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn.steer import visual_tokens as vt
from attn.steer.registry import register


def prune_layer(weights: jax.Array, span: tuple[int, int], previous: jax.Array, count: int) -> jax.Array:
    """K_l: the `count` tokens of previous (bool [B, n]) with the largest text-to-image attention in weights
    [B, H, S, S] -> bool [B, n]."""
    scores = jnp.where(previous, vt.text_to_image(weights, span), -jnp.inf)
    return vt.index_mask(vt.top_indices(scores, count), previous.shape[-1])


def p_sigmoid(num_layers: int, budget: float, steepness: float = 1.0) -> tuple[float, ...]:
    """P-Sigmoid keep ratios (r_0, ..., r_{L-1}), r_l = sigmoid(-steepness (l - c)), non-increasing, with c solved
    by bisection so that their mean is `budget` in (0, 1] (budget 1: all ones)."""
    budget = vt.check_ratio("budget", budget)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be a positive int")
    if not steepness > 0:
        raise ValueError(f"steepness={steepness!r} must be > 0")
    if budget == 1.0:
        return (1.0,) * num_layers

    def curve(center: float) -> list[float]:
        return [1.0 / (1.0 + math.exp(min(700.0, steepness * (layer - center)))) for layer in range(num_layers)]

    low, high = -1e3, 1e3
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if sum(curve(middle)) / num_layers < budget else (low, middle)
    return tuple(curve(0.5 * (low + high)))


def g_search(
    score: Callable[[tuple[float, ...]], float],
    num_layers: int,
    candidates: Sequence[float] = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625),
    tolerance: float = 0.0,
) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
    """G-Search: the per-layer ratios (non-increasing) found greedily from the shallowest layer, and the trials
    [{"ratios", "score"}]. score(ratios) is the calibration score of a schedule (higher is better)."""
    values = sorted({vt.check_ratio("candidates", c) for c in candidates}, reverse=True)
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0")
    ratios = [1.0] * num_layers
    base = score(tuple(ratios))
    trials = [{"ratios": list(ratios), "score": base}]
    for layer in range(num_layers):
        for value in (v for v in values if v < ratios[layer]):
            trial = ratios[:layer] + [value] * (num_layers - layer)
            result = score(tuple(trial))
            trials.append({"ratios": trial, "score": result})
            if result < base - tolerance:
                break
            ratios = trial
    return tuple(ratios), trials


@register(
    "g_search",
    paper="[169] Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction "
    "(G-Search / P-Sigmoid, Zhao et al. 2024)",
    fidelity="reconstructed",
    reference=(
        "arXiv 2412.00556 (abstract and overview: per-layer vision-token keep counts, non-increasing with depth, "
        "tokens ranked by attention in each layer; G-Search greedy from shallow to deep; P-Sigmoid schedule with "
        "Bayesian-optimised parameters); no official code was found. Reconstructed: the ranking (mean attention from "
        "the text queries), the nesting of the kept sets, the sigmoid's form and its budget-matching centre, and a "
        "steepness sweep instead of Bayesian optimisation"
    ),
    no_op="ratios all 1 (bit-identical logits)",
)
@dataclasses.dataclass(frozen=True)
class GSearch:
    """ratios: per decoder layer, the share of the image tokens kept (non-increasing, each in (0, 1]; one per
    layer); span: (start, stop) of the image tokens in the decoder's sequence (None: the prefix)."""

    ratios: Sequence[float]
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        values = [vt.check_ratio("ratios", r) for r in self.ratios]
        if not values or any(b > a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"ratios={list(self.ratios)} must be a non-empty, non-increasing sequence")

    def check(self, model: Any) -> None:
        """ValueError naming `model` for a model this system cannot reduce, or `ratios` of the wrong length."""
        vt.check_prefix_vlm(model)
        vt.check_weights(model, "g_search", vision=False)
        if len(self.ratios) != model.num_layers:
            raise ValueError(f"ratios has {len(self.ratios)} entries; the decoder has {model.num_layers} layers")

    def reduce(self, model: Any, params: Any, images: jax.Array, tokens: jax.Array) -> vt.Reduction:
        """The Reduction for images [B, H, W, C] and text tokens [B, T]: nested per-layer key masks [L, B, n]."""
        self.check(model)
        prefix = vt.image_tokens(model, params, images)
        span = vt.check_span(
            (0, prefix.shape[1]) if self.span is None else self.span, prefix.shape[1] + tokens.shape[1]
        )
        if all(r == 1.0 for r in self.ratios):
            return vt.unreduced(prefix, model.num_layers)
        n = span[1] - span[0]

        def select(layer: int, weights: jax.Array, previous: jax.Array) -> jax.Array:
            return prune_layer(weights, span, previous, vt.keep_count(float(self.ratios[layer]), n))

        masks = vt.layerwise_masks(model, params, prefix, tokens, span, select)
        return vt.Reduction(prefix, jnp.mean(masks, axis=-1).T.astype(jnp.float32), masks, span[0])
