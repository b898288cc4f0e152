"""`selective` (Selective Attention, SSA): exact reductions, the temperature formula, causality, decode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import (
    apply,
    assert_causal,
    assert_decode_matches,
    assert_finite_grads,
    init,
    shared_params,
    trace_init,
)

import attn
from attn import functional as F

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


@pytest.mark.parametrize("mask", [MASK, attn.Mask(kv_lengths=jnp.array([8, 5]))], ids=["causal", "padded"])
def test_layer_equals_the_explicit_temperature_formula(mask):
    layer, params = init("selective", X, mask, num_heads=H, head_dim=D, position="none")
    p = nn.unbox(params)["params"]
    keys = jax.random.split(jax.random.key(4), 3)
    w, u = jax.random.normal(keys[0], (E, H)), jax.random.normal(keys[1], (E, H))
    beta = jax.random.normal(keys[2], (H,))
    p = {**p, "query_temperature": w, "value_temperature": u, "position_beta": beta}
    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    n = mask.materialize(T, T).sum(-1)  # visible keys per row, [B|1, 1, T]
    tau_pos = 1 + jnp.exp(-jnp.exp(beta))[None, None, :] * jnp.log(jnp.moveaxis(n, 1, 2))  # [B|1, T, H]
    q = proj("query") * (1 + jnp.tanh(X @ w))[..., None] * tau_pos[..., None]
    v = proj("value") * (1 + jnp.tanh(X @ u))[..., None]
    want = jnp.einsum("bthd,hde->bte", F.softmax_attention(q, proj("key"), v, mask=mask), p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, {"params": p}, X, mask=mask), want, atol=1e-5)


def test_causal_decode_and_gradients():
    layer, params = init("selective", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2)
    p = nn.unbox(params)["params"]
    noisy = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), p)
    params = {"params": {**p, **{n: noisy[n] for n in ("query_temperature", "value_temperature", "position_beta")}}}
    assert_causal(layer, params, X, cut=5)
    assert_decode_matches(layer, params, X, MASK)
    assert_finite_grads(layer, params, X)


def test_qk_norm_with_query_temperature_is_rejected():
    layer = attn.build("selective", num_heads=H, head_dim=D, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm=True would normalise away the query temperature"):
        trace_init(layer, X)
