"""Attention distillation: how far a student's attention weights are from a teacher's, as KL(teacher || student) per
row. Hedgehog's feature-map training ([217]) and SEA's estimator training ([183]) use it.

    attention_distillation_loss(a, p) = mean over rows of KL(p || a) = cross-entropy(p, a) - H(p)

It differs from a cross-entropy loss by the teacher's entropy, a constant for the student, so the gradients are the
same, and it is exactly 0 when the student equals the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["attention_distillation_loss"]


def attention_distillation_loss(student_probs: Array, teacher_probs: Array, *, eps: float = 1e-12) -> Array:
    """Attention distillation: mean over (batch, head, query) rows of KL(teacher || student), a float32 scalar.

    Both are attention weights [..., Tq, Tk] whose rows sum to 1 (or are all 0 for fully masked rows, which add 0).
    Equal to the cross-entropy between teacher and student rows minus the teacher's entropy: the same gradient for
    the student, and 0 exactly when student == teacher. Student entries are clipped at `eps` inside the log.
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"student_probs {student_probs.shape} and teacher_probs {teacher_probs.shape} must have the same shape"
        )
    p = teacher_probs.astype(jnp.float32)
    a = student_probs.astype(jnp.float32)
    positive = p > 0
    log_ratio = jnp.log(jnp.where(positive, p, 1.0)) - jnp.log(jnp.maximum(a, eps))
    return jnp.mean(jnp.sum(jnp.where(positive, p * log_ratio, 0.0), axis=-1))
