"""The flash kernels' reference is itself trusted: it equals attn.core.reference.reference_softmax_attention (with an
attn.Mask built from the same options, the bias factors expanded to a dense bias), forward, lse, probabilities
(key_mass = their column sums) and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import Mask
from attn.core.reference import reference_softmax_attention
from pallas_kernels.flash import flash_attention_reference
from tests.pallas_kernels.flash_cases import GRAD_TOL, assert_close, make_inputs

CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, options)
    (1, 9, 9, 2, 2, 8, dict(causal=True)),
    (3, 7, 12, 4, 2, 6, dict(window=(2, 3), softcap=2.5)),
    (2, 10, 10, 4, 1, 5, dict(causal=True, window=3, segments=True, sinks=True)),
    (2, 6, 11, 2, 1, 4, dict(bias_shape=(1, 2, 6, 11), factor_shapes=((2, 6, 1, 3), (1, 11, 2, 3)), sinks=True)),
]


def _attn_reference(args: dict, causal=False, window=None, softcap=None, scale=None):
    """attn's reference with the same options: Mask for causal/window/segments, one dense bias."""
    mask = Mask.from_args(causal=causal, window=window, segment_ids=args.get("segment_ids"))
    bias = args.get("bias")
    if "bias_factors" in args:
        u, vf = args["bias_factors"]
        low_rank = jnp.einsum("bihr,bjhr->bhij", u, vf)
        bias = low_rank if bias is None else bias + low_rank
    return reference_softmax_attention(
        args["q"], args["k"], args["v"], mask=mask, bias=bias, softcap=softcap, sinks=args.get("sinks"),
        scale=scale, return_probs=True, return_lse=True,
    )  # fmt: skip


def _split(options: dict) -> tuple[dict, dict]:
    input_keys = ("bias_shape", "factor_shapes", "sinks", "segments")
    return {k: v for k, v in options.items() if k in input_keys}, {
        k: v for k, v in options.items() if k not in input_keys
    }


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_matches_attn_reference(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, options = CASES[case]
    input_options, mask_options = _split(options)
    args = make_inputs(case, batch, q_len, kv_len, heads, kv_heads, head_dim, **input_options)
    out, stats = flash_attention_reference(**args, **mask_options, return_stats=True)
    expected, aux = _attn_reference(args, **mask_options)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(stats["lse"], aux["lse"], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(stats["key_mass"], aux["probs"].sum(axis=2), atol=1e-6, rtol=1e-6)
    assert stats["lse"].shape == (batch, heads, q_len) and stats["key_mass"].shape == (batch, heads, kv_len)


def test_reference_gradients_match_attn_reference():
    """Every gradient (q, k, v, bias, both factors, sinks) of the reference equals the one of attn's reference."""
    args = make_inputs(
        7, 2, 8, 13, 4, 2, 6, bias_shape=(2, 1, 8, 13), factor_shapes=((1, 8, 4, 2), (2, 13, 1, 2)), sinks=True,
        segments=True,
    )  # fmt: skip
    options = dict(causal=True, window=(4, 1), softcap=3.0)
    floats = dict(q=args["q"], k=args["k"], v=args["v"], bias=args["bias"], sinks=args["sinks"])
    floats["u"], floats["vf"] = args["bias_factors"]
    weights = jnp.cos(jnp.arange(2 * 8 * 4 * 6, dtype=jnp.float32).reshape(2, 8, 4, 6))

    def ours(f):
        out = flash_attention_reference(
            f["q"], f["k"], f["v"], bias=f["bias"], bias_factors=(f["u"], f["vf"]), sinks=f["sinks"],
            segment_ids=args["segment_ids"], **options,
        )  # fmt: skip
        return jnp.sum(out * weights)

    def theirs(f):
        merged = dict(args, q=f["q"], k=f["k"], v=f["v"], bias=f["bias"], sinks=f["sinks"])
        merged["bias_factors"] = (f["u"], f["vf"])
        return jnp.sum(_attn_reference(merged, **options)[0] * weights)

    got, want = jax.grad(ours)(floats), jax.grad(theirs)(floats)
    for name in floats:
        assert bool(jnp.all(jnp.isfinite(got[name]))), name
        assert_close(got[name], want[name], GRAD_TOL, name)


def test_rows_without_visible_keys():
    """A query whose segment has no key: output 0 and lse -inf; with sinks, lse = the sink logit."""
    q = jnp.ones((1, 3, 2, 4))
    k = v = jnp.ones((1, 5, 1, 4))
    segment_ids = (jnp.array([[0, 1, 2]]), jnp.array([[0, 0, 1, 1, 1]]))
    out, stats = flash_attention_reference(q, k, v, segment_ids=segment_ids, return_stats=True)
    np.testing.assert_array_equal(out[0, 2], 0.0)
    assert bool(jnp.all(stats["lse"][0, :, 2] == -jnp.inf))
    sinks = jnp.array([0.5, -1.0])
    out, stats = flash_attention_reference(q, k, v, segment_ids=segment_ids, sinks=sinks, return_stats=True)
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_allclose(stats["lse"][0, :, 2], sinks)
