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
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attn.core.masks import Mask
from attn.softmax.multi_head import MultiHeadAttention

from .evaluator import Evaluator, is_task, pyplot, unboxed

ESTIMATORS = ("model", "least_squares", "bayes", "gd", "debiased_gd", "zero")


def context_layer(num_heads: int, head_dim: int) -> nn.Module:
    """The paper's model: one `softmax` attention layer without positions and with logit scale 1."""
    return MultiHeadAttention(num_heads=num_heads, head_dim=head_dim, position="none", scale=1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def predict(model: nn.Module, params: Any, inputs: jax.Array, context: int) -> jax.Array:
    """Last output entry at the query tokens: inputs [B, T, E] (the first `context` tokens are the examples, every
    token attends to them only) -> [B, T - context]."""
    if not 0 < context < inputs.shape[1]:
        raise ValueError(
            f"context={context} must lie in [1, {inputs.shape[1] - 1}] for prompts of shape {inputs.shape}"
        )
    lengths = jnp.full((inputs.shape[0],), context, jnp.int32)
    out = model.apply({"params": params}, inputs, mask=Mask(kv_lengths=lengths))
    return out[:, context:, -1]


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


def circuits(params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(KQ, OV) float64 [H, E, E] of a layer's parameters: KQ^h = W_q^h W_k^h^T (logit = x_q^T KQ x_k) and
    OV^h = W_v^h W_o^h (output = sum of weights x_k^T OV). Needs query/key/value kernels [E, H, D] (no GQA) and the
    out kernel [H, D, E]."""
    params = unboxed(params)
    try:
        wq, wk, wv, wo = (np.asarray(params[name]["kernel"], np.float64) for name in ("query", "key", "value", "out"))
    except (KeyError, TypeError):
        raise ValueError(
            "the layer needs query/key/value/out kernels (a softmax-family layer); got parameters "
            f"{sorted(params) if isinstance(params, Mapping) else type(params).__name__}"
        ) from None
    if wk.shape[1] != wq.shape[1]:
        raise ValueError(f"the layer has {wk.shape[1]} kv heads for {wq.shape[1]} heads; expected one per head")
    return np.einsum("ehd,fhd->hef", wq, wk), np.einsum("ehd,hdf->hef", wv, wo)


def head_patterns(kq: np.ndarray, ov: np.ndarray) -> tuple[list[dict[str, float]], float]:
    """Per-head pattern statistics of KQ, OV [H, E, E] (the last index is y; see the module docstring) and the OV
    zero-sum ratio."""
    dim = kq.shape[1] - 1
    heads = []
    for h in range(kq.shape[0]):
        block = kq[h, :dim, :dim]
        diag = np.diag(block)
        mean = float(diag.mean())
        off = block - np.diag(diag)
        scale = abs(mean) if mean != 0 else np.nan
        offdiag = float(np.sqrt((off**2).sum() / max(dim * dim - dim, 1))) / scale
        norm = float(np.linalg.norm(ov[h, :, dim]))
        heads.append(
            {
                "kq_diag": mean,
                "kq_spread": float(diag.std()) / scale,
                "kq_offdiag": offdiag,
                "ov_last": float(ov[h, dim, dim]),
                "ov_last_share": abs(float(ov[h, dim, dim])) / norm if norm > 0 else 0.0,
            }
        )
    last = ov[:, dim, dim]
    total = float(np.abs(last).sum())
    return heads, float(last.sum()) / total if total > 0 else 0.0


def fit(
    model: nn.Module,
    params: Any,
    sample: Callable[[jax.Array], Mapping[str, jax.Array]],
    loss: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
    *,
    steps: int,
    learning_rate: float,
    seed: int,
    log_every: int,
    probe: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[Any, dict[str, list]]:
    """Adam on `loss(params, sample(key))` with a fresh sample per step; returns (params, curve): the curve holds
    "step" and "loss" (the step's training loss) every `log_every` steps and at the last, plus probe(params)'s
    entries."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params: Any, state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, sample(key))
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = optimizer.init(params)
    curve: dict[str, list] = {"step": [], "loss": []}
    key = jax.random.key(seed)
    for i in range(1, steps + 1):
        params, state, value = step(params, state, jax.random.fold_in(key, i))
        if i % log_every == 0 or i == steps:
            curve["step"].append(i)
            curve["loss"].append(float(value))
            for name, entry in (probe(params) if probe else {}).items():
                curve.setdefault(name, []).append(entry)
    return params, curve


def check_positive(name: str, value: Any, kind: type = int) -> None:
    """ValueError naming `name` unless `value` is a positive `kind` (an int passes for float)."""
    if not (isinstance(value, kind | int) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive {kind.__name__}")


def dynamics_plot(axis: Any, curve: dict[str, list]) -> None:
    """Each head's KQ diagonal (solid) and OV last entry (dashed) against the training step on `axis`."""
    kq, ov = np.asarray(curve["kq_diag"]), np.asarray(curve["ov_last"])
    for head in range(kq.shape[1]):
        (line,) = axis.plot(curve["step"], kq[:, head], label=f"head {head} KQ diag")
        axis.plot(curve["step"], ov[:, head], ls="--", color=line.get_color(), label=f"head {head} OV[y, y]")
    axis.axhline(0.0, color="k", lw=0.5)
    axis.set(xlabel="step", title="head patterns during training")
    axis.legend(fontsize=6, ncol=2)


def circuit_plot(axes: Any, result: dict[str, Any]) -> None:
    """KQ and OV of every head side by side on axes[0], axes[1]."""
    for axis, key, title in ((axes[0], "kq", "W_KQ per head (x_1..x_d, y)"), (axes[1], "ov", "W_OV per head")):
        matrices = np.asarray(result[key])
        size = matrices.shape[1]
        gap = np.full((size, 1), np.nan)
        row = np.concatenate([part for m in matrices for part in (m, gap)][:-1], axis=1)
        limit = np.nanmax(np.abs(row)) or 1.0
        image = axis.imshow(row, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axis.figure.colorbar(image, ax=axis, shrink=0.7)
        axis.set(title=title, xticks=[h * (size + 1) + size / 2 - 0.5 for h in range(len(matrices))], yticks=[])
        axis.set_xticklabels([f"head {h}" for h in range(len(matrices))])


@dataclasses.dataclass(frozen=True)
class ICLRegression(Evaluator):
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
    standalone = True  # `python -m eval.analysis icl_regression` trains its own layer: no --workdir

    def __post_init__(self) -> None:
        for name in ("dim", "context", "num_heads", "head_dim", "steps", "batch", "log_every", "eval_rows"):
            check_positive(name, getattr(self, name))
        check_positive("learning_rate", self.learning_rate, float)
        if not (isinstance(self.noise, int | float) and self.noise >= 0):
            raise ValueError(f"noise={self.noise!r} must be a float >= 0")

    # ------------------------------------------------------------------------------------------ training
    def sample(self, key: jax.Array, rows: int) -> dict[str, jax.Array]:
        """`rows` prompts of this tool's setting (see regression_prompts)."""
        return regression_prompts(key, rows, self.dim, self.context, self.noise)

    def train(self) -> tuple[nn.Module, Any, dict[str, list]]:
        """(layer, trained params, curve) from random initialisation (see `fit`)."""
        model = context_layer(self.num_heads, self.head_dim)
        init = model.init(jax.random.key(self.seed), jnp.zeros((1, self.context + 1, self.dim + 1)))
        params = unboxed(init["params"])

        def loss(params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
            return jnp.mean((predict(model, params, batch["inputs"], self.context)[:, 0] - batch["targets"]) ** 2)

        def probe(params: Any) -> dict[str, Any]:
            heads, _ = head_patterns(*circuits(jax.device_get(params)))
            return {"kq_diag": [h["kq_diag"] for h in heads], "ov_last": [h["ov_last"] for h in heads]}

        params, curve = fit(
            model,
            params,
            lambda key: self.sample(key, self.batch),
            loss,
            steps=self.steps,
            learning_rate=self.learning_rate,
            seed=self.seed + 1,
            log_every=self.log_every,
            probe=probe,
        )
        return model, params, curve

    def standalone_run(self) -> dict[str, Any]:
        """Trains the layer, then evaluates it on `eval_rows` held-out prompts; the result holds the curve too."""
        model, params, curve = self.train()
        held_out = self.sample(jax.random.key(self.seed + 2), self.eval_rows)
        return {**self.evaluate(model, params, [held_out]), "curve": curve}

    # ------------------------------------------------------------------------------------------ analysis
    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model):
            raise ValueError(
                "icl_regression analyses one attention layer on real-valued prompts, not a training run's task; "
                "it trains its own: python -m eval.analysis icl_regression --output O"
            )
        kq, ov = circuits(params)
        if kq.shape[1] != self.dim + 1:
            raise ValueError(f"the layer's embedding is {kq.shape[1]} wide; dim={self.dim} expects {self.dim + 1}")
        predictions, targets, references = [], [], {name: [] for name in ESTIMATORS[1:-1]}
        for batch in batches:
            inputs = jnp.asarray(batch["inputs"], jnp.float32)
            if inputs.ndim != 3 or inputs.shape[1] != self.context + 1 or inputs.shape[2] != self.dim + 1:
                raise ValueError(
                    f"prompts of shape {inputs.shape}; expected [B, {self.context + 1}, {self.dim + 1}] "
                    f"(context={self.context}, dim={self.dim})"
                )
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

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(22, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.3, 1.3]})
        mse = result["mse"]
        if "curve" in result:
            curve = result["curve"]
            axes[0].plot(curve["step"], curve["loss"], label="training loss (model)")
            for name, style in (("gd", ":"), ("debiased_gd", "--"), ("least_squares", (0, (1, 4))), ("zero", "-.")):
                axes[0].axhline(mse[name], ls=style, color="k", lw=0.8, label=f"{name} {mse[name]:.3g}")
            axes[0].set(xlabel="step", ylabel="squared error", ylim=(0, 1.1 * mse["zero"]), title="training loss")
            axes[0].legend(fontsize=7)
            dynamics_plot(axes[1], curve)
        else:
            axes[1].axis("off")
            axes[0].bar(range(len(ESTIMATORS)), [mse[name] for name in ESTIMATORS])
            axes[0].set(xticks=range(len(ESTIMATORS)), ylabel="squared error", title="held-out MSE")
            axes[0].set_xticklabels(ESTIMATORS, rotation=30, fontsize=7)
        circuit_plot(axes[2:], result)
        agreement = result["agreement"]["debiased_gd"]
        fig.suptitle(
            f"icl_regression [50]: model MSE {mse['model']:.3g}, debiased GD explains {agreement['explained']:.3f} "
            f"(eta {agreement['step_size']:.3g}), OV zero-sum {result['ov_zero_sum']:.2f}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
