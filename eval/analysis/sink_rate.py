"""`python -m eval.analysis sink_rate`: the attention-sink metric and epsilon-threshold sink rate of [156].

"When Attention Sink Emerges in Language Models: An Empirical View" (Gu et al., ICLR 2025, arXiv 2410.10781) measures
the importance of token k to head h of layer l as the mean attention it receives from the queries that can see it,

    alpha_k^{l,h} = 1 / (T - k) * sum_{t = k}^{T - 1} A^{l,h}[t, k]            (0-based; k = 0, the first token)

and the sink rate as the fraction of heads over all layers whose alpha exceeds epsilon (0.3 in the paper),
averaged over the sample sequences: Sink_k^eps = mean_samples 1 / (L H) sum_{l,h} 1(alpha_k^{l,h} > eps).

Reported: `sink_metric` [L][H] (alpha, mean over rows), `head_rate` [L][H] (the fraction of rows where the head's
alpha > eps; 1 for a head that always sinks), `layer_rate` [L] and `sink_rate` (the paper's number). The paper's
training-time factors come from running this tool on several checkpoints of one run (`--step`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .evaluator import Evaluator, attention_maps, layer_head_heatmap, pyplot


def sink_metric(weights: np.ndarray, token: int = 0) -> np.ndarray:
    """alpha per row and head: weights [N, H, Tq, Tk] (causal self-attention) -> [N, H], the mean over the queries
    t >= token of the weight on key `token`."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3]:
        raise ValueError(f"weights must be self-attention [N, H, T, T]; got shape {weights.shape}")
    if not 0 <= token < weights.shape[2]:
        raise ValueError(f"token={token} must index a position of the {weights.shape[2]}-token sequences")
    return weights[:, :, token:, token].mean(axis=-1)


@dataclasses.dataclass(frozen=True)
class SinkRate(Evaluator):
    """Options: epsilon, the sink threshold (paper: 0.3); token, the key position measured (0: the first token)."""

    epsilon: float = 0.3
    token: int = 0

    name = "sink_rate"
    paper = "[156] When Attention Sink Emerges in Language Models: An Empirical View (arXiv 2410.10781)"
    fidelity = "official-code"
    reference = (
        "the paper's alpha_k^{l,h} and Sink_k^eps (section 3, eps = 0.3), checked against sail-sg/Attention-Sink "
        "eval_sink_open_source.py (compute_attention_sink: column sums of A divided by T - k, thresholded, mean "
        "over samples, layers and heads)"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"epsilon={self.epsilon!r} must be in [0, 1)")
        if not (isinstance(self.token, int) and self.token >= 0):
            raise ValueError(f"token={self.token!r} must be a non-negative int")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        maps = attention_maps(model, params, batches)
        alpha = np.stack([sink_metric(maps[layer], self.token) for layer in maps], axis=1)  # [N, L, H]
        sinks = alpha > self.epsilon
        return {
            "layers": list(maps),
            "rows": int(alpha.shape[0]),
            "sink_metric": alpha.mean(axis=0).tolist(),
            "head_rate": sinks.mean(axis=0).tolist(),
            "layer_rate": sinks.mean(axis=(0, 2)).tolist(),
            "sink_rate": float(sinks.mean()),
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        layer_head_heatmap(axes[0], result["sink_metric"], "mean attention on the sink token", "alpha", vmin=0, vmax=1)
        layer_head_heatmap(axes[1], result["head_rate"], f"fraction of rows with alpha > {self.epsilon}", "rate")
        fig.suptitle(f"sink_rate [156]: Sink^eps = {result['sink_rate']:.3f} (token {self.token})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
