"""A BertModel checkpoint loads as a post-norm `Encoder` that computes what transformers computed: last hidden
states and the pooler output within 1e-4 (float32, eager attention on their side), with padding and token types;
the "embedding" head is the masked mean of those hidden states (sentence-transformers' mean pooling)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from attn.models.encoder import Encoder
from tests.pretrained.fixtures import loaded, reference


def _inputs():
    ref = reference("bert")
    return ref, dict(
        lengths=jnp.asarray(ref["lengths"], jnp.int32), token_type_ids=jnp.asarray(ref["token_type_ids"], jnp.int32)
    )


def test_hidden_states_and_pooler_match_transformers():
    model, params, _, _ = loaded("bert")
    assert isinstance(model, Encoder) and model.norm_position == "post"
    ref, kwargs = _inputs()
    hidden, state = model.apply(
        {"params": params}, jnp.asarray(ref["input_ids"], jnp.int32), mutable=["intermediates"], **kwargs
    )
    for row, length in enumerate(ref["lengths"]):  # padded positions are not outputs of either model
        np.testing.assert_allclose(np.asarray(hidden[row, :length]), ref["hidden"][row, :length], atol=1e-4, rtol=0)
    (pooler,) = state["intermediates"]["pooler_output"]
    np.testing.assert_allclose(np.asarray(pooler), ref["pooler"], atol=1e-4, rtol=0)


def test_embedding_head_is_the_masked_mean_of_the_reference_hidden_states():
    model, params, _, _ = loaded("bert")
    ref, kwargs = _inputs()
    embedder = dataclasses.replace(model, head="embedding")
    pooled = embedder.apply({"params": params}, jnp.asarray(ref["input_ids"], jnp.int32), **kwargs)
    expected = np.stack([ref["hidden"][row, :length].mean(axis=0) for row, length in enumerate(ref["lengths"])])
    np.testing.assert_allclose(np.asarray(pooled), expected, atol=1e-4, rtol=0)


def test_token_types_change_the_output():
    """The fixture's second half has token type 1: with all types 0 the hidden states differ (the table is read)."""
    model, params, _, _ = loaded("bert")
    ref, kwargs = _inputs()
    tokens = jnp.asarray(ref["input_ids"], jnp.int32)
    zeros = model.apply({"params": params}, tokens, lengths=kwargs["lengths"])
    typed = model.apply({"params": params}, tokens, **kwargs)
    assert float(jnp.abs(typed - zeros)[0, -1].max()) > 1e-3


def test_bad_token_types_and_norm_position_are_named():
    model, params, _, _ = loaded("bert")
    ref, kwargs = _inputs()
    tokens = jnp.asarray(ref["input_ids"], jnp.int32)
    untyped = dataclasses.replace(model, token_types=0)
    with pytest.raises(ValueError, match=r"token_type_ids of shape \(2, 19\) need a model with token_types > 0"):
        untyped.apply({"params": params}, tokens, token_type_ids=kwargs["token_type_ids"])
    with pytest.raises(ValueError, match=r"norm_position='middle'.*'pre', 'post'"):
        dataclasses.replace(model, norm_position="middle").apply({"params": params}, tokens)
