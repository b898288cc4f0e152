"""`arflow`: a numpy re-implementation of the authors' equations (loops over tokens), block-causal softmax when the
inter-chunk path is exact, decode == the causal forward, chunk-causality, padding, bad options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn

CAUSAL = attn.Mask(causal=True)
HEADS, HEAD_DIM, FEATURES = 2, 4, 8


def build(**options):
    return attn.build("arflow", num_heads=HEADS, head_dim=HEAD_DIM, **options)


def inputs(batch=2, length=10, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, FEATURES)), jnp.float32)


def init(layer, x, mask=None):
    return {"params": nn.unbox(layer.init(jax.random.key(1), x, mask=mask)["params"])}


def numpy_params(variables):
    return {name: np.asarray(leaf["kernel"], np.float64) for name, leaf in variables["params"].items()}


def softmax(z):
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def rms(z, eps=1e-6):
    return z / np.sqrt(np.mean(z**2) + eps)


def reference(params, x, chunk, *, causal, inter="linear", qkv_norm=True, output_norm=True, gated=True, kv_heads=None):
    """ARFlow's GateRetention (train code) token by token in float64: x [B, T, E] -> [B, T, E]."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    kv_heads = kv_heads or HEADS
    out = np.zeros((batch, length, FEATURES))
    for b in range(batch):
        q = np.einsum("te,ehd->thd", x[b], params["query"])
        k = np.einsum("te,ehd->thd", x[b], params["key"])
        v = np.einsum("te,ehd->thd", x[b], params["value"])
        if qkv_norm:  # RMS over the whole projected vector of a token (all heads)
            q, k, v = (np.stack([rms(t[i].ravel()).reshape(t[i].shape) for i in range(length)]) for t in (q, k, v))
        k = np.repeat(k, HEADS // kv_heads, axis=1) / np.sqrt(HEAD_DIM)
        v = np.repeat(v, HEADS // kv_heads, axis=1)
        logit = np.einsum("te,eh->th", x[b], params["forget_gate"][..., 0])
        g = -np.log1p(np.exp(-logit)) / 16.0  # logsigmoid / gate_logit_normalizer
        heads = np.zeros((length, HEADS, HEAD_DIM))
        for h in range(HEADS):
            state = np.zeros((HEAD_DIM, HEAD_DIM))
            chunk_start = 0
            for n_start in range(0, length, chunk):
                members = range(n_start, min(n_start + chunk, length))
                for t in members:
                    if inter == "softmax":
                        keys = [s for s in range(length) if s < n_start or (s in members and (not causal or s <= t))]
                    else:
                        keys = [s for s in members if not causal or s <= t]
                    w = softmax(np.array([q[t, h] @ k[s, h] for s in keys]))
                    heads[t, h] = sum(wi * v[s, h] for wi, s in zip(w, keys, strict=True))
                    if inter == "linear":
                        c_t = sum(g[s, h] for s in range(n_start, t + 1))
                        heads[t, h] += np.exp(c_t) * q[t, h] @ state
                if inter == "linear" and len(members) == chunk:  # S <- exp(mean g) S + K^T V
                    kv = sum(np.outer(k[s, h], v[s, h]) for s in members)
                    state = np.exp(np.mean([g[s, h] for s in members])) * state + kv
                chunk_start += chunk
        for t in range(length):
            y = heads[t]
            if output_norm:
                y = np.stack([rms(y[h]) for h in range(HEADS)])
            if gated:
                u = np.einsum("e,ehd->hd", x[b, t], params["gate"])
                y = y * u / (1.0 + np.exp(-u))
            out[b, t] = np.einsum("hd,hde->e", y, params["out"])
    return out


@pytest.mark.parametrize("mask", [None, CAUSAL], ids=["chunk_causal", "causal"])
@pytest.mark.parametrize("kv_heads", [HEADS, 1], ids=["mha", "mqa"])
def test_matches_the_authors_equations(mask, kv_heads):
    layer = build(chunk_size=3, num_kv_heads=kv_heads)
    x = inputs()
    variables = init(layer, x, mask)
    want = reference(numpy_params(variables), x, 3, causal=mask is not None, kv_heads=kv_heads)
    np.testing.assert_allclose(layer.apply(variables, x, mask=mask), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", [None, CAUSAL], ids=["chunk_causal", "causal"])
def test_exact_inter_chunk_path_is_block_causal_softmax(mask):
    """inter_chunk='softmax' without the norms and gate: softmax attention under the block-causal mask."""
    options = dict(chunk_size=4, inter_chunk="softmax", qkv_norm=False, output_norm=False, gated_output=False)
    layer = build(**options)
    x = inputs(length=10)
    variables = init(layer, x, mask)
    p = numpy_params(variables)
    xs = np.asarray(x, np.float64)
    q, k, v = (np.einsum("bte,ehd->bthd", xs, p[name]) for name in ("query", "key", "value"))
    block = np.arange(10) // 4
    allowed = block[:, None] >= block[None, :]
    if mask is not None:
        allowed &= np.tril(np.ones((10, 10), bool))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HEAD_DIM)
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd,hde->bte", weights, v, p["out"])
    np.testing.assert_allclose(layer.apply(variables, x, mask=mask), want, atol=2e-5, rtol=2e-5)
    # and the registry's softmax layer with the same parameters and a block mask gives the same
    dense = attn.Mask(dense=jnp.asarray(allowed)[None, None])
    softmax_layer = attn.build("softmax", num_heads=HEADS, head_dim=HEAD_DIM, position="none")
    same = {"params": {name: variables["params"][name] for name in ("query", "key", "value", "out")}}
    np.testing.assert_allclose(softmax_layer.apply(same, x, mask=dense), want, atol=2e-5, rtol=2e-5)
    # the exact form and the hybrid differ once there is more than one chunk
    hybrid = build(chunk_size=4, qkv_norm=False, output_norm=False, gated_output=False)
    assert float(jnp.max(jnp.abs(hybrid.apply(variables, x, mask=mask) - want))) > 1e-3


def test_one_chunk_is_plain_softmax_attention():
    """A chunk as long as the sequence has no state to read: bidirectional softmax attention."""
    layer = build(chunk_size=16, qkv_norm=False, output_norm=False, gated_output=False)
    x = inputs(length=7)
    variables = init(layer, x)
    softmax_layer = attn.build("softmax", num_heads=HEADS, head_dim=HEAD_DIM, position="none")
    same = {"params": {name: variables["params"][name] for name in ("query", "key", "value", "out")}}
    np.testing.assert_allclose(layer.apply(variables, x), softmax_layer.apply(same, x), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("pieces", [(1,) * 10, (5, 1, 1, 3)], ids=["tokens", "prefill"])
def test_decode_equals_the_causal_forward(pieces):
    layer = build(chunk_size=3, num_kv_heads=1)
    x = inputs(length=10)
    variables = init(layer, x, CAUSAL)
    cache = layer.init(jax.random.key(1), x, mask=CAUSAL, decode=True)["cache"]
    assert cache["state"].shape == (2, HEADS, HEAD_DIM, HEAD_DIM) and cache["chunk_key"].shape == (2, 3, HEADS, 4)
    cache = jax.tree.map(jnp.zeros_like, cache)
    outs, start = [], 0
    for size in pieces:
        y, mutated = layer.apply(
            {**variables, "cache": cache}, x[:, start : start + size], mask=CAUSAL, decode=True, mutable=["cache"]
        )
        outs.append(y)
        cache, start = mutated["cache"], start + size
    assert int(cache["cache_index"]) == 10
    np.testing.assert_allclose(jnp.concatenate(outs, 1), layer.apply(variables, x, mask=CAUSAL), atol=2e-5)


def test_chunk_causality_without_a_mask():
    """Without a mask a token sees its whole chunk and the chunks before it, never a later chunk."""
    layer = build(chunk_size=4)
    x = inputs(length=12)
    variables = init(layer, x)
    base = layer.apply(variables, x)
    changed = layer.apply(variables, x.at[:, 6].set(3.0))  # a token of chunk 1 (positions 4..7)
    np.testing.assert_array_equal(changed[:, :4], base[:, :4])
    assert float(jnp.max(jnp.abs(changed[:, 4:6] - base[:, 4:6]))) > 1e-3, "earlier tokens of the chunk see it"
    assert float(jnp.max(jnp.abs(changed[:, 8:] - base[:, 8:]))) > 1e-3, "later chunks see it through the state"


def test_padding_equals_the_truncated_sequence():
    layer = build(chunk_size=3)
    x = inputs(length=10)
    variables = init(layer, x)
    padded = layer.apply(variables, x, mask=attn.Mask(kv_lengths=jnp.array([7, 10]), q_lengths=jnp.array([7, 10])))
    short = layer.apply(variables, x[:1, :7])
    np.testing.assert_allclose(padded[:1, :7], short, atol=2e-6)
    np.testing.assert_array_equal(padded[0, 7:], 0.0)
    np.testing.assert_allclose(padded[1:], layer.apply(variables, x[1:]), atol=2e-6)


@pytest.mark.slow  # ~10-20 s on 2 cores; the registry matrix checks the same in its slow phase too
def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        layer = build(chunk_size=2, dtype=jnp.float64, param_dtype=jnp.float64)
        x = inputs(batch=1, length=5).astype(jnp.float64)
        variables = init(layer, x, CAUSAL)
        check_grads(lambda p, x: layer.apply(p, x, mask=CAUSAL), (variables, x), order=1, modes=("rev",), eps=1e-4)


def test_bad_options_and_calls_raise():
    x = inputs(length=6)
    with pytest.raises(ValueError, match="chunk_size"):
        build(chunk_size=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="inter_chunk"):
        build(inter_chunk="exact").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="decode=True needs inter_chunk='linear'"):
        build(inter_chunk="softmax").init(jax.random.key(0), x, mask=CAUSAL, decode=True)
    with pytest.raises(ValueError, match="decode=True needs a causal mask"):
        build().init(jax.random.key(0), x, decode=True)
    with pytest.raises(ValueError, match="context must be None"):
        build().init(jax.random.key(0), x, context=x)
