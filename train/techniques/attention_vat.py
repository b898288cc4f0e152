"""Attention VAT: virtual adversarial training on the attention logits (Kitada & Iyatomi 2023, "Making Attention
Mechanisms More Robust and Interpretable with Virtual Adversarial Training", catalog [92]).

Attention AT (train/techniques/attention_at.py) needs labels for its perturbation; VAT finds the direction that
changes the model's own prediction most (Miyato et al.'s virtual adversarial training), so it also works without
labels. On the pre-softmax attention scores a of every softmax layer:

    p        = softmax(f(x; a))                        the clean prediction, under stop_gradient
    d_l      ~ N(0, I), normalised per attention row   a random direction per layer
    g_l      = d KL(p || softmax(f(x; a + xi d))) / d d_l        one power-iteration step
    r_l      = epsilon * g_l / ||g_l||_2               per (batch, head, query) row over the keys
    loss     = L(x; a) + lambda * KL(p || softmax(f(x; a + r)))   r under stop_gradient

The KL is per prediction (per example for classifiers, per weighted token for language models) and averaged with
the task's weights. `xi` is the finite-difference step of the power iteration (Miyato et al. use 1e-6; with float32
logits of O(1) a larger 1e-3 keeps the difference above rounding, this implementation's default).

Fidelity: reconstructed. The paper's text beyond its abstract and its official code were not available when this
was written: the equations are Miyato et al.'s VAT (one power iteration) put on the attention scores exactly where
Attention AT puts its perturbation (the official AT code), and the row normalisation is the one attention_at uses.

Attention iVAT (`attention_ivat`) is the same with the perturbation restricted as Attention iAT restricts it
(train/techniques/attention_at.py): r_i(alpha) = sum_j alpha_ij d_ij, d_ij the normalised difference between the
attention logits of examples i and j of the batch; the power iteration runs on the coefficients alpha [B, B] per
(head, query) row instead of on the logits:

    alpha_0  ~ N(0, I), normalised over j               a random coefficient direction
    g        = d KL(p || softmax(f(x; a + r(xi alpha)))) / d alpha  at alpha_0
    alpha*   = epsilon * g / ||g||_2                     over j
    loss     = L(x; a) + lambda * KL(p || softmax(f(x; a + r(alpha*))))

Fidelity of iVAT: reconstructed the same way (the paper's abstract names the restriction to attention differences;
the span construction is the official iAT code's d_ij).

No-op setting: weight = 0 or epsilon = 0 (the technique is skipped; the train step is the baseline's bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn.core import validation

from .attention_at import (
    AttentionPerturbation,
    coefficient_shapes,
    logit_shapes,
    normalize_coefficients,
    normalize_rows,
    perturbed_forward,
    span_perturbed_forward,
)
from .base import Option, register


def prediction_kl(clean: jax.Array, perturbed: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Weighted mean over the predictions of KL(softmax(clean) || softmax(perturbed)): logits [..., C], weights
    [...] (None = 1) -> float32 scalar."""
    log_p = jax.nn.log_softmax(clean.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(perturbed.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    weights = jnp.ones(kl.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


@register
class AttentionVAT(AttentionPerturbation):
    """Virtual adversarial training on the attention logits (see the module docstring)."""

    name = "attention_vat"
    fidelity = "reconstructed"
    reference = (
        "Kitada & Iyatomi 2023 (arXiv 2104.08763) abstract; Miyato et al. 2018 VAT (one power iteration); the "
        "perturbation site and row normalisation of attention_at (shunk031/attention-meets-perturbation advt.py)"
    )
    model_kinds = ("decoder", "encoder", "vit")
    options = {
        **AttentionPerturbation.options,
        "xi": Option(1e-3, validation.positive, "finite-difference step of the power iteration"),
    }

    def forward_loss(
        self, forward: Any, params: Any, logits: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        clean = jax.lax.stop_gradient(logits)
        weights = batch.get("weights")
        if weights is not None and weights.shape != clean.shape[:-1]:
            weights = None
        frozen = jax.lax.stop_gradient(params)
        shapes = logit_shapes(forward, frozen, batch)
        keys = jax.random.split(rng, len(shapes))
        directions = {
            path: normalize_rows(jax.random.normal(key, s.shape, s.dtype))
            for key, (path, s) in zip(keys, sorted(shapes.items()), strict=True)
        }

        def divergence(d: Mapping[str, jax.Array]) -> jax.Array:
            moved = {path: self.xi * value for path, value in d.items()}
            return prediction_kl(clean, perturbed_forward(forward, frozen, batch, moved), weights)

        gradients = jax.grad(divergence)(directions)
        perturbation = jax.lax.stop_gradient({path: self.epsilon * normalize_rows(g) for path, g in gradients.items()})
        virtual = prediction_kl(clean, perturbed_forward(forward, params, batch, perturbation), weights)
        return self.weight * virtual, {"loss": self.weight * virtual, "virtual_adversarial_kl": virtual}


@register
class AttentionIVAT(AttentionVAT):
    """Interpretable virtual adversarial training on the attention logits: the VAT perturbation restricted to the
    span of the differences between the batch's attention rows (see the module docstring)."""

    name = "attention_ivat"
    reference = (
        "Kitada & Iyatomi 2023 (arXiv 2104.08763) abstract (Attention iVAT); the span of attention differences of "
        "shunk031/attention-meets-perturbation advt.py (TanhBCAttentioniAT); Miyato et al. 2018 VAT"
    )

    def forward_loss(
        self, forward: Any, params: Any, logits: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        clean = jax.lax.stop_gradient(logits)
        weights = batch.get("weights")
        if weights is not None and weights.shape != clean.shape[:-1]:
            weights = None
        frozen = jax.lax.stop_gradient(params)
        shapes = coefficient_shapes(forward, frozen, batch)
        keys = jax.random.split(rng, len(shapes))
        starts = {
            path: normalize_coefficients(jax.random.normal(key, shape, jnp.float32))
            for key, (path, shape) in zip(keys, sorted(shapes.items()), strict=True)
        }

        def divergence(c: Mapping[str, jax.Array]) -> jax.Array:
            moved = {path: self.xi * value for path, value in c.items()}
            return prediction_kl(clean, span_perturbed_forward(forward, frozen, batch, moved), weights)

        gradients = jax.grad(divergence)(starts)
        coefficients = {path: self.epsilon * normalize_coefficients(g) for path, g in gradients.items()}
        moved = span_perturbed_forward(forward, params, batch, jax.lax.stop_gradient(coefficients))
        virtual = prediction_kl(clean, moved, weights)
        return self.weight * virtual, {"loss": self.weight * virtual, "virtual_adversarial_kl": virtual}
