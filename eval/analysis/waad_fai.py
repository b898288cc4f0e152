"""`python -m eval.analysis waad_fai`: windowed average attention distance and future attention influence per token,
with the preplan and anchor tokens they mark ([40]).

"Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization" (Li et
al., 2025, arXiv 2510.13554) splits heads into locally focused heads (attention near the diagonal) and globally
focused heads, and reads two per-token signals from them:

    WAAD_t = sum_{s <= t} A[t, s] * min(t - s, W)        (windowed average attention distance of query t, local heads)
    FAI_s  = 1 / (T - 1 - s) * sum_{t > s} A[t, s]        (future attention influence of key s, global heads)

averaged over the heads of each group. A peak of WAAD (a token reaching far back past its local chunk) marks a
preplan token; a high FAI (a token later tokens keep attending to) marks an anchor token; the paper finds anchors at
or right after preplan tokens (the rhythm its RL credit assignment uses; the RL part is not in this tool).

Head groups here: each head's mean attention distance (unclipped, ViT-style) over the batch; heads at or below the
median are local, the others global (`local_heads` overrides the split with [layer, head] pairs). Per row, preplan
tokens are the `top_fraction` of positions with the highest WAAD, anchor tokens those with the highest FAI (the last
position, which no later token sees, is left out of FAI). `coupling` is the fraction of anchor tokens that are a
preplan token or follow one directly.

Reported: `waad` / `fai` [L][H] (per-head means over rows and tokens), `local` (the local heads), `token_waad` /
`token_fai` [N][T] (per token, averaged over the local / global heads), `preplan` / `anchor` [N][...] (positions per
row), `coupling`.

Fidelity: reconstructed from the abstract's definitions (full text and code not read).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .attention_distance import distance_matrix
from .evaluator import Evaluator, attention_maps, layer_head_heatmap, pyplot


def _parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """'0:1,1:0' -> ((0, 1), (1, 0))."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        layer, _, head = part.partition(":")
        if not (layer.strip().isdigit() and head.strip().isdigit()):
            raise ValueError(f"local_heads={text!r}: {part!r} must be layer:head")
        pairs.append((int(layer), int(head)))
    return tuple(pairs)


def waad(weights: np.ndarray, window: int) -> np.ndarray:
    """WAAD per query: weights [..., T, T] (causal rows) -> [..., T], sum_s A[t, s] * min(t - s, window)."""
    length = weights.shape[-1]
    clipped = np.minimum(np.tril(distance_matrix(length)), window)
    return np.einsum("...ts,ts->...t", weights, clipped)


def fai(weights: np.ndarray) -> np.ndarray:
    """FAI per key: weights [..., T, T] -> [..., T], the mean over the later queries t > s of A[t, s]; 0 for the last
    key (no later query)."""
    length = weights.shape[-1]
    later = np.triu(np.ones((length, length)), k=1).T  # [t, s]: 1 where t > s
    counts = np.maximum(length - 1 - np.arange(length), 1)
    return np.einsum("...ts,ts->...s", weights, later) / counts


def top_positions(values: np.ndarray, fraction: float) -> list[int]:
    """Positions of the ceil(fraction * len) largest values, ascending."""
    count = max(1, math.ceil(fraction * len(values)))
    return sorted(np.argsort(-values, kind="stable")[:count].tolist())


