"""The linear-attention core: quadratic, recurrent and chunked forms agree (values and gradients), state passing,
the non-causal formula, masks, errors, and no T x T array on the chunked path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn import functional as F
from attn.core.feature_maps import resolve_feature_map
from attn.core.linear_scan import linear_mask_parts

B, T, H, KVH, D, DV = 2, 13, 4, 2, 5, 6
RNG = np.random.default_rng(0)
Q = jnp.asarray(RNG.standard_normal((B, T, H, D)), jnp.float32)
K = jnp.asarray(RNG.standard_normal((B, T, KVH, D)), jnp.float32)
V = jnp.asarray(RNG.standard_normal((B, T, KVH, DV)), jnp.float32)
DECAYS = {
    "none": None,
    "per_head": jnp.asarray([0.5, 0.8, 0.95, 1.0], jnp.float32),
    "data": jnp.asarray(RNG.uniform(0.3, 1.0, (B, T, H)), jnp.float32),
}
# Chunk sizes: one token (1), T = 13 not a multiple (5; 4 elsewhere), larger than T (64: one chunk of T).
CHUNKS = (1, 5, 64)
FORMS = ("recurrent", "chunked")


# Jitted: one compile per configuration is much cheaper than running the scans op by op.
la = jax.jit(
    F.linear_attention,
    static_argnames=("causal", "feature_map", "normalize", "chunk_size", "return_state", "form"),
)


def run(form, chunk=4, **kwargs):
    return la(Q, K, V, form=form, chunk_size=chunk, return_state=True, **kwargs)


def explicit_recurrence(q, k, v, decay, state):
    """Plain numpy S_t = lambda_t S_{t-1} + k_t v_t^T, o_t = q_t S_t (k, v already repeated to H heads)."""
    outs = []
    for t in range(q.shape[1]):
        state = decay[:, t, :, None, None] * state + np.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        outs.append(np.einsum("bhd,bhde->bhe", q[:, t], state))
    return np.stack(outs, axis=1), state


@pytest.mark.parametrize(
    ("decay", "normalize", "chunks"),
    [("none", False, CHUNKS), ("per_head", True, (4,)), ("data", False, CHUNKS)],
)
def test_forms_agree_forward(decay, normalize, chunks):
    kwargs = dict(decay=DECAYS[decay], normalize=normalize, feature_map="elu_plus_one" if normalize else None)
    ref_out, ref_state = run("quadratic", **kwargs)
    assert ref_state.shape == (B, H, D, DV + normalize)
    for form, sizes in (("recurrent", (4,)), ("chunked", chunks)):
        for chunk in sizes:
            out, state = run(form, chunk, **kwargs)
            np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5, err_msg=f"{form} chunk={chunk}")
            np.testing.assert_allclose(state, ref_state, atol=2e-5, rtol=2e-5, err_msg=f"{form} chunk={chunk}")


def test_chunked_matches_an_explicit_recurrence_with_initial_state():
    decay = np.asarray(DECAYS["data"])
    s0 = RNG.standard_normal((B, H, D, DV)).astype(np.float32)
    k, v = np.repeat(np.asarray(K), H // KVH, axis=2), np.repeat(np.asarray(V), H // KVH, axis=2)
    want_out, want_state = explicit_recurrence(np.asarray(Q), k, v, decay, s0)
    out, state = la(Q, K, V, decay=decay, initial_state=s0, chunk_size=4, return_state=True)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(state, want_state, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("decay", "normalize", "forms"), [("per_head", False, ("chunked",)), ("data", True, FORMS)])
def test_forms_agree_gradients(decay, normalize, forms):
    """d/d(q, k, v, decay, initial_state) of a weighted sum of outputs and final state (with normalize: through
    the feature map and the denominator)."""
    d = DECAYS[decay]
    s0 = jnp.asarray(RNG.standard_normal((B, H, D, DV + normalize)), jnp.float32) * 0.1
    w_out = jnp.asarray(RNG.standard_normal((B, T, H, DV)), jnp.float32)
    w_state = jnp.asarray(RNG.standard_normal(s0.shape), jnp.float32)

    def loss(q, k, v, dec, s, form, chunk):
        out, state = la(
            q,
            k,
            v,
            decay=dec,
            normalize=normalize,
            feature_map="elu_plus_one" if normalize else None,
            initial_state=s,
            return_state=True,
            form=form,
            chunk_size=chunk,
        )
        return jnp.sum(out * w_out) + jnp.sum(state * w_state)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5, 6))
    ref = grad(Q, K, V, d, s0, "quadratic", 4)
    for form, chunk in (("recurrent", 4), ("chunked", 4)):
        if form not in forms:
            continue
        got = grad(Q, K, V, d, s0, form, chunk)
        for name, g, r in zip(("q", "k", "v", "decay", "initial_state"), got, ref, strict=True):
            assert np.all(np.isfinite(g)), (form, chunk, name)
            np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"d{name} {form} chunk={chunk}")


def test_two_pieces_with_initial_state_equal_the_whole():
    kwargs = dict(normalize=True, feature_map="relu", chunk_size=4, return_state=True)
    dec = DECAYS["data"]
    split = 6

    whole, whole_state = la(Q, K, V, decay=dec, **kwargs)
    first, state = la(Q[:, :split], K[:, :split], V[:, :split], decay=dec[:, :split], **kwargs)
    second, final = la(Q[:, split:], K[:, split:], V[:, split:], decay=dec[:, split:], initial_state=state, **kwargs)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(final, whole_state, atol=1e-5, rtol=1e-5)


def test_non_causal_equals_the_explicit_formula():
    """phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K)) with Tq != Tk, GQA, padded keys dropped."""
    kv_len = 9
    k, v = K[:, :kv_len], V[:, :kv_len]
    lengths = jnp.asarray([9, 6])
    phi = lambda x: np.asarray(jax.nn.elu(x)) + 1  # noqa: E731
    qf, kf = phi(Q), np.repeat(phi(k), H // KVH, axis=2)
    vr = np.repeat(np.asarray(v), H // KVH, axis=2)
    kf = kf * (np.arange(kv_len)[None, :] < np.asarray(lengths)[:, None])[:, :, None, None]
    want = np.einsum("bthd,bhde->bthe", qf, np.einsum("bshd,bshe->bhde", kf, vr))
    want = want / (np.einsum("bthd,bhd->bth", qf, kf.sum(axis=1))[..., None] + 1e-6)
    for form in ("chunked", "recurrent", "quadratic"):
        got = la(Q, k, v, causal=False, feature_map="elu_plus_one", normalize=True, kv_lengths=lengths, form=form)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=form)


def test_non_causal_with_a_per_head_decay_weighs_by_distance():
    decay = np.asarray(DECAYS["per_head"])
    k, v = np.repeat(np.asarray(K), H // KVH, axis=2), np.repeat(np.asarray(V), H // KVH, axis=2)
    distance = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :])
    weights = decay[:, None, None] ** distance  # [H, T, T]
    want = np.einsum("bthd,bshd,hts,bshe->bthe", np.asarray(Q), k, weights, v)
    for form in ("chunked", "recurrent", "quadratic"):
        got = la(Q, K, V, causal=False, decay=decay, form=form, chunk_size=4)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=form)


def test_lengths_mask_keys_and_zero_padded_queries():
    lengths = jnp.asarray([13, 8])
    out = la(Q, K, V, decay=DECAYS["per_head"], q_lengths=lengths, kv_lengths=lengths)
    short = la(Q[1:, :8], K[1:, :8], V[1:, :8], decay=DECAYS["per_head"])
    np.testing.assert_allclose(out[1:, :8], short, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out[1, 8:]) == 0)


def test_low_precision_inputs_return_their_dtype():
    out = la(Q.astype(jnp.bfloat16), K.astype(jnp.bfloat16), V.astype(jnp.bfloat16), decay=0.9)
    assert out.dtype == jnp.bfloat16
    ref = la(Q, K, V, decay=0.9)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1, rtol=0.05)


def _avals(jaxpr):
    """Every variable's abstract value in a (closed) jaxpr and the jaxprs nested in its equations."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from _avals(sub)


