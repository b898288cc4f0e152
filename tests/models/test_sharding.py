"""Models under a device mesh: logical axis names map to mesh axes and the results are unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from attn.models import DecoderLM, Encoder, ViT

RULES = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", None),
    ("length", None),
    ("head_dim", None),
)
SIZES = dict(num_layers=1, d_model=32, num_heads=4, mlp_dim=64)
MODELS = {
    "decoder": (DecoderLM(vocab_size=32, **SIZES), jnp.ones((4, 8), jnp.int32)),
    "encoder": (Encoder(vocab_size=32, num_classes=3, **SIZES), jnp.ones((4, 8), jnp.int32)),
    "vit": (ViT(num_classes=3, patch_size=4, **SIZES), jnp.ones((4, 8, 8, 3))),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_sharded_forward_matches_single_device(kind, quick_params):
    model, inputs = MODELS[kind]
    params = quick_params(model, inputs)
    expected = jax.jit(model.apply)(params, inputs)

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, RULES)
        sharded = jax.device_put(params, shardings)
        out = jax.jit(model.apply)(sharded, inputs)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, expected, atol=1e-5)