@dataclasses.dataclass(frozen=True)
class WaadFai(Evaluator):
    """Options: window (W, the distance clip of WAAD); top_fraction (share of positions marked preplan / anchor per
    row); local_heads ("layer:head,..." to name the locally focused heads; default: the median split)."""

    window: int = 10
    top_fraction: float = 0.1
    local_heads: tuple[tuple[int, int], ...] | None = dataclasses.field(default=None, metadata={"parse": _parse_pairs})

    name = "waad_fai"
    paper = "[40] Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm (arXiv 2510.13554)"
    fidelity = "reconstructed"
    reference = (
        "WAAD (backward attention distance clipped at a window) and FAI (mean attention a token receives from later "
        "tokens) as the abstract defines them, in the clipped-distance / column-mean form; head split, peak picking "
        "and coupling reconstructed; the paper's full text and code were not read"
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window={self.window!r} must be a positive int")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction={self.top_fraction!r} must be in (0, 1]")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        maps = attention_maps(model, params, batches)
        layers = list(maps)
        weights = np.stack([maps[layer] for layer in layers], axis=1)  # [N, L, H, T, T]
        if weights.shape[-1] != weights.shape[-2] or weights.shape[-1] < 2:
            raise ValueError(f"waad_fai needs causal self-attention over >= 2 tokens; weights have {weights.shape}")
        num_heads = weights.shape[2]
        head_waad, head_fai = waad(weights, self.window), fai(weights)  # [N, L, H, T]
        distance = np.einsum("nlhts,ts->lh", weights, distance_matrix(weights.shape[-1])) / (
            weights.shape[0] * weights.shape[-1]
        )
        if self.local_heads is None:
            local = distance <= np.median(distance)
        else:
            local = np.zeros(distance.shape, bool)
            for layer, head in self.local_heads:
                if layer not in layers or not 0 <= head < num_heads:
                    raise ValueError(
                        f"local_heads holds ({layer}, {head}), out of range: layers {layers}, heads 0..{num_heads - 1}"
                    )
                local[layers.index(layer), head] = True
        if local.all() or not local.any():
            raise ValueError("waad_fai needs both local and global heads; the split put every head in one group")
        token_waad = head_waad[:, local].mean(axis=1)  # [N, T]
        token_fai = head_fai[:, ~local].mean(axis=1)
        preplan = [top_positions(row, self.top_fraction) for row in token_waad]
        anchor = [top_positions(row[:-1], self.top_fraction) for row in token_fai]
        coupled = [
            sum(a in p or a - 1 in p for a in anchors) for anchors, p in zip(anchor, map(set, preplan), strict=True)
        ]
        return {
            "layers": layers,
            "rows": int(weights.shape[0]),
            "distance": distance.tolist(),
            "waad": head_waad.mean(axis=(0, 3)).tolist(),
            "fai": head_fai[..., :-1].mean(axis=(0, 3)).tolist(),
            "local": [[layers[i], int(j)] for i, j in zip(*np.nonzero(local), strict=True)],
            "token_waad": token_waad.tolist(),
            "token_fai": token_fai.tolist(),
            "preplan": preplan,
            "anchor": anchor,
            "coupling": float(sum(coupled) / max(sum(len(a) for a in anchor), 1)),
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2, 2, 3]})
        layer_head_heatmap(axes[0], result["waad"], f"WAAD (W = {self.window})", "tokens")
        layer_head_heatmap(axes[1], result["fai"], "FAI", "attention")
        for axis in axes[:2]:
            axis.set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
            for layer, head in result["local"]:
                axis.add_patch(
                    plt.Rectangle(
                        (head - 0.42, result["layers"].index(layer) - 0.42), 0.84, 0.84, fill=False, ec="red", lw=2
                    )
                )
        row_waad, row_fai = np.asarray(result["token_waad"][0]), np.asarray(result["token_fai"][0])
        axes[2].plot(row_waad / max(row_waad.max(), 1e-12), label="WAAD (local heads, scaled)")
        axes[2].plot(row_fai / max(row_fai.max(), 1e-12), label="FAI (global heads, scaled)")
        axes[2].scatter(result["preplan"][0], row_waad[result["preplan"][0]] / max(row_waad.max(), 1e-12), marker="^")
        axes[2].scatter(result["anchor"][0], row_fai[result["anchor"][0]] / max(row_fai.max(), 1e-12), marker="o")
        axes[2].set(xlabel="token position (row 0)", title="preplan (^) and anchor (o) tokens")
        axes[2].legend(fontsize=7)
        fig.suptitle(f"waad_fai [40]: local heads outlined in red; coupling {result['coupling']:.2f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
