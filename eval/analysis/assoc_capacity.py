"""`python -m eval.analysis assoc_capacity --output O`: stored associations against the capacity bounds of attention
read as Pavlovian conditioning ([51]).

"Understanding Transformers through the Lens of Pavlovian Conditioning" (Qiao; arXiv 2508.08289) reads linear
attention as a transient Hebbian memory: conditional stimuli (keys k_i) and unconditional stimuli (values v_i) are
stored as M = sum_i v_i k_i^T, a test stimulus (query q) retrieves M q. A stored key retrieves its value plus
crosstalk,

    M k_j = v_j + sum_{i != j} (k_i . k_j) v_i,

and the paper's capacity theorem bounds how many associations a head of key width d_k holds: error-free retrieval of
every association for O(sqrt(d_k)) of them (the worst-case crosstalk of random keys), average-case fidelity for
O(d_k) (the crosstalk variance (N - 1) / d_k for unit random keys, so the expected cosine of M k_j with v_j is about
1 / sqrt(1 + (N - 1) / d_k)).

This tool measures it: for each key width in `dims` and each count N (a log grid up to 4 max(dims)), `trials`
memories of N unit random keys and unit random values (d_v = d_k), retrieved by every stored key, with

    accuracy      the retrieved vector's nearest stored value (cosine) is its own
    error_free    fraction of memories where every retrieval is accurate
    fidelity      mean cosine(M k_j, v_j), against the prediction 1 / sqrt(1 + (N - 1) / d_k)
    softmax_*     the same for softmax attention over the stored pairs, sum_i softmax_i(sqrt(d_k) k_i . k_j) v_i
                  (a transformer head's scaled dot product for keys of norm sqrt(d_k))

and the capacities per d_k: the largest N with error_free >= 1/2, with accuracy >= `threshold` and with fidelity >=
1/sqrt(2) (crosstalk as strong as the signal; predicted N = d_k + 1), plus their log-log slopes against d_k (the
theorem: O(sqrt(d_k)) error-free, O(d_k) average-case). Decoding to the nearest stored value tolerates far more
crosstalk than the fidelity level, so the accuracy capacities grow faster than d_k at these sizes.

Fidelity: paper (the Hebbian memory, the crosstalk decomposition and the O(sqrt(d_k)) / O(d_k) capacity claims from
the paper's abstract and introduction, arXiv 2508.08289; the measurement protocol is this tool's; no official code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .evaluator import Evaluator, pyplot
from .icl_layer import check_positive

FIDELITY_LEVEL = float(np.sqrt(0.5))  # cosine 1/sqrt(2): crosstalk as strong as the signal ((N - 1) / d_k = 1)


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian vectors normalised along the last axis, float64."""
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def retrieve(keys: np.ndarray, values: np.ndarray, queries: np.ndarray, kind: str) -> np.ndarray:
    """Retrieval from memories of keys [M, N, d_k], values [M, N, d_v] by queries [M, Q, d_k] -> [M, Q, d_v]:
    "hebbian" (M q with M = sum_i v_i k_i^T) or "softmax" (sum_i softmax_i(sqrt(d_k) k_i . q) v_i)."""
    scores = np.einsum("mqd,mnd->mqn", queries, keys)
    if kind == "hebbian":
        return np.einsum("mqn,mnv->mqv", scores, values)
    logits = np.sqrt(keys.shape[-1]) * scores
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("mqn,mnv->mqv", weights, values)


def retrieval_stats(keys: np.ndarray, values: np.ndarray, kind: str) -> dict[str, float]:
    """{accuracy, error_free, fidelity} of retrieving every stored value by its own key (see the module docstring)."""
    out = retrieve(keys, values, keys, kind)
    cos = np.einsum("mqv,mnv->mqn", out, values) / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-30)
    hits = cos.argmax(axis=-1) == np.arange(keys.shape[1])
    return {
        "accuracy": float(hits.mean()),
        "error_free": float(hits.all(axis=-1).mean()),
        "fidelity": float(np.diagonal(cos, axis1=1, axis2=2).mean()),
    }


def predicted_fidelity(count: np.ndarray, dim: int) -> np.ndarray:
    """1 / sqrt(1 + (N - 1) / d_k): the cosine of M k_j with v_j when the crosstalk has variance (N - 1) / d_k."""
    return 1.0 / np.sqrt(1.0 + (np.asarray(count, np.float64) - 1.0) / dim)


def _capacity(counts: Sequence[int], values: Sequence[float], level: float) -> int:
    """The largest count whose value (and every smaller count's) is >= level; 0 when the first is below."""
    best = 0
    for count, value in zip(counts, values, strict=True):
        if value < level:
            break
        best = count
    return best


def _slope(dims: Sequence[int], capacities: Sequence[int]) -> float | None:
    """Least-squares slope of log capacity against log d_k (None with fewer than two positive capacities)."""
    pairs = [(np.log(d), np.log(c)) for d, c in zip(dims, capacities, strict=True) if c > 0]
    if len(pairs) < 2:
        return None
    x, y = np.array(pairs).T
    return float(np.polyfit(x, y, 1)[0])


