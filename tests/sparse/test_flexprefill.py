"""`flexprefill`: the block mask and the per-head pattern against a loop-by-loop numpy re-implementation of
FlexPrefill's rules, the output against dense causal softmax masked to those blocks, the reductions to causal
`softmax`, monotonicity in gamma, and the argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_sparse_attention
from attn.sparse.flexprefill import flexprefill_block_indices, flexprefill_selection
from tests.sparse.sparse_reference import blocks_to_token_mask, indices_to_sets, masked_softmax_attention, random_qk

OPTION_NAMES = ("block_size", "gamma", "tau", "min_budget", "max_budget", "q_offset")
# One compiled program per shape and options (much cheaper on CPU than the selection's ops run one by one).
select = jax.jit(flexprefill_selection, static_argnames=OPTION_NAMES)
select_indices = jax.jit(flexprefill_block_indices, static_argnames=OPTION_NAMES)

attend = jax.jit(block_sparse_attention, static_argnames=("block_size", "causal", "q_offset"))


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def fewest_reaching(values, target):
    total, count = 0.0, 0
    for value in sorted(values, reverse=True):
        if total >= target:
            break
        total, count = total + value, count + 1
    return count


def first_ranked(scores, count, forced):
    """The `count` best indices by score (ties: lower index), `forced` first."""
    order = sorted(range(len(scores)), key=lambda c: (c != forced, -scores[c], c))
    return set(order[:count])


def numpy_flexprefill(q, k, bs, gamma, tau, min_budget, max_budget, q_offset):
    """(block mask [B, H, nq, nk], query_aware [B, H]) by explicit loops over heads, queries and blocks."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, q_len, heads, dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    n_q, n_k, scale, n = -(-q_len // bs), -(-kv_len // bs), dim**-0.5, min(bs, q_len)
    low, high = min(min_budget, n_k), n_k if max_budget is None else min(max_budget, n_k)
    mask, aware = np.zeros((batch, heads, n_q, n_k), bool), np.zeros((batch, heads), bool)
    for b in range(batch):
        for h in range(heads):
            keys = k[b, :, h // group]
            attention = np.zeros((n, kv_len))
            for a, t in enumerate(range(q_len - n, q_len)):
                visible = np.arange(kv_len) <= q_offset + t
                attention[a, visible] = softmax(scale * keys[visible] @ q[b, t, h])
            vertical = attention.mean(0)
            slash = np.zeros(kv_len)
            for a, t in enumerate(range(q_len - n, q_len)):
                for j in range(kv_len):
                    if 0 <= q_offset + t - j < kv_len:
                        slash[q_offset + t - j] += attention[a, j] / n
            true = np.array([vertical[c * bs : (c + 1) * bs].sum() for c in range(n_k)])
            mean_k = np.array([keys[c * bs : (c + 1) * bs].mean(0) for c in range(n_k)])
            estimate = softmax(scale * mean_k @ q[b, q_len - n :, h].mean(0))
            middle = (estimate + true) / 2
            js = sum(0.5 * p[c] * np.log(p[c] / middle[c]) for p in (estimate, true) for c in range(n_k) if p[c] > 0)
            aware[b, h] = np.sqrt(max(js, 0.0)) < tau
            n_vertical = low if aware[b, h] else int(np.clip(fewest_reaching(vertical, gamma) // bs + 1, low, high))
            n_slash = low if aware[b, h] else int(np.clip(fewest_reaching(slash, gamma) // bs + 1, low, high))
            kept_vertical = first_ranked(true, n_vertical, 0)
            kept_slash = first_ranked([slash[d * bs : (d + 1) * bs].sum() for d in range(n_k)], n_slash, 0)
            for r in range(n_q):
                for c in range(n_k):
                    visible = c * bs <= q_offset + (r + 1) * bs - 1
                    diagonal = (q_offset + r * bs) // bs - c
                    mask[b, h, r, c] = visible and (c in kept_vertical or diagonal in kept_slash)
            if aware[b, h]:
                pooled = []
                for r in range(n_q):
                    mean_q = q[b, r * bs : (r + 1) * bs, h].mean(0)
                    visible = [c for c in range(n_k) if c * bs <= q_offset + (r + 1) * bs - 1]
                    row = softmax(scale * mean_k[visible] @ mean_q)
                    pooled += [(-row[i], r * n_k + c) for i, c in enumerate(visible)]
                total = 0.0
                for value, flat in sorted(pooled):
                    if gamma < 1 and total >= gamma * n_q:
                        break
                    mask[b, h, flat // n_k, flat % n_k] = True
                    total -= value
    return mask, aware


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, head_dim, block_size, gamma, tau, min_budget, max_budget, q_offset
    (2, 16, 16, 2, 2, 4, 2, 0.6, 0.3, 1, None, 0),
    (1, 13, 13, 4, 2, 4, 2, 0.9, 0.0, 1, 3, 0),  # tau 0: vertical-slash everywhere; budgets capped at 3
    (1, 13, 13, 2, 1, 8, 3, 0.7, 1.0, 2, None, 0),  # tau 1 > sqrt(ln 2): query-aware everywhere
    (1, 8, 20, 2, 2, 4, 2, 0.8, 0.4, 1, None, 12),  # chunked prefill: 8 queries after 12 cached keys
]


@pytest.mark.parametrize("case", CASES)
def test_selection_and_output_match_numpy(case):
    batch, q_len, kv_len, heads, kv_heads, dim, bs, gamma, tau, low, high, offset = case
    q, k, v = random_qk(sum(case[:7]), batch, q_len, kv_len, heads, kv_heads, dim)
    options = dict(block_size=bs, gamma=gamma, tau=tau, min_budget=low, max_budget=high, q_offset=offset)
    with jax.enable_x64(True):  # float64 selection: no threshold decided by float32 rounding
        q64, k64 = jnp.asarray(q, jnp.float64), jnp.asarray(k, jnp.float64)
        mask, aware = select(q64, k64, **options)
        indices = np.asarray(select_indices(q64, k64, **options))
    expected_mask, expected_aware = numpy_flexprefill(q, k, bs, gamma, tau, low, high, offset)
    np.testing.assert_array_equal(aware, expected_aware)
    np.testing.assert_array_equal(mask, expected_mask)
    if tau == 0.0:
        assert not np.any(aware)
    if tau >= 1.0:
        assert np.all(aware)

    assert indices_to_sets(indices) == [[[list(np.flatnonzero(row)) for row in head] for head in b] for b in mask]
    out = attend(q, k, v, block_indices=indices, block_size=bs, causal=True, q_offset=offset)
    allowed = blocks_to_token_mask(expected_mask, q_len, kv_len, bs, True, offset)
    np.testing.assert_allclose(out, masked_softmax_attention(q, k, v, allowed, dim**-0.5), atol=2e-5, rtol=2e-5)


def test_fewer_blocks_for_lower_gamma():
    q, k, _ = random_qk(4, 2, 24, 24, 2, 2, 4)
    masks = [np.asarray(select(q, k, block_size=2, gamma=g, tau=0.3)[0]) for g in (0.3, 0.6, 0.9, 1.0)]
    for smaller, larger in zip(masks[:-1], masks[1:], strict=True):
        assert np.all(larger | ~smaller)  # every block kept at the lower gamma is kept at the higher one
    assert masks[0].sum() < masks[-1].sum()


def test_gamma_one_in_query_aware_heads_keeps_every_visible_block():
    q, k, _ = random_qk(5, 1, 12, 12, 2, 2, 4)
    mask, aware = select(q, k, block_size=3, gamma=1.0, tau=1.0)
    assert np.all(aware)
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((4, 4), bool)))


def test_full_budget_equals_causal_softmax_layer():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    flex = attn.build("flexprefill", num_heads=2, head_dim=4, num_kv_heads=1, block_size=2, min_budget=5)
    params = jax.jit(lambda x: flex.init(jax.random.key(0), x, mask=mask))(x)
    softmax_layer = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)
    y = jax.jit(lambda p, x: flex.apply(p, x, mask=mask))(params, x)
    np.testing.assert_allclose(
        y, jax.jit(lambda p, x: softmax_layer.apply(p, x, mask=mask))(params, x), atol=2e-6, rtol=2e-5
    )


def test_the_layer_needs_a_causal_mask():
    x = jnp.ones((1, 4, 16))
    layer = attn.build("flexprefill", num_heads=2, head_dim=4, block_size=2)
    with pytest.raises(ValueError, match="causal prefill"):
        layer.init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gamma": 0.0}, "gamma=0.0"),
        ({"gamma": 1.5}, "gamma=1.5"),
        ({"tau": -0.1}, "tau=-0.1"),
        ({"min_budget": 0}, "min_budget=0"),
        ({"max_budget": 0}, "max_budget=0"),
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 1.5}, "block_size=1.5"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    q, k, _ = random_qk(0, 1, 8, 8, 2, 2, 4)
    with pytest.raises(ValueError, match=message):
        flexprefill_selection(q, k, **{"block_size": 2, **kwargs})
    with pytest.raises(ValueError, match=message):
        attn.build("flexprefill", num_heads=2, head_dim=4, **{"block_size": 2, **kwargs})


def test_max_budget_below_min_budget_raises():
    q, k, _ = random_qk(0, 1, 8, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="max_budget=1 must be None or >= min_budget=2"):
        flexprefill_selection(q, k, block_size=2, min_budget=2, max_budget=1)
