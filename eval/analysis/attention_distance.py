"""`python -m eval.analysis attention_distance`: mean attention distance per head against depth ([197], ViT).

Dosovitskiy et al. ("An Image is Worth 16x16 Words", section 4.5 and appendix D.7) compute, per head, the distance in
image space over which information is integrated: for each query patch the sum over key patches of the attention
weight times the distance between the two patches, averaged over queries and images,

    d^{l,h} = mean_{rows, queries i} sum_j A^{l,h}[i, j] * dist(i, j)

with dist the Euclidean distance between patch positions on the (h, w) grid times the patch size in pixels ("attention
distance", the analogue of a CNN's receptive field). [197] ("How Does Attention Work in Vision Transformers? A
Visual Analytics Attempt") profiles the same attention strength against spatial distance per head and layer. For a
token sequence (no grid) dist(i, j) = |i - j| in tokens. Leading non-patch tokens (a class token) are left out with
`prefix_tokens`: their rows and columns are dropped and each remaining row renormalised over the patch keys.

Reported: `distance` [L][H] (mean over rows and queries), `layer_mean` [L], `layer_min` / `layer_max` [L] (the spread
over heads that the ViT figure plots against depth). Heads clustering ([197]'s autoencoder) is not part of this tool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .evaluator import Evaluator, attention_maps, pyplot


def distance_matrix(length: int, grid: tuple[int, int] | None = None, patch_size: float = 1.0) -> np.ndarray:
    """dist(i, j) float64 [length, length]: |i - j| * patch_size for a sequence, or the Euclidean distance between
    (i // w, i % w) and (j // w, j % w) times patch_size for a row-major (h, w) grid with h * w == length."""
    index = np.arange(length)
    if grid is None:
        return np.abs(index[:, None] - index[None, :]).astype(np.float64) * patch_size
    if len(grid) != 2 or grid[0] * grid[1] != length:
        raise ValueError(f"grid={tuple(grid)} must be (h, w) with h * w == {length} patch tokens")
    rows, cols = index // grid[1], index % grid[1]
    return np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]) * patch_size


def mean_distance(
    weights: np.ndarray, grid: tuple[int, int] | None = None, patch_size: float = 1.0, prefix_tokens: int = 0
) -> np.ndarray:
    """Mean attention distance per head: weights [N, H, T, T] -> [H] (see the module docstring)."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3]:
        raise ValueError(f"weights must be self-attention [N, H, T, T]; got shape {weights.shape}")
    if not 0 <= prefix_tokens < weights.shape[2]:
        raise ValueError(f"prefix_tokens={prefix_tokens} must leave patch tokens of the {weights.shape[2]} tokens")
    weights = weights[:, :, prefix_tokens:, prefix_tokens:]
    if prefix_tokens:
        weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
    dist = distance_matrix(weights.shape[-1], grid, patch_size)
    return np.einsum("nhij,ij->nhi", weights, dist).mean(axis=(0, 2))


def parse_grid(text: str) -> tuple[int, int]:
    """'14x14' -> (14, 14) (the command line's --grid)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"grid={text!r} must be HxW with positive ints, e.g. 14x14")
    return int(parts[0]), int(parts[1])


@dataclasses.dataclass(frozen=True)
class AttentionDistance(Evaluator):
    """Options: grid (h, w) of patch tokens (None: a token sequence), patch_size (pixels per patch side, 1 for
    distances in patches or tokens), prefix_tokens (leading non-patch tokens, e.g. 1 for a class token)."""

    grid: tuple[int, int] | None = dataclasses.field(default=None, metadata={"parse": parse_grid})
    patch_size: float = 1.0
    prefix_tokens: int = 0

    name = "attention_distance"
    paper = "[197] How Does Attention Work in Vision Transformers? A Visual Analytics Attempt; ViT (arXiv 2010.11929)"
    fidelity = "paper"
    reference = (
        "ViT's mean attention distance (Dosovitskiy et al., section 4.5 / appendix D.7: attention-weighted pixel "
        "distance averaged over queries and images); [197]'s attention-strength-vs-distance profile per head"
    )

    def __post_init__(self) -> None:
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid={self.grid!r} must be None or (h, w) of positive ints")
        if not self.patch_size > 0:
            raise ValueError(f"patch_size={self.patch_size!r} must be > 0")
        if not (isinstance(self.prefix_tokens, int) and self.prefix_tokens >= 0):
            raise ValueError(f"prefix_tokens={self.prefix_tokens!r} must be a non-negative int")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        maps = attention_maps(model, params, batches)
        grid = None if self.grid is None else tuple(self.grid)
        distance = np.stack([mean_distance(maps[layer], grid, self.patch_size, self.prefix_tokens) for layer in maps])
        return {
            "layers": list(maps),
            "unit": "pixels" if grid is not None and self.patch_size != 1.0 else ("patches" if grid else "tokens"),
            "distance": distance.tolist(),
            "layer_mean": distance.mean(axis=1).tolist(),
            "layer_min": distance.min(axis=1).tolist(),
            "layer_max": distance.max(axis=1).tolist(),
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axis = plt.subplots(figsize=(6, 4.5))
        distance = np.asarray(result["distance"])
        for head in range(distance.shape[1]):
            axis.scatter(result["layers"], distance[:, head], s=18, label=f"head {head}" if head < 12 else None)
        axis.plot(result["layers"], result["layer_mean"], "k--", lw=1, label="mean over heads")
        axis.set(xlabel="layer (depth)", ylabel=f"mean attention distance ({result['unit']})")
        axis.set_title("attention_distance [197]: per head against depth")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
