"""`python -m eval.analysis logit_attribution`: direct logit attribution per head ([218]).

"Does Circuit Analysis Interpretability Scale? Evidence from Multiple Choice Capabilities in Chinchilla" (Lieberum et
al., 2023) finds its output heads by direct logit attribution: the residual stream entering the final norm is a sum
of the embedding, every head's output through its rows of the output projection, and every MLP's output; with the
final norm linearised (its per-token scale frozen at the value of the actual forward, as TransformerLens's
`apply_ln_to_stack` does) each term maps linearly to the logit of a chosen token:

    x = embed + sum_l [ sum_h o_{l,h} W_O^{l,h} + rest_l ] + ff_l                    (x: the final norm's input)
    logit_v = sum_terms (phi(term) * inv * gamma) . U_v + beta . U_v
    phi = centring over features (LayerNorm) or identity (RMSNorm); inv = 1 / sqrt(var + eps) or 1 / rms(x)

with o_{l,h} [Dv] the head's output (the `head_outputs` capture), rest_l what the attention sublayer adds besides
its heads (output bias, gates; 0 for plain softmax), ff_l the rest of block l (its feed-forward sublayer), gamma /
beta the final norm's scale / bias and U_v the unembedding column of token v. The terms sum to the model's logit up
to rounding (`max_abs_sum_error` reports it).

Reported for query `position` and, per row, the model's top token there (or `token`): `heads` [L][H], `embedding`,
`attention_rest` [L], `feed_forward` [L], `final_norm_bias`, `logit` (means over rows) and `max_abs_sum_error`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import attn
from attn import attention_stats
from attn.interventions import capture

from . import stats
from .evaluator import Evaluator, forward, is_task, layer_head_heatmap, layer_of, pyplot


def _module_params(params: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node: Any = params
    for part in path.split("/"):
        node = node[part]
    return node


def _forward_terms(model: Any, params: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Logits and the "intermediates" of one forward recording head outputs, block inputs/outputs, attention outputs
    and the final norm's statistics."""
    with stats.capture_outputs(), attn.intervene(capture("head_outputs")):
        logits, state = forward(model, params, batch, mutable=["intermediates"])
    return logits, state.get("intermediates", {})


