"""H2O (`h2o`): decoding equals a numpy replay of the official real-drop cache (accumulated attention per kv head,
top heavy hitters outside the recent window) on attention computed from q/k in float64, token by token and after a
prompt chunk; the heads keep different tokens; budget >= length is causal softmax attention; the cache is allocated
at the budget."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from tests.kv.decoding import decode_cache_bytes, decode_equals_softmax, decode_pieces
from tests.kv.score_reference import accumulated, decode, heavy_recent

B, T, E, H, D = 2, 12, 16, 4, 8
BUDGET, RECENT = 5, 2
CAUSAL = attn.Mask(causal=True)


def build(**options):
    return attn.build("h2o", num_heads=H, head_dim=D, **{"budget": BUDGET, "recent": RECENT, **options})


def inputs(seed=0, length=T):
    # sharp attention, so the heavy hitters differ between heads and from the recent window
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def check_cache(cache, kept, scores, kv_heads):
    positions, lengths = np.asarray(cache["cache_positions"]), np.asarray(cache["cache_lengths"])
    for b in range(B):
        for g in range(kv_heads):
            n = len(kept[b][g])
            assert lengths[b, g] == n
            np.testing.assert_array_equal(positions[b, g, :n], kept[b][g])
            expected = [scores[b][g][j] for j in kept[b][g]]
            np.testing.assert_allclose(cache["cache_key_mass"][b, g, :n], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("pieces", [(1,) * T, (6,) + (1,) * (T - 6), (3, 4, 1, 4)])
def test_decode_equals_official_rule(kv_heads, pieces):
    layer = build(num_kv_heads=kv_heads)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, kept, scores = decode(
        params, x, pieces, kv_heads=kv_heads, score=accumulated(), keep=heavy_recent(BUDGET, RECENT)
    )
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    check_cache(cache, kept, scores, kv_heads)
    assert any(kept[b][0] != kept[b][1] for b in range(B)), "the heads should keep different tokens"
    # the rule is not a sliding window: some heavy hitter lies outside the last BUDGET tokens
    assert any(min(kept[b][g]) < T - BUDGET for b in range(B) for g in range(kv_heads))


@pytest.mark.parametrize("recent", [0, BUDGET])
def test_window_extremes_equal_rule(recent):
    """recent=0: heavy hitters only; recent=budget: a sliding window of the latest tokens."""
    layer = build(recent=recent, num_kv_heads=2)
    x = inputs(seed=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, (1,) * T)
    expected, kept, scores = decode(
        params, x, (1,) * T, kv_heads=2, score=accumulated(), keep=heavy_recent(BUDGET, recent)
    )
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    check_cache(cache, kept, scores, 2)
    if recent == BUDGET:
        np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(range(T - BUDGET, T), (B, 2, BUDGET)))


def test_budget_at_least_length_is_softmax(caplog):
    x = inputs(length=7)
    layer = build(budget=7, recent=3, num_kv_heads=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    with caplog.at_level(logging.INFO):
        y, cache = decode_equals_softmax(layer, params, x, (1,) * 7, mask=CAUSAL)
    np.testing.assert_allclose(layer.apply(params, x, mask=CAUSAL), y, atol=2e-5)
    np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(range(7), (B, 2, 7)))
    assert "budget=7 >= length 7 of the cache: nothing is evicted" in caplog.text


def test_cache_is_allocated_at_the_budget():
    x = inputs(length=24)
    small, large = build(num_kv_heads=2), build(num_kv_heads=2, budget=2 * BUDGET)
    params = small.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    _, cache = decode_pieces(small, params, x, (5,) + (1,) * 19)
    assert cache["cached_key"].shape == (B, BUDGET, 2, D) and cache["cache_key_mass"].shape == (B, 2, BUDGET)
    assert int(cache["cache_index"]) == 24
    np.testing.assert_array_equal(cache["cache_lengths"], np.full((B, 2), BUDGET))

    def cache_bytes(layer, length):
        return decode_cache_bytes(layer, params, x[:, :length])

    assert cache_bytes(small, 8) == cache_bytes(small, 24) == cache_lib.nbytes(cache)
    per_slot = B * 2 * (2 * D * 4 + 4 + 4)  # keys, values (float32), position, key mass
    assert cache_bytes(large, 24) - cache_bytes(small, 24) == BUDGET * per_slot


def test_alibi_reads_each_kv_heads_own_positions():
    """Heads keep different entries; the ALiBi bias of each query head uses its kv head's kept positions."""
    layer = build(position="alibi", num_kv_heads=2)
    x = inputs(seed=3)
    params = layer.init(jax.random.key(2), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, (1,) * T)
    expected, kept, _ = decode(
        params, x, (1,) * T, kv_heads=2, score=accumulated(), keep=heavy_recent(BUDGET, RECENT), position="alibi"
    )
    assert any(kept[b][0] != kept[b][1] for b in range(B))  # the two kv heads keep different tokens
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"recent": 6}, r"recent=6 must be in \[0, budget=5\]"),
        ({"recent": -1}, "recent=-1 must be a non-negative int"),
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"position": "learned"}, "position='learned' must be one of"),
        ({"window": 3}, "window=3 must be None"),
        ({"cache_bits": 3}, "cache_bits=3 must be None or one of"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())


def test_quantized_cache_keeps_codes_and_scores():
    """cache_bits=8: the cache stores uint8 codes at the budget; the output stays close to the float cache."""
    x = inputs(seed=5)
    layer, quantized = build(num_kv_heads=2), build(num_kv_heads=2, cache_bits=8)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    exact, _ = decode_pieces(layer, params, x, (4,) + (1,) * (T - 4))
    approx, cache = decode_pieces(quantized, params, x, (4,) + (1,) * (T - 4))
    assert cache["cached_key"].codes.dtype == jnp.uint8 and cache["cached_key"].codes.shape == (B, BUDGET, 2, D)
    assert cache["cache_key_mass"].shape == (B, 2, BUDGET)
    error = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < error < 0.05, error
