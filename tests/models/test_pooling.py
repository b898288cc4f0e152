"""Classifier pooling by name: the models' `pool=` accepts registered "pooling" mechanisms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.models import Encoder, ViT


def test_every_pooling_mechanism_is_a_pool_choice():
    poolers = [name for name in attn.list_mechanisms() if attn.get(name).input_kind == "pooling"]
    assert {"attentive_pooling", "low_rank_pooling"} <= set(poolers)
    with pytest.raises(ValueError, match=r"pool='window' is not supported; expected one of \['mean', 'attentive"):
        Encoder(vocab_size=16, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, num_classes=3, pool="window").init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
        )


@pytest.mark.parametrize("pool", ["attentive_pooling", "low_rank_pooling"])
def test_encoder_attentive_pool_ignores_padding(pool):
    model = Encoder(
        vocab_size=32,
        num_layers=1,
        d_model=16,
        num_heads=2,
        mlp_dim=32,
        num_classes=3,
        head="classification",
        pool=pool,
        pool_options={"num_queries": 4} if pool == "attentive_pooling" else {},
    )
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 32)
    lengths = jnp.array([4, 6])
    params = model.init(jax.random.key(0), tokens, lengths=lengths)
    assert "pool" in params["params"]
    apply = jax.jit(lambda p, t: model.apply(p, t, lengths=lengths))
    base = apply(params, tokens)
    assert base.shape == (2, 3)
    changed = apply(params, tokens.at[0, 4:].set(7))  # only row 0's padding changes
    np.testing.assert_allclose(changed, base, rtol=1e-6, atol=1e-6)
    assert not np.allclose(apply(params, tokens.at[0, 0].set((tokens[0, 0] + 1) % 32)), base)


def test_vit_spatial_mechanism_with_attentive_probe():
    model = ViT(
        num_classes=4,
        patch_size=4,
        num_layers=1,
        d_model=16,
        num_heads=2,
        mlp_dim=32,
        attention="neighborhood",
        attention_options={"kernel_size": 3},
        pool="attentive_pooling",
        pool_options={"num_queries": 2},
    )
    images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    params = model.init(jax.random.key(0), images)
    grads = jax.grad(lambda p: model.apply(p, images).sum())(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    probe = jax.tree.leaves(grads["params"]["pool"])
    assert probe and all(float(jnp.abs(g).sum()) > 0 for g in probe)  # the probe's parameters learn