def _final_norm(tree: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(module path, {statistic: last value sown}) of the final norm in an "intermediates" tree, or (None, {})."""
    found: dict[str, dict[str, Any]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]
        for i, key in enumerate(keys[:-1]):
            if key == "final_norm" and keys[i + 1] in (stats.NORM_INVERSE_SCALE, stats.NORM_CENTRED):
                found.setdefault("/".join(keys[: i + 1]), {})[keys[i + 1]] = value
    if len(found) != 1:
        return None, {}
    return next(iter(found.items()))


def unembedding(params: Mapping[str, Any]) -> np.ndarray:
    """U float64 [E, V]: the untied `lm_head` kernel, or the transposed token embedding when tied."""
    if "lm_head" in params:
        return np.asarray(params["lm_head"]["kernel"], np.float64)
    if "embedding" in params:
        return np.asarray(params["embedding"]["embedding"], np.float64).T
    raise ValueError("the model has neither lm_head nor embedding parameters; logit attribution needs a token LM")


@dataclasses.dataclass(frozen=True)
class LogitAttribution(Evaluator):
    """Options: position (query position attributed, negative from the end); token (vocabulary id attributed;
    None: each row's top prediction at that position)."""

    position: int = -1
    token: int | None = None

    name = "logit_attribution"
    paper = (
        "[218] Does Circuit Analysis Interpretability Scale? Evidence from Multiple Choice Capabilities in Chinchilla"
    )
    fidelity = "peer"
    reference = (
        "the paper's direct logit attribution (head output through W_O and the unembedding, final norm linearised); "
        "the linearisation follows TransformerLens's ActivationCache.apply_ln_to_stack (scale frozen from the forward)"
    )

    def __post_init__(self) -> None:
        if not isinstance(self.position, int):
            raise ValueError(f"position={self.position!r} must be an int")
        if self.token is not None and not (isinstance(self.token, int) and self.token >= 0):
            raise ValueError(f"token={self.token!r} must be None or a non-negative int")

    def run(self, model: Any, params: Any, batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if is_task(model) and model.kind != "decoder":
            raise ValueError(f"logit_attribution reads decoder language models; the run holds a {model.kind!r} model")
        rows = [self._attribute(model, params, batch) for batch in batches]
        merged = {key: np.concatenate([r[key] for r in rows]) for key in rows[0] if key != "layers"}
        return {
            "layers": rows[0]["layers"],
            "rows": int(merged["logit"].shape[0]),
            "position": self.position,
            "tokens": merged["token"].astype(int).tolist(),
            "logit": float(merged["logit"].mean()),
            "heads": merged["heads"].mean(axis=0).tolist(),
            "embedding": float(merged["embedding"].mean()),
            "attention_rest": merged["attention_rest"].mean(axis=0).tolist(),
            "feed_forward": merged["feed_forward"].mean(axis=0).tolist(),
            "final_norm_bias": float(merged["final_norm_bias"].mean()),
            "max_abs_sum_error": float(np.abs(merged["sum_error"]).max()),
        }

    def _attribute(self, model: Any, params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Per-row terms (float64 arrays with a leading row axis) for one batch."""
        logits, tree = jax.device_get(_forward_terms(model, params, batch))
        logits = np.asarray(logits, np.float64)
        if logits.ndim != 3:
            raise ValueError(f"the model returns logits of shape {logits.shape}; logit_attribution needs [B, T, V]")
        batch_size, length, vocab = logits.shape
        if not -length <= self.position < length:
            raise ValueError(f"position={self.position} is out of range for sequences of {length} tokens")
        if self.token is not None and self.token >= vocab:
            raise ValueError(f"token={self.token} is out of range for the vocabulary of {vocab}")
        p, rows = self.position % length, np.arange(batch_size)
        token = np.argmax(logits[:, p], axis=-1) if self.token is None else np.full(batch_size, self.token)

        def at(value: Any) -> np.ndarray:  # [B, T, ...] -> float64 [B, ...] at the position
            return np.asarray(value, np.float64)[:, p]

        heads = {layer_of(path): v for path, v in attention_stats.sown_by_path(tree, "head_outputs").items()}
        heads.pop(None, None)
        norm_path, norm = _final_norm(tree)
        if not heads or norm_path is None:
            raise ValueError("logit_attribution needs a token model with self-attention head outputs and a final norm")
        inv = at(norm[stats.NORM_INVERSE_SCALE])  # [B, 1]
        centred = float(np.asarray(norm[stats.NORM_CENTRED])) > 0
        norm_params = _module_params(params, norm_path)
        gamma = np.asarray(norm_params.get("scale", 1.0), np.float64)
        u = unembedding(params)[:, token].T  # [B, E]: the attributed token's column per row

        def to_logit(term: np.ndarray) -> np.ndarray:  # term [B, ..., E] -> [B, ...]
            if centred:
                term = term - term.mean(axis=-1, keepdims=True)
            scaled = term * inv.reshape(batch_size, *([1] * (term.ndim - 1))) * gamma
            return np.einsum("b...e,be->b...", scaled, u)

        block_in = attention_stats.sown_by_layer(tree, stats.BLOCK_INPUT)
        block_out = attention_stats.sown_by_layer(tree, stats.BLOCK_OUTPUT)
        attn_out = attention_stats.sown_by_layer(tree, stats.ATTENTION_OUTPUT)
        layers = sorted(heads)
        head_terms, rest_terms, ff_terms = [], [], []
        for layer in layers:
            path = next(path for path in attention_stats.sown_by_path(tree, "head_outputs") if layer_of(path) == layer)
            out_params = _module_params(params, path).get("out", {})
            if "kernel" not in out_params or np.ndim(out_params["kernel"]) != 3:
                raise ValueError(f"{path} has no output projection out/kernel [heads, head_dim, embed] to attribute")
            per_head = np.einsum("bhd,hde->bhe", at(heads[layer]), np.asarray(out_params["kernel"], np.float64))
            head_terms.append(to_logit(per_head))
            rest_terms.append(to_logit(at(attn_out[layer]) - per_head.sum(axis=1)))
            ff_terms.append(to_logit(at(block_out[layer]) - at(block_in[layer]) - at(attn_out[layer])))
        embedding = to_logit(at(block_in[layers[0]]))
        bias = np.asarray(norm_params["bias"], np.float64) @ u.T if "bias" in norm_params else np.zeros((batch_size,))
        logit = logits[rows, p, token]
        heads_arr, rest, ff = np.stack(head_terms, 1), np.stack(rest_terms, 1), np.stack(ff_terms, 1)
        total = heads_arr.sum(axis=(1, 2)) + rest.sum(axis=1) + ff.sum(axis=1) + embedding + bias
        return {
            "layers": layers,
            "token": token,
            "logit": logit,
            "heads": heads_arr,
            "attention_rest": rest,
            "feed_forward": ff,
            "embedding": embedding,
            "final_norm_bias": bias,
            "sum_error": logit - total,
        }

    def plot(self, result: dict[str, Any], path: str) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
        heads = np.asarray(result["heads"])
        bound = max(float(np.abs(heads).max()), 1e-12)
        layer_head_heatmap(
            axes[0], heads, "direct logit attribution per head", "logit", cmap="RdBu_r", vmin=-bound, vmax=bound
        )
        names = ["embedding", *[f"ff {i}" for i in result["layers"]], "norm bias", "logit"]
        values = [result["embedding"], *result["feed_forward"], result["final_norm_bias"], result["logit"]]
        axes[1].barh(names, values)
        axes[1].set(xlabel="logit contribution (mean over rows)", title="other terms and the logit")
        fig.suptitle(f"logit_attribution [218]: position {result['position']}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
