"""`python -m eval.analysis icl_regression --output O`: in-context linear regression with one layer of multi-head
softmax attention, its training dynamics and its estimator against the closed forms ([50]).

"In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of Multi-Head Softmax
Attention" (He, Pan, Chen, Yang; ICML 2025, arXiv 2503.12734). A prompt holds L examples and a query,

    z_l = [x_l; y_l]  (l = 1..L),  z_q = [x_q; 0]          x ~ N(0, I_d), beta ~ N(0, I_d), y = beta^T x + sigma eps

as tokens [B, L + 1, d + 1]; one attention layer (this project's `softmax` mechanism, no positions, logit scale 1,
every token attending to the L examples only) reads them and its prediction is the last entry of its output at the
query token. Trained from random initialisation on fresh prompts, the paper finds a diagonal, homogeneous KQ pattern
(W_KQ^h = W_q^h W_k^h^T restricted to x ~ omega_h I_d) and a last-entry-only, zero-sum OV pattern (only
W_OV^h[y, y] = u_h non-zero, sum_h u_h ~ 0). Two heads with KQ = +-omega I and OV = +-1 / (2 omega) give, for small
omega, the debiased gradient-descent predictor

    y_hat = (1 / L) sum_l y_l (x_l - x_bar)^T x_q                        (x_bar = mean_l x_l)

(the odd part of the softmax-weighted mean in omega; the plain GD step from zero is (1 / L) sum_l y_l x_l^T x_q).

This tool trains the layer (Adam on the squared error of fresh prompts; a curve of the loss and of each head's KQ
diagonal and OV last entry) and compares its predictions on held-out prompts with the closed forms, computed in
float64 numpy: least squares (min-norm), the Bayes posterior mean (ridge with lambda = sigma^2; least squares for
sigma = 0), one GD step and one debiased GD step with their best step sizes, and the zero predictor. Reported:

    mse            {model, least_squares, bayes, gd, debiased_gd, zero}: mean squared error against y_q
    step_size      best step sizes eta of gd and debiased_gd against y_q
    agreement      {gd, debiased_gd}: 1 - |y_hat - eta g|^2 / |y_hat|^2 with eta fitted to the model (1: the model
                   is that predictor up to its step size), and the fitted eta
    heads          per head: kq_diag (mean of the KQ x-block diagonal), kq_spread (std / |mean| of that diagonal:
                   0 = homogeneous), kq_offdiag (rms of the x-block's off-diagonal / |mean diagonal|: 0 = diagonal),
                   ov_last (W_OV[y, y]), ov_last_share (|W_OV[y, y]| / |W_OV[:, y]|: 1 = only
                   y feeds the output entry the prediction reads, last-entry-only)
    ov_zero_sum    sum_h W_OV^h[y, y] / sum_h |W_OV^h[y, y]| (0: zero-sum)
    kq, ov         the matrices [H, d + 1, d + 1] (embed x embed)
    curve          (trained) step, loss, kq_diag [S][H], ov_last [S][H]

`evaluate(layer, params, [prompts])` analyses a given layer instead (e.g. a planted one); prompts are
`regression_prompts(...)` dicts ("inputs" [B, L + 1, d + 1], "targets" [B]).

Fidelity: paper (setting and patterns from the paper's abstract, its authors' summary page and the catalog's
reading of the method; the debiased-GD form derived here as the small-omega limit of two opposite heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .icl_layer import (
    InContextLayerTool,
    check_positive,
    head_patterns,
    predict,
)

ESTIMATORS = ("model", "least_squares", "bayes", "gd", "debiased_gd", "zero")


def regression_prompts(key: jax.Array, rows: int, dim: int, context: int, noise: float) -> dict[str, jax.Array]:
    """`rows` prompts of `context` examples and one query: {"inputs" float32 [rows, context + 1, dim + 1] (the
    query's y entry 0), "targets" [rows] (y_q), "beta" [rows, dim]}."""
    kx, kb, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (rows, context + 1, dim))
    beta = jax.random.normal(kb, (rows, dim))
    y = jnp.einsum("btd,bd->bt", x, beta) + noise * jax.random.normal(ke, (rows, context + 1))
    shown = y.at[:, -1].set(0.0)
    return {"inputs": jnp.concatenate([x, shown[..., None]], axis=-1), "targets": y[:, -1], "beta": beta}


def closed_forms(inputs: np.ndarray, noise: float) -> dict[str, np.ndarray]:
    """float64 predictions [B] at the query of prompts [B, L + 1, d + 1]: least_squares (min-norm), bayes (ridge,
    lambda = noise^2), and the unit-step gd ((1/L) sum y_l x_l^T x_q) and debiased_gd ((1/L) sum y_l (x_l - x_bar)^T
    x_q) predictors."""
    z = np.asarray(inputs, np.float64)
    x, y, query = z[:, :-1, :-1], z[:, :-1, -1], z[:, -1, :-1]
    length, dim = x.shape[1], x.shape[2]
    least = np.einsum("bdl,bl->bd", np.linalg.pinv(x), y)
    if noise > 0:
        gram = np.einsum("bld,ble->bde", x, x) + noise**2 * np.eye(dim)
        bayes = np.linalg.solve(gram, np.einsum("bld,bl->bd", x, y)[..., None])[..., 0]
    else:
        bayes = least
    centred = x - x.mean(axis=1, keepdims=True)
    return {
        "least_squares": np.einsum("bd,bd->b", least, query),
        "bayes": np.einsum("bd,bd->b", bayes, query),
        "gd": np.einsum("bl,bld,bd->b", y, x, query) / length,
        "debiased_gd": np.einsum("bl,bld,bd->b", y, centred, query) / length,
    }


def best_step(predictor: np.ndarray, target: np.ndarray) -> float:
    """eta minimising |eta predictor - target|^2 (0 for a zero predictor)."""
    denominator = float(np.dot(predictor, predictor))
    return float(np.dot(predictor, target) / denominator) if denominator > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class ICLRegression(InContextLayerTool):
    """Options: dim (d), context (L examples), num_heads, head_dim (>= d + 1 lets KQ be any matrix), noise (sigma),
    steps, batch (prompts per step), learning_rate, log_every (training), eval_rows (held-out prompts), seed."""

    dim: int = 4
    context: int = 16
    num_heads: int = 4
    head_dim: int = 5
    noise: float = 0.0
    steps: int = 2000
    batch: int = 256
    learning_rate: float = 0.003
    log_every: int = 50
    eval_rows: int = 4096
    seed: int = 0

    name = "icl_regression"
    paper = (
        "[50] In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of "
        "Multi-Head Softmax Attention (arXiv 2503.12734)"
    )
    fidelity = "paper"
    reference = (
        "the paper's setting (tokens [x; y], query [x_q; 0], one multi-head softmax layer, prediction = last output "
        "entry) and its KQ/OV patterns and debiased-GD predictor as stated in its abstract and the authors' summary "
        "(y-agent.github.io/posts/in_context_regression); official code (github.com/Y-Agent/ICL_linear) not "
        "available here; the predictor's form derived as the small-omega limit of two opposite heads"
    )
    prompt_options = ("context", "dim")
    loss_key, loss_names, loss_title, loss_label = "mse", ESTIMATORS, "held-out MSE", "squared error"
    reference_lines = (("gd", ":"), ("debiased_gd", "--"), ("least_squares", (0, (1, 4))), ("zero", "-."))

    def __post_init__(self) -> None:
        for name in ("dim", "context", "num_heads", "head_dim", "steps", "batch", "log_every", "eval_rows"):
            check_positive(name, getattr(self, name))
        check_positive("learning_rate", self.learning_rate, float)
        if not (isinstance(self.noise, int | float) and self.noise >= 0):
            raise ValueError(f"noise={self.noise!r} must be a float >= 0")

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return self.context + 1, self.dim + 1

    def sample(self, key: jax.Array, rows: int) -> dict[str, jax.Array]:
        """`rows` prompts of this tool's setting (see regression_prompts)."""
        return regression_prompts(key, rows, self.dim, self.context, self.noise)

    def training_loss(self, model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Mean squared error of the prediction at the query."""
        return jnp.mean((predict(model, params, batch["inputs"], self.context)[:, 0] - batch["targets"]) ** 2)

    # ------------------------------------------------------------------------------------------ analysis
    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        kq, ov = self.layer_circuits(model, params)
        if kq.shape[1] != self.dim + 1:
            raise ValueError(f"the layer's embedding is {kq.shape[1]} wide; dim={self.dim} expects {self.dim + 1}")
        predictions, targets, references = [], [], {name: [] for name in ESTIMATORS[1:-1]}
        for batch in batches:
            inputs = self.prompt_inputs(batch)
            predictions.append(np.asarray(predict(model, params, inputs, self.context)[:, 0], np.float64))
            targets.append(np.asarray(batch["targets"], np.float64))
            for name, value in closed_forms(np.asarray(inputs), self.noise).items():
                references[name].append(value)
        y_hat, target = np.concatenate(predictions), np.concatenate(targets)
        forms = {name: np.concatenate(values) for name, values in references.items()}
        steps = {name: best_step(forms[name], target) for name in ("gd", "debiased_gd")}
        scaled = {**forms, **{name: steps[name] * forms[name] for name in steps}, "model": y_hat, "zero": 0 * target}
        agreement = {}
        for name in ("gd", "debiased_gd"):
            eta = best_step(forms[name], y_hat)
            residual = float(np.sum((y_hat - eta * forms[name]) ** 2))
            agreement[name] = {"explained": 1.0 - residual / max(float(np.sum(y_hat**2)), 1e-30), "step_size": eta}
        heads, zero_sum = head_patterns(kq, ov)
        return {
            "rows": int(target.size),
            "mse": {name: float(np.mean((scaled[name] - target) ** 2)) for name in ESTIMATORS},
            "step_size": steps,
            "agreement": agreement,
            "heads": heads,
            "ov_zero_sum": zero_sum,
            "kq": kq.tolist(),
            "ov": ov.tolist(),
        }

    def headline(self, result: dict[str, Any]) -> str:
        mse, agreement = result["mse"], result["agreement"]["debiased_gd"]
        return (
            f"icl_regression [50]: model MSE {mse['model']:.3g}, debiased GD explains {agreement['explained']:.3f} "
            f"(eta {agreement['step_size']:.3g}), OV zero-sum {result['ov_zero_sum']:.2f}"
        )
