"""Scissorhands (`scissorhands`): decoding equals a numpy replay of the rule (per step, each seen entry flagged when
its group-mean attention is below 1 / entries seen; over budget, drop max(n - B, m) of the most-flagged entries over
the latest w steps outside the recent window) on attention computed from q/k in float64, token by token and after a
prompt chunk; the cache's bit history equals the replay's flags; budget >= length is causal softmax attention; the
cache is allocated at the budget."""

import logging

import jax
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from tests.kv.decoding import decode_cache_bytes, decode_equals_softmax, decode_pieces
from tests.kv.score_reference import decode

B, T, E, H, D = 2, 16, 16, 4, 8
BUDGET, HISTORY, RECENT, DROP = 6, 4, 1, 2
CAUSAL = attn.Mask(causal=True)


def build(**options):
    defaults = {"budget": BUDGET, "history": HISTORY, "recent": RECENT, "drop": DROP}
    return attn.build("scissorhands", num_heads=H, head_dim=D, **{**defaults, **options})


def inputs(seed=0, length=T):
    # sharp attention: weights far from the 1/t threshold, heads that disagree
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def low_flags(old, weights, chunk, heads):
    """Score of an entry: {query position: flag} for every query that saw it, flag = the mean attention of `heads`
    below 1 / (entries that query saw)."""
    new = {j: dict(flags) for j, flags in old.items()}
    for t in chunk:
        rows = [weights[(h, t)] for h in heads]
        for j in rows[0]:
            mean = sum(row[j] for row in rows) / len(heads)
            new.setdefault(j, {})[t] = mean < 1.0 / len(rows[0])
    return new


def count(flags, last, window):
    return sum(flag for t, flag in flags.items() if t > last - window)


def persistence_drop(budget, history, recent, drop):
    """Over budget: drop max(n - budget, drop) entries outside the recent window, most flags first (ties: earlier)."""

    def keep(entries, scores, seen):
        if len(entries) <= budget:
            return entries
        last = seen - 1
        eligible = sorted(
            (j for j in entries if j < seen - recent), key=lambda j: (-count(scores[j], last, history), j)
        )
        gone = set(eligible[: max(len(entries) - budget, drop)])
        return [j for j in entries if j not in gone]

    return keep


def check_history(cache, kept, scores, kv_heads, last):
    positions, lengths = np.asarray(cache["cache_positions"]), np.asarray(cache["cache_lengths"])
    history = np.asarray(cache["cache_key_history"])
    for b in range(B):
        for g in range(kv_heads):
            n = len(kept[b][g])
            assert lengths[b, g] == n
            np.testing.assert_array_equal(positions[b, g, :n], kept[b][g])
            for slot, j in enumerate(kept[b][g]):
                bits = sum(1 << (last - t) for t, flag in scores[b][g][j].items() if flag and last - t < 32)
                assert int(history[b, g, slot]) == bits, (b, g, j)


@pytest.mark.parametrize(
    ("kv_heads", "pieces"), [(4, (1,) * T), (2, (1,) * T), (2, (7,) + (1,) * (T - 7)), (4, (3, 5, 1, 7))]
)
def test_decode_equals_replay(kv_heads, pieces):
    layer = build(num_kv_heads=kv_heads)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    keep = persistence_drop(BUDGET, HISTORY, RECENT, DROP)
    expected, kept, scores = decode(params, x, pieces, kv_heads=kv_heads, score=low_flags, keep=keep)
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    check_history(cache, kept, scores, kv_heads, T - 1)
    assert any(kept[b][0] != kept[b][1] for b in range(B)), "the heads should keep different tokens"
    assert any(min(kept[b][g]) < T - BUDGET for b in range(B) for g in range(kv_heads)), "not a sliding window"


def test_budgeted_drops_refill():
    """Token by token, the cache fills to the budget, drops `drop` entries at once, refills: lengths cycle."""
    layer = build(num_kv_heads=2, drop=3)
    x = inputs(seed=4)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    apply = jax.jit(lambda variables, chunk: layer.apply(variables, chunk, decode=True, mutable=["cache"]))
    cache = apply(params, x)[1]["cache"]
    lengths = []
    for t in range(T):
        cache = apply({**params, "cache": cache}, x[:, t : t + 1])[1]["cache"]
        lengths.append(int(cache["cache_lengths"][0, 0]))
    # 1..6, then 7 entries > 6: drop 3 -> 4, 5, 6, then 7 -> 4 ...
    assert lengths == [1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4]


def test_window_of_one_step():
    """history=1 counts only the latest query's flag."""
    layer = build(num_kv_heads=2, history=1)
    x = inputs(seed=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, (1,) * T)
    keep = persistence_drop(BUDGET, 1, RECENT, DROP)
    expected, kept, scores = decode(params, x, (1,) * T, kv_heads=2, score=low_flags, keep=keep)
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    check_history(cache, kept, scores, 2, T - 1)


def test_budget_at_least_length_is_softmax(caplog):
    x = inputs(length=7)
    layer = build(budget=7, num_kv_heads=2)
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
    assert cache["cached_key"].shape == (B, BUDGET, 2, D) and cache["cache_key_history"].shape == (B, 2, BUDGET)
    assert cache["cache_key_history"].dtype == np.uint32 and int(cache["cache_index"]) == 24

    def cache_bytes(layer, length):
        return decode_cache_bytes(layer, params, x[:, :length])

    assert cache_bytes(small, 8) == cache_bytes(small, 24) == cache_lib.nbytes(cache)
    per_slot = B * 2 * (2 * D * 4 + 4 + 4)  # keys, values (float32), position, history
    assert cache_bytes(large, 24) - cache_bytes(small, 24) == BUDGET * per_slot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"history": 33}, r"history=33 must be in \[1, 32\]"),
        ({"history": 0}, "history=0 must be a positive int"),
        ({"drop": 0}, "drop=0 must be a positive int"),
        ({"recent": 5, "drop": 2}, r"recent=5 and drop=2 must satisfy .* recent \+ drop <= budget=6"),
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"window": 3}, "window=3 must be None"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())
