"""StreamingLLM (`streaming`): decoding equals an explicit-loop numpy reference of the official algorithm
(mit-han-lab/streaming-llm: evict_for_space before every token, keys rotated at their index in the cache and the
query at the cache length), whatever the split into decode calls; with the position shift off it equals the
forward under the sink-plus-window mask; the cache stays at its budget."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import cache as cache_lib
from attn.models import DecoderLM, generate, init_cache
from tests.kv.decoding import decode_pieces
from tests.kv.score_reference import np_rope

B, T, E, H, D = 2, 13, 16, 4, 8
SINKS, BUDGET = 2, 5
CAUSAL = attn.Mask(causal=True)


def build(**options):
    return attn.build("streaming", num_heads=H, head_dim=D, sinks=SINKS, budget=BUDGET, **options)


def inputs(seed=0, length=T):
    return jax.random.normal(jax.random.key(seed), (B, length, E))


def np_alibi_slopes(n):
    start = 2.0 ** (-8.0 / n)  # n a power of two
    return np.array([start ** (i + 1) for i in range(n)])


def reference(params, x, *, shift, kv_heads, position="rope"):
    """The official generation loop, token by token, in float64: before token t the cache evicts for space (keep
    the first SINKS and the last BUDGET - SINKS - 1 tokens once full), appends t and attends over the cache; with
    shift the cached keys sit at positions 0..n-1 and the query at n-1, else at their original positions."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params)["params"])
    x = np.asarray(x, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    group = H // kv_heads
    out = np.zeros((B, x.shape[1], H, D))
    for b in range(B):
        cache = []
        for t in range(x.shape[1]):
            if len(cache) + 1 > BUDGET:
                cache = cache[:SINKS] + cache[len(cache) - (BUDGET - SINKS - 1) :]
            cache.append(t)
            kv_pos = np.arange(len(cache)) if shift else np.array(cache)
            q_pos = len(cache) - 1 if shift else t
            keys, qt = k[b, cache], q[b, t][None]
            bias = np.zeros((H, len(cache)))
            if position == "rope":
                keys, qt = np_rope(keys, kv_pos[:, None]), np_rope(qt, q_pos)
            elif position == "alibi":
                bias = -np_alibi_slopes(H)[:, None] * np.abs(q_pos - kv_pos)[None]
            for h in range(H):
                logits = keys[:, h // group] @ qt[0, h] / np.sqrt(D) + bias[h]
                w = np.exp(logits - logits.max())
                out[b, t, h] = (w / w.sum()) @ v[b, cache, h // group]
    return np.einsum("bthd,hde->bte", out, p["out"]["kernel"])


PIECES = ((1,) * T, (5,) + (1,) * (T - 5), (3, 7, 1, 2))


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_equals_official_reference(shift, kv_heads):
    layer = build(num_kv_heads=kv_heads, shift_positions=shift)
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    expected = reference(params, x, shift=shift, kv_heads=kv_heads)
    for pieces in PIECES:
        y, _ = decode_pieces(layer, params, x, pieces)
        np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5, err_msg=f"pieces={pieces}")
    if not shift:  # the forward is full attention under the sink-plus-window mask
        forward = layer.apply(params, x, mask=CAUSAL)
        np.testing.assert_allclose(forward, expected, atol=2e-5, rtol=1e-5)


def test_shift_with_alibi_equals_reference():
    layer = build(position="alibi", shift_positions=True)
    x = inputs(seed=3)
    params = layer.init(jax.random.key(2), x, mask=CAUSAL)
    expected = reference(params, x, shift=True, kv_heads=H, position="alibi")
    for pieces in PIECES[:2]:
        y, _ = decode_pieces(layer, params, x, pieces)
        np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5, err_msg=f"pieces={pieces}")


def test_shift_changes_the_output_only_after_eviction():
    x = inputs()
    layer, plain = build(), build(shift_positions=False)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    shifted, _ = decode_pieces(layer, params, x, (1,) * T)
    original, _ = decode_pieces(plain, params, x, (1,) * T)
    np.testing.assert_allclose(shifted[:, :BUDGET], original[:, :BUDGET], atol=1e-5)
    assert np.abs(shifted[:, BUDGET:] - original[:, BUDGET:]).max() > 1e-3


def test_within_budget_equals_softmax():
    x = inputs(length=BUDGET)
    layer = build()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    softmax = attn.build("softmax", num_heads=H, head_dim=D)
    y, _ = decode_pieces(layer, params, x, (1,) * BUDGET)
    np.testing.assert_allclose(y, softmax.apply(params, x, mask=CAUSAL), atol=2e-5)


def test_cache_stays_at_budget():
    layer = build(num_kv_heads=2)
    x = inputs(length=40)
    params = layer.init(jax.random.key(1), x[:, :4], mask=CAUSAL)
    _, cache = decode_pieces(layer, params, x, (7,) + (1,) * 33)
    assert cache["cached_key"].shape == (B, BUDGET, 2, D) and cache["cached_value"].shape == (B, BUDGET, 2, D)
    assert int(cache["cache_index"]) == 40
    np.testing.assert_array_equal(cache["cache_lengths"], np.full((B, 2), BUDGET))
    kept = [0, 1] + list(range(40 - (BUDGET - SINKS), 40))
    np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(kept, (B, 2, BUDGET)))
    # the same cache bytes whatever the generated length
    short = jax.eval_shape(lambda: layer.apply(params, x[:, :8], decode=True, mutable=["cache"])[1]["cache"])
    long = jax.eval_shape(lambda: layer.apply(params, x, decode=True, mutable=["cache"])[1]["cache"])
    assert cache_lib.nbytes(short) == cache_lib.nbytes(long) == cache_lib.nbytes(cache)


