"""`hedgehog`: the spiky feature map, the distillation loss (trains only the maps, decreases on a toy teacher), the
layer equals its weights formula, decode == forward, causality."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn.linear.hedgehog import hedgehog_attention_weights, spiky_features

RNG = np.random.default_rng(0)


def test_spiky_features_are_positive_halves_summing_to_one():
    x = jnp.asarray(RNG.standard_normal((3, 5, 2, 8)), jnp.float32)
    phi = spiky_features(x)
    assert phi.shape == (3, 5, 2, 16) and np.all(np.asarray(phi) > 0)
    np.testing.assert_allclose(phi[..., :8], jax.nn.softmax(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(phi[..., 8:], jax.nn.softmax(-x, axis=-1), rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_its_attention_weights_times_values(layer_checks, causal):
    c = layer_checks
    layer = c.build("hedgehog", num_kv_heads=2, chunk_size=4)
    x = c.inputs()
    mask = c.CAUSAL if causal else None
    variables = c.init(layer, x, mask=mask)
    p = nn.unbox(variables["params"])
    q, k, v = (jnp.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("query", "key", "value"))
    # At init the maps are the identity: phi(x) = [softmax(x), softmax(-x)].
    weights = hedgehog_attention_weights(spiky_features(q), spiky_features(k), causal=causal)
    np.testing.assert_allclose(jnp.sum(weights, axis=-1), 1.0, rtol=1e-5)
    o = jnp.einsum("bhts,bshd->bthd", weights, jnp.repeat(v, 2, axis=2))
    want = jnp.einsum("bthd,hde->bte", o, p["out"]["kernel"])
    np.testing.assert_allclose(c.forward(layer, variables, x, mask=mask), want, atol=1e-5, rtol=1e-5)


def test_decode_equals_full_forward_and_is_causal(layer_checks):
    c = layer_checks
    layer = c.build("hedgehog", num_kv_heads=2, position="rope", chunk_size=4)
    x = c.inputs()
    variables = c.init(layer, x)
    assert set(variables["params"]) == {"query", "key", "value", "out", "query_feature_map", "key_feature_map"}
    full = c.forward(layer, variables, x)
    decoded, cache = c.decode_in_chunks(layer, variables, x, c.CHUNKS)
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)
    assert cache["state"].shape == (2, 4, 16, 9)  # 2D spiky features; D + 1 with the normaliser
    assert c.causality_gap(layer, variables, x, t=3) < 1e-5


def test_distillation_sows_a_loss_that_trains_only_the_feature_maps(layer_checks):
    """Stage 1 of the conversion recipe: the sown loss has gradients for the feature maps only, and a few steps
    of Adam on them lower it (the student moves towards the softmax teacher)."""
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
