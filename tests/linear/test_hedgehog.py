"""`hedgehog`: the paper's map exp(xW + b) ⊕ exp(-xW - b) against a numpy reference of the unshifted equations (the
max shifts cancel), LoLCATs' softmax form, overflow-free features, the distillation loss (trains only the maps,
decreases on a toy teacher), decode == forward, causality, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import attn
from attn.core.feature_maps import spiky_exp

RNG = np.random.default_rng(0)


def perturbed_feature_maps(variables, scale=0.3, seed=5):
    """The init's identity maps plus random W and b, so the reference exercises both."""
    rng = np.random.default_rng(seed)
    params = nn.unbox(variables["params"])
    for name in ("query_feature_map", "key_feature_map"):
        params[name] = {
            key: value + scale * jnp.asarray(rng.standard_normal(value.shape), value.dtype)
            for key, value in params[name].items()
        }
    return {"params": params}


def numpy_hedgehog(x, params, *, causal, activation, kv_heads=2):
    """The paper's equations in float64 numpy with explicit loops: phi(y) = exp(y) ⊕ exp(-y) (or softmax halves),
    a_ij = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j'), output projection of sum_j a_ij v_j."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key", "value"))

    def phi(y):
        if activation == "exp":
            return np.concatenate([np.exp(y), np.exp(-y)], axis=-1)
        pos, neg = np.exp(y - y.max(-1, keepdims=True)), np.exp(-y + y.min(-1, keepdims=True))
        return np.concatenate([pos / pos.sum(-1, keepdims=True), neg / neg.sum(-1, keepdims=True)], axis=-1)

    batch, length, heads, _ = q.shape
    out = np.zeros(v.shape[:2] + (heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            wq, bq = p["query_feature_map"]["kernel"][h], p["query_feature_map"]["bias"][h]
            wk, bk = p["key_feature_map"]["kernel"][g], p["key_feature_map"]["bias"][g]
            for i in range(length):
                fq = phi(q[b, i, h] @ wq + bq)
                keys = range(i + 1) if causal else range(length)
                scores = np.array([fq @ phi(k[b, j, g] @ wk + bk) for j in keys])
                weights = scores / scores.sum()
                out[b, i, h] = sum(w * v[b, j, g] for w, j in zip(weights, keys, strict=True))
    return np.einsum("bthd,hde->bte", out, p["out"]["kernel"])


@pytest.mark.parametrize("activation", ["exp", "softmax"])
@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_the_papers_unshifted_equations(layer_checks, causal, activation):
    """The shifted features (per-query max, one key max per (batch, kv head)) cancel in the normaliser: the layer
    equals the unshifted formula at moderate inputs, with random W and b."""
    c = layer_checks
    layer = c.build("hedgehog", num_kv_heads=2, chunk_size=4, feature_map=activation)
    x = c.inputs()
    mask = c.CAUSAL if causal else None
    variables = perturbed_feature_maps(c.init(layer, x, mask=mask))
    want = numpy_hedgehog(x, variables["params"], causal=causal, activation=activation)
    np.testing.assert_allclose(c.forward(layer, variables, x, mask=mask), want, atol=2e-5, rtol=2e-5)


def test_the_two_maps_differ():
    """The default is the paper's exp map, not the softmax-per-half form (which it was before)."""
    x = jnp.asarray(RNG.standard_normal((1, 6, 16)), jnp.float32)
    exp_layer = attn.build("hedgehog", num_heads=4, head_dim=8)
    soft_layer = attn.build("hedgehog", num_heads=4, head_dim=8, feature_map="softmax")
    assert attn.get("hedgehog").module.feature_map == "exp"
    variables = {"params": exp_layer.init(jax.random.key(0), x)["params"]}
    gap = jnp.abs(exp_layer.apply(variables, x) - soft_layer.apply(variables, x)).max()
    assert float(gap) > 1e-3


