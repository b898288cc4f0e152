"""Entropy regularisation against entropic overload (Jha & Reagen 2025, "Entropy-Guided Attention for Private LLMs",
catalog [126]).

Decoder LMs with fewer non-linearities (no LayerNorm, no GELU) put many early-layer heads near the maximum attention
entropy ("entropic overload"). The regulariser penalises, per layer l and head h, the entropy of every query row that
strays from a learnable fraction θ[l, h] of the maximum entropy by more than a tolerance margin:

    E[b, h, i]   = -Σ_j A[b, h, i, j] log(A[b, h, i, j] + 1e-9)           entropy of query row i
    E_max        = log(T_k)                                               T_k: number of keys (the context size)
    δ            = E[b, h, i] - θ[l, h] E_max
    penalty      = (δ · 1[|δ| > γ E_max])²
    L_l          = (1 / H) Σ_h Σ_{b, i} penalty                           summed over batch and queries
    L_entropy    = λ (1 / L) Σ_l L_l

θ [L, H] are trained with the model (the paper's headwise learnable `reg_threshold_weights`, one per layer and
head, Fig. 5; stored per layer as params["techniques"]["entropy_reg"]["thresholds"]["layer_<l>"] [H]); λ = `weight`
(official default 1e-5), γ = `tolerance` (official default 0.20). The loss is the official code's
`EntropyRegularization.compute_loss` (entropy_regularization.py), including its +1e-9 inside the log, its sums over
batch and queries, and E_max from the key count of the captured matrices (the causal mask is not discounted).
The initial θ is not stated in the text checked: `threshold_init` (default 0.5) is this implementation's choice.

The weights come from the `attention_weights` captures of the train forward ("intermediates" made mutable), so the
mechanism must compute a probability matrix: a config naming one that does not is refused before compilation.
The paper pairs the regulariser with a learnable softmax temperature and scaled FFN (its SM(t)+ScFuFFN model); those
are architecture changes this technique does not make.

No-op setting: weight = 0 (the technique is skipped; the train step is the baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import validation

from .base import Option, Technique, register

LOG_EPS = 1e-9  # inside the log, as the official code


def row_entropy(weights: jax.Array) -> jax.Array:
    """Entropy of each query row of weights [B, H, Tq, Tk] -> [B, H, Tq] (official form: log(p + 1e-9))."""
    weights = weights.astype(jnp.float32)
    return -jnp.sum(weights * jnp.log(weights + LOG_EPS), axis=-1)


def entropy_penalty(weights: jax.Array, thresholds: jax.Array, tolerance: float) -> jax.Array:
    """L_l of one layer: weights [B, H, Tq, Tk], thresholds θ[l] [H] -> float32 scalar (see the module docstring)."""
    max_entropy = jnp.log(jnp.float32(weights.shape[-1]))
    deviation = row_entropy(weights) - thresholds[None, :, None] * max_entropy
    outside = jnp.where(jnp.abs(deviation) > tolerance * max_entropy, deviation, 0.0)
    return jnp.sum(jnp.square(outside)) / weights.shape[1]


@register
class EntropyReg(Technique):
    """Headwise entropy regularisation with learnable thresholds (see the module docstring)."""

    name = "entropy_reg"
    fidelity = "official-code"
    reference = (
        "Jha & Reagen 2025 (arXiv 2501.03489) Sec. 4 and Fig. 5 (headwise learnable thresholds); "
        "Nandan91/entropy-guided-attention-llm entropy_regularization.py EntropyRegularization.compute_loss"
    )
    model_kinds = ("decoder",)
    options = {
        "weight": Option(1e-5, validation.non_negative, "λ, the loss coefficient (official default 1e-5); 0 = off"),
        "tolerance": Option(0.2, validation.in_range(0.0, 1.0), "γ, the tolerance margin as a fraction of E_max"),
        "threshold_init": Option(0.5, validation.in_range(0.0, 1.0), "initial θ, as a fraction of E_max"),
    }
    collections = ("intermediates",)
    needs_attention_weights = True

    @property
    def active(self) -> bool:
        return self.weight > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        self.num_layers = int(model_config["num_layers"])
        self.num_heads = int(model_config["num_heads"])

    def init_variables(self, rng: jax.Array, params: Any) -> dict[str, Any]:
        """{"thresholds": {"layer_<l>": θ[l] float32 [H]}}: one vector per layer (1-D, so AdamW does not decay it)."""
        initial = jnp.full((self.num_heads,), self.threshold_init, jnp.float32)
        return {"thresholds": {f"layer_{i}": initial for i in range(self.num_layers)}}

    def loss(
        self,
        logits: jax.Array,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        by_layer = self.layer_weights(collections)
        thresholds = jnp.stack([variables["thresholds"][f"layer_{i}"] for i in range(self.num_layers)])  # [L, H]
        penalties = [entropy_penalty(by_layer[i], thresholds[i], self.tolerance) for i in range(self.num_layers)]
        loss = self.weight * sum(penalties) / self.num_layers
        metrics = {"loss": loss, "threshold_mean": jnp.mean(thresholds)}
        for i in range(self.num_layers):
            entropy = row_entropy(by_layer[i])
            # mean row entropy as a fraction of E_max
            metrics[f"entropy_fraction/layer_{i}"] = jnp.mean(entropy) / jnp.log(jnp.float32(by_layer[i].shape[-1]))
        return loss, metrics