def _largest_square(fn, length):
    """The biggest intermediate (by its two largest dims) in the jaxpr of value-and-grad of fn at T = length."""
    q = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
    decay = jax.ShapeDtypeStruct((1, length, 1), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda q, d: jnp.sum(fn(q, q, q, d)), argnums=(0, 1)))(q, decay)
    return max(
        (sorted(getattr(a, "shape", ()))[-2:] or [0])[0] for a in _avals(jaxpr) if len(getattr(a, "shape", ())) >= 2
    )


def test_chunked_path_never_materialises_a_t_by_t_array():
    length = 16384
    kwargs = dict(feature_map="elu_plus_one", normalize=True, chunk_size=64)
    chunked = functools.partial(F.linear_attention, **kwargs)
    quadratic = functools.partial(F.linear_attention, form="quadratic", **kwargs)
    # Forward and backward: no intermediate has two dims >= T (the T x T reference does: the check can fail).
    assert _largest_square(lambda q, k, v, d: chunked(q, k, v, decay=d), length) < length
    assert _largest_square(lambda q, k, v, d: chunked(q, k, v, causal=False), length) < length
    assert _largest_square(lambda q, k, v, d: quadratic(q, k, v, decay=d), length) >= length


def test_feature_map_registry():
    assert resolve_feature_map(None) is None
    x = jnp.linspace(-2.0, 2.0, 7)
    np.testing.assert_allclose(resolve_feature_map("elu_plus_one")(x), jax.nn.elu(x) + 1)
    np.testing.assert_allclose(resolve_feature_map("relu")(x), jnp.maximum(x, 0))
    np.testing.assert_allclose(resolve_feature_map("identity")(x), x)
    square = lambda x: x**2  # noqa: E731
    assert resolve_feature_map(square) is square
    with pytest.raises(ValueError, match="feature_map='exp' is not supported"):
        resolve_feature_map("exp")


