"""`python -m eval.analysis stiffness`: the stiffness ratio of the residual dynamics, per layer ([96]).

"Understanding Self-attention Mechanism via Dynamical System Perspective" (Huang, Liang, Qin, Zhong, Lin; ICCV 2023,
arXiv 2308.09939) reads a residual network x_{l+1} = x_l + F_l(x_l) as the explicit Euler discretisation of
dx/dt = F(x), finds the stiffness phenomenon of stiff ODEs in high-performing networks, and reads attention as a
stiffness-aware adaptive step size. A system is stiff where the Jacobian's eigenvalues decay at very different rates;
the classical measure is the stiffness ratio

    S = max_i |Re lambda_i| / min_i |Re lambda_i|          lambda_i the eigenvalues of J = dF/dx at the state x.

This tool measures it on every transformer block of a model (`layers_<l>`, TransformerBlock: F_l = block output -
block input), at the block's actual input for the first `length` tokens of the first `rows` rows of the first batch:

    token scope     J_t = dF(x)_t / dx_t [E, E] per token (the feature-level dynamics of one position)
    sequence scope  J = dF / dx [T E, T E] (the whole layer; block lower-triangular for a causal decoder)

Eigenvalues with |Re lambda| <= tolerance * max |Re lambda| are neutral modes (e.g. the direction a norm removes) and
are left out of the minimum; S is nan where every mode is neutral (F constant). Also the step size
|F(x)_t| / |x_t| per token (the Euler step the block takes) and its Spearman correlation with log S over tokens (the
paper's reading: attention adapts the step to the stiffness).

Reported per layer: `token` {ratio_median, ratio_log10_mean, ratio_max, rate_max (mean over tokens of the largest
|Re lambda|), neutral_fraction, stable_fraction (non-neutral modes with Re lambda < 0)}, `sequence` (the same of the
full Jacobian per row, medians over rows), `step_size` (mean), `step_correlation`; and `token_ratio_log10` [L][T]
(mean over rows) for the picture.

Fidelity: reconstructed (the paper's abstract and its ODE reading; the classical stiffness ratio, since the paper's
exact feature-level estimator was not available here; no official code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.models.block import TransformerBlock

from .evaluator import Evaluator, forward, pyplot
from .icl_layer import check_positive


def spectrum_stats(eigenvalues: np.ndarray, tolerance: float) -> dict[str, float]:
    """{ratio, rate_max, neutral_fraction, stable_fraction} of one Jacobian's eigenvalues (complex [N]); ratio and
    stable_fraction nan when every mode is neutral."""
    rates = np.abs(np.real(eigenvalues))
    rate_max = float(rates.max()) if rates.size else 0.0
    active = rates > tolerance * rate_max
    if rate_max == 0.0 or not active.any():
        return {"ratio": np.nan, "rate_max": rate_max, "neutral_fraction": 1.0, "stable_fraction": np.nan}
    return {
        "ratio": rate_max / float(rates[active].min()),
        "rate_max": rate_max,
        "neutral_fraction": float(1.0 - active.mean()),
        "stable_fraction": float((np.real(eigenvalues)[active] < 0).mean()),
    }


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, tied values sharing the mean of their ranks."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties) of two 1-D arrays over the entries finite in both (nan
    with fewer than 3 or a constant one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return float("nan")
    ra, rb = average_ranks(a[keep]), average_ranks(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def block_io(model: Any, params: Any, batch: Mapping[str, Any], layer: int, replacement: Any = None) -> tuple:
    """(input, output) [B, T, E] of block `layers_<layer>` in one forward of `batch`; with `replacement`, the block
    reads it instead of its input (the layers after it still run). ValueError when the model has no such block."""
    seen: dict[str, Any] = {}

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
        module = context.module
        hit = isinstance(module, TransformerBlock) and module.name == f"layers_{layer}"
        if not hit or context.method_name != "__call__" or "output" in seen:
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs.pop("x")
        out = next_fun(x if replacement is None else replacement, *args[1:], **kwargs)
        seen.update(input=x, output=out)
        return out

    with nn.intercept_methods(interceptor):
        forward(model, params, batch)
    if "output" not in seen:
        raise ValueError(f"layers={layer} is out of range: the model has no transformer block layers_{layer}")
    return seen["input"], seen["output"]


def _prefix(batch: Mapping[str, Any], length: int) -> dict[str, Any]:
    """`batch` with token inputs [B, T] and the arrays sharing their B and T cut to the first `length` positions
    (other inputs, e.g. images, unchanged). Every row stays, so a batch sharded over a mesh keeps its shape."""
    inputs = np.asarray(batch["inputs"])
    cut = inputs.ndim == 2 and np.issubdtype(inputs.dtype, np.integer)
    out = {}
    for key, value in batch.items():
        array = np.asarray(value)
        if cut and array.ndim >= 2 and array.shape[:2] == inputs.shape:
            array = array[:, :length]
        out[key] = array
    return out


def _parse_layers(text: str) -> tuple[int, ...] | None:
    text = str(text).strip()
    return None if text in ("", "all", "None") else tuple(int(part) for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Stiffness(Evaluator):
    """Options: layers ("all" or "0,2"), rows (examples), length (first tokens of token inputs), tolerance (neutral
    modes: |Re lambda| <= tolerance * max)."""

    layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"parse": _parse_layers})
    rows: int = 2
    length: int = 16
    tolerance: float = 1e-4

    name = "stiffness"
    paper = "[96] Understanding Self-attention Mechanism via Dynamical System Perspective (arXiv 2308.09939)"
    fidelity = "reconstructed"
    reference = (
        "the paper's residual-network-as-ODE reading and stiffness phenomenon (abstract, ICCV 2023); the classical "
        "stiffness ratio max|Re lambda| / min|Re lambda| of the Jacobian of each block's residual branch (the paper's "
        "exact estimator and code not available here)"
    )

    def __post_init__(self) -> None:
        check_positive("rows", self.rows)
        check_positive("length", self.length)
        if not (isinstance(self.tolerance, float | int) and 0 <= self.tolerance < 1):
            raise ValueError(f"tolerance={self.tolerance!r} must be a float in [0, 1)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @staticmethod
    def _count_blocks(params: Mapping[str, Any]) -> int:
        names = [key for key in params if key.startswith("layers_")]
        if not names:
            raise ValueError("the model has no transformer blocks (parameters layers_<i>); stiffness reads those")
        return len(names)

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = _prefix(batches[0], self.length)
        count = self._count_blocks(params)
        layers = self.layers if self.layers is not None else tuple(range(count))
        bad = [layer for layer in layers if not 0 <= layer < count]
        if bad:
            raise ValueError(
                f"layers={layers} holds {bad}, out of range: the model has {count} blocks (0..{count - 1})"
            )
        results, token_maps = [], []
        for layer in layers:
            entry, token_map = self._layer(model, params, batch, layer)
            results.append({"layer": layer, **entry})
            token_maps.append(token_map)
        return {"layers": list(layers), "per_layer": results, "token_ratio_log10": token_maps}

    def _layer(self, model: Any, params: Any, batch: Mapping[str, Any], layer: int) -> tuple[dict, list]:
        h, out = block_io(model, params, batch, layer)

        rows = min(self.rows, h.shape[0])

        @jax.jit
        def jacobian(params: Any, h: jax.Array) -> jax.Array:
            def residual(x: jax.Array) -> jax.Array:  # the first `rows` rows; the others keep their input
                full = jnp.concatenate([x, h[rows:]], axis=0)
                return block_io(model, params, batch, layer, replacement=full)[1][:rows] - x

            return jax.jacfwd(residual)(h[:rows])  # [R, T, E, R, T, E]

        jac = np.asarray(jacobian(params, h), np.float64)
        h, out = np.asarray(h[:rows], np.float64), np.asarray(out[:rows], np.float64)
        length, width = h.shape[1:]
        step = np.linalg.norm(out - h, axis=-1) / np.maximum(np.linalg.norm(h, axis=-1), 1e-30)  # [R, T]
        token, sequence = [], []
        for b in range(rows):
            block = jac[b, :, :, b, :, :]  # [T, E, T, E]
            token.append([spectrum_stats(np.linalg.eigvals(block[t, :, t, :]), self.tolerance) for t in range(length)])
            sequence.append(spectrum_stats(np.linalg.eigvals(block.reshape(length * width, -1)), self.tolerance))
        ratio = np.array([[s["ratio"] for s in row] for row in token])  # [B, T]
        log_ratio = np.log10(ratio)

        def summary(stats: list[dict[str, float]], reduce: Any) -> dict[str, float]:
            return {
                key: _num(reduce([s[key] for s in stats]))
                for key in ("rate_max", "neutral_fraction", "stable_fraction")
            }

        flat = [s for row in token for s in row]
        entry = {
            "token": {
                "ratio_median": _num(_nanmedian(ratio.ravel())),
                "ratio_log10_mean": _num(_nanmean(log_ratio.ravel())),
                "ratio_max": _num(np.nanmax(ratio)) if np.isfinite(ratio).any() else None,
                **summary(flat, _nanmean),
            },
            "sequence": {"ratio": _num(_nanmedian([s["ratio"] for s in sequence])), **summary(sequence, _nanmedian)},
            "step_size": float(step.mean()),
            "step_correlation": _num(spearman(log_ratio.ravel(), step.ravel())),
        }
        return entry, [_num(v) for v in _nanmean_columns(log_ratio)]

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        layers = result["layers"]
        per_layer = result["per_layer"]
        for key, label in (("token", "token J_t (median)"), ("sequence", "sequence J (median over rows)")):
            values = [e[key]["ratio_median" if key == "token" else "ratio"] for e in per_layer]
            axes[0].plot(layers, [np.nan if v is None else v for v in values], marker="o", label=label)
        axes[0].set(xlabel="layer", ylabel="stiffness ratio", yscale="log", title="stiffness ratio per layer")
        axes[0].legend(fontsize=8)
        grid = np.array([[np.nan if v is None else v for v in row] for row in result["token_ratio_log10"]])
        image = axes[1].imshow(grid, aspect="auto", cmap="magma")
        fig.colorbar(image, ax=axes[1], label="log10 stiffness ratio")
        axes[1].set(xlabel="token position", ylabel="layer", title="token-level stiffness", yticks=range(len(layers)))
        axes[1].set_yticklabels(layers)
        axes[2].bar(layers, [e["step_size"] for e in per_layer])
        for layer, entry in zip(layers, per_layer, strict=True):
            rho = entry["step_correlation"]
            axes[2].text(layer, entry["step_size"], "" if rho is None else f"rho {rho:.2f}", ha="center", fontsize=7)
        axes[2].set(xlabel="layer", ylabel="|F(x)_t| / |x_t|", title="Euler step size (rho: vs log stiffness)")
        fig.suptitle(f"stiffness [96]: residual dynamics of {len(layers)} blocks")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _num(value: Any) -> float | None:
    """A float, or None for nan (JSON has no nan)."""
    value = float(value)
    return None if np.isnan(value) else value


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _nanmedian(values: Sequence[float]) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")


def _nanmean_columns(matrix: np.ndarray) -> np.ndarray:
    """Mean over rows ignoring non-finite entries, per column (nan where a column has none)."""
    finite = np.isfinite(matrix)
    sums = np.where(finite, matrix, 0.0).sum(axis=0)
    counts = finite.sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
