"""attn.functional.softmax_attention against jax.nn.dot_product_attention and a plain einsum reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn import functional as F

B, TQ, TK, D = 2, 13, 13, 16


def qkv(heads=4, kv_heads=4, tq=TQ, tk=TK, d=D, dtype=jnp.float32, seed=0):
    r = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(r[0], (B, tq, heads, d), dtype)
    k = jax.random.normal(r[1], (B, tk, kv_heads, d), dtype)
    v = jax.random.normal(r[2], (B, tk, kv_heads, d), dtype)
    return q, k, v


def naive(q, k, v, allowed=None, bias=None, softcap=None, scale=None):
    """Per-head loop reference, repeats kv heads explicitly."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = jnp.where(allowed, s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


SEG = jnp.array([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (dict(), dict()),
        (dict(causal=True), dict(is_causal=True)),
        (dict(mask=attn.Mask(kv_lengths=jnp.array([7, 13]))), dict(key_value_seq_lengths=jnp.array([7, 13]))),
        (dict(window=(3, 2)), dict(local_window_size=(3, 2))),
        (dict(causal=True, window=4), dict(is_causal=True, local_window_size=(4, 4))),
        (dict(segment_ids=SEG), dict(mask=(SEG[:, None, :, None] == SEG[:, None, None, :]))),
    ],
    ids=["none", "causal", "padding", "window", "causal_window", "segments"],
)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_jax_dot_product_attention(ours, theirs, heads, kv_heads):
    q, k, v = qkv(heads, kv_heads)
    got = F.softmax_attention(q, k, v, **ours)
    want = jax.nn.dot_product_attention(q, k, v, **theirs, implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_query_padding_matches_on_valid_rows():
    q, k, v = qkv()
    lengths = jnp.array([5, 13])
    got = F.softmax_attention(q, k, v, mask=attn.Mask(q_lengths=lengths, kv_lengths=lengths))
    want = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(got[0, :5], want[0, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[0, 5:], 0.0)  # padded query rows see no key: zero output


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_bias_matches_jax(heads, kv_heads):
    q, k, v = qkv(heads, kv_heads)
    bias = jax.random.normal(jax.random.key(3), (1, heads, TQ, TK))
    got = F.softmax_attention(q, k, v, bias=bias, causal=True)
    want = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_error_within_xla_bf16_error():
    q, k, v = qkv(4, 2, dtype=jnp.bfloat16)
    exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)
    got = F.softmax_attention(q, k, v, causal=True)
    xla = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert got.dtype == jnp.bfloat16
    err = float(jnp.abs(got.astype(jnp.float32) - exact).max())
    ref_err = float(jnp.abs(xla.astype(jnp.float32) - exact).max())
    assert err <= 2 * ref_err + 1e-3


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_softcap_matches_einsum(kv_heads):
    q, k, v = qkv(4, kv_heads)
    q = q * 4.0  # large logits so the cap matters
    allowed = jnp.tril(jnp.ones((TQ, TK), bool))
    got = F.softmax_attention(q, k, v, causal=True, softcap=5.0)
    np.testing.assert_allclose(got, naive(q, k, v, allowed, softcap=5.0), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(got - F.softmax_attention(q, k, v, causal=True)).max()) > 1e-2


def test_prefix_lm_matches_einsum():
    q, k, v = qkv()
    prefix = jnp.array([4, 9])
    i, j = jnp.arange(TQ)[:, None], jnp.arange(TK)[None, :]
    allowed = (j <= i)[None, None] | (j[None, None] < prefix[:, None, None, None])
    got = F.softmax_attention(q, k, v, mask=attn.Mask(causal=True, prefix_lengths=prefix))
    np.testing.assert_allclose(got, naive(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_dense_boolean_mask_and_scale():
    q, k, v = qkv()
    allowed = jax.random.bernoulli(jax.random.key(5), 0.6, (B, 1, TQ, TK)).at[..., 0].set(True)
    got = F.softmax_attention(q, k, v, mask=allowed, scale=0.3)
    np.testing.assert_allclose(got, naive(q, k, v, allowed, scale=0.3), atol=1e-5, rtol=1e-5)


def test_probs_lse_and_fully_masked_rows():
    q, k, v = qkv()
    mask = attn.Mask(causal=True, q_lengths=jnp.array([13, 6]))
    out, aux = F.softmax_attention(q, k, v, mask=mask, return_probs=True, return_lse=True)
    probs, lse = aux["probs"], aux["lse"]
    assert probs.shape == (B, 4, TQ, TK) and lse.shape == (B, 4, TQ)
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0.0  # causal: nothing above the diagonal
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
    allowed = mask.materialize(TQ, TK)
    want_lse = jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    np.testing.assert_allclose(lse[0], want_lse[0], atol=1e-5)
    assert bool(jnp.all(jnp.isneginf(lse[1, :, 6:])))
    np.testing.assert_array_equal(out[1, 6:], 0.0)
    np.testing.assert_allclose(out, jnp.einsum("bhqk,bkhd->bqhd", probs, v), atol=1e-5)


def test_sinks_equal_an_extra_zero_value_column():
    q, k, v = qkv()
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    got = F.softmax_attention(q, k, v, causal=True, sinks=sinks)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
    logits = jnp.where(jnp.tril(jnp.ones((TQ, TK), bool)), logits, -jnp.inf)
    sink_col = jnp.broadcast_to(sinks[None, :, None, None], (B, 4, TQ, 1))
    p = jax.nn.softmax(jnp.concatenate([logits, sink_col], -1), -1)[..., :-1]
    np.testing.assert_allclose(got, jnp.einsum("bhqk,bkhd->bqhd", p, v), atol=1e-5)


def test_dropout_is_deterministic_per_key_and_unbiased_in_shape():
    q, k, v = qkv()
    a = F.softmax_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    b = F.softmax_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    c = F.softmax_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        F.softmax_attention(q, k, v, dropout_rate=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(causal=True),
        dict(causal=True, window=3),
        dict(causal=True, segment_ids=SEG),
        dict(causal=True, softcap=2.0),
    ],
    ids=["causal", "window", "segments", "softcap"],
)
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_causality(kwargs, kv_heads):
    q, k, v = qkv(4, kv_heads)
    t = 6
    out = F.softmax_attention(q, k, v, **kwargs)
    r = jax.random.split(jax.random.key(9), 3)
    q2 = q.at[:, t + 1 :].set(jax.random.normal(r[0], q[:, t + 1 :].shape))
    k2 = k.at[:, t + 1 :].set(jax.random.normal(r[1], k[:, t + 1 :].shape))
    v2 = v.at[:, t + 1 :].set(jax.random.normal(r[2], v[:, t + 1 :].shape))
    out2 = F.softmax_attention(q2, k2, v2, **kwargs)
    np.testing.assert_array_equal(out[:, : t + 1], out2[:, : t + 1])
    assert float(jnp.abs(out[:, t + 1 :] - out2[:, t + 1 :]).max()) > 1e-3


def test_gradients_match_finite_differences():
    q, k, v = qkv(2, 1, tq=5, tk=5, d=4)
    bias = jax.random.normal(jax.random.key(4), (1, 2, 5, 5))
    f = lambda q, k, v, bias: F.softmax_attention(q, k, v, bias=bias, causal=True, softcap=3.0)
    check_grads(f, (q, k, v, bias), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_jit():
    q, k, v = qkv(4, 2)
    f = jax.jit(lambda q, k, v: F.softmax_attention(q, k, v, causal=True, window=4))
    np.testing.assert_allclose(f(q, k, v), F.softmax_attention(q, k, v, causal=True, window=4), atol=1e-6)


def test_xla_forced_and_pallas_error_on_cpu():
    q, k, v = qkv()
    np.testing.assert_array_equal(F.softmax_attention(q, k, v, implementation="xla"), F.softmax_attention(q, k, v))
    with pytest.raises(ValueError, match="implementation='pallas' is not available.*platform 'cpu'"):
        F.softmax_attention(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='fast' is not supported"):
        F.softmax_attention(q, k, v, implementation="fast")