def test_mask_parts_a_state_cannot_honour_are_rejected_by_name():
    ids = jnp.zeros((B, T), jnp.int32)
    causal, q_len, kv_len = linear_mask_parts(attn.Mask(causal=True, kv_lengths=jnp.asarray([3, 4])), "x")
    assert causal and q_len is None and kv_len is not None
    assert linear_mask_parts(None, "x") == (False, None, None)
    with pytest.raises(ValueError, match=r"lightning cannot honour the mask part\(s\) q_segment_ids, window"):
        linear_mask_parts(attn.Mask(causal=True, q_segment_ids=ids, kv_segment_ids=ids, window=(4, 0)), "lightning")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decay=1.5), r"decay must lie in \(0, 1\]"),
        (dict(decay=jnp.ones((3,))), r"decay has shape \(3,\); expected a scalar, \[heads\] = \(4,\)"),
        (dict(decay=DECAYS["data"], causal=False), "data-dependent decay"),
        (dict(chunk_size=0), "chunk_size=0 must be a positive int"),
        (dict(form="parallel"), "form='parallel' is not supported"),
        (dict(implementation="pallas"), "implementation='pallas' is not available for linear_attention"),
        (dict(initial_state=jnp.zeros((B, H, D, D))), r"initial_state has shape \(2, 4, 5, 5\); expected"),
        (dict(feature_map=lambda x: x[..., :1, :]), "feature_map must map"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        F.linear_attention(Q, K, V, **kwargs)
    with pytest.raises(ValueError, match="causal linear attention needs as many queries as keys"):
        F.linear_attention(Q, K[:, :5], V[:, :5])
