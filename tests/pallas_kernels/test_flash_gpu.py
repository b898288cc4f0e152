"""GPU (Pallas on Triton) flash attention, run in the Pallas interpreter on CPU, against the dense reference:
forward, lse, key_mass and every gradient (q, k, v, bias, bias factors u and v, sinks), at awkward shapes (lengths
1, 33, 63, 130 that are not block multiples, Tq != Tk, head_dim 60 and 128, batch 1 and 3, GQA and MQA).
Small blocks (16/32) make a few dozen tokens cross several q and kv blocks, including the skipped ones."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.flash import flash_attention, flash_attention_reference
from tests.pallas_kernels.flash_cases import (
    FORWARD_TOL,
    GRAD_TOL,
    SMALL_BLOCKS,
    assert_close,
    check_low_precision_forward,
    make_inputs,
    value_and_grads,
)

KERNEL = dict(block_sizes=SMALL_BLOCKS, backend="gpu", interpret=True)

GRAD_CASES = {
    # causal + segments + softcap, GQA (4 heads over 2), batch 3, head_dim 60 (padded to 64), 63 tokens.
    "causal_gqa_segments_softcap": (
        dict(seed=0, batch=3, q_len=63, kv_len=63, heads=4, kv_heads=2, head_dim=60, segments=True),
        dict(causal=True, softcap=4.0),
    ),
    # window + dense bias + low-rank bias + sinks, MQA, batch 1, head_dim 128, Tq != Tk (33 vs 130).
    "window_mqa_bias_factors_sinks": (
        dict(
            seed=1, batch=1, q_len=33, kv_len=130, heads=2, kv_heads=1, head_dim=128, sinks=True,
            bias_shape=(1, 2, 33, 130), factor_shapes=((1, 33, 1, 3), (1, 130, 2, 3)),
        ),
        dict(window=(40, 20)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_forward_stats_and_all_gradients(name):
    shape, options = GRAD_CASES[name]
    args = make_inputs(**shape)
    out, stats, grads = value_and_grads(flash_attention, args, **options, **KERNEL)
    ref_out, ref_stats, ref_grads = value_and_grads(flash_attention_reference, args, **options)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert_close(out, ref_out, FORWARD_TOL, "out")
    assert_close(stats["lse"], ref_stats["lse"], FORWARD_TOL, "lse")
    assert_close(stats["key_mass"], ref_stats["key_mass"], FORWARD_TOL, "key_mass")
    assert set(grads) == set(ref_grads)
    for key in ref_grads:
        assert grads[key].shape == ref_grads[key].shape, key
        assert_close(grads[key], ref_grads[key], GRAD_TOL, key)


def test_single_tokens_and_batch_broadcast_bias():
    """Tq = 1 against 63 keys (causal: only key 0 is visible) and Tq = Tk = 1, bias broadcast over heads."""
    args = make_inputs(2, 3, 1, 63, 2, 2, 16, bias_shape=(3, 1, 1, 63), sinks=True)
    for q_len, kv_len in ((1, 63), (1, 1)):
        sub = dict(args, k=args["k"][:, :kv_len], v=args["v"][:, :kv_len], bias=args["bias"][..., :kv_len])
        out, stats = flash_attention(**sub, causal=True, return_stats=True, **KERNEL)
        ref, ref_stats = flash_attention_reference(**sub, causal=True, return_stats=True)
        assert_close(out, ref, FORWARD_TOL, f"out {q_len}x{kv_len}")
        assert_close(stats["lse"], ref_stats["lse"], FORWARD_TOL)
        assert_close(stats["key_mass"], ref_stats["key_mass"], FORWARD_TOL)


def test_rows_without_visible_keys_give_zero_and_minus_inf_lse():
    """A window that leaves the last queries no key (Tq > Tk): out 0, lse -inf, no NaN anywhere."""
    args = make_inputs(3, 1, 40, 18, 2, 1, 8)
    out, stats = flash_attention(**args, window=(3, 0), return_stats=True, **KERNEL)
    ref, ref_stats = flash_attention_reference(**args, window=(3, 0), return_stats=True)
    np.testing.assert_array_equal(out[:, 21:], 0.0)
    assert bool(jnp.all(stats["lse"][:, :, 21:] == -jnp.inf))
    assert_close(out, ref, FORWARD_TOL)
    assert_close(stats["lse"], ref_stats["lse"], FORWARD_TOL)


def test_bf16_forward_meets_flash_attention_criterion():
    """bf16: error vs the f32 reference <= 2x that of XLA attention computed in bf16, + 1e-3."""
    args = make_inputs(4, 2, 130, 130, 4, 2, 64, dtype=jnp.bfloat16)
    out = flash_attention(**args, causal=True, **KERNEL)
    assert out.dtype == jnp.bfloat16
    check_low_precision_forward(out, args, causal=True)


@settings(max_examples=8, deadline=None)
@given(
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(0, 20))),
    segments=st.booleans(),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 40),
)
def test_forward_matches_reference_over_mask_options(causal, window, segments, q_len, kv_len):
    args = make_inputs(5, 1, q_len, kv_len, 2, 1, 16, segments=segments)
    out, stats = flash_attention(**args, causal=causal, window=window, return_stats=True, **KERNEL)
    ref, ref_stats = flash_attention_reference(**args, causal=causal, window=window, return_stats=True)
    assert_close(out, ref, FORWARD_TOL)
    assert_close(stats["lse"], ref_stats["lse"], FORWARD_TOL)
    assert_close(stats["key_mass"], ref_stats["key_mass"], FORWARD_TOL)
