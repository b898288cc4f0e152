"""KIVI (`kivi`): decoding equals a numpy replay of the paper's Algorithm 1 (keys quantized per channel in groups of G
tokens once R of them wait in the residual, values per token once more than R wait), whatever the split into
decode calls; the stored entries lie within half a quantization step of the exact ones; bits=16 or a residual
longer than the sequence equal exact causal attention; the cache holds b-bit codes plus scales."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.models import DecoderLM, generate, init_cache
from tests.kv.decoding import decode_pieces
from tests.kv.score_reference import np_rope

B, T, E, H, KVH, D = 2, 13, 16, 4, 2, 8
G, R = 4, 4
CAUSAL = attn.Mask(causal=True)


def build(**options):
    return attn.build(
        "kivi", num_heads=H, head_dim=D, num_kv_heads=KVH, **{"bits": 2, "group_size": G, "residual": R, **options}
    )


def inputs(seed=0, length=T):
    return 2.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


def np_quantize(block, bits):
    """Asymmetric min/max quantization of one group (any shape) -> (dequantized block, step)."""
    low, high = block.min(), block.max()
    step = (high - low) / (2**bits - 1) if high > low else 1.0
    return np.clip(np.round((block - low) / step), 0, 2**bits - 1) * step + low, step


def np_key_quant(keys, bits):
    """keys [n, D] (n a multiple of G): per channel, groups of G consecutive tokens."""
    out = np.empty_like(keys)
    for start in range(0, len(keys), G):
        for c in range(keys.shape[1]):
            out[start : start + G, c] = np_quantize(keys[start : start + G, c], bits)[0]
    return out


def np_value_quant(values, bits):
    """values [n, D]: per token, groups of G consecutive channels."""
    out = np.empty_like(values)
    for t in range(len(values)):
        for c in range(0, values.shape[1], G):
            out[t, c : c + G] = np_quantize(values[t, c : c + G], bits)[0]
    return out


def projections(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params)["params"])
    x = np.asarray(x, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    return q, k, v, p["out"]["kernel"]


def reference(params, x, pieces, bits=2):
    """Algorithm 1 with lists, per (batch, kv head), in float64: a call's queries attend causally over the stored
    [quantized; residual] keys and values followed by the call's exact tokens; then the tokens join the residuals,
    every full R residual keys are quantized (groups of G per channel) and moved, and the values beyond the latest
    R are quantized (per token) and moved. Keys are rotated (RoPE) before they are stored."""
    q, k, v, w_out = projections(params, x)
    group = H // KVH
    out = np.zeros((B, x.shape[1], H, D))
    for b in range(B):
        for g in range(KVH):
            kq, kr, vq, vr = np.zeros((0, D)), np.zeros((0, D)), np.zeros((0, D)), np.zeros((0, D))
            start = 0
            for size in pieces:
                span = np.arange(start, start + size)
                ck, cv = np_rope(k[b, span, g], span), v[b, span, g]
                keys, values = np.concatenate([kq, kr, ck]), np.concatenate([vq, vr, cv])
                for i, t in enumerate(span):
                    seen = start + i + 1  # stored entries and the call's tokens up to t
                    for h in range(g * group, (g + 1) * group):
                        qt = np_rope(q[b, t, h], t)
                        logits = keys[:seen] @ qt / np.sqrt(D)
                        wts = np.exp(logits - logits.max())
                        out[b, t, h] = (wts / wts.sum()) @ values[:seen]
                kr, vr = np.concatenate([kr, ck]), np.concatenate([vr, cv])
                while len(kr) >= R:
                    kq, kr = np.concatenate([kq, np_key_quant(kr[:R], bits)]), kr[R:]
                if len(vr) > R:
                    vq, vr = np.concatenate([vq, np_value_quant(vr[:-R], bits)]), vr[-R:]
                start += size
    return np.einsum("bthd,hde->bte", out, w_out)


@pytest.mark.parametrize("pieces", [(1,) * T, (6,) + (1,) * (T - 6), (3, 6, 1, 3)])
def test_decode_equals_numpy_replay_of_algorithm_1(pieces):
    layer, x = build(), inputs()
    params = layer.init(jax.random.key(1), x, mask=CAUSAL)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected = reference(params, x, pieces)
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-4)
    exact = layer.apply(params, x, mask=CAUSAL)
    assert float(jnp.max(jnp.abs(y - exact))) > 1e-3, "2-bit storage should change the decoded outputs"
    assert int(cache["cache_index"]) == T


def test_stored_entries_within_half_a_step_of_the_exact_ones():
    layer, x = build(), inputs(seed=2)
    params = layer.init(jax.random.key(3), x, mask=CAUSAL)
    _, cache = decode_pieces(layer, params, x, (5,) + (1,) * (T - 5))
    _, k, v, _ = projections(params, x)
    keys = cache["cached_key"]
    values = cache["cached_value"]
    key_split, value_split = (T // R) * R, T - R  # positions below are quantized
    for b in range(B):
        for g in range(KVH):
            exact_k = np_rope(k[b, :, g], np.arange(T))
            dk = np.asarray(keys.dequantize())[b, :key_split, g]
            dv = np.asarray(values.dequantize())[b, :value_split, g]
            key_step = np.repeat(np.asarray(keys.scale)[b, : key_split // G, g], G, axis=0)
            value_step = np.repeat(np.asarray(values.scale)[b, :value_split, g], G, axis=1)
            assert np.all(np.abs(dk - exact_k[:key_split]) <= key_step / 2 * (1 + 1e-4) + 1e-5)
            assert np.all(np.abs(dv - v[b, :value_split, g]) <= value_step / 2 * (1 + 1e-4) + 1e-5)
            # the steps are those of min/max over each group: G tokens of a channel, G channels of a token
            np.testing.assert_allclose(key_step[0], np.ptp(exact_k[:G], axis=0) / 3, rtol=1e-4)
            np.testing.assert_allclose(value_step[0, :G], np.ptp(v[b, 0, g, :G]) / 3, rtol=1e-4)
            # the residuals hold the latest tokens exactly
            np.testing.assert_allclose(cache["residual_key"][b, : T - key_split, g], exact_k[key_split:], atol=1e-5)
            np.testing.assert_allclose(cache["residual_value"][b, :R, g], v[b, value_split:, g], atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{"bits": 16}, {"residual": 16}, {"bits": 16, "position": "alibi"}],
    ids=["bits16", "residual-beyond-length", "bits16-alibi"],
)
def test_exact_storage_equals_full_attention(options):
    layer, x = build(**options), inputs(seed=4)
    params = layer.init(jax.random.key(5), x, mask=CAUSAL)
    expected = layer.apply(params, x, mask=CAUSAL)
    for pieces in [(1,) * T, (6,) + (1,) * (T - 6), (3, 6, 1, 3)]:
        y, _ = decode_pieces(layer, params, x, pieces)
        np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5, err_msg=str(pieces))
    if "position" not in options:  # the forward itself against numpy causal attention (an empty cache's call)
        np.testing.assert_allclose(expected, reference(params, x, (T,)), atol=2e-5, rtol=1e-5)


def test_decoder_generates_with_kivi_caches():
    sizes = {"vocab_size": 32, "num_layers": 2, "d_model": 32, "num_heads": H, "mlp_dim": 64, "head_dim": D}
    kivi = {"group_size": G, "residual": R}
    exact = DecoderLM(attention="kivi", attention_options={**kivi, "bits": 16}, num_kv_heads=KVH, **sizes)
    softmax = DecoderLM(attention="softmax", num_kv_heads=KVH, **sizes)
    two_bit = DecoderLM(attention="kivi", attention_options={**kivi, "bits": 2}, num_kv_heads=KVH, **sizes)
    prompt = jax.random.randint(jax.random.key(0), (B, 6), 0, 32)
    params = exact.init(jax.random.key(1), prompt)
    np.testing.assert_array_equal(generate(exact, params, prompt, 8), generate(softmax, params, prompt, 8))
    assert generate(two_bit, params, prompt, 8).shape == (B, 14)
    cache = init_cache(two_bit, params, B, 14)
    layer_cache = next(iter(cache.values()))
    while "cached_key" not in layer_cache:
        layer_cache = next(iter(layer_cache.values()))
    assert layer_cache["cached_key"].codes.dtype == jnp.uint8 and layer_cache["cached_key"].bits == 2
    assert layer_cache["cached_key"].codes.shape == (B, 16, KVH, D // 4)  # 14 slots rounded up to whole groups


@pytest.mark.parametrize("bits", [2, 4])
def test_cache_bytes_are_codes_plus_scales(bits):
    """Shapes only (jax.eval_shape): a 4096-token cache of 128-dim heads, G=32, R=128, in bfloat16."""
    length, dim, kv_heads, group, residual = 4096, 128, 2, 32, 128
    layer = attn.build(
        "kivi", num_heads=4, head_dim=dim, num_kv_heads=kv_heads, bits=bits, group_size=group, residual=residual
    )
    layer = layer.clone(dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, length, 64), jnp.bfloat16)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    cache = jax.eval_shape(functools.partial(layer.apply, decode=True, mutable=["cache"]), params, x)[1]["cache"]
    size = lambda tree: sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    dense = 2 * length * kv_heads * dim * 2  # keys and values in bfloat16
    codes = size([cache["cached_key"].codes, cache["cached_value"].codes])
    scales = size([cache["cached_key"].scale, cache["cached_key"].zero])
    scales += size([cache["cached_value"].scale, cache["cached_value"].zero])
    assert codes == dense * bits // 16
    assert scales == 2 * (2 * length * kv_heads * dim // group) * 4  # float32 scale and zero per group
    assert size(cache["residual_key"]) == size(cache["residual_value"]) == residual * kv_heads * dim * 2
    total = size(cache)
    assert total == codes + scales + 2 * size(cache["residual_key"]) + 4
    assert total / dense < (bits + 4) / 16  # 2-bit: 0.125 codes + 0.125 scales (G=32) + the residual's 0.03


def test_rejects_bad_options():
    x = inputs(length=4)
    with pytest.raises(ValueError, match="bits=3"):
        build(bits=3)
    with pytest.raises(ValueError, match="group_size=0"):
        build(group_size=0)
    with pytest.raises(ValueError, match="residual=6 must be a multiple of group_size=4"):
        build(residual=6).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="head_dim=8 must be a multiple of group_size=16"):
        build(group_size=16, residual=16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cache_bits=8 must be None"):
        build(cache_bits=8).init(jax.random.key(0), x)
