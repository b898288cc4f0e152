"""`python -m eval.analysis attn_vs_attribution`: agreement between attention-based and gradient / perturbation
attributions of a prediction, with the paper's rank-correlation metrics ([194]).

"A Song of (Dis)agreement: Evaluating the Evaluation of Explainable Artificial Intelligence in Natural Language
Processing" (Neely, Schouten, Bleeker, Lucic; HHAI 2022, arXiv 2205.04559) ranks the input tokens of each example by
two attention-based explanations and by feature-attribution methods, measures their agreement with Kendall's tau
(and Spearman's rho), finds the correlations weak, and argues that rank correlation is a poor yardstick. This tool
explains the prediction at `position` of a language model (its top-1 token, logit z) over the tokens t <= position:

    attention             last layer's attention from `position`, mean over heads
    rollout               attention rollout (Abnar & Zuidema): prod_l (A_l + I) / 2 (A_l mean over heads), its row
    saliency              |dz / de_t|_2 (e_t the token embedding of t)
    grad_input            |sum_f e_tf dz / de_tf|
    integrated_gradients  |sum_f e_tf mean_k dz / de_tf (alpha_k e)|, alpha_k = (k - 1/2) / steps (zero baseline;
                          the position embeddings stay)
    occlusion             |z - z(e_t = 0)|

and reports, for every pair of methods, the mean over rows of Kendall's tau-b, Spearman's rho (average ranks for
ties) and the top-1 agreement (both rank the same token first), plus `importance` {method: [rows][T]}.

Fidelity: reconstructed (the paper's comparison and metrics as its abstract and summaries describe them; its
attribution methods were LIME, Integrated Gradients, DeepLIFT, Grad-SHAP and Deep-SHAP on classifiers; here the
gradient-family and occlusion methods above on a language model's next-token prediction; no official code read).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .evaluator import Evaluator, attention_maps, forward, is_task, pyplot
from .icl_layer import check_positive
from .stiffness import spearman

METHODS = ("attention", "rollout", "saliency", "grad_input", "integrated_gradients", "occlusion")


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two 1-D arrays (ties in either counted as tau-b does; nan where one is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    upper = np.triu_indices(a.size, k=1)
    sa = np.sign(a[:, None] - a[None, :])[upper]
    sb = np.sign(b[:, None] - b[None, :])[upper]
    denominator = float(np.sqrt(np.sum(sa**2) * np.sum(sb**2)))
    return float(np.sum(sa * sb) / denominator) if denominator > 0 else float("nan")


def rollout(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Attention rollout [B, T, T] of per-layer attention [B, H, T, T] (first layer first): the product of
    (mean over heads + I) / 2, earlier layers applied first."""
    out = None
    for weights in maps:
        mixed = 0.5 * weights.mean(axis=1) + 0.5 * np.eye(weights.shape[-1])
        out = mixed if out is None else mixed @ out
    return out


def _embedding_edit(scale: Any, shift: Any) -> Any:
    """An interceptor: the token embedding module ("embedding", __call__) returns scale * e + shift."""

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
        out = next_fun(*args, **kwargs)
        if context.module.name == "embedding" and context.method_name == "__call__":
            return scale * out + shift
        return out

    return interceptor


