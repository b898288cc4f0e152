"""NNX interop: attn modules wrapped with nnx.bridge.ToNNX compute what the linen apply computes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attn
from attn.models import DecoderLM


def test_attention_layer_through_to_nnx_equals_linen_apply():
    layer = attn.build("softmax", num_heads=2, head_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    mask = attn.Mask(causal=True)
    # Parameters carry logical axis names; with no mesh to place them on, NNX must not shard eagerly.
    with nnx.use_eager_sharding(False):
        model = nnx.bridge.ToNNX(layer, rngs=nnx.Rngs(0)).lazy_init(x, mask=mask)
    y = model(x, mask=mask)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert params["query"]["kernel"].shape == (16, 2, 8)
    np.testing.assert_allclose(y, layer.apply({"params": params}, x, mask=mask), atol=1e-6)
    # The logical axis names survive the bridge as the NNX sharding metadata.
    assert model.query["kernel"].out_sharding == ("embed", "heads", "head_dim")


def test_decoder_through_to_nnx_equals_linen_apply_and_jits():
    lm = DecoderLM(vocab_size=32, num_layers=1, d_model=16, num_heads=2, mlp_dim=32)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 32)
    with nnx.use_eager_sharding(False):
        model = nnx.bridge.ToNNX(lm, rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(model, tokens)  # the function form of .lazy_init(tokens)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    expected = lm.apply({"params": params}, tokens)
    np.testing.assert_allclose(model(tokens), expected, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), expected, atol=1e-5)
    assert jnp.shape(params["layers_0"]["attention"]["key"]["kernel"]) == (16, 2, 8)