def test_generate_with_streaming_model():
    model = DecoderLM(
        vocab_size=32, num_layers=2, d_model=16, num_heads=2, mlp_dim=32, attention="streaming",
        attention_options={"sinks": 1, "budget": 4},
    )  # fmt: skip
    prompt = jax.random.randint(jax.random.key(0), (2, 3), 0, 32)
    params = model.init(jax.random.key(1), prompt)
    cache = init_cache(model, params, 2, 500)
    assert cache["layers_0"]["attention"]["cached_key"].shape == (2, 4, 2, 8)
    out = generate(model, params, prompt, 12)
    assert out.shape == (2, 15)
    np.testing.assert_array_equal(out[:, :3], prompt)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_stores_codes_and_stays_close(bits):
    x = inputs()
    layer, quantized = build(), build(cache_bits=bits)
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    exact, exact_cache = decode_pieces(layer, params, x, PIECES[1])
    approx, cache = decode_pieces(quantized, params, x, PIECES[1])
    assert cache["cached_key"].codes.dtype == jnp.uint8
    assert cache["cached_key"].codes.shape == (B, BUDGET, H, D if bits == 8 else D // 2)
    assert cache_lib.nbytes(cache) < cache_lib.nbytes(exact_cache)
    error = np.abs(approx - exact).max() / np.abs(exact).max()
    assert error < (0.02 if bits == 8 else 0.3), error
    assert error > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sinks": 5, "budget": 5}, r"sinks=5 must be in \[0, budget=5\)"),
        ({"window": 3}, "window=3 must be None"),
        ({"cache_bits": 3}, "cache_bits=3 must be None or one of"),
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"shift_positions": 1}, "shift_positions=1 must be one of"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        attn.build("streaming", num_heads=H, head_dim=D, **options).init(jax.random.key(0), inputs())


def test_decode_rejects_positions_and_padding_masks():
    layer = build()
    x = inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    _, state = layer.apply(params, x, decode=True, mutable=["cache"])
    variables = {**params, "cache": state["cache"]}
    with pytest.raises(ValueError, match="positions with decode=True"):
        layer.apply(variables, x[:, :1], decode=True, positions=jnp.zeros((B, 1), jnp.int32), mutable=["cache"])
    padded = attn.Mask(causal=True, kv_lengths=jnp.array([3, 4]))
    with pytest.raises(ValueError, match=r"mask with \['kv_lengths'\]"):
        layer.apply(variables, x[:, :1], decode=True, mask=padded, mutable=["cache"])
