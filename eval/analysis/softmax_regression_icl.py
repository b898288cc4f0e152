"""`python -m eval.analysis softmax_regression_icl --output O`: one gradient step of softmax regression against the
in-context output of a trained single-layer softmax attention ([177]).

"The Closeness of In-Context Learning and Weight Shifting for Softmax Regression" (Li, Song, Xia, Yu, Zhou; arXiv
2304.13276) studies in-context learning through softmax regression,

    min_x L(x) = 1/2 |f(x) - b|^2,      f(x) = <exp(A x), 1_n>^-1 exp(A x)          A [n, d], b in the simplex,

and bounds how far a single self-attention layer and a gradient step on L move the prediction, concluding that a
self-attention-only model trained on such tasks behaves like gradient descent. This tool is the experiment that
conclusion suggests (in the manner of von Oswald et al.'s linear-regression comparison). A task draws x* ~
N(0, radius^2 / d I_d); n context rows a_i ~ N(0, I_d) with b = f_A(x*) and m query rows a'_j with targets
b' = f_A'(x*). The prompt's tokens are [a_i; n b_i] (i = 1..n), then [a'_j; 0] (j = 1..m), [B, n + m, d + 1].

    GD step: x_1 = x_0 - eta grad L(x_0) at x_0 = 0, where f = 1/n and grad L(0) = -(1/n) A^T (b - 1/n), so
             x_1 = (eta / n) A^T (b - 1/n) and the prediction is softmax_j(a'_j^T x_1)
    model:   one `softmax` attention layer (no positions, logit scale 1, every token attending to the n context
             tokens); its logit for query j is the last entry of its output there, its prediction softmax_j(logit_j)

The GD logit a'^T x_1 = (eta / n) (1/n) sum_i n b_i (a_i - a_bar)^T a' is the debiased-GD form of icl_regression
with y_i = n b_i, so the two-head construction there (KQ = +-omega I, OV = +-1/(2 omega)) is one GD step with
eta = n (to O(omega^2)): the known answer of the tests.

Reported on held-out prompts: `loss` {model, gd (best eta on a log grid), uniform (x = 0)}, `step_size`,
`prediction_gap` (mean |y_model - y_gd|_2 per prompt), `agreement` (1 - |z - eta g|^2 / |z|^2 for the model's
logits z and the GD logits g, both centred over the queries (softmax ignores a shift), eta fitted to the model),
the head patterns of icl_regression (`heads`, `ov_zero_sum`, `kq`, `ov`) and, when trained, the `curve`.

Fidelity: reconstructed (the paper gives bounds, not an experiment protocol; the loss, f and the gradient are the
paper's, the prompt layout and the metrics are this tool's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .icl_layer import InContextLayerTool, check_positive, head_patterns, predict


def softmax_prompts(key: jax.Array, rows: int, dim: int, context: int, queries: int, radius: float) -> dict:
    """`rows` softmax-regression prompts: {"inputs" float32 [rows, context + queries, dim + 1] (context tokens
    [a_i; n b_i], query tokens [a'_j; 0]), "targets" [rows, queries] (b' = softmax(A' x*)), "solution" [rows, dim]}."""
    ka, kx = jax.random.split(key)
    a = jax.random.normal(ka, (rows, context + queries, dim))
    solution = radius / np.sqrt(dim) * jax.random.normal(kx, (rows, dim))
    logits = jnp.einsum("btd,bd->bt", a, solution)
    b = jax.nn.softmax(logits[:, :context], axis=-1)
    shown = jnp.concatenate([context * b, jnp.zeros((rows, queries))], axis=1)
    targets = jax.nn.softmax(logits[:, context:], axis=-1)
    return {"inputs": jnp.concatenate([a, shown[..., None]], axis=-1), "targets": targets, "solution": solution}


def gd_logits(inputs: np.ndarray, context: int) -> np.ndarray:
    """float64 [B, m]: a'_j^T x_1 for x_1 = (1/n) A^T (b - 1/n) (one gradient step of L from 0 with eta = 1), read
    from prompts [B, n + m, d + 1] whose context tokens hold n b_i."""
    z = np.asarray(inputs, np.float64)
    a, b, query = z[:, :context, :-1], z[:, :context, -1] / context, z[:, context:, :-1]
    step = np.einsum("bnd,bn->bd", a, b - 1.0 / context) / context
    return np.einsum("bmd,bd->bm", query, step)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, float64."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def half_squared_error(prediction: np.ndarray, target: np.ndarray) -> float:
    """Mean over prompts of L = 1/2 |prediction - target|^2 (rows [B, m])."""
    return float(np.mean(0.5 * np.sum((prediction - target) ** 2, axis=-1)))


@dataclasses.dataclass(frozen=True)
class SoftmaxRegressionICL(InContextLayerTool):
    """Options: dim (d), context (n rows), queries (m rows), radius (|x*| scale), num_heads, head_dim, steps, batch,
    learning_rate, log_every (training), eval_rows (held-out prompts), seed."""

    dim: int = 4
    context: int = 16
    queries: int = 4
    radius: float = 2.0
    num_heads: int = 2
    head_dim: int = 5
    steps: int = 2000
    batch: int = 256
    learning_rate: float = 0.003
    log_every: int = 50
    eval_rows: int = 4096
    seed: int = 0

    name = "softmax_regression_icl"
    paper = "[177] The Closeness of In-Context Learning and Weight Shifting for Softmax Regression (arXiv 2304.13276)"
    fidelity = "reconstructed"
    reference = (
        "the paper's softmax regression L(x) = 1/2 |<exp(Ax), 1>^-1 exp(Ax) - b|^2 and its gradient (abstract, "
        "arXiv 2304.13276); the prompt layout, the trained single layer and the comparison metrics are this tool's "
        "(the paper states bounds, no protocol); no official code"
    )
    prompt_options = ("context", "queries", "dim")
    loss_key, loss_names, loss_title, loss_label = "loss", ("model", "gd", "uniform"), "held-out loss", "1/2 |f - b'|^2"
    reference_lines = (("gd", "--"), ("uniform", "-."))

    def __post_init__(self) -> None:
        names = ("dim", "context", "queries", "num_heads", "head_dim", "steps", "batch", "log_every", "eval_rows")
        for name in names:
            check_positive(name, getattr(self, name))
        check_positive("learning_rate", self.learning_rate, float)
        check_positive("radius", self.radius, float)

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return self.context + self.queries, self.dim + 1

    def sample(self, key: jax.Array, rows: int) -> dict[str, jax.Array]:
        """`rows` prompts of this tool's setting (see softmax_prompts)."""
        return softmax_prompts(key, rows, self.dim, self.context, self.queries, self.radius)

    def training_loss(self, model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """L = 1/2 |softmax over the queries of the model's logits - b'|^2, mean over prompts."""
        prediction = jax.nn.softmax(predict(model, params, batch["inputs"], self.context), axis=-1)
        return jnp.mean(0.5 * jnp.sum((prediction - batch["targets"]) ** 2, axis=-1))

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        kq, ov = self.layer_circuits(model, params)
        logits, targets, reference = [], [], []
        for batch in batches:
            inputs = self.prompt_inputs(batch)
            logits.append(np.asarray(predict(model, params, inputs, self.context), np.float64))
            targets.append(np.asarray(batch["targets"], np.float64))
            reference.append(gd_logits(np.asarray(inputs), self.context))
        z, target, g = (np.concatenate(parts) for parts in (logits, targets, reference))
        grid = self.context * np.logspace(-2, 2, 161)
        losses = [half_squared_error(softmax_rows(eta * g), target) for eta in grid]
        eta = float(grid[int(np.argmin(losses))])
        y_model, y_gd = softmax_rows(z), softmax_rows(eta * g)
        zc, gc = z - z.mean(axis=-1, keepdims=True), g - g.mean(axis=-1, keepdims=True)
        denominator = float(np.sum(gc**2))
        fitted = float(np.sum(zc * gc) / denominator) if denominator > 0 else 0.0
        explained = 1.0 - float(np.sum((zc - fitted * gc) ** 2)) / max(float(np.sum(zc**2)), 1e-30)
        heads, zero_sum = head_patterns(kq, ov)
        return {
            "rows": int(target.shape[0]),
            "loss": {
                "model": half_squared_error(y_model, target),
                "gd": half_squared_error(y_gd, target),
                "uniform": half_squared_error(np.full_like(target, 1.0 / self.queries), target),
            },
            "step_size": eta,
            "prediction_gap": float(np.mean(np.linalg.norm(y_model - y_gd, axis=-1))),
            "agreement": {"explained": explained, "step_size": fitted},
            "heads": heads,
            "ov_zero_sum": zero_sum,
            "kq": kq.tolist(),
            "ov": ov.tolist(),
        }

    def headline(self, result: dict[str, Any]) -> str:
        loss = result["loss"]
        return (
            f"softmax_regression_icl [177]: model {loss['model']:.3g} vs one GD step {loss['gd']:.3g} "
            f"(eta {result['step_size']:.3g}); GD logits explain {result['agreement']['explained']:.3f}, "
            f"prediction gap {result['prediction_gap']:.3g}"
        )
