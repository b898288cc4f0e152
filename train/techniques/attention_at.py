"""Attention AT: adversarial training on the attention logits (Kitada & Iyatomi 2021, "Attention Meets
Perturbations: Robust and Interpretable Attention with Adversarial Training", catalog [16]).

The perturbation goes on the pre-softmax attention scores of every softmax attention layer, in the direction that
increases the loss most, and the model also trains on the perturbed forward:

    g_l     = dL(x; a + d) / d d_l  at d = 0          gradient of the task loss w.r.t. the logits of layer l
    r_l     = epsilon * g_l / ||g_l||_2                normalised per attention row (over the keys)
    loss    = L(x; a) + lambda * L(x; a + r)           r under stop_gradient

The official code (shunk031/attention-meets-perturbation, amep/modules/attention_layer/bc/advt.py
TanhBCAttentionAT and amep/models/bc/at_advt.py) perturbs the one additive-attention score vector of an RNN
classifier: a first forward with a zero perturbation variable gives its gradient, `F.normalize` over the tokens
gives r, a second forward adds xi * r, and the loss is bce + lam_adv * bce_adv (lam_adv = 1 by default). Here the
same runs on every softmax layer of a transformer (through the `attention_logits` stage of attn.interventions):
each layer's [B, H, Tq, Tk] logits get their own r, normalised per (batch, head, query) row over the valid keys, the
extension of the official per-example normalisation to multi-head attention (reconstructed, not in the paper).
Both extra forwards are the train forward (same dropout key).

Attention iAT (`attention_iat`, the paper's "interpretable" variant, after Sato et al.'s iAdvT-Text) restricts the
perturbation of example i to the span of the differences between its attention scores and those of the other
examples j of the batch, so the adversary can only make an example's attention look more like another's:

    d_ij    = (a_i - a_j) / ||a_i - a_j||_2            per (head, query) row over the keys; d_ii = 0
    r_i(alpha) = sum_j alpha_ij d_ij                    alpha [B, B] per (head, query) row
    g       = dL(x; a + r(alpha)) / d alpha  at alpha = 0
    alpha*  = epsilon * g / ||g||_2                     per (i, head, query) over j
    loss    = L(x; a) + lambda * L(x; a + r(alpha*))    alpha* under stop_gradient, d from the clean logits

so ||r_i|| <= epsilon * sqrt(B - 1) per row (||alpha*|| = epsilon, unit d_ij). The official TanhBCAttentioniAT
builds the same d_ij (attn_1 - attn_2) and the coefficient variable, but its final step normalises the gradient of
the loss w.r.t. the logits themselves (its `d_var` is the normalised zero sum, whose `.grad` is dL/da), which takes
the perturbation out of the span of the d_ij; this implementation keeps the span, through alpha, as iAdvT-Text (which
the paper extends) defines it. The paper's own equations were not readable here (abstract only), so the iAT record
rests on the official code plus Sato et al. With batch size 1 there are no differences and the perturbation is 0.

epsilon (the official `xi`, set per dataset in its configs) defaults to 1 here, this implementation's choice.
The model's mechanism must compute attention logits (a config naming one that does not is refused before
compilation); every layer's logits are perturbed. Cost: two more forwards and one more backward per step.

No-op setting (AT and iAT): weight = 0 or epsilon = 0 (the technique is skipped; the train step is the baseline's
bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attn import interventions
from attn.core import validation

from .. import tasks
from .base import Option, Technique, register

NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps


def perturbed_forward(forward: Callable[..., Any], params: Any, batch: Any, deltas: Mapping[str, jax.Array]) -> Any:
    """forward(params, batch) with deltas[path] added to the attention logits of the attention layer at module
    path `path` (every layer that has a delta; others unchanged)."""

    def add(value: jax.Array, path: str) -> jax.Array:
        return value + deltas[path].astype(value.dtype) if path in deltas else value

    with interventions.intervene(interventions.hook("attention_logits", add)):
        return forward(params, batch)


def logit_shapes(forward: Callable[..., Any], params: Any, batch: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """{module path: shape of its attention logits [B, H, Tq, Tk]} of every attention layer `forward` runs."""
    shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def record(value: jax.Array, path: str) -> jax.Array:
        shapes[path] = jax.ShapeDtypeStruct(value.shape, jnp.float32)
        return value

    def run(p: Any) -> Any:
        with interventions.intervene(interventions.hook("attention_logits", record)):
            return forward(p, batch)

    jax.eval_shape(run, params)
    if not shapes:
        raise ValueError("the model ran no attention layer with attention logits to perturb")
    return shapes


def normalize_rows(gradient: jax.Array) -> jax.Array:
    """g / max(||g||_2, 1e-12) over the last (key) axis of [..., Tk], as torch's F.normalize; masked keys (zero
    gradient, or nan/inf from -inf logits) count 0."""
    gradient = jnp.where(jnp.isfinite(gradient), gradient.astype(jnp.float32), 0.0)
    norm = jnp.sqrt(jnp.sum(jnp.square(gradient), axis=-1, keepdims=True))
    return gradient / jnp.maximum(norm, NORM_EPS)


def batch_difference_directions(logits: jax.Array) -> jax.Array:
    """d[i, j] = (a_i - a_j) / ||a_i - a_j||_2 over the keys: logits [B, H, Tq, Tk] -> float32 [B, B, H, Tq, Tk];
    keys masked (-inf) in either example count 0, and d[i, i] = 0."""
    logits = logits.astype(jnp.float32)
    return normalize_rows(logits[:, None] - logits[None, :])


def combine_directions(coefficients: jax.Array, directions: jax.Array) -> jax.Array:
    """r_i = sum_j alpha_ij d_ij: coefficients [B, B, H, Tq], directions [B, B, H, Tq, Tk] -> [B, H, Tq, Tk]."""
    return jnp.einsum("ijhq,ijhqk->ihqk", coefficients.astype(jnp.float32), directions)


def normalize_coefficients(coefficients: jax.Array) -> jax.Array:
    """alpha / max(||alpha||_2, 1e-12) over the other examples j (axis 1) of [B, B, H, Tq]."""
    norm = jnp.sqrt(jnp.sum(jnp.square(coefficients.astype(jnp.float32)), axis=1, keepdims=True))
    return coefficients / jnp.maximum(norm, NORM_EPS)


def coefficient_shapes(forward: Callable[..., Any], params: Any, batch: Any) -> dict[str, tuple[int, ...]]:
    """{module path: shape [B, B, H, Tq] of the iAT coefficients} of every attention layer `forward` runs."""
    return {path: (s.shape[0], *s.shape[:3]) for path, s in logit_shapes(forward, params, batch).items()}


def span_perturbed_forward(
    forward: Callable[..., Any], params: Any, batch: Any, coefficients: Mapping[str, jax.Array]
) -> Any:
    """forward(params, batch) with r_i = sum_j coefficients[path][i, j] d_ij added to the attention logits of the
    layer at `path`, d_ij the batch difference directions of that layer's own logits (under stop_gradient)."""

    def add(value: jax.Array, path: str) -> jax.Array:
        if path not in coefficients:
            return value
        directions = batch_difference_directions(jax.lax.stop_gradient(value))
        return value + combine_directions(coefficients[path], directions).astype(value.dtype)

    with interventions.intervene(interventions.hook("attention_logits", add)):
        return forward(params, batch)


