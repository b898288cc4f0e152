"""`minimal`: collapsed Q/K and V/O reproduce softmax exactly; symmetric and shared (W_q = W_k) forms; the paper's
single-head no-V/O formula in numpy; decode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.softmax.minimal import symmetric_matrix

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def test_collapsed_products_of_softmax_weights_reproduce_softmax():
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    p = nn.unbox(jax.jit(softmax.init)(jax.random.key(1), X))["params"]
    collapsed = {
        "query_key": {"kernel": jnp.einsum("ehd,fhd->ehf", p["query"]["kernel"], p["key"]["kernel"])},
        "out": {"kernel": jnp.einsum("ehd,hdf->hef", p["value"]["kernel"], p["out"]["kernel"])},
    }
    layer = attn.build("minimal", num_heads=H, head_dim=D, value="collapsed")
    for mask in (MASK, None):
        want = apply(softmax, {"params": p}, X, mask=mask)
        np.testing.assert_allclose(apply(layer, {"params": collapsed}, X, mask=mask), want, atol=1e-5)


def test_symmetric_similarity_and_parameter_counts():
    layer, params = init("minimal", X, None, num_heads=H, head_dim=D, qk="symmetric")
    upper = nn.unbox(params)["params"]["query_key"]
    assert upper.shape == (H, E * (E + 1) // 2)
    w = symmetric_matrix(upper, E)
    np.testing.assert_array_equal(w, jnp.swapaxes(w, -1, -2))
    logits = np.einsum("bie,hef,bjf->bhij", X, w, X)
    np.testing.assert_allclose(logits, np.swapaxes(logits, -1, -2), atol=1e-4)
    collapsed = attn.build("minimal", num_heads=H, head_dim=D)
    as_full = {"params": {"query_key": {"kernel": jnp.moveaxis(w, 0, 1)}}}
    np.testing.assert_allclose(apply(layer, params, X), apply(collapsed, as_full, X), atol=1e-5)
    full = trace_init(attn.build("minimal", num_heads=H, head_dim=D, value="collapsed"), X)
    sizes = {k: sum(a.size for a in jax.tree.leaves(v)) for k, v in nn.unbox(full)["params"].items()}
    assert sizes == {"query_key": E * H * E, "out": H * E * E}


def test_no_value_projection_averages_heads_over_the_tokens():
    layer, params = init("minimal", X, MASK, num_heads=H, head_dim=D)
    w = nn.unbox(params)["params"]["query_key"]["kernel"]  # [E, H, E]
    q = jnp.einsum("bte,ehf->bthf", X, w) * (E / D) ** 0.5  # the layer keeps scale 1/sqrt(head_dim)
    heads = F.softmax_attention(q, X[:, :, None], X[:, :, None], causal=True)
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), heads.mean(axis=2), atol=1e-5)


def test_single_head_without_value_is_the_papers_convex_combination_numpy():
    # the paper's minimum variant: W^K = I, W^V = W^O = I, so z_i = sum_j softmax_j(x_i W^QK x_j / sqrt(d)) x_j
    layer, params = init("minimal", X, MASK, num_heads=1, head_dim=E)
    w = np.asarray(nn.unbox(params)["params"]["query_key"]["kernel"][:, 0], np.float64)  # [E, E]
    x = np.asarray(X, np.float64)
    logits = np.einsum("bie,ef,bjf->bij", x, w, x) / np.sqrt(E)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), np.einsum("bij,bje->bie", a, x), atol=1e-5)


def test_shared_query_key_is_softmax_with_key_kernel_equal_to_query_kernel():
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    p = dict(nn.unbox(jax.jit(softmax.init)(jax.random.key(2), X))["params"])
    p["key"] = p["query"]  # the paper's symmetric variant: W^K_h reuses W^Q_h
    layer = attn.build("minimal", num_heads=H, head_dim=D, qk="shared", value="collapsed")
    shared = {
        "query_key": p["query"]["kernel"],
        "out": {"kernel": jnp.einsum("ehd,hdf->hef", p["value"]["kernel"], p["out"]["kernel"])},
    }
    out = apply(layer, {"params": shared}, X)
    np.testing.assert_allclose(out, apply(softmax, {"params": p}, X), atol=1e-5)
    s = np.asarray(p["query"]["kernel"], np.float64)
    logits = np.einsum("bie,ehd,fhd,bjf->bhij", X, s, s, X)
    np.testing.assert_allclose(logits, np.swapaxes(logits, -1, -2), atol=1e-4)
    assert (np.diagonal(logits, axis1=-2, axis2=-1) >= 0).all()  # S S^T is positive semi-definite
    full = trace_init(attn.build("minimal", num_heads=H, head_dim=D, qk="shared"), X)
    assert nn.unbox(full)["params"]["query_key"].shape == (E, H, D)


def test_causal_decode_and_gradients():
    layer, params = init("minimal", X, MASK, num_heads=H, head_dim=D, value="collapsed", position="alibi")
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)
    assert_finite_grads(layer, params, X)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(qk="asymmetric"), r"qk='asymmetric' must be one of \('collapsed', 'symmetric', 'shared'\)"),
        (dict(value="full"), r"value='full' must be one of \('none', 'collapsed'\)"),
        (dict(position="rope"), r"position='rope' must be one of \('none', 'alibi', 't5'\)"),
        (dict(qk_norm=True), r"qk_norm=True has no query/key to normalise"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("minimal", num_heads=H, head_dim=D, **options)
        trace_init(layer, X)
