"""attn.core.distillation: the attention-distillation loss is KL(teacher || student) per row (cross-entropy minus the
teacher's entropy, from numpy), zero iff student == teacher, and rejects mismatched shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core.distillation import attention_distillation_loss

RNG = np.random.default_rng(0)


def test_distillation_loss_is_zero_iff_student_equals_teacher():
    logits = jnp.asarray(RNG.standard_normal((2, 3, 6, 6)), jnp.float32)
    causal = jnp.tril(jnp.ones((6, 6), bool))
    teacher = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    assert float(attention_distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = jax.nn.softmax(jnp.where(causal, 0.5 * logits, -jnp.inf), axis=-1)
    loss = float(attention_distillation_loss(student, teacher))
    p, a = np.asarray(teacher), np.asarray(student)
    cross_entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, a, 1.0)), 0.0), axis=-1).mean()
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1).mean()
    assert loss > 1e-3
    assert loss == pytest.approx(cross_entropy - entropy, rel=1e-4)
    with pytest.raises(ValueError, match="must have the same shape"):
        attention_distillation_loss(student[..., :5], teacher)
