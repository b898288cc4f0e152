"""`cca` (Core Context Aware attention): reductions to causal softmax, pooled cores, effective weights, causality."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_finite_grads, init, trace_init

import attn
from attn.softmax.cca import cca_attention, core_tokens

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


@pytest.mark.parametrize("options", [dict(group_size=1, local_window=2), dict(group_size=4, local_window=T)])
def test_trivial_groups_or_a_full_window_is_causal_softmax(options):
    layer, params = init("cca", X, MASK, num_heads=H, head_dim=D, num_kv_heads=2, **options)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2)
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK), apply(softmax, params, X, mask=MASK), atol=1e-5)


def test_core_tokens_are_the_importance_weighted_average_of_the_group():
    layer, params = init("cca", X, MASK, num_heads=H, head_dim=D, position="none")
    p = nn.unbox(params)["params"]
    q, k, v = (jnp.einsum("bte,ehd->bthd", X, p[n]["kernel"]) for n in ("query", "key", "value"))
    core_k, core_v, w = core_tokens(q, k, v, group_size=4)
    assert core_k.shape == (B, T // 4, H, D) and w.shape == (B, T // 4, H, 4)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    last_q = q[:, 3::4]  # the last query of each group scores its group's keys
    logits = jnp.einsum("bthd,btjhd->bthj", last_q, k.reshape(B, T // 4, 4, H, D)) / D**0.5
    np.testing.assert_allclose(w, jax.nn.softmax(logits, -1), atol=1e-6)
    pooled_x = jnp.einsum("bthj,btje->bthe", w, X.reshape(B, T // 4, 4, E))  # c_t per head
    np.testing.assert_allclose(core_k, jnp.einsum("bthe,ehd->bthd", pooled_x, p["key"]["kernel"]), atol=1e-5)
    np.testing.assert_allclose(core_v, jnp.einsum("bthe,ehd->bthd", pooled_x, p["value"]["kernel"]), atol=1e-5)


def test_output_is_effective_token_weights_times_values_with_the_paper_structure():
    q = jax.random.normal(jax.random.key(1), (B, T, H, D))
    k, v = (jax.random.normal(jax.random.key(i), (B, T, 2, D)) for i in (2, 3))
    g, s = 3, 4
    out, aux = cca_attention(q, k, v, group_size=g, local_window=s, return_probs=True)
    weights = np.asarray(aux["probs"])  # numpy from here: the per-row slices below have many shapes
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", weights, np.repeat(v, 2, axis=2)), atol=1e-5)
    assert np.all(np.triu(weights, 1) == 0)  # nothing after the query
    w = np.asarray(core_tokens(q, k, v, group_size=g)[2])
    for p in range(T):
        start = max(0, (p - s + 1) // g) * g  # raw window start: a group boundary, at least s tokens back
        assert p - start + 1 >= min(s, p + 1) and start % g == 0
        if start:  # tokens before the window are reached only through their (complete) group's core
            ratio = weights[:, :, p, :start].reshape(B, H, start // g, g) / np.moveaxis(w[:, : start // g], 1, 2)
            np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-4)


def test_causality_gradients_and_padding():
    layer, params = init("cca", X, MASK, num_heads=H, head_dim=D, group_size=3, local_window=4)
    assert_causal(layer, params, X, cut=5)
    assert_finite_grads(layer, params, X)
    padded = attn.Mask(causal=True, kv_lengths=jnp.array([T, 6]))
    y = apply(layer, params, X, mask=padded)
    y2 = apply(layer, params, X.at[1, 6:].set(5.0), mask=padded)
    np.testing.assert_allclose(y[1, :6], y2[1, :6], atol=1e-6)


@pytest.mark.parametrize(
    "options, kwargs, message",
    [
        (dict(), dict(decode=True), r"cca does not support decode=True"),
        (dict(), dict(mask=None), r"cca is causal attention: pass mask=attn.Mask\(causal=True\)"),
        (dict(group_size=0), dict(), r"group_size=0 must be a positive int"),
        (dict(window=3), dict(), r"window=3 must be one of \(None,\)"),
        (dict(position="alibi"), dict(), r"position='alibi' must be one of"),
    ],
)
def test_bad_options_name_the_option(options, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("cca", num_heads=H, head_dim=D, **options)
        trace_init(layer, X, **{"mask": MASK, **kwargs})
