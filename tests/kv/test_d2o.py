"""D2O (`d2o`): decoding equals a numpy replay of the official rule (H2O scores, sinks, recent window; evicted
entries merged into their most similar kept key above an EMA threshold, weighted scatter-mean) on float64
projections; merging a copy of a kept entry changes nothing; budget >= length is causal softmax attention; the cache
is allocated at the budget; per-layer budgets follow the density formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kv import d2o
from tests.kv.decoding import decode_equals_softmax, decode_pieces
from tests.kv.score_reference import np_rope, projections

B, T, E, H, D = 2, 12, 16, 4, 8
BUDGET, RECENT, SINKS, ALPHA = 6, 2, 1, 0.5
CAUSAL = attn.Mask(causal=True)


def build(**options):
    base = {"budget": BUDGET, "recent": RECENT, "sinks": SINKS, "alpha": ALPHA}
    return attn.build("d2o", num_heads=H, head_dim=D, **{**base, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def reference(params, x, pieces, *, kv_heads, budget=BUDGET, recent=RECENT, sinks=SINKS, alpha=ALPHA):
    """Explicit loops: every (batch, kv head) holds a list of entries [position, key, value, score]."""
    q, k, v, out_kernel = projections(params, x)
    heads, group = q.shape[2], q.shape[2] // kv_heads
    out = np.zeros(q.shape)
    cache = [[[] for _ in range(kv_heads)] for _ in range(B)]
    threshold = [None] * B
    start = 0
    for size in pieces:
        chunk, n = list(range(start, start + size)), start + size
        for b in range(B):
            cands = [
                cache[b][g] + [[j, k[b, j, g].copy(), v[b, j, g].copy(), 0.0] for j in chunk] for g in range(kv_heads)
            ]
            for h in range(heads):
                g = h // group
                for t in chunk:
                    seen = [e for e in cands[g] if e[0] <= t]
                    keys = np_rope(np.stack([e[1] for e in seen]), np.array([e[0] for e in seen]))
                    logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                    out[b, t, h] = w @ np.stack([e[2] for e in seen])
                    for e, a in zip(seen, w, strict=True):
                        e[3] += a
            kept, evicted = [], []
            for g in range(kv_heads):
                ents = cands[g]
                late = [e for e in ents if e[0] >= n - recent]
                sink = [e for e in ents if e[0] < sinks and e[0] < n - recent]
                rest = sorted((e for e in ents if sinks <= e[0] < n - recent), key=lambda e: (-e[3], e[0]))
                keep = sorted(late + sink + rest[: budget - recent - sinks], key=lambda e: e[0])
                kept.append(keep)
                evicted.append([e for e in ents if not any(e is f for f in keep)])
            unit = lambda a: a / np.linalg.norm(a)  # noqa: E731
            best = [
                [max((unit(e[1]) @ unit(f[1]), -i) for i, f in enumerate(kept[g])) for e in evicted[g]]
                for g in range(kv_heads)
            ]
            sims = [c for g in range(kv_heads) for c, _ in best[g]]
            if sims:
                mean = float(np.mean(sims))
                threshold[b] = mean if threshold[b] is None else alpha * threshold[b] + (1 - alpha) * mean
            for g in range(kv_heads):
                sums = [[np.zeros(D), np.zeros(D), 0] for _ in kept[g]]
                for e, (c, neg_i) in zip(evicted[g], best[g], strict=True):
                    if c >= threshold[b]:
                        sums[-neg_i][0] += c * e[1]
                        sums[-neg_i][1] += c * e[2]
                        sums[-neg_i][2] += 1
                for f, (sk, sv, count) in zip(kept[g], sums, strict=True):
                    f[1], f[2] = (f[1] + sk) / (1 + count), (f[2] + sv) / (1 + count)
                cache[b][g] = kept[g]
        start = n
    return np.einsum("bthd,hde->bte", out, out_kernel), cache, threshold


@pytest.mark.parametrize(
    ("kv_heads", "pieces"),
    [
        pytest.param(4, (1,) * T, marks=pytest.mark.slow),
        (2, (6,) + (1,) * (T - 6)),
        pytest.param(2, (3, 4, 1, 4), marks=pytest.mark.slow),
    ],
)
def test_decode_equals_official_rule(kv_heads, pieces):
    layer = build(num_kv_heads=kv_heads)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, kept, threshold = reference(params, x, pieces, kv_heads=kv_heads)
    np.testing.assert_allclose(y, expected, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(cache["merge_threshold"], threshold, rtol=1e-5)
    _, k, _, _ = projections(params, x)
    merged = 0
    for b in range(B):
        for g in range(kv_heads):
            positions = [e[0] for e in kept[b][g]]
            assert int(cache["cache_lengths"][b, g]) == len(positions)
            np.testing.assert_array_equal(cache["cache_positions"][b, g, : len(positions)], positions)
            keys = np.stack([e[1] for e in kept[b][g]])
            np.testing.assert_allclose(cache["cached_key"][b, : len(positions), g], keys, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(
                cache["cache_key_mass"][b, g, : len(positions)], [e[3] for e in kept[b][g]], rtol=1e-4, atol=1e-6
            )
            merged += sum(not np.allclose(keys[i], k[b, p, g]) for i, p in enumerate(positions))
    assert merged > 0, "some kept entry should have absorbed an evicted one"


def test_merging_a_copy_changes_nothing_and_threshold_filters():
    """Entry 3 is a copy of kept entry 0 (similarity 1: merged, unchanged); entry 4 is orthogonal to every kept key
    (similarity 0, below the threshold 0.5: evicted without a merge)."""
    rng = np.random.default_rng(0)
    keys = np.zeros((1, 5, 1, 4), np.float32)
    keys[0, :3, 0] = np.eye(4)[:3] + 0.1 * rng.standard_normal((3, 4))
    keys[0, :3, 0, 3] = 0.0
    keys[0, 3, 0], keys[0, 4, 0] = keys[0, 0, 0], np.array([0, 0, 0, 1.0])
    values = rng.standard_normal((1, 5, 1, 3)).astype(np.float32)
    values[0, 3] = values[0, 0]
    kept = np.array([[[True, True, True, False, False]]])
    k2, v2, threshold = d2o.merge_evicted(
        jnp.asarray(keys), jnp.asarray(values), kept, ~kept, jnp.array([jnp.nan]), ALPHA
    )
    np.testing.assert_allclose(threshold, [0.5], rtol=1e-6)  # mean of the similarities 1 and 0
    np.testing.assert_allclose(k2, keys, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v2, values, rtol=1e-6, atol=1e-7)
    # a second eviction moves the threshold by the EMA
    _, _, again = d2o.merge_evicted(jnp.asarray(keys), jnp.asarray(values), kept, ~kept, threshold, 0.25)
    np.testing.assert_allclose(again, [0.25 * 0.5 + 0.75 * 0.5], rtol=1e-6)
    _, _, none = d2o.merge_evicted(jnp.asarray(keys), jnp.asarray(values), kept, kept & False, threshold, 0.25)
    np.testing.assert_allclose(none, threshold)  # no eviction: unchanged


def test_budget_at_least_length_is_softmax():
    x = inputs(length=7)
    layer = build(budget=7, recent=3, num_kv_heads=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    _, cache = decode_equals_softmax(layer, params, x, (1,) * 7, mask=CAUSAL)
    assert np.isnan(np.asarray(cache["merge_threshold"])).all()  # nothing was evicted


def test_cache_is_allocated_at_the_budget():
    x = inputs(length=14)
    layer = build(num_kv_heads=2)
    params = layer.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    _, cache = decode_pieces(layer, params, x, (5, 9))
    assert cache["cached_key"].shape == (B, BUDGET, 2, D) and cache["merge_threshold"].shape == (B,)
    np.testing.assert_array_equal(cache["cache_lengths"], np.full((B, 2), BUDGET))
    shapes = jax.eval_shape(lambda: layer.apply(params, x, decode=True, mutable=["cache"])[1])
    assert shapes["cache"]["cached_value"].shape == (B, BUDGET, 2, D)


def test_layer_budgets_and_density():
    # softmax(-[0, ln 3]) = [3/4, 1/4]; r = w * 2 * 16 / 64 = [3/8, 1/8]; B_l = floor(64 r 1/2) + floor(64 r 1/2)
    options = d2o.layer_budgets([0.0, np.log(3.0)], budget=16, recent=8, length=64)
    assert options == [{"budget": 24, "recent": 12}, {"budget": 8, "recent": 4}]
    assert d2o.layer_budgets([0.3, 0.3, 0.3], budget=16, recent=4, length=64) == [{"budget": 16, "recent": 4}] * 3
    weights = np.random.default_rng(1).dirichlet(np.ones(6), size=(2, 3, 5))  # [B, H, Tq, Tk]
    variance = np.array([np.mean([np.var(weights[b, h].sum(0)) for b in range(2)]) for h in range(3)])
    expected = np.mean((variance - variance.min()) / (variance.max() - variance.min() + 1e-6))
    np.testing.assert_allclose(d2o.attention_density(jnp.asarray(weights)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"densities=\[\] must be a non-empty sequence"):
        d2o.layer_budgets([], budget=4, recent=2, length=8)
    with pytest.raises(ValueError, match="weights has shape"):
        d2o.attention_density(jnp.ones((2, 3, 4)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sinks": -1}, "sinks=-1 must be a non-negative int"),
        ({"alpha": 1.5}, "alpha=1.5 must be"),
        ({"recent": 7}, r"recent=7 must be in \[0, budget=6\]"),
        ({"budget": 0}, "budget=0 must be a positive int"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())


@pytest.mark.slow
def test_calibrate_gives_each_layer_its_budget():
    """Per-layer budgets from a decoder's prompt attention (numpy density of the captured weights), and each layer's
    cache is allocated at its own budget."""
    from attn.interventions import run_with_cache
    from attn.models import DecoderLM
    from attn.models.generate import init_cache

    sizes = {"vocab_size": 32, "num_layers": 2, "d_model": 16, "num_heads": H, "mlp_dim": 32, "head_dim": D}
    model = DecoderLM(attention="softmax", num_kv_heads=2, **sizes)
    prompt = jax.random.randint(jax.random.key(0), (B, 16), 0, 32)
    params = model.init(jax.random.key(1), prompt)
    options = d2o.calibrate(model, params, prompt, budget=8, recent=4)
    _, captured = run_with_cache(model, params, prompt, names=("attention_weights",))
    densities = []
    for path in sorted(captured):
        w = np.asarray(captured[path]["attention_weights"], np.float64)
        var = np.array([np.mean([np.var(w[b, h].sum(0)) for b in range(B)]) for h in range(H)])
        densities.append(np.mean((var - var.min()) / (var.max() - var.min() + 1e-6)))
    weights = np.exp(-np.array(densities)) / np.exp(-np.array(densities)).sum()
    ratios = np.clip(weights * 2 * 8 / 16, 0.01, 1.0)
    assert options == [{"budget": 2 * int(16 * r * 4 / 8), "recent": int(16 * r * 4 / 8)} for r in ratios]
    assert options[0] != options[1], "the two layers' densities should differ"
    per_layer = model.clone(attention="d2o", attention_options=options)
    caches = init_cache(per_layer, params, B, 16)
    capacities = sorted(a.shape[1] for p, a in jax.tree_util.tree_leaves_with_path(caches) if "cached_key" in str(p))
    assert capacities == sorted(o["budget"] for o in options)


@pytest.mark.slow
def test_quantized_cache_merges_and_keeps_codes():
    """cache_bits=8: merged entries are re-encoded; the cache stores uint8 codes at the budget, close to float."""
    x = inputs(seed=5)
    layer, quantized = build(num_kv_heads=2), build(num_kv_heads=2, cache_bits=8)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    exact, _ = decode_pieces(layer, params, x, (4,) + (1,) * (T - 4))
    approx, cache = decode_pieces(quantized, params, x, (4,) + (1,) * (T - 4))
    assert cache["cached_key"].codes.dtype == jnp.uint8 and cache["cached_key"].codes.shape == (B, BUDGET, 2, D)
    error = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < error < 0.05, error
