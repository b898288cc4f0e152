"""`moh` (Mixture-of-Head attention): reduction to softmax, the routing formula, the load-balance loss, decode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_decode_matches, init, trace_init

import attn
from attn import functional as F

B, T, E, H, D = 2, 8, 16, 6, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def zero_routers(params):
    p = nn.unbox(params)["params"]
    return {"params": {n: (jnp.zeros_like(v) if n.endswith("router") else v) for n, v in p.items()}}


def test_all_heads_with_a_uniform_router_is_softmax():
    shared_heads = 1
    options = dict(num_heads=H, head_dim=D, num_kv_heads=2, shared_heads=shared_heads, top_k=H - shared_heads)
    layer, params = init("moh", X, MASK, **options)
    params = zero_routers(params)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2)
    want = apply(softmax, {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}, X, mask=MASK)
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), want, atol=1e-6, rtol=1e-6)


def explicit_gates(x, p, shared, top_k):
    """Per-token loop over the official routing: softmax scores, top-k, renormalise, scale, two-stage mixing."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    softmax = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    gates = []
    for token in x:
        scores = softmax(token @ np.asarray(p["routed_router"], np.float64))
        chosen = np.argsort(-scores, kind="stable")[:top_k]
        routed = np.zeros_like(scores)
        routed[chosen] = top_k * scores[chosen] / scores[chosen].sum()
        shared_gates = shared * softmax(token @ np.asarray(p["shared_router"], np.float64))
        a = 2 * softmax(token @ np.asarray(p["mixing_router"], np.float64))
        gates.append(np.concatenate([a[0] * shared_gates, a[1] * routed]))
    return np.stack(gates)


@pytest.fixture(scope="module")
def routed_layer():
    """h_s = 2 shared heads, top-2 of the 4 routed heads."""
    return init("moh", X, MASK, num_heads=H, head_dim=D, shared_heads=2, top_k=2, position="none")


def test_gates_and_output_follow_the_routing_formula(routed_layer):
    shared, top_k = 2, 2
    layer, params = routed_layer
    p = nn.unbox(params)["params"]
    out, state = apply(layer, params, X, mask=MASK, mutable=["intermediates", "losses"])
    (sown,) = state["intermediates"]["gate_scores"]
    gates = explicit_gates(X, p, shared, top_k)
    np.testing.assert_allclose(np.asarray(sown).reshape(-1, H), gates, atol=1e-5)
    # every token uses its h_s shared heads and exactly top_k routed heads
    assert np.all(np.count_nonzero(np.asarray(sown)[..., 0], axis=-1) == shared + top_k)
    assert np.all(np.asarray(sown)[..., :shared, 0] > 0)

    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    heads = F.softmax_attention(proj("query"), proj("key"), proj("value"), causal=True)
    want = jnp.einsum("bthd,bth,hde->bte", heads, gates.reshape(B, T, H), p["out"]["kernel"])
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_load_balance_loss(routed_layer):
    shared, top_k = 2, 2
    layer, params = routed_layer
    p = nn.unbox(params)["params"]
    losses = jax.jit(lambda params: layer.apply(params, X, mask=MASK, mutable=["losses"])[1]["losses"])
    loss_of = lambda params: losses(params)["moh_load_balance"][0]

    scores = jax.nn.softmax(X.reshape(-1, E) @ p["routed_router"], axis=-1)
    chosen = np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, :top_k]
    fraction = np.zeros(H - shared)
    for row in chosen:
        fraction[row] += 1.0 / len(chosen)
    want = (H - shared) * np.sum(fraction * np.asarray(scores).mean(0))
    np.testing.assert_allclose(loss_of(params), want, rtol=1e-5)

    # uniform routing: f_i P_i summed = K / E, so L = K; routing every token to the same heads costs more
    uniform = zero_routers(params)
    np.testing.assert_allclose(loss_of(uniform), top_k, rtol=1e-6)
    collapsed = jax.tree.map(lambda v: v, uniform)
    collapsed["params"]["routed_router"] = (
        jnp.zeros((E, H - shared)).at[:, :top_k].set(1.0) * jnp.sign(X.sum((0, 1)))[:, None]
    )
    assert float(loss_of(collapsed)) > top_k + 0.1


def test_causal_decode_and_gradients():
    layer, params = init("moh", X, MASK, num_heads=H, head_dim=D, num_kv_heads=3, shared_heads=0, top_k=3)
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)

    def loss(params):
        y, state = layer.apply(params, X, mask=MASK, mutable=["losses"])
        return jnp.sum(y**2) + state["losses"]["moh_load_balance"][0]

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    g = nn.unbox(grads)["params"]
    assert "mixing_router" not in g and float(jnp.abs(g["routed_router"]).max()) > 0
    assert float(jnp.abs(g["query"]["kernel"]).max()) > 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(shared_heads=7), r"shared_heads=7 must be an int in \[0, num_heads=6\]"),
        (dict(shared_heads=2, top_k=5), r"top_k=5 must be an int in \[0, num_heads - shared_heads = 4\]"),
        (dict(shared_heads=0, top_k=0), "shared_heads=0 and top_k=0 activate no head"),
    ],
)
def test_bad_options_name_the_option(options, message):
    layer = attn.build("moh", num_heads=H, head_dim=D, **options)
    with pytest.raises(ValueError, match=message):
        trace_init(layer, X)
