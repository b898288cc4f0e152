"""Lightning attention: the GPU (Triton) kernel in interpret mode, the reference, dispatch and argument errors.

The TPU kernel's equivalents are in test_lightning_tpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear import lightning_attention, lightning_attention_reference
from tests.pallas_kernels.lightning_cases import (
    check_against_references,
    check_low_precision,
    check_state_passing,
    make_inputs,
)

# (batch, length, heads, kv_heads, key_dim, value_dim, chunk, with_decay, with_state)
CASES = [
    (1, 1, 2, 2, 8, 8, 16, False, False),  # one token, shorter than a chunk
    (3, 63, 4, 2, 16, 8, 16, True, True),  # GQA, T not a chunk multiple, batch 3
    (1, 130, 2, 1, 60, 128, 32, True, True),  # MQA, head dims 60 / 128 (padded to 64 / 2 Dv blocks)
    (1, 20, 1, 1, 8, 16, 64, False, True),  # chunk longer than T, no decay with a state
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-H{c[2]}/{c[3]}-D{c[4]}/{c[5]}-C{c[6]}")
def test_gpu_kernel_matches_references(case):
    check_against_references("gpu", *case)


def test_gpu_state_passing_equals_one_call():
    check_state_passing("gpu", 16)


def test_gpu_bfloat16_within_flash_criterion():
    check_low_precision("gpu", 80, 16)


def test_default_chunk_and_scalar_decay():
    q, k, v, _, _ = make_inputs(2, 1, 20, 2, 2, 8, 8, False, False)
    out = lightning_attention(q, k, v, decay=0.9, interpret=True)  # backend None + interpret -> gpu
    np.testing.assert_allclose(
        out, lightning_attention_reference(q, k, v, decay=jnp.full((2,), 0.9)), atol=2e-5, rtol=2e-5
    )


def _args():
    return make_inputs(0, 1, 8, 2, 2, 4, 4, False, False)[:3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": jnp.array([0.5, 1.5])}, r"decay=\[0.5, 1.5\] must lie in \(0, 1\]"),
        ({"decay": jnp.ones((3,))}, r"decay has shape \(3,\); expected \[heads\] = \(2,\)"),
        ({"initial_state": jnp.zeros((1, 2, 4, 5))}, r"initial_state has shape \(1, 2, 4, 5\); expected"),
        ({"chunk_size": 24}, r"chunk_size=24 is not valid for the GPU kernel; expected a power of two >= 16"),
        ({"chunk_size": 12, "backend": "tpu"}, r"chunk_size=12 is not valid for the TPU kernel; expected a multiple"),
        ({"chunk_size": 0}, r"chunk_size=0; expected None or a positive int"),
        ({"backend": "cuda"}, r"backend='cuda' is not supported; expected None, 'gpu' or 'tpu'"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    q, k, v = _args()
    kwargs = {"interpret": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        lightning_attention(q, k, v, **kwargs)


def test_bad_shapes_raise():
    q, k, v = _args()
    with pytest.raises(ValueError, match=r"q has shape \(8, 2, 4\); expected rank 4"):
        lightning_attention(q[0], k, v, interpret=True)
    with pytest.raises(ValueError, match=r"k has 3 heads; expected a divisor of q's 2 heads"):
        lightning_attention(q, jnp.zeros((1, 8, 3, 4)), jnp.zeros((1, 8, 3, 4)), interpret=True)
    with pytest.raises(ValueError, match=r"k has head_dim 5; expected q's head_dim 4"):
        lightning_attention(q, jnp.zeros((1, 8, 2, 5)), v, interpret=True)
    with pytest.raises(ValueError, match=r"must share \[batch, length\]"):
        lightning_attention(q, k[:, :4], v[:, :4], interpret=True)
    with pytest.raises(ValueError, match=r"v head_dim=300; expected 1 <= head_dim <= 256"):
        lightning_attention(q, k, jnp.zeros((1, 8, 2, 300)), interpret=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU error message")
def test_no_kernel_for_cpu_without_interpret():
    q, k, v = _args()
    with pytest.raises(ValueError, match=r"no Pallas lightning attention kernel for platform 'cpu'; pass backend="):
        lightning_attention(q, k, v)


@pytest.mark.gpu
def test_compiled_gpu_kernel_long_bfloat16():
    """The real Triton kernel at T = 4096 in bf16, forward against the f32 reference (FlashAttention criterion),
    plus finite gradients."""
    check_low_precision("gpu", 4096, 64, interpret=False)
    q, k, v, decay, _ = make_inputs(4, 1, 4096, 4, 2, 64, 64, True, False)
    grads = jax.grad(lambda q_, k_, v_: lightning_attention(q_, k_, v_, decay=decay).sum(), argnums=(0, 1, 2))(
        *(x.astype(jnp.bfloat16) for x in (q, k, v))
    )
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)
