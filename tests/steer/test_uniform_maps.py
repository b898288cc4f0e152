"""[127] uniform_maps: every cross-attention map becomes 1/L, so each query gets the mean of the caption values."""

import jax
import numpy as np
import pytest

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, UniformMaps
from tests.steer.tiny_dit import CAPTIONS, NOISE, TIMES, init_params, tiny_dit


def test_uniform_maps_make_cross_attention_query_independent_and_leave_self_attention():
    model = tiny_dit()
    variables = {"params": init_params(model)}
    names = ("attention_weights", "head_outputs")
    cached = jax.jit(lambda v: run_with_cache(model, v, NOISE, TIMES, CAPTIONS, names=names)[1])
    plain = cached(variables)
    with attn.intervene(*UniformMaps().rules(model)):
        uniform = cached(variables)  # re-traced with the rule
    weights = np.asarray(uniform["layers_0/cross_attention"]["attention_weights"])
    np.testing.assert_array_equal(weights, np.full(weights.shape, 1.0 / CAPTIONS.shape[1], np.float32))
    heads = np.asarray(uniform["layers_0/cross_attention"]["head_outputs"])  # [B, N, H, D]: mean of V for all queries
    np.testing.assert_allclose(heads, np.broadcast_to(heads[:, :1], heads.shape), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(plain["layers_0/cross_attention"]["head_outputs"]) - heads).max() > 1e-4
    np.testing.assert_array_equal(  # the self-attention before it saw the same input and was not touched
        np.asarray(plain["layers_0/attention"]["attention_weights"]),
        np.asarray(uniform["layers_0/attention"]["attention_weights"]),
    )


def test_disabled_is_bit_identical_and_a_model_without_cross_attention_is_refused():
    model = tiny_dit()
    params = init_params(model)
    apply = jax.jit(lambda p: model.apply({"params": p}, NOISE, TIMES, CAPTIONS))
    assert UniformMaps(enabled=False).rules(model) == ()
    plain = np.asarray(apply(params))
    with attn.intervene(*UniformMaps(enabled=False).rules(model)):
        np.testing.assert_array_equal(np.asarray(apply(params)), plain)
    with pytest.raises(ValueError, match="model: this DiT has cross_attention=None"):
        UniformMaps().rules(tiny_dit(cross_attention=None))
    with pytest.raises(ValueError, match="enabled=1"):
        UniformMaps(enabled=1)
    assert STEERERS["uniform_maps"].fidelity == "official-code"
