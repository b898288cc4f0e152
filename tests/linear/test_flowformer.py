"""`flowformer`: Flow-Attention against its equations computed directly, decode, causality, padding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn.linear.flowformer import flow_attention, flow_state_shapes

EPS = 1e-6
# rbg keys: XLA compiles a jitted init ~5x faster than with threefry keys.
KEY = jax.random.key(1, impl="rbg")


def qkv(batch=2, q_len=11, kv_len=11, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda length, h: (batch, length, h, dim)  # noqa: E731
    return tuple(
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in (shape(q_len, heads), shape(kv_len, kv_heads), shape(kv_len, kv_heads))
    )


class Jitted:
    """A layer whose init/apply are jitted (the mask traced, decode/mutable static): one compilation per shape
    instead of one per eager op, for the `layer_checks` helpers."""

    def __init__(self, layer):
        self._init = jax.jit(layer.init, static_argnames=("decode",))
        self._apply = jax.jit(layer.apply, static_argnames=("decode", "mutable"))

    def init(self, key, x, **kwargs):
        if kwargs.get("decode"):  # a fresh cache is all zeros: its shapes suffice (no compilation)
            shapes = jax.eval_shape(self._init, key, x, **kwargs)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return self._init(key, x, **kwargs)

    def apply(self, variables, x, **kwargs):
        if isinstance(kwargs.get("mutable"), list):
            kwargs["mutable"] = tuple(kwargs["mutable"])
        return self._apply(variables, x, **kwargs)


def expand(k, v, heads):
    return jnp.repeat(k, heads // k.shape[2], axis=2), jnp.repeat(v, heads // v.shape[2], axis=2)


def direct_noncausal(q, k, v):
    """The paper's non-causal Flow-Attention, written out with whole-sequence sums."""
    k, v = expand(k, v, q.shape[2])
    sq, sk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
    n, m = q.shape[1], k.shape[1]
    incoming = jnp.einsum("bihd,bhd->bih", sq + EPS, sk.sum(1) + EPS)
    outgoing = jnp.einsum("bjhd,bhd->bjh", sk + EPS, sq.sum(1) + EPS)
    sink = jnp.einsum("bihd,bhd->bih", sq + EPS, (sk / outgoing[..., None]).sum(1) + EPS)
    source = jnp.clip(jnp.einsum("bjhd,bhd->bjh", sk + EPS, (sq / incoming[..., None]).sum(1) + EPS), -1, 1)
    competed = v * (m * jax.nn.softmax(source, axis=1))[..., None]
    scores = jnp.einsum("bihd,bjhd->bhij", sq / incoming[..., None], sk)
    return jnp.einsum("bhij,bjhd->bihd", scores, competed) * jax.nn.sigmoid(sink * n / m)[..., None]


def direct_causal(q, k, v):
    """The official causal version: prefix sums (cumsum) normalised by the count, a masked T x T aggregation."""
    k, v = expand(k, v, q.shape[2])
    sq, sk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
    count = jnp.arange(1, q.shape[1] + 1, dtype=jnp.float32)[None, :, None]
    incoming = jnp.einsum("bihd,bihd->bih", sq + EPS, jnp.cumsum(sk, 1) + EPS) / count
    outgoing = jnp.einsum("bihd,bihd->bih", sk + EPS, jnp.cumsum(sq, 1) + EPS) / count
    sink = jnp.einsum("bihd,bihd->bih", sq + EPS, jnp.cumsum(sk / outgoing[..., None], 1) + EPS) / count
    source = jnp.einsum("bihd,bihd->bih", sk + EPS, jnp.cumsum(sq / incoming[..., None], 1) + EPS) / count
    weights = jnp.exp(jnp.clip(source, -1, 1))
    competed = v * (count * weights / jnp.cumsum(weights, 1))[..., None]
    scores = jnp.einsum("bihd,bjhd->bhij", sq / (count * incoming)[..., None], sk) * jnp.tril(
        jnp.ones((q.shape[1],) * 2)
    )
    return jnp.einsum("bhij,bjhd->bihd", scores, competed) * jax.nn.sigmoid(sink)[..., None]


