"""TOVA (`tova`): decoding equals a numpy replay of the official TOVACache (keep the top-budget entries by the last
query's attention averaged over all heads, the same entries in every kv head) on attention computed from q/k in
float64, token by token and after a prompt chunk; budget >= length is causal softmax attention; the cache is
allocated at the budget."""

import jax
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from tests.kv.decoding import decode_cache_bytes, decode_equals_softmax, decode_pieces
from tests.kv.score_reference import decode, last_query_mean, top_scores

B, T, E, H, D = 2, 12, 16, 4, 8
BUDGET = 4
CAUSAL = attn.Mask(causal=True)


def build(**options):
    return attn.build("tova", num_heads=H, head_dim=D, **{"budget": BUDGET, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("pieces", [(1,) * T, (6,) + (1,) * (T - 6), (3, 4, 1, 4)])
def test_decode_equals_official_rule(kv_heads, pieces):
    layer = build(num_kv_heads=kv_heads)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, kept, scores = decode(
        params, x, pieces, kv_heads=kv_heads, score=last_query_mean, keep=top_scores(BUDGET), shared_heads=True
    )
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    positions = np.asarray(cache["cache_positions"])
    for b in range(B):
        assert all(kept[b][g] == kept[b][0] for g in range(kv_heads))  # one selection for the layer
        for g in range(kv_heads):
            np.testing.assert_array_equal(positions[b, g], kept[b][g])
            expected_scores = [scores[b][g][j] for j in kept[b][g]]
            np.testing.assert_allclose(cache["cache_key_mass"][b, g], expected_scores, rtol=1e-5, atol=1e-6)
    # not a sliding window: some kept entry is older than the last BUDGET tokens
    assert any(min(kept[b][0]) < T - BUDGET for b in range(B))
    np.testing.assert_array_equal(cache["cache_lengths"], np.full((B, kv_heads), BUDGET))


def test_alibi_equals_rule():
    """A bias position is exact: every head keeps the same entries."""
    layer = build(position="alibi")
    x = inputs(seed=3)
    params = layer.init(jax.random.key(2), x, mask=CAUSAL)
    y, _ = decode_pieces(layer, params, x, (1,) * T)
    expected, _, _ = decode(
        params, x, (1,) * T, kv_heads=H, score=last_query_mean, keep=top_scores(BUDGET), shared_heads=True,
        position="alibi",
    )  # fmt: skip
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)


def test_budget_at_least_length_is_softmax():
    x = inputs(length=6)
    layer = build(budget=6, num_kv_heads=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    _, cache = decode_equals_softmax(layer, params, x, (2, 1, 3), mask=CAUSAL)
    np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(range(6), (B, 2, 6)))


def test_cache_is_allocated_at_the_budget():
    x = inputs(length=20)
    small, large = build(num_kv_heads=2), build(num_kv_heads=2, budget=3 * BUDGET)
    params = small.init(jax.random.key(1), x[:, :4], mask=CAUSAL)

    def cache_bytes(layer, length):
        return decode_cache_bytes(layer, params, x[:, :length])

    _, cache = decode_pieces(small, params, x, (1,) * 20)
    assert cache["cached_key"].shape == (B, BUDGET, 2, D)
    assert cache_bytes(small, 8) == cache_bytes(small, 20) == cache_lib.nbytes(cache)
    per_slot = B * 2 * (2 * D * 4 + 4 + 4)  # keys, values (float32), position, last-query score
    assert cache_bytes(large, 20) - cache_bytes(small, 20) == 2 * BUDGET * per_slot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"budget": 2.5}, "budget=2.5 must be a positive int"),
        ({"window": 3}, "window=3 must be None"),
        ({"cache_bits": 2}, "cache_bits=2 must be None or one of"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())
