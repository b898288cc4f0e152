"""AEM: Attention Entropy Maximization (Zhang et al. 2024, "AEM: Attention Entropy Maximization for Multiple Instance
Learning based Whole Slide Image Classification", catalog [88]).

Attention-MIL overfits by concentrating its attention on a few instances. AEM adds the negative entropy of the
instance attention to the bag loss, so the objective rewards attention spread over more instances:

    H(a_b)  = -sum_n a_{b,n} log a_{b,n}               a_b: the MIL attention of bag b over its valid instances
    L_AEM   = lambda * mean_b (-H(a_b))                added to the bag cross-entropy
    top_k > 0: a_b is first restricted to its k largest weights and renormalised (a'_{b,i} = a_{b,i} / sum_topk a),
               and the entropy is taken over those k (the official --top_k option)

With several attention branches (model.branches > 1) the mean runs over bags and branches. The official training
loop (dazhangyu123/AEM main.py, arch "abmil": `div_loss = sum(softmax(attn) * log_softmax(attn))`, `loss = lamda *
div_loss + bag_loss`) trains one bag per step, so its sum over instances is the per-bag term here; its default
lambda is 0.1. The paper's later versions add a cosine annealing of lambda over epochs, which the official
main.py checked here does not do; neither does this technique (lambda is constant).

Padded instances (attention exactly 0) contribute 0 to H and no gradient.

No-op setting: weight = 0 (the technique is skipped; the train step is the baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import validation
from attn.models.mil import intermediate

from .base import Option, Technique, register


def attention_entropy(weights: jax.Array, top_k: int = 0) -> jax.Array:
    """H of each attention row: weights float [..., N] (rows summing to 1, zeros allowed) -> float32 [...]; with
    top_k > 0 the entropy of the renormalised k largest weights."""
    weights = weights.astype(jnp.float32)
    if top_k > 0:
        weights = jax.lax.top_k(weights, min(top_k, weights.shape[-1]))[0]
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    positive = weights > 0
    logs = jnp.log(jnp.where(positive, weights, 1.0))  # 0 log 0 = 0, with a zero (not nan) gradient
    return -jnp.sum(jnp.where(positive, weights * logs, 0.0), axis=-1)


@register
class AttentionEntropyMaximization(Technique):
    """AEM on the MIL attention (see the module docstring)."""

    name = "aem"
    fidelity = "official-code"
    reference = (
        "Zhang et al. 2024 (arXiv 2406.15303) Sec. 3 (negative entropy loss on the attention); dazhangyu123/AEM "
        "main.py train_one_epoch (div_loss, --lamda 0.1, --top_k)"
    )
    model_kinds = ("mil",)
    options = {
        "weight": Option(0.1, validation.non_negative, "lambda, the loss coefficient (official default 0.1); 0 = off"),
        "top_k": Option(0, validation.non_negative_int, "entropy of the k largest weights renormalised; 0 = all"),
    }
    collections = ("intermediates",)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def loss(
        self,
        logits: Any,
        collections: Mapping[str, Any],
        batch: Mapping[str, jax.Array],
        variables: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        entropy = attention_entropy(intermediate(collections, "mil_attention"), self.top_k)  # [B, K]
        loss = -self.weight * jnp.mean(entropy)
        return loss, {"loss": loss, "entropy": jnp.mean(entropy)}
