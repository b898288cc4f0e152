"""A²ATS (`a2ats`): decoding equals a numpy replay of the official decode step written from the equations with explicit
loops (query-aware metric of the prompt's queries rotated at w, k-means in that metric, codes of every key, per query
head top-k of the codeword scores outside the window and sinks, united over the kv group, exact RoPE attention); the
stored codes and codebook equal the replay's; budget >= length is causal softmax attention; bad options fail."""

import jax
import numpy as np
import pytest

import attn
from tests.kv.decoding import decode_pieces
from tests.kv.score_reference import attend, np_rope, projections

B, T, E, H, D = 2, 16, 16, 4, 8
PROMPT = 8
OPTIONS = {"budget": 3, "local_window": 2, "sinks": 1, "codebook_size": 4, "kmeans_iters": 3, "relative_position": 5}
CAUSAL = attn.Mask(causal=True)


def build(**options):
    return attn.build("a2ats", num_heads=H, head_dim=D, **{**OPTIONS, **options})


def inputs(seed=0):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, T, E))


def metric_distance(key, word, metric):
    diff = key - word
    return diff @ metric @ diff


def reference(params, x, *, kv_heads, budget, local_window, sinks, codebook_size, kmeans_iters, relative_position):
    """(y [B, T, E], codes [B][g][t], codebooks [B][g] list of words) of a prompt of PROMPT tokens (exact causal
    attention) followed by one token per step (retrieval)."""
    q, k, v, out_kernel = projections(params, x)
    group = H // kv_heads
    rotated = np_rope(q, relative_position)  # windowed RoPE: every query at the fixed position w
    out = np.zeros(q.shape)
    codes = [[None] * kv_heads for _ in range(B)]
    books = [[None] * kv_heads for _ in range(B)]
    for b in range(B):
        for g in range(kv_heads):
            rows = [rotated[b, t, h] for t in range(PROMPT) for h in range(g * group, (g + 1) * group)]
            moment = sum(np.outer(r, r) for r in rows)
            metric = moment / np.sqrt(np.mean(moment**2)) + 1e-6 * np.eye(D)
            keys = [k[b, t, g] for t in range(PROMPT)]
            book = [keys[s * PROMPT // codebook_size].copy() for s in range(codebook_size)]
            for _ in range(kmeans_iters):
                labels = [int(np.argmin([metric_distance(key, w, metric) for w in book])) for key in keys]
                for s in range(codebook_size):
                    members = [key for key, label in zip(keys, labels, strict=True) if label == s]
                    if members:
                        book[s] = np.mean(members, axis=0)
            books[b][g] = book
            codes[b][g] = [int(np.argmin([metric_distance(k[b, t, g], w, metric) for w in book])) for t in range(T)]
    for b in range(B):
        for h in range(H):
            g = h // group
            for t in range(PROMPT):
                out[b, t, h] = attend(q, k, v, b, h, t, list(range(t + 1)), group)[1]
        for t in range(PROMPT, T):
            local = [j for j in range(t + 1) if t - j < local_window or j < sinks]
            for g in range(kv_heads):
                chosen = set(local)
                for h in range(g * group, (g + 1) * group):
                    others = [j for j in range(t + 1) if j not in local]
                    score = {j: rotated[b, t, h] @ books[b][g][codes[b][g][j]] for j in others}
                    chosen |= set(sorted(others, key=lambda j: (-score[j], j))[:budget])
                for h in range(g * group, (g + 1) * group):
                    out[b, t, h] = attend(q, k, v, b, h, t, sorted(chosen), group)[1]
    return np.einsum("bthd,hde->bte", out, out_kernel), codes, books


@pytest.mark.parametrize("kv_heads", [2, pytest.param(4, marks=pytest.mark.slow)])  # 2: heads united per group
def test_decode_equals_numpy_replay(kv_heads):
    layer = build(num_kv_heads=kv_heads)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, (PROMPT,) + (1,) * (T - PROMPT))
    expected, codes, books = reference(params, x, kv_heads=kv_heads, **OPTIONS)
    np.testing.assert_allclose(y, expected, atol=3e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache["a2ats_codes"]).transpose(0, 2, 1), np.array(codes))
    np.testing.assert_allclose(cache["a2ats_codebook"], np.array(books), atol=1e-4, rtol=1e-4)
    # the retrieval reads fewer entries than the full cache: the output is not causal softmax attention
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=kv_heads)
    full = np.asarray(softmax.apply(params, x, mask=CAUSAL))
    np.testing.assert_allclose(y[:, :PROMPT], full[:, :PROMPT], atol=1e-5)
    assert np.abs(y[:, PROMPT:] - full[:, PROMPT:]).max() > 1e-2


def test_budget_covering_the_sequence_is_softmax():
    layer = build(budget=T, num_kv_heads=2)
    x = inputs(seed=3)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, _ = decode_pieces(layer, params, x, (4,) + (1,) * (T - 4))
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2)
    np.testing.assert_allclose(y, softmax.apply(params, x, mask=CAUSAL), atol=2e-5, rtol=1e-5)
    # the forward (decode=False) is causal softmax attention at any budget
    np.testing.assert_allclose(
        build(num_kv_heads=2).apply(params, x, mask=CAUSAL), softmax.apply(params, x, mask=CAUSAL), atol=1e-5
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"local_window": 0}, "local_window"),
        ({"codebook_size": -1}, "codebook_size"),
        ({"cache_bits": 8}, "cache_bits"),
        ({"position": "alibi"}, "position"),
    ],
)
def test_rejects_bad_options(options, message):
    x = inputs()[:, :4]
    with pytest.raises(ValueError, match=message):
        layer = build(**options)
        layer.init(jax.random.key(1), x, mask=CAUSAL)