def _parse_dims(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class AssocCapacity(Evaluator):
    """Options: dims (key widths, "16,32,64"), trials (memories per point), threshold (accuracy of the average-case
    capacity), points (counts on the log grid), seed."""

    dims: tuple[int, ...] = dataclasses.field(default=(16, 32, 64), metadata={"parse": _parse_dims})
    trials: int = 64
    threshold: float = 0.9
    points: int = 20
    seed: int = 0

    name = "assoc_capacity"
    paper = "[51] Understanding Transformers through the Lens of Pavlovian Conditioning (arXiv 2508.08289)"
    fidelity = "paper"
    reference = (
        "the paper's Hebbian reading of linear attention (M = sum v k^T, retrieval M q with crosstalk) and its "
        "O(sqrt(d_k)) error-free / O(d_k) average-case capacity claims (abstract and introduction, arXiv "
        "2508.08289); the Monte Carlo protocol and the fidelity prediction 1/sqrt(1 + (N-1)/d_k) are this tool's"
    )
    standalone = True  # `python -m eval.analysis assoc_capacity` needs no trained model: no --workdir

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        if not self.dims or any(not isinstance(d, int) or d < 2 for d in self.dims):
            raise ValueError(f"dims={self.dims!r} must be key widths >= 2, e.g. (16, 32, 64)")
        for name in ("trials", "points"):
            check_positive(name, getattr(self, name))
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold!r} must lie in (0, 1]")

    def counts(self) -> list[int]:
        """The log grid of association counts, 1 .. 4 max(dims)."""
        grid = np.unique(np.round(np.logspace(0, np.log10(4 * max(self.dims)), self.points)).astype(int))
        return [int(n) for n in grid]

    def standalone_run(self) -> dict[str, Any]:
        """Runs the measurement (no model: see the module docstring)."""
        return self.evaluate(None, {}, [{"inputs": np.zeros((1, 1), np.int32)}])

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if model is not None:
            raise ValueError("assoc_capacity measures Hebbian and softmax memories of random keys, not a model")
        rng = np.random.default_rng(self.seed)
        counts = self.counts()
        per_dim = []
        for dim in self.dims:
            curves: dict[str, list[float]] = {}
            for count in counts:
                keys = unit_rows(rng, (self.trials, count, dim))
                values = unit_rows(rng, (self.trials, count, dim))
                for kind, prefix in (("hebbian", ""), ("softmax", "softmax_")):
                    for key, value in retrieval_stats(keys, values, kind).items():
                        curves.setdefault(prefix + key, []).append(value)
            per_dim.append(
                {
                    "dim": dim,
                    **curves,
                    "predicted_fidelity": predicted_fidelity(np.array(counts), dim).tolist(),
                    "capacity_error_free": _capacity(counts, curves["error_free"], 0.5),
                    "capacity_accuracy": _capacity(counts, curves["accuracy"], self.threshold),
                    "capacity_fidelity": _capacity(counts, curves["fidelity"], FIDELITY_LEVEL),
                    "softmax_capacity_accuracy": _capacity(counts, curves["softmax_accuracy"], self.threshold),
                }
            )
        return {
            "counts": counts,
            "per_dim": per_dim,
            "slope_error_free": _slope(self.dims, [d["capacity_error_free"] for d in per_dim]),
            "slope_accuracy": _slope(self.dims, [d["capacity_accuracy"] for d in per_dim]),
            "slope_fidelity": _slope(self.dims, [d["capacity_fidelity"] for d in per_dim]),
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        counts = result["counts"]
        for entry in result["per_dim"]:
            (line,) = axes[0].plot(counts, entry["fidelity"], marker=".", label=f"d_k={entry['dim']} measured")
            axes[0].plot(counts, entry["predicted_fidelity"], ls="--", color=line.get_color(), lw=0.8)
            axes[1].plot(
                counts, entry["accuracy"], marker=".", color=line.get_color(), label=f"hebbian d_k={entry['dim']}"
            )
            axes[1].plot(counts, entry["error_free"], ls=":", color=line.get_color())
            axes[1].plot(counts, entry["softmax_accuracy"], ls="--", color=line.get_color(), lw=0.8)
        axes[0].set(
            xscale="log",
            xlabel="associations N",
            ylabel="cosine(M k_j, v_j)",
            title="fidelity (dashed: 1/sqrt(1+(N-1)/d_k))",
        )
        axes[1].set(
            xscale="log",
            xlabel="associations N",
            ylabel="fraction",
            title="accuracy (solid), error-free (dotted), softmax (dashed)",
        )
        for axis in axes[:2]:
            axis.legend(fontsize=7)
        dims = [entry["dim"] for entry in result["per_dim"]]
        for key, label in (
            ("capacity_error_free", "error-free"),
            ("capacity_accuracy", f"accuracy >= {self.threshold}"),
            ("capacity_fidelity", "fidelity >= 1/sqrt(2)"),
        ):
            axes[2].plot(dims, [max(entry[key], 0.5) for entry in result["per_dim"]], marker="o", label=label)
        axes[2].set(xscale="log", yscale="log", xlabel="d_k", ylabel="capacity N", title="capacity against key width")
        axes[2].legend(fontsize=8)
        fig.suptitle(
            f"assoc_capacity [51]: log-log slopes of capacity vs d_k: error-free {_fmt(result['slope_error_free'])}, "
            f"accuracy {_fmt(result['slope_accuracy'])}, fidelity {_fmt(result['slope_fidelity'])}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