def test_spiky_exp_does_not_overflow_and_keeps_ratios():
    """At |y| = 100 exp overflows float32; the shifted features stay in (0, 1] and keep the ratios of exp(±y)."""
    y = np.array([[100.0, -3.0, 0.5], [2.0, -1.0, 0.0]])
    phi = np.asarray(spiky_exp(jnp.asarray(y, jnp.float32)), np.float64)
    assert np.all(np.isfinite(phi)) and phi.max() == 1.0 and phi.min() >= 0.0
    exact = np.concatenate([np.exp(y), np.exp(-y)], axis=-1)  # float64: no overflow at 100
    np.testing.assert_allclose(phi / phi[:, :1], exact / exact[:, :1], rtol=1e-5, atol=1e-30)
    shifted = np.asarray(spiky_exp(jnp.asarray(y, jnp.float32), jnp.full((2, 1), 4.0)))
    np.testing.assert_allclose(shifted[1], np.exp(np.concatenate([y[1], -y[1]]) - 4.0), rtol=1e-6)


def test_decode_equals_full_forward_and_is_causal(layer_checks):
    c = layer_checks
    layer = c.build("hedgehog", num_kv_heads=2, position="rope", chunk_size=4)
    x = c.inputs()
    variables = perturbed_feature_maps(c.init(layer, x))
    assert set(variables["params"]) == {"query", "key", "value", "out", "query_feature_map", "key_feature_map"}
    full = c.forward(layer, variables, x)
    for chunks in (c.CHUNKS, c.PREFILL_CHUNKS):
        decoded, cache = c.decode_in_chunks(layer, variables, x, chunks)
        np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)
    assert cache["state"].shape == (2, 4, 16, 9)  # 2D spiky features; D + 1 with the normaliser
    assert cache["key_shift"].shape == (2, 1, 2, 1)  # the first call's key shift per (batch, kv head)
    assert c.causality_gap(layer, variables, x, t=3) < 1e-5


def test_gradients_match_finite_differences(layer_checks):
    c = layer_checks
    layer = c.build("hedgehog", num_kv_heads=2, chunk_size=2)
    x = c.inputs(batch=1, length=4)
    variables = perturbed_feature_maps(c.init(layer, x))
    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), variables["params"])
    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)

        def loss(params):
            return jnp.sum(jnp.sin(layer.apply({"params": params}, x64, mask=c.CAUSAL)))

        check_grads(loss, (jax.tree.map(jnp.asarray, params64),), order=1, modes=("rev",), atol=1e-4, rtol=1e-4)


def test_distillation_sows_a_loss_that_trains_only_the_feature_maps(layer_checks):
    """Stage 1 of the paper's conversion recipe: the sown loss has gradients for the feature maps only, and a few
    steps of Adam on them lower it (the student moves towards the softmax teacher)."""
    c = layer_checks
    layer = c.build("hedgehog", distill=True)
    x = c.inputs()
    variables = c.init(layer, x)

    def distillation(params):
        _, sown = layer.apply({"params": params}, x, mask=c.CAUSAL, mutable=["losses"])
        (loss,) = sown["losses"]["hedgehog_distillation"]
        return loss

    value_and_grad = jax.jit(jax.value_and_grad(distillation))
    loss, grads = value_and_grad(variables["params"])
    assert float(loss) > 0
    norms = {name: float(optax.tree.norm(g)) for name, g in nn.unbox(grads).items()}
    assert norms["query_feature_map"] > 0 and norms["key_feature_map"] > 0
    assert norms["query"] == norms["key"] == norms["value"] == norms["out"] == 0.0

    optimizer = optax.adam(0.05)
    params = variables["params"]
    state = optimizer.init(params)
    for _ in range(15):
        _, grads = value_and_grad(params)
        updates, state = optimizer.update(grads, state)
        params = optax.apply_updates(params, updates)
    assert float(value_and_grad(params)[0]) < 0.8 * float(loss)
    # Without distill nothing is sown.
    plain = c.build("hedgehog")
    _, sown = plain.apply(variables, x, mask=c.CAUSAL, mutable=["losses"])
    assert not sown
