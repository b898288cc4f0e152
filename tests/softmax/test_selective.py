"""`selective` (Selective Attention, SSA): exact reductions, the temperature formula, causality, decode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from layer_checks import (
    apply,
    assert_causal,
    assert_decode_matches,
    init,
    shared_params,
    trace_init,
)

import attn

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))
OFF = dict(query_temperature=False, position_temperature=False, value_temperature=False)


def softmax_output(params, mask=MASK, **options):
    return apply(attn.build("softmax", num_heads=H, head_dim=D, **options), params, X, mask=mask)


def test_temperatures_off_is_softmax_exactly():
    layer, params = init("selective", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, **OFF)
    assert set(params["params"]) == {"query", "key", "value", "out"}
    np.testing.assert_array_equal(apply(layer, params, X, mask=MASK), softmax_output(params, num_kv_heads=2))


def test_unit_temperatures_are_softmax_exactly():
    layer, params = init("selective", X, MASK, num_heads=H, head_dim=D)
    p = nn.unbox(params)["params"]
    assert not p["query_temperature"].any() and not p["value_temperature"].any()  # zero-initialised
    np.testing.assert_array_equal(p["position_beta"], 2.0)  # the official code's initial beta
    unit = {"params": {**p, "position_beta": jnp.full((H,), 50.0)}}  # exp(-exp(50)) == 0
    np.testing.assert_array_equal(apply(layer, unit, X, mask=MASK), softmax_output(shared_params(unit)))


def ssa_by_hand(x, p, visible, combine="product"):
    """SSA from its equations, one (batch, head, query) at a time in numpy (float64), for position="none":
    q_i = tau_tok(x_i) tau_pos(n_i) x_i W_q (combine="sum": (tau_tok(x_i) - 1 + tau_pos(n_i)) x_i W_q),
    v_j = (1 + tanh(x_j u)) x_j W_v, o_i = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j over the visible keys j,
    y_i = sum_h o_i^h W_o^h. x [B, T, E]; visible bool [B, T, T] -> [B, T, E]."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (np.asarray(p[name]["kernel"], np.float64) for name in ("query", "key", "value", "out"))
    w_tok, w_val, beta = (
        np.asarray(p[name], np.float64) for name in ("query_temperature", "value_temperature", "position_beta")
    )
    batch, length, _ = x.shape
    heads, dim = wq.shape[1], wq.shape[2]
    y = np.zeros(x.shape)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                keys = [j for j in range(length) if visible[b, i, j]]
                tau_tok = 1.0 + np.tanh(x[b, i] @ w_tok[:, h])
                tau_pos = 1.0 + np.exp(-np.exp(beta[h])) * np.log(len(keys))
                tau = tau_tok * tau_pos if combine == "product" else tau_tok - 1.0 + tau_pos
                q = tau * (x[b, i] @ wq[:, h])
                logits = np.array([q @ (x[b, j] @ wk[:, h]) / np.sqrt(dim) for j in keys])
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                values = [(1.0 + np.tanh(x[b, j] @ w_val[:, h])) * (x[b, j] @ wv[:, h]) for j in keys]
                y[b, i] += sum(w * v for w, v in zip(weights, values, strict=True)) @ wo[h]
    return y


CAUSAL_VISIBLE = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
PADDED_VISIBLE = np.broadcast_to((np.arange(T) < np.array([8, 5])[:, None])[:, None, :], (B, T, T))


@pytest.mark.parametrize(
    "mask, visible, combine",
    [
        (MASK, CAUSAL_VISIBLE, "product"),
        (attn.Mask(kv_lengths=jnp.array([8, 5])), PADDED_VISIBLE, "product"),
        (MASK, CAUSAL_VISIBLE, "sum"),
    ],
    ids=["causal", "padded", "causal-sum"],
)
def test_layer_equals_the_temperature_equations(mask, visible, combine):
    layer, params = init("selective", X, mask, num_heads=H, head_dim=D, position="none", combine=combine)
    p = nn.unbox(params)["params"]
    keys = jax.random.split(jax.random.key(4), 3)
    w, u = jax.random.normal(keys[0], (E, H)), jax.random.normal(keys[1], (E, H))
    beta = jax.random.normal(keys[2], (H,))
    p = {**p, "query_temperature": w, "value_temperature": u, "position_beta": beta}
    want = ssa_by_hand(X, p, visible, combine)
    np.testing.assert_allclose(apply(layer, {"params": p}, X, mask=mask), want, atol=2e-5)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_causal_and_decode(combine):
    layer, params = init("selective", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, combine=combine)
    p = nn.unbox(params)["params"]
    noisy = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), p)
    params = {"params": {**p, **{n: noisy[n] for n in ("query_temperature", "value_temperature", "position_beta")}}}
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_gradients_match_finite_differences(combine):
    """Reverse-mode gradients w.r.t. x and every parameter (all three temperatures on, random; GQA) equal central
    differences in float64."""
    with jax.enable_x64(True):
        options = dict(num_heads=2, head_dim=4, num_kv_heads=1, combine=combine)
        layer = attn.build("selective", dtype=jnp.float64, param_dtype=jnp.float64, **options)
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 8)))
        params = nn.unbox(layer.init(jax.random.key(1), x, mask=MASK))["params"]
        rng = np.random.default_rng(5)
        params = {
            name: jnp.asarray(rng.standard_normal(np.shape(value)))
            if "temperature" in name or "beta" in name
            else value
            for name, value in params.items()
        }
        forward = jax.jit(lambda x, p: layer.apply({"params": p}, x, mask=MASK))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-4, atol=1e-5, rtol=1e-5)


def test_qk_norm_with_query_temperature_is_rejected():
    layer = attn.build("selective", num_heads=H, head_dim=D, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm=True would normalise away the query temperature"):
        trace_init(layer, X)