def mean_task_loss(task: tasks.Task, logits: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The task's weighted mean loss of `logits` (the trainer's objective without auxiliary losses)."""
    sums = task.loss_sums(logits, batch)
    return sums["loss_sum"] / jnp.maximum(sums["weight"], 1e-9)


class AttentionPerturbation(Technique):
    """Shared part of the attention-logit perturbation techniques: options, refusal, the perturbed forwards."""

    needs_attention_weights = True
    uses_forward = True
    options = {
        "weight": Option(1.0, validation.non_negative, "lambda, weight of the perturbed loss (official 1); 0 = off"),
        "epsilon": Option(1.0, validation.non_negative, "norm of r per attention row (official xi); 0 = off"),
    }

    @property
    def active(self) -> bool:
        return self.weight > 0 and self.epsilon > 0

    def bind_model(self, model_config: Mapping[str, Any]) -> None:
        kind = model_config["kind"]
        head = model_config.get("head", "classification") if kind == "encoder" else None
        self.task = tasks.Task(kind=kind, model=None, head=head)  # its loss only (the model runs through forward)


@register
class AttentionAT(AttentionPerturbation):
    """Adversarial training on the attention logits (see the module docstring)."""

    name = "attention_at"
    fidelity = "official-code"
    reference = (
        "Kitada & Iyatomi 2021 (arXiv 2009.12064) Sec. 3; shunk031/attention-meets-perturbation "
        "amep/modules/attention_layer/bc/advt.py (TanhBCAttentionAT) and amep/models/bc/at_advt.py (lam_adv)"
    )
    model_kinds = ("decoder", "encoder", "vit")

    def forward_loss(
        self, forward: Any, params: Any, logits: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        objective = lambda out: mean_task_loss(self.task, out, batch)  # noqa: E731
        frozen = jax.lax.stop_gradient(params)
        zeros = {path: jnp.zeros(s.shape, s.dtype) for path, s in logit_shapes(forward, frozen, batch).items()}
        gradients = jax.grad(lambda d: objective(perturbed_forward(forward, frozen, batch, d)))(zeros)
        perturbation = {path: self.epsilon * normalize_rows(g) for path, g in gradients.items()}
        adversarial = objective(perturbed_forward(forward, params, batch, jax.lax.stop_gradient(perturbation)))
        return self.weight * adversarial, {"loss": self.weight * adversarial, "adversarial_loss": adversarial}


@register
class AttentionIAT(AttentionPerturbation):
    """Interpretable adversarial training on the attention logits: the perturbation lies in the span of the
    differences between the batch's attention rows (see the module docstring)."""

    name = "attention_iat"
    fidelity = "reconstructed"
    reference = (
        "Kitada & Iyatomi 2021 (arXiv 2009.12064) Sec. 3 (Attention iAT); shunk031/attention-meets-perturbation "
        "amep/modules/attention_layer/bc/advt.py (TanhBCAttentioniAT: d_ij, coefficients); Sato et al. 2018 iAdvT"
    )
    model_kinds = ("decoder", "encoder", "vit")

    def forward_loss(
        self, forward: Any, params: Any, logits: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        objective = lambda out: mean_task_loss(self.task, out, batch)  # noqa: E731
        frozen = jax.lax.stop_gradient(params)
        zeros = {
            path: jnp.zeros(shape, jnp.float32) for path, shape in coefficient_shapes(forward, frozen, batch).items()
        }
        gradients = jax.grad(lambda c: objective(span_perturbed_forward(forward, frozen, batch, c)))(zeros)
        coefficients = {path: self.epsilon * normalize_coefficients(g) for path, g in gradients.items()}
        adversarial = objective(span_perturbed_forward(forward, params, batch, jax.lax.stop_gradient(coefficients)))
        return self.weight * adversarial, {"loss": self.weight * adversarial, "adversarial_loss": adversarial}
