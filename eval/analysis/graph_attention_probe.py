"""`python -m eval.analysis graph_attention_probe`: attention between the nodes of a serialised graph against its
adjacency and graph distance ([23]).

"Attention Mechanisms Perspective: Exploring LLM Processing of Graph-Structured Data" (catalog [23]) feeds graphs
to language models as text and finds that attention captures text-node interactions but does not follow the graph:
the attention distribution over nodes does not line up with the structure. This tool measures that alignment. A
batch holds "inputs" int [B, T], "node_ids" int [B, T] (the node a token belongs to, -1 for other tokens) and
"adjacency" bool [B, N, N] (N nodes, symmetric or not). Per layer and head,

    A[u, v]            mean over the query tokens of node u of the attention weight on the key tokens of node v
    neighbour_share    sum_{(u, v) edges} A[u, v] / sum_{u != v} A[u, v]: the inter-node attention on neighbours
    uniform_share      the same for uniform attention over the allowed keys (causal: the earlier tokens), the
                       no-structure baseline (a share above it means the head prefers neighbours)
    distance_rho       Spearman correlation of A[u, v] with the shortest-path distance d(u, v) over the node pairs
                       that attend (u != v, A defined): negative = nearer nodes get more attention

averaged over rows (rows without inter-node attention are skipped).

Without "node_ids" in the batches (e.g. `--workdir` on a text run) the tool generates serialised random graphs for a
byte-level model: `graphs` rows of `nodes` nodes with edge probability `edge_prob`, written as the edge list
"a-b,c-d,...;" with one letter per node (node u is the letter chr(97 + u)); every letter token belongs to its node.

Fidelity: reconstructed (the paper's question and findings from its abstract and summaries; the serialisation,
the shares and the distance correlation are this tool's; official code github.com/millioniron/LLM_exploration
not read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .evaluator import Evaluator, attention_maps, layer_head_heatmap, pyplot
from .icl_layer import check_positive
from .stiffness import spearman


def shortest_paths(adjacency: np.ndarray) -> np.ndarray:
    """Hop distances [N, N] (inf where unreachable) of a bool adjacency [N, N], by breadth-first search."""
    adjacency = np.asarray(adjacency, bool)
    count = adjacency.shape[0]
    distance = np.full((count, count), np.inf)
    for source in range(count):
        distance[source, source], frontier, hops = 0, [source], 0
        while frontier:
            hops += 1
            reached = [v for u in frontier for v in np.nonzero(adjacency[u])[0] if np.isinf(distance[source, v])]
            for v in set(reached):
                distance[source, v] = hops
            frontier = sorted(set(reached))
    return distance


def node_attention(weights: np.ndarray, node_ids: np.ndarray, count: int) -> np.ndarray:
    """A [H, N, N] (nan where node u has no query token): weights [H, T, T] of one row, node_ids int [T] (-1: none)."""
    node_ids = np.asarray(node_ids)
    out = np.full((weights.shape[0], count, count), np.nan)
    for u in range(count):
        queries = node_ids == u
        if not queries.any():
            continue
        mass = weights[:, queries][:, :, None, :] * (node_ids[None, :] == np.arange(count)[:, None])[None, None]
        out[:, u] = mass.sum(axis=-1).mean(axis=1)  # [H, N]
    return out


def neighbour_share(attention: np.ndarray, adjacency: np.ndarray) -> np.ndarray:
    """Share [H] of the inter-node attention (u != v) of A [H, N, N] that lands on edges (nan without any)."""
    a = np.nan_to_num(attention) * (1 - np.eye(attention.shape[-1]))
    total = a.sum(axis=(1, 2))
    on_edges = (a * np.asarray(adjacency, bool)).sum(axis=(1, 2))
    return np.where(total > 0, on_edges / np.where(total > 0, total, 1.0), np.nan)


def serialised_graphs(rows: int, nodes: int, edge_prob: float, seed: int) -> dict[str, np.ndarray]:
    """Random graphs as byte-level edge lists "a-b,c-d;" padded with ";" to one length: inputs int32 [rows, T],
    node_ids int32 [rows, T], adjacency bool [rows, nodes, nodes] (symmetric, at least one edge per graph)."""
    rng = np.random.default_rng(seed)
    texts, adjacency = [], np.zeros((rows, nodes, nodes), bool)
    for r in range(rows):
        upper = np.triu(rng.random((nodes, nodes)) < edge_prob, k=1)
        if not upper.any():
            upper[0, 1] = True
        adjacency[r] = upper | upper.T
        texts.append(",".join(f"{chr(97 + u)}-{chr(97 + v)}" for u, v in zip(*np.nonzero(upper), strict=True)) + ";")
    length = max(len(t) for t in texts)
    inputs = np.array([list(t.ljust(length, ";").encode("ascii")) for t in texts], np.int32)
    node_ids = np.where((inputs >= 97) & (inputs < 97 + nodes), inputs - 97, -1).astype(np.int32)
    return {"inputs": inputs, "node_ids": node_ids, "adjacency": adjacency}


@dataclasses.dataclass(frozen=True)
class GraphAttentionProbe(Evaluator):
    """Options of the generated graphs (used when the batches hold no "node_ids"): graphs, nodes, edge_prob, seed."""

    graphs: int = 16
    nodes: int = 6
    edge_prob: float = 0.4
    seed: int = 0

    name = "graph_attention_probe"
    paper = "[23] Attention Mechanisms Perspective: Exploring LLM Processing of Graph-Structured Data"
    fidelity = "reconstructed"
    reference = (
        "the paper's question (does attention over serialised graphs follow the structure) from its abstract and "
        "summaries; node attention, neighbour share against the uniform baseline and the distance correlation are "
        "this tool's measures; official code not read"
    )

    def __post_init__(self) -> None:
        check_positive("graphs", self.graphs)
        if not (isinstance(self.nodes, int) and 2 <= self.nodes <= 26):
            raise ValueError(f"nodes={self.nodes!r} must be an int in [2, 26] (one letter per node)")
        if not 0 < self.edge_prob <= 1:
            raise ValueError(f"edge_prob={self.edge_prob!r} must lie in (0, 1]")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        given = all("node_ids" in batch and "adjacency" in batch for batch in batches)
        if not given:
            batches = [serialised_graphs(self.graphs, self.nodes, self.edge_prob, self.seed)]
        maps = attention_maps(model, params, [{"inputs": b["inputs"]} for b in batches])  # {layer: [R, H, T, T]}
        layers = sorted(maps)
        node_ids = np.concatenate([np.asarray(b["node_ids"]) for b in batches])
        adjacency = [np.asarray(a, bool) for b in batches for a in b["adjacency"]]
        length = node_ids.shape[1]
        uniform = np.tril(np.ones((length, length))) / np.arange(1, length + 1)[:, None]  # causal, uniform
        share, baseline, rho = [], [], []
        for layer in layers:
            per_row, base_row, rho_row = [], [], []
            for r, adj in enumerate(adjacency):
                count = adj.shape[0]
                a = node_attention(maps[layer][r], node_ids[r], count)
                per_row.append(neighbour_share(a, adj))
                base_row.append(neighbour_share(node_attention(uniform[None], node_ids[r], count), adj)[0])
                distance = shortest_paths(adj)
                pairs = ~np.eye(count, dtype=bool) & np.isfinite(distance)
                rho_row.append([spearman(a[h][pairs], distance[pairs]) for h in range(a.shape[0])])
            share.append(_nanmean_rows(per_row))
            baseline.append(float(np.nanmean(base_row)))
            rho.append(_nanmean_rows(rho_row))
        return {
            "layers": layers,
            "graphs": "given" if given else "generated",
            "rows": len(adjacency),
            "neighbour_share": share,
            "uniform_share": baseline,
            "distance_rho": rho,
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        share = np.array([[np.nan if v is None else v for v in row] for row in result["neighbour_share"]])
        lift = share / np.asarray(result["uniform_share"])[:, None]
        layer_head_heatmap(
            axes[0],
            lift,
            "neighbour share / uniform share",
            "lift (1 = no structure)",
            cmap="RdBu_r",
            vmin=0,
            vmax=max(2.0, float(np.nanmax(lift)) if np.isfinite(lift).any() else 2.0),
        )
        rho = np.array([[np.nan if v is None else v for v in row] for row in result["distance_rho"]])
        layer_head_heatmap(axes[1], rho, "Spearman(attention, graph distance)", "rho", cmap="RdBu_r", vmin=-1, vmax=1)
        for axis in axes:
            axis.set(yticks=range(len(result["layers"])), yticklabels=result["layers"])
        fig.suptitle(f"graph_attention_probe [23]: {result['rows']} {result['graphs']} graphs")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _nanmean_rows(rows: Sequence[Sequence[float]]) -> list[float | None]:
    """Column means ignoring nan; None (JSON null) for a column without values."""
    values = np.asarray(rows, np.float64)
    finite = np.isfinite(values)
    sums, counts = np.where(finite, values, 0.0).sum(axis=0), finite.sum(axis=0)
    return [float(s / c) if c else None for s, c in zip(sums, counts, strict=True)]
