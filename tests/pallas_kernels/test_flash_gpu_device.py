"""The compiled GPU kernels (interpret=False) against the reference on a real GPU, at long sequences and in bf16.

Marked `gpu`: tests/conftest.py skips them unless the platform is a GPU (run with ATTN_TEST_ACCELERATOR=1 on a GPU
machine). float32 uses IEEE dots in the kernel (tiling.dot), so the fp32 tolerances hold; bf16 uses FlashAttention's
criterion (kernel error vs f32 reference <= 2x the error of XLA attention run in bf16, + 1e-3).
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels.flash import flash_attention, flash_attention_reference
from tests.pallas_kernels.flash_cases import (
    FORWARD_TOL,
    GRAD_TOL,
    assert_close,
    check_low_precision_forward,
    make_inputs,
    value_and_grads,
    xla_low_precision,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "shape, options",
    [
        (dict(seed=0, batch=2, q_len=1024, kv_len=1024, heads=4, kv_heads=2, head_dim=128, segments=True), dict(causal=True)),
        (
            dict(seed=1, batch=1, q_len=1000, kv_len=1500, heads=2, kv_heads=1, head_dim=60, sinks=True,
                 bias_shape=(1, 2, 1000, 1500), factor_shapes=((1, 1000, 2, 4), (1, 1500, 1, 4))),
            dict(window=(300, 50), softcap=20.0),
        ),
    ],
)  # fmt: skip
def test_float32_forward_and_gradients(shape, options):
    args = make_inputs(**shape)
    out, stats, grads = value_and_grads(flash_attention, args, **options, backend="gpu")
    ref_out, ref_stats, ref_grads = value_and_grads(flash_attention_reference, args, **options)
    assert_close(out, ref_out, FORWARD_TOL, "out")
    assert_close(stats["lse"], ref_stats["lse"], FORWARD_TOL, "lse")
    assert_close(stats["key_mass"], ref_stats["key_mass"], FORWARD_TOL * 10, "key_mass")  # sums of ~1000 terms
    for key in ref_grads:
        assert_close(grads[key], ref_grads[key], GRAD_TOL, key)


@pytest.mark.parametrize("seq, head_dim, causal", [(2048, 128, True), (4096, 64, False), (4096, 256, True)])
def test_bf16_forward_long_sequences(seq, head_dim, causal):
    args = make_inputs(2, 1, seq, seq, 8, 2, head_dim, dtype=jnp.bfloat16)
    out = flash_attention(**args, causal=causal, backend="gpu")
    assert out.dtype == jnp.bfloat16
    check_low_precision_forward(out, args, causal=causal)


def test_bf16_gradients_criterion():
    """Each bf16 gradient's error vs the f32 reference <= 2x that of the reference differentiated in bf16 + 1e-3
    (relative to the gradient's scale)."""
    args = make_inputs(3, 2, 2048, 2048, 8, 8, 128, dtype=jnp.bfloat16)
    _, _, grads = value_and_grads(flash_attention, args, causal=True, backend="gpu")
    f32 = {name: args[name].astype(jnp.float32) for name in ("q", "k", "v")}
    _, _, exact = value_and_grads(flash_attention_reference, f32, causal=True)
    _, _, low = value_and_grads(
        lambda q, k, v, return_stats, causal: (xla_low_precision(q, k, v, causal=causal), {}), args, causal=True
    )
    for key in ("q", "k", "v"):
        scale = float(jnp.max(jnp.abs(exact[key])))
        kernel_err = float(jnp.max(jnp.abs(grads[key].astype(jnp.float32) - exact[key]))) / scale
        xla_err = float(jnp.max(jnp.abs(low[key].astype(jnp.float32) - exact[key]))) / scale
        assert kernel_err <= 2 * xla_err + 1e-3, (key, kernel_err, xla_err)
