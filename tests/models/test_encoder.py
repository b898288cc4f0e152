"""Encoder: both heads train, padding is invisible, parameters carry logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn.models import Encoder, build_model

VOCAB, BATCH, LENGTH, CLASSES = 32, 2, 8, 3
LENGTHS = jnp.array([5, 8])


def small_encoder(**fields) -> Encoder:
    config = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, num_classes=CLASSES)
    return build_model("encoder", **{**config, "attention": "softmax", **fields})


def tokens(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (BATCH, LENGTH), 0, VOCAB)


def test_classification_sgd_step_lowers_loss(sgd_losses):
    model = small_encoder(num_layers=1)
    batch, labels = tokens(), jnp.array([0, 2])
    params = jax.jit(model.init)(jax.random.key(1), batch, lengths=LENGTHS)["params"]

    def loss_fn(params):
        logits = model.apply({"params": params}, batch, lengths=LENGTHS)
        assert logits.shape == (BATCH, CLASSES) and logits.dtype == jnp.float32
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    before, after = sgd_losses(loss_fn, params, lr=0.5)
    assert np.isfinite(before) and after < before


def test_mlm_sgd_step_lowers_loss(sgd_losses, quick_params):
    model = small_encoder(num_layers=1, head="mlm", num_classes=None, tie_embeddings=False, norm="layernorm")
    batch = tokens()
    masked = batch.at[:, ::3].set(0)  # token 0 plays [MASK]
    params = quick_params(model, masked)["params"]

    def loss_fn(params):
        logits = model.apply({"params": params}, masked, lengths=LENGTHS)
        assert logits.shape == (BATCH, LENGTH, VOCAB) and logits.dtype == jnp.float32
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, ::3], batch[:, ::3]).mean()

    before, after = sgd_losses(loss_fn, params, lr=0.5)
    assert after < before


def test_tokens_beyond_lengths_do_not_change_the_outputs(quick_params, jit_apply):
    model = small_encoder()
    batch = tokens()
    params, apply = quick_params(model, batch, lengths=LENGTHS), jit_apply(model)
    padded = batch.at[0, 5:].set((batch[0, 5:] + 11) % VOCAB)
    base = apply(params, batch, lengths=LENGTHS)
    np.testing.assert_allclose(apply(params, padded, lengths=LENGTHS), base, atol=1e-6)
    # The same change is visible without the padding mask, and a change to a valid token is visible.
    assert not np.allclose(apply(params, padded, lengths=jnp.array([8, 8]))[0], apply(params, batch)[0])
    assert not np.allclose(apply(params, batch.at[0, 4].add(1), lengths=LENGTHS)[0], base[0])
    # Full lengths are the same as no lengths.
    np.testing.assert_allclose(apply(params, batch, lengths=jnp.array([8, 8])), apply(params, batch), atol=1e-6)


def test_encoder_is_bidirectional(quick_params, jit_apply):
    model = small_encoder(head="mlm", num_classes=None)
    batch = tokens()
    params, apply = quick_params(model, batch), jit_apply(model)
    changed = apply(params, batch.at[:, -1].add(1))
    assert not np.allclose(changed[:, 0], apply(params, batch)[:, 0])


def test_classification_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes=None"):
        jax.eval_shape(small_encoder(num_classes=None).init, jax.random.key(0), tokens())
    with pytest.raises(ValueError, match="head='pooler'"):
        jax.eval_shape(small_encoder(head="pooler").init, jax.random.key(0), tokens())


@pytest.mark.parametrize("head", ["classification", "mlm"])
def test_every_parameter_has_logical_axes_of_its_rank(head, boxed_leaves):
    model = small_encoder(head=head, tie_embeddings=False, position_embedding="learned")
    params = jax.eval_shape(model.init, jax.random.key(0), tokens())["params"]
    for path, leaf in boxed_leaves(params):
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)
    assert ("classifier" in params) == (head == "classification")
    assert ("lm_head" in params) == (head == "mlm")
