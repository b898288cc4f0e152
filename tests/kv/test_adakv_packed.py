"""Ada-KV's packed cache (layout="packed", the default): the kept entries of all kv heads back to back in one flat
buffer of sum-of-head-budgets slots. Packed split-KV attention equals the padded split-KV decode and an explicit numpy
loop at ragged per-head lengths; the layer's prefill and decode equal the padded layout while no head has overflowed
and a float64 loop of the per-head rule (SnapKV's window per head segment) after; the cache's bytes are the exact
formula n (budget + decode_budget) + n // 2 slots, about the budget's share of the full cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.core import cache as cache_lib
from attn.core.split_kv_decode import packed_split_kv_attention, split_kv_attention
from tests.kv.decoding import decode_pieces
from tests.kv.prompt_selection_reference import pooled_votes, softmax_row, top_keys
from tests.kv.score_reference import projections
from tests.kv.test_adakv import build, official_head_budgets
from tests.kv.test_snapkv import BUDGET, CAUSAL, DECODE, KERNEL, WINDOW, B, D, H, inputs, prefill_then_decode


def loop_attention(q, keys, values, segments):
    """Explicit loop: query head h of row b over the entries segments[b][g] (flat slots) of its kv head g."""
    batch, length, heads, _ = q.shape
    kv_heads = len(segments[0])
    out = np.zeros((batch, length, heads, values.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            slots = segments[b][h // (heads // kv_heads)]
            for t in range(length):
                if not slots:
                    continue
                logits = np.array([q[b, t, h] @ keys[b, s] for s in slots]) / np.sqrt(q.shape[-1])
                w = np.exp(logits - logits.max())
                out[b, t, h] = (w / w.sum()) @ values[b, slots]
    return out


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_packed_attention_equals_padded_and_loop(kv_heads):
    rng = np.random.default_rng(0)
    lengths = np.array([[5, 0, 7, 2][:kv_heads], [1, 6, 3, 4][:kv_heads]], np.int32)  # ragged, one empty head
    capacities = lengths + np.array([[2, 1, 0, 3][:kv_heads], [0, 0, 2, 1][:kv_heads]], np.int32)  # segment slack
    offsets = np.concatenate([np.zeros((2, 1), np.int32), np.cumsum(capacities, axis=1)[:, :-1]], axis=1)
    total = int(capacities.sum(axis=1).max()) + 3  # unused slots at the end
    keys, values = rng.normal(size=(2, total, D)), rng.normal(size=(2, total, 6))
    q = rng.normal(size=(2, 2, 4, D))
    segments = [[list(range(offsets[b, g], offsets[b, g] + lengths[b, g])) for g in range(kv_heads)] for b in range(2)]
    expected = loop_attention(q, keys, values, segments)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    for chunk in (3, 512):  # several splits, one split
        packed = packed_split_kv_attention(f32(q), f32(keys), f32(values), offsets, lengths, chunk=chunk)
        np.testing.assert_allclose(packed, expected, atol=2e-5, rtol=1e-5)
    padded_k, padded_v = np.zeros((2, 7, kv_heads, D)), np.zeros((2, 7, kv_heads, 6))  # a per-head copy, by loop
    for b in range(2):
        for g in range(kv_heads):
            padded_k[b, : lengths[b, g], g] = keys[b, segments[b][g]]
            padded_v[b, : lengths[b, g], g] = values[b, segments[b][g]]
    padded = split_kv_attention(f32(q), f32(padded_k), f32(padded_v), lengths=lengths, num_splits=2)
    np.testing.assert_allclose(packed, padded, atol=2e-6, rtol=1e-5)


def test_packed_attention_reads_quantized_codes():
    rng = np.random.default_rng(1)
    keys, values, q = rng.normal(size=(1, 9, D)), rng.normal(size=(1, 9, D)), rng.normal(size=(1, 1, 2, D))
    offsets, lengths = np.array([[0, 4]], np.int32), np.array([[3, 5]], np.int32)
    codes_k, codes_v = cache_lib.quantize(jnp.asarray(keys, jnp.float32), 8), cache_lib.quantize(jnp.asarray(values), 8)
    got = packed_split_kv_attention(jnp.asarray(q, jnp.float32), codes_k, codes_v, offsets, lengths, chunk=2)
    dequantized = [np.asarray(codes_k.dequantize(), np.float64), np.asarray(codes_v.dequantize(), np.float64)]
    expected = loop_attention(q, *dequantized, [[[0, 1, 2], [4, 5, 6, 7, 8]]])
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def head_capacities(kept_counts, kv_heads):
    """The module docstring's segments: kept + decode_budget + an even share of the rest of N (first heads +1)."""
    size = kv_heads * (BUDGET + DECODE) + kv_heads // 2
    base = [c + DECODE for c in kept_counts]
    spare = size - sum(base)
    return [base[g] + spare // kv_heads + (g < spare % kv_heads) for g in range(kv_heads)]


def per_head_reference(params, x, prompt, kv_heads):
    """float64 loop: the prefill's Ada-KV selection (official head budgets), then single-token decoding where each
    head's cache holds at most its own segment capacity, keeping its first cap - recent entries and its latest
    `recent` tokens. Returns the decoded outputs [B, T - prompt, E], the kept positions per (batch, head) and the
    capacities."""
    q, k, v, wo = projections(params, x)
    group, recent = H // kv_heads, WINDOW + DECODE
    out = np.zeros((B, x.shape[1] - prompt, H, D))
    kept, caps = [], []
    for b in range(B):
        scores = [pooled_votes(q, k, b, g, prompt, WINDOW, KERNEL, "max", H, kv_heads) for g in range(kv_heads)]
        budgets = official_head_budgets(scores)
        rows = [top_keys(scores[g], budgets[g]) + list(range(prompt - WINDOW, prompt)) for g in range(kv_heads)]
        caps.append(head_capacities([len(r) for r in rows], kv_heads))
        for g in range(kv_heads):
            for t in range(prompt, x.shape[1]):
                cache = rows[g] + [t]
                for h in range(g * group, (g + 1) * group):
                    out[b, t - prompt, h] = softmax_row(q[b, t, h], t, k[b, cache, g], cache) @ v[b, cache, g]
                if len(cache) > caps[b][g]:
                    cache = cache[: caps[b][g] - recent] + cache[-recent:]
                rows[g] = cache
        kept.append(rows)
    return np.einsum("bthd,hde->bte", out, wo), kept, caps


def segment_positions(cache, b, g):
    offset, length = int(cache["packed_offsets"][b, g]), int(cache["cache_lengths"][b, g])
    return list(np.asarray(cache["packed_positions"][b, offset : offset + length]))


@pytest.mark.parametrize("kv_heads", [4, pytest.param(2, marks=pytest.mark.slow)])
def test_packed_decode_equals_padded_then_per_head_reference(kv_heads):
    x = inputs(23, seed=2)  # a 16-token prompt, then 7 tokens: every head's segment overflows and slides
    packed_layer = build(num_kv_heads=kv_heads)
    params = packed_layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = prefill_then_decode(packed_layer, params, x, 16)
    padded, _ = prefill_then_decode(build(num_kv_heads=kv_heads, layout="padded"), params, x[:, :18], 16)
    # no head has filled its segment by token 18 (kept + decode_budget slots each): the layouts agree
    np.testing.assert_allclose(y[:, :18], padded, atol=2e-5, rtol=1e-5)
    expected, kept, caps = per_head_reference(params, x, 16, kv_heads)
    np.testing.assert_allclose(y[:, 16:], expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache["packed_capacities"]), caps)
    for b in range(B):
        for g in range(kv_heads):
            assert sorted(segment_positions(cache, b, g)) == kept[b][g], f"row {b} head {g}"
    assert any(len(set(caps[b])) > 1 for b in range(B)), "the heads' segments should differ in size"


