"""`python -m eval.analysis arank`: ARank, the rank of attention maps per layer ([13], gamma-MoD).

"gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models" (Luo et al., arXiv
2410.13859) scores a layer's redundancy by the rank of its attention maps, averaged over heads and samples; layers
with low ARank are the ones converted to mixture-of-depth (token-skipping) layers. The rank of a map A [Tq, Tk] is
its numerical rank: the number of singular values above rtol * sigma_max, with rtol defaulting to numpy's
matrix_rank rule max(Tq, Tk) * float32 epsilon (the weights are computed in float32).

Reported: `rank` [L][H] (mean over rows), `arank` [L] (mean over heads and rows), `normalised` [L] (arank / min(Tq,
Tk)), and `skip_order` (layers from lowest to highest ARank: the paper's candidates for skipping first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .evaluator import Evaluator, attention_maps, layer_head_heatmap, pyplot

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def map_ranks(weights: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """Numerical rank of each map: weights [..., Tq, Tk] -> int [...], singular values > rtol * the largest
    (rtol None: max(Tq, Tk) * float32 epsilon)."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim < 2:
        raise ValueError(f"weights must be [..., Tq, Tk]; got shape {weights.shape}")
    rtol = max(weights.shape[-2:]) * FLOAT32_EPS if rtol is None else rtol
    singular = np.linalg.svd(weights, compute_uv=False)
    return (singular > rtol * singular[..., :1]).sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class ARank(Evaluator):
    """Options: rtol, the singular-value threshold relative to the largest (None: max(Tq, Tk) * float32 eps)."""

    rtol: float | None = None

    name = "arank"
    paper = "[13] gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models (2410.13859)"
    fidelity = "reconstructed"
    reference = (
        "the paper's ARank (rank of the attention maps of a layer averaged over heads and samples); the official "
        "code (Yaxin9Luo/Gamma-MOD) was not available to read, so the numerical-rank tolerance is numpy's rule"
    )

    def __post_init__(self) -> None:
        if self.rtol is not None and not 0.0 < self.rtol < 1.0:
            raise ValueError(f"rtol={self.rtol!r} must be None or in (0, 1)")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        maps = attention_maps(model, params, batches)
        rank = np.stack([map_ranks(maps[layer], self.rtol).mean(axis=0) for layer in maps])  # [L, H]
        arank = rank.mean(axis=1)
        full = min(next(iter(maps.values())).shape[-2:])
        return {
            "layers": list(maps),
            "full_rank": int(full),
            "rank": rank.tolist(),
            "arank": arank.tolist(),
            "normalised": (arank / full).tolist(),
            "skip_order": [list(maps)[i] for i in np.argsort(arank, kind="stable")],
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        layer_head_heatmap(
            axes[0], result["rank"], "rank of the attention map", "rank", vmin=0, vmax=result["full_rank"]
        )
        axes[1].bar(result["layers"], result["arank"])
        axes[1].axhline(result["full_rank"], color="k", ls="--", lw=0.8, label="full rank")
        axes[1].set(xlabel="layer", ylabel="ARank (mean over heads and rows)", title="ARank per layer")
        axes[1].legend(fontsize=7)
        fig.suptitle("arank [13]")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
