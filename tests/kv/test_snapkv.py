"""SnapKV (`snapkv`): the prefill's per-head selection and the decode after it equal a float64 numpy loop of the
official rule (tests/kv/prompt_selection_reference.py), for max and average pooling, MHA and GQA; a prompt within
the budget decodes as full attention; the cache is allocated at budget + decode_budget whatever the length."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from attn.kv.snapkv import pool_scores
from attn.models import DecoderLM, generate, init_cache
from tests.kv.prompt_selection_reference import decode_reference

B, E, H, D = 2, 16, 4, 8
BUDGET, WINDOW, KERNEL, DECODE = 6, 2, 3, 2
CAUSAL = attn.Mask(causal=True)


def build(**options):
    defaults = {"budget": BUDGET, "observation_window": WINDOW, "kernel_size": KERNEL, "decode_budget": DECODE}
    return attn.build("snapkv", num_heads=H, head_dim=D, **{**defaults, **options})


def inputs(length, seed=0):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))  # sharp: heads vote for different keys


def prefill_then_decode(layer, params, x, prompt):
    """Outputs [B, T, E] of the prompt in one decode call, then one call per token, and the final cache."""
    apply = jax.jit(functools.partial(layer.apply, decode=True, mutable=["cache"]))
    _, state = apply(params, x)
    y, state = apply({**params, "cache": state["cache"]}, x[:, :prompt])
    outs = [y]
    for t in range(prompt, x.shape[1]):
        y, state = apply({**params, "cache": state["cache"]}, x[:, t : t + 1])
        outs.append(y)
    return np.asarray(jnp.concatenate(outs, axis=1)), state["cache"]


def check_against_reference(layer, x, prompt, *, kv_heads, pooling, capacity, counts, compress_from=None):
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = prefill_then_decode(layer, params, x, prompt)
    expected, kept = decode_reference(
        params, x, prompt, budget=BUDGET, window=WINDOW, kernel=KERNEL, pooling=pooling, decode_budget=DECODE,
        capacity=capacity, counts=counts, heads=H, kv_heads=kv_heads, compress_from=compress_from,
    )  # fmt: skip
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    lengths = np.asarray(cache["cache_lengths"])
    positions = np.asarray(cache["cache_positions"])
    for b in range(B):
        for g in range(kv_heads):
            assert lengths[b, g] == len(kept[b][g])
            np.testing.assert_array_equal(positions[b, g, : lengths[b, g]], kept[b][g], err_msg=f"row {b} head {g}")
    return cache, kept


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_selection_and_decode_equal_reference(pooling, kv_heads):
    layer = build(num_kv_heads=kv_heads, pooling=pooling)
    x = inputs(16)  # a 12-token prompt, then 4 tokens: the decode slots fill and the recent window slides
    cache, kept = check_against_reference(
        layer, x, 12, kv_heads=kv_heads, pooling=pooling, capacity=BUDGET + DECODE,
        counts=lambda b, g, scores: BUDGET - WINDOW,
    )  # fmt: skip
    assert cache["cached_key"].shape == (B, BUDGET + DECODE, kv_heads, D)
    assert any(kept[b][0] != kept[b][1] for b in range(B)), "the heads should keep different prompt keys"


def test_prompt_within_budget_equals_full_attention():
    layer = build(num_kv_heads=2)
    x = inputs(BUDGET + DECODE)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    full = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2).apply(params, x, mask=CAUSAL)
    y, cache = prefill_then_decode(layer, params, x, BUDGET)
    np.testing.assert_allclose(y, full, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.apply(params, x, mask=CAUSAL), full, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(np.arange(BUDGET + DECODE), (B, 2, 8)))


def test_pool_scores_equals_torch_padding_rule():
    scores = np.array([[0.3, 0.1, 0.9, 0.2, 0.5, 0.7]], np.float32)
    include = np.array([[True, True, True, True, False, False]])
    # avg: zero padding, divided by the kernel size everywhere (count_include_pad); max: -inf padding
    np.testing.assert_allclose(pool_scores(scores, include, 3, "avg")[0, :4], [0.4 / 3, 1.3 / 3, 1.2 / 3, 1.1 / 3])
    np.testing.assert_allclose(pool_scores(scores, include, 3, "max")[0, :4], [0.3, 0.9, 0.9, 0.9])


def test_cache_allocated_at_budget():
    layer = build(num_kv_heads=2)
    x = inputs(40)
    params = layer.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    shapes = [
        jax.eval_shape(lambda n=n: layer.apply(params, x[:, :n], decode=True, mutable=["cache"])[1]["cache"])
        for n in (10, 40)
    ]
    assert cache_lib.nbytes(shapes[0]) == cache_lib.nbytes(shapes[1])
    assert shapes[1]["cached_key"].shape == (B, BUDGET + DECODE, 2, D)
    larger = build(num_kv_heads=2, budget=2 * BUDGET)
    big = jax.eval_shape(lambda: larger.apply(params, x, decode=True, mutable=["cache"])[1]["cache"])
    per_slot = 2 * (2 * D * 4 + 4 + 4)  # 2 kv heads: float32 key and value, int32 position, float32 votes
    assert cache_lib.nbytes(big) - cache_lib.nbytes(shapes[1]) == B * BUDGET * per_slot


def test_quantized_cache_stores_codes_and_stays_close():
    x = inputs(16)
    exact_layer, quantized = build(num_kv_heads=2), build(num_kv_heads=2, cache_bits=8)
    params = exact_layer.init(jax.random.key(1), x, mask=CAUSAL)
    exact, exact_cache = prefill_then_decode(exact_layer, params, x, 12)
    approx, cache = prefill_then_decode(quantized, params, x, 12)
    assert cache["cached_key"].codes.dtype == jnp.uint8
    assert cache_lib.nbytes(cache) < cache_lib.nbytes(exact_cache)
    error = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < error < 0.02, error


def test_generate_with_snapkv_model():
    model = DecoderLM(
        vocab_size=32, num_layers=2, d_model=16, num_heads=2, mlp_dim=32, attention="snapkv",
        attention_options={"budget": 4, "observation_window": 2, "kernel_size": 3, "decode_budget": 2},
    )  # fmt: skip
    prompt = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
    params = model.init(jax.random.key(1), prompt)
    assert init_cache(model, params, 2, 500)["layers_0"]["attention"]["cached_key"].shape == (2, 6, 2, 8)
    out = generate(model, params, prompt, 5)
    assert out.shape == (2, 14)
    np.testing.assert_array_equal(out[:, :9], prompt)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"observation_window": 6}, r"observation_window=6 must be in \[1, budget=6\)"),
        ({"kernel_size": 4}, "kernel_size=4 must be odd"),
        ({"pooling": "mean"}, "pooling='mean' must be one of"),
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"decode_budget": -1}, "decode_budget=-1 must be a non-negative int"),
        ({"position": "alibi"}, "position='alibi' must be one of"),
        ({"window": 3}, "window=3 must be None"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs(8))
