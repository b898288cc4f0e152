"""A2SF (`a2sf`): decoding equals a numpy replay of the paper's score A_n = sum_q f^(n-1-q) a_q (kept per kv head,
the query heads of a group summed) with H2O's heavy-hitter-plus-recent selection, on attention computed from q/k in
float64; forgetting = 1 is `h2o` exactly and forgetting < 1 keeps other tokens; the cache is allocated at the
budget."""

import jax
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from tests.kv.decoding import decode_pieces
from tests.kv.score_reference import accumulated, decode, heavy_recent

B, T, E, H, D = 2, 12, 16, 4, 8
BUDGET, RECENT = 5, 2
CAUSAL = attn.Mask(causal=True)


def build(name="a2sf", **options):
    return attn.build(name, num_heads=H, head_dim=D, num_kv_heads=2, **{"budget": BUDGET, "recent": RECENT, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


@pytest.mark.parametrize("forgetting", [0.5, 0.0])
@pytest.mark.parametrize("pieces", [(1,) * T, (6,) + (1,) * (T - 6), (3, 4, 1, 4)])
def test_decode_equals_paper_rule(forgetting, pieces):
    layer = build(forgetting=forgetting)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, kept, scores = decode(
        params, x, pieces, kv_heads=2, score=accumulated(forgetting), keep=heavy_recent(BUDGET, RECENT)
    )
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    positions = np.asarray(cache["cache_positions"])
    for b in range(B):
        for g in range(2):
            np.testing.assert_array_equal(positions[b, g], kept[b][g])
            expected_scores = [scores[b][g][j] for j in kept[b][g]]
            np.testing.assert_allclose(cache["cache_key_mass"][b, g], expected_scores, rtol=1e-5, atol=1e-6)


def test_forgetting_one_is_h2o_and_below_one_differs():
    x = inputs(seed=4)
    h2o = build("h2o")
    params = h2o.init(jax.random.key(1), x, mask=CAUSAL)
    pieces = (4,) + (1,) * (T - 4)
    y_h2o, cache_h2o = decode_pieces(h2o, params, x, pieces)
    y_one, cache_one = decode_pieces(build(forgetting=1.0), params, x, pieces)
    np.testing.assert_array_equal(y_one, y_h2o)
    jax.tree.map(np.testing.assert_array_equal, cache_one, cache_h2o)
    _, cache_low = decode_pieces(build(forgetting=0.3), params, x, pieces)
    assert not np.array_equal(cache_low["cache_positions"], cache_h2o["cache_positions"])


def test_cache_is_allocated_at_the_budget():
    x = inputs(length=20)
    layer = build()
    params = layer.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    _, cache = decode_pieces(layer, params, x, (1,) * 20)
    assert cache["cached_key"].shape == (B, BUDGET, 2, D) and cache["cache_key_mass"].shape == (B, 2, BUDGET)
    short = jax.eval_shape(lambda: layer.apply(params, x[:, :8], decode=True, mutable=["cache"])[1]["cache"])
    assert cache_lib.nbytes(short) == cache_lib.nbytes(cache)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"forgetting": 1.5}, r"forgetting=1.5 must be a number in \[0.0, 1.0\]"),
        ({"forgetting": -0.1}, r"forgetting=-0.1 must be a number in \[0.0, 1.0\]"),
        ({"recent": 9}, r"recent=9 must be in \[0, budget=5\]"),
        ({"budget": -2}, "budget=-2 must be a positive int"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())