@pytest.mark.slow
def test_chunks_decode_as_single_tokens_until_a_segment_fills():
    x = inputs(19, seed=2)
    layer = build(num_kv_heads=2)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    single, _ = prefill_then_decode(layer, params, x, 16)
    chunked, cache = decode_pieces(layer, params, x, [16, 2, 1])
    np.testing.assert_allclose(chunked[:, 16:], single[:, 16:], atol=2e-5, rtol=1e-5)
    assert int(cache["cache_index"]) == 19


def test_packed_bytes_are_the_sum_of_head_budgets():
    x = inputs(8)
    params = build(num_kv_heads=4).init(jax.random.key(1), x)

    def cache_bytes(layer):
        shape = jax.eval_shape(lambda: layer.apply(params, x, decode=True, mutable=["cache"])[1]["cache"])
        return shape, cache_lib.nbytes(shape)

    for budget in (BUDGET, 2 * BUDGET):
        shape, nbytes = cache_bytes(build(num_kv_heads=4, budget=budget))
        slots = 4 * (budget + DECODE) + 2  # n (budget + decode_budget) + n // 2
        assert shape["packed_key"].shape == (B, slots, D)
        # float32 key and value, int32 position, float32 vote per slot; offsets, capacities, lengths; the index
        assert nbytes == B * slots * (2 * D * 4 + 4 + 4) + 3 * B * 4 * 4 + 4
    padded = cache_bytes(build(num_kv_heads=4, budget=2 * BUDGET, layout="padded"))[1]
    assert nbytes < padded


def test_a_causal_window_keeps_the_padded_store():
    x = inputs(8)
    layer = build(window=(4, 0))
    params = layer.init(jax.random.key(0), x, mask=CAUSAL)
    cache = jax.eval_shape(lambda: layer.apply(params, x, decode=True, mutable=["cache"])[1]["cache"])
    assert "cached_key" in cache and "packed_key" not in cache
    assert "packed_key" in jax.eval_shape(lambda: build().apply(params, x, decode=True, mutable=["cache"])[1]["cache"])


@pytest.mark.slow
def test_generate_with_packed_adakv():
    from attn.models import DecoderLM, generate

    model = DecoderLM(
        vocab_size=32, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, attention="adakv",
        attention_options={"budget": 4, "observation_window": 2, "kernel_size": 3, "decode_budget": 2},
    )  # fmt: skip
    prompt = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
    params = model.init(jax.random.key(1), prompt)
    out = generate(model, params, prompt, 5)
    assert out.shape == (2, 14)
    np.testing.assert_array_equal(out[:, :9], prompt)