@dataclasses.dataclass(frozen=True)
class AttnVsAttribution(Evaluator):
    """Options: position (the explained position; negative counts from the end), rows (examples explained), steps
    (integrated-gradients steps)."""

    position: int = -1
    rows: int = 8
    steps: int = 16

    name = "attn_vs_attribution"
    paper = (
        "[194] A Song of (Dis)agreement: Evaluating the Evaluation of Explainable Artificial Intelligence in Natural "
        "Language Processing (arXiv 2205.04559)"
    )
    fidelity = "reconstructed"
    reference = (
        "the paper's protocol (per-example token rankings by attention and by attribution methods, Kendall's tau and "
        "Spearman's rho between them) as its abstract and summaries describe it; attribution methods here are "
        "saliency, gradient x input, integrated gradients and occlusion (the paper used LIME, IG, DeepLIFT and SHAP "
        "variants); full text and code not read"
    )

    def __post_init__(self) -> None:
        check_positive("rows", self.rows)
        check_positive("steps", self.steps)
        if not isinstance(self.position, int):
            raise ValueError(f"position={self.position!r} must be an int")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model) and model.kind != "decoder":
            raise ValueError(f"attn_vs_attribution reads decoder language models; the run holds a {model.kind!r} model")
        inputs = np.concatenate([np.asarray(b["inputs"]) for b in batches])[: self.rows]
        length = inputs.shape[1]
        if not -length <= self.position < length:
            raise ValueError(f"position={self.position} is out of range for sequences of length {length}")
        query = self.position % length
        batch = {"inputs": inputs}
        maps = attention_maps(model, params, [batch])  # {layer: [B, H, T, T]}
        layers = sorted(maps)
        scores = {
            "attention": maps[layers[-1]].mean(axis=1)[:, query],
            "rollout": rollout([maps[layer] for layer in layers])[:, query],
        }
        scores.update(self._gradients(model, params, batch, query))
        importance = {name: np.asarray(value, np.float64)[:, : query + 1] for name, value in scores.items()}
        pairs = []
        for first, second in itertools.combinations(METHODS, 2):
            a, b = importance[first], importance[second]
            tau = [kendall_tau_b(x, y) for x, y in zip(a, b, strict=True)]
            rho = [spearman(x, y) for x, y in zip(a, b, strict=True)]
            pairs.append(
                {
                    "methods": [first, second],
                    "kendall": _mean(tau),
                    "spearman": _mean(rho),
                    "top1": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
                }
            )
        return {
            "layers": layers,
            "position": query,
            "rows": int(inputs.shape[0]),
            "agreement": pairs,
            "importance": {name: value.tolist() for name, value in importance.items()},
        }

    def _gradients(self, model: Any, params: Any, batch: Mapping[str, Any], query: int) -> dict[str, np.ndarray]:
        """saliency, grad_input, integrated_gradients and occlusion [B, T] for the top-1 token at `query`."""
        inputs = jnp.asarray(batch["inputs"])
        embedded = {}

        def capture(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
            out = next_fun(*args, **kwargs)
            if context.module.name == "embedding" and context.method_name == "__call__":
                embedded["e"] = out
            return out

        with nn.intercept_methods(capture):
            logits = forward(model, params, batch)
        if "e" not in embedded:
            raise ValueError("the model has no token embedding module named 'embedding'; this tool differentiates it")
        e = jnp.asarray(embedded["e"], jnp.float32)  # [B, T, E]
        target = jnp.argmax(logits[:, query], axis=-1)  # [B]

        def logit(scale: Any, shift: jax.Array) -> jax.Array:
            """The target logits [B] with the token embeddings replaced by scale * e + shift."""
            with nn.intercept_methods(_embedding_edit(scale, shift)):
                out = forward(model, params, {"inputs": inputs})
            return jnp.take_along_axis(out[:, query], target[:, None], axis=-1)[:, 0]

        @jax.jit
        def attributions(e: jax.Array) -> dict[str, jax.Array]:
            zero = jnp.zeros_like(e)
            grad = jax.grad(lambda d: logit(1.0, d).sum())(zero)  # [B, T, E]
            alphas = (jnp.arange(self.steps) + 0.5) / self.steps

            def scaled_grad(alpha: jax.Array) -> jax.Array:  # dz/de at alpha * e (shift (alpha - 1) e)
                return jax.grad(lambda d: logit(1.0, d).sum())((alpha - 1.0) * e)

            mean_grad = jnp.mean(jax.lax.map(scaled_grad, alphas), axis=0)
            base = logit(1.0, zero)
            occluded = jax.vmap(lambda t: logit(1.0, -e * (jnp.arange(e.shape[1]) == t)[None, :, None]))(
                jnp.arange(e.shape[1])
            )  # [T, B]
            return {
                "saliency": jnp.linalg.norm(grad, axis=-1),
                "grad_input": jnp.abs(jnp.sum(grad * e, axis=-1)),
                "integrated_gradients": jnp.abs(jnp.sum(mean_grad * e, axis=-1)),
                "occlusion": jnp.abs(base[None, :] - occluded).T,
            }

        return {name: np.asarray(value) for name, value in attributions(e).items()}

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(19, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.4]})
        index = {name: i for i, name in enumerate(METHODS)}
        for axis, key, title in ((axes[0], "kendall", "Kendall tau-b"), (axes[1], "spearman", "Spearman rho")):
            matrix = np.eye(len(METHODS))
            for pair in result["agreement"]:
                i, j = (index[name] for name in pair["methods"])
                matrix[i, j] = matrix[j, i] = np.nan if pair[key] is None else pair[key]
            image = axis.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
            fig.colorbar(image, ax=axis)
            axis.set(title=f"{title} (mean over rows)", xticks=range(len(METHODS)), yticks=range(len(METHODS)))
            axis.set_xticklabels(METHODS, rotation=40, ha="right", fontsize=7)
            axis.set_yticklabels(METHODS, fontsize=7)
            for (i, j), value in np.ndenumerate(matrix):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        rows = np.array([result["importance"][name][0] for name in METHODS])
        rows = rows / np.maximum(rows.max(axis=1, keepdims=True), 1e-30)
        image = axes[2].imshow(rows, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=axes[2], label="importance / max")
        axes[2].set(xlabel="token position", title="row 0: importance per method", yticks=range(len(METHODS)))
        axes[2].set_yticklabels(METHODS, fontsize=7)
        fig.suptitle(f"attn_vs_attribution [194]: prediction at position {result['position']}, {result['rows']} rows")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values; None (JSON null) when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None