def test_causal_matches_the_cumsum_formula():
    q, k, v = qkv()
    # chunk 3 does not divide the length 11: the last chunk is padded.
    out = jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=True, chunk_size=3))(q, k, v)
    np.testing.assert_allclose(out, jax.jit(direct_causal)(q, k, v), atol=2e-5, rtol=2e-5)


def test_noncausal_matches_the_formula_and_is_permutation_equivariant():
    q, k, v = qkv(q_len=7, kv_len=11)  # cross-attention: N != M
    flow = jax.jit(lambda q, k, v: flow_attention(q, k, v, chunk_size=4))
    out = flow(q, k, v)
    np.testing.assert_allclose(out, jax.jit(direct_noncausal)(q, k, v), atol=2e-5, rtol=2e-5)
    # No positional bias: permuting the keys/values leaves the output, permuting the queries permutes it.
    perm_k, perm_q = np.random.default_rng(1).permutation(11), np.random.default_rng(2).permutation(7)
    np.testing.assert_allclose(flow(q, k[:, perm_k], v[:, perm_k]), out, atol=2e-5)
    np.testing.assert_allclose(flow(q[:, perm_q], k, v), out[:, perm_q], atol=2e-5)


def test_padding_lengths_equal_the_unpadded_sequence():
    """Padded tokens take no part in any flow, nor in the counts N and M (an encoder's padding)."""
    q, k, v = qkv(batch=1)
    lengths = jnp.asarray([7])
    flow = jax.jit(flow_attention)
    padded = flow(q, k, v, q_lengths=lengths, kv_lengths=lengths)
    np.testing.assert_allclose(padded[:, :7], flow(q[:, :7], k[:, :7], v[:, :7]), atol=2e-5)
    assert np.all(np.asarray(padded[:, 7:]) == 0)


def test_layer_decode_equals_full_forward_and_is_causal(layer_checks):
    """A prefill, a single step and a prefill continuing from the carried flows (initial_state, q_offset)."""
    c = layer_checks
    layer = Jitted(c.build("flowformer", num_kv_heads=2, chunk_size=4))
    x = c.inputs()
    variables = {"params": layer.init(KEY, x, mask=c.CAUSAL)["params"]}
    decoded, cache = c.decode_in_chunks(layer, variables, x, (5, 1, 5))
    np.testing.assert_allclose(decoded, c.forward(layer, variables, x), atol=2e-5, rtol=2e-5)
    assert cache["flow_kv"].shape == (2, 4, 8, 8) and cache["flow_competition"].shape == (2, 4, 1, 1)
    assert c.causality_gap(layer, variables, x, t=5) < 1e-5


def test_gradients_match_finite_differences(layer_checks):
    """Reverse-mode gradients w.r.t. x and every parameter equal central differences in float64."""
    c = layer_checks
    with jax.enable_x64(True):
        layer = attn.build("flowformer", num_heads=2, head_dim=4, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 8)))
        params = {"params": layer.init(KEY, x, mask=c.CAUSAL)["params"]}
        forward = jax.jit(lambda x, p: layer.apply(p, x, mask=c.CAUSAL))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_errors_name_the_problem(layer_checks):
    q, k, v = qkv(q_len=7)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        flow_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="initial_state / return_state need causal=True"):
        flow_attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="eps=0"):
        flow_attention(q, k, v, eps=0)
    q, k, v = qkv()
    state = {name: jnp.zeros(shape) for name, shape in flow_state_shapes(2, 4, 8, 8).items()}
    with pytest.raises(ValueError, match=r"initial_state\['kv'\] has shape"):
        flow_attention(q, k, v, causal=True, initial_state={**state, "kv": state["kv"][:1]})
    c = layer_checks
    x = c.inputs()
    with pytest.raises(ValueError, match="chunk_size=0"):
        c.init(c.build("flowformer", chunk_size=0), x)
    with pytest.raises(ValueError, match="decode=True needs a causal mask"):
        c.build("flowformer").init(KEY, x, decode=True)
    assert attn.get("flowformer").supports_decode and attn.get("flowformer").catalog == 64
