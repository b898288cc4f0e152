"""`linear`: decode equals the full forward, causality, padding masks, the learnable map, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn


@pytest.mark.parametrize("options", [dict(num_kv_heads=2), dict(feature_map="learnable", num_kv_heads=1, chunk_size=4)])
def test_decode_with_state_equals_full_forward_and_is_causal(layer_checks, options):
    c = layer_checks
    layer = c.build("linear", **options)
    x = c.inputs()
    variables = c.init(layer, x)
    full = c.forward(layer, variables, x)
    decoded, cache = c.decode_in_chunks(layer, variables, x, c.PREFILL_CHUNKS)
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)
    # The state is constant-size: [B, H, D, D + 1] (+1: the normaliser), whatever the length.
    assert cache["state"].shape == (2, 4, 8, 9) and int(cache["cache_index"]) == x.shape[1]
    assert c.causality_gap(layer, variables, x, t=5) < 1e-5


def test_learnable_map_starts_as_elu_plus_one(layer_checks):
    """The per-head map is identity-initialised, so at init it equals the fixed elu+1 map with the same q/k/v/o."""
    c = layer_checks
    x = c.inputs()
    learnable = c.build("linear", feature_map="learnable", num_kv_heads=2)
    fixed = c.build("linear", feature_map="elu_plus_one", num_kv_heads=2)
    variables = c.init(learnable, x)
    params = dict(variables["params"])
    kernel = nn.unbox(params.pop("feature_map"))["kernel"]
    np.testing.assert_array_equal(kernel, np.broadcast_to(np.eye(8), (2, 8, 8)))
    spec = nn.get_partition_spec(variables)["params"]["feature_map"]["kernel"]
    assert spec == jax.sharding.PartitionSpec("kv_heads", "head_dim", None)
    np.testing.assert_allclose(
        c.forward(learnable, variables, x), c.forward(fixed, {"params": params}, x), atol=1e-6, rtol=1e-6
    )


def test_normalised_rows_average_the_values(layer_checks):
    """With normalize=True the weights of each query sum to 1: constant values come out unchanged."""
    c = layer_checks
    layer = c.build("linear")
    x = c.inputs()
    params = nn.unbox(c.init(layer, x, mask=None)["params"])
    q = jnp.einsum("bte,ehd->bthd", x, params["query"]["kernel"])
    k = jnp.einsum("bte,ehd->bthd", x, params["key"]["kernel"])
    v = jnp.broadcast_to(jnp.arange(8.0), k.shape)
    for causal in (True, False):
        out = attn.functional.linear_attention(q, k, v, causal=causal, feature_map="elu_plus_one", normalize=True)
        np.testing.assert_allclose(out, jnp.broadcast_to(jnp.arange(8.0), out.shape), atol=1e-5)


def test_padding_lengths_equal_the_unpadded_sequence(layer_checks):
    c = layer_checks
    layer = c.build("linear")
    x = c.inputs(batch=1)
    variables = c.init(layer, x, mask=None)
    lengths = jnp.asarray([7])
    padded = c.forward(layer, variables, x, mask=attn.Mask(q_lengths=lengths, kv_lengths=lengths))
    np.testing.assert_allclose(padded[:, :7], c.forward(layer, variables, x[:, :7], mask=None), atol=1e-5)
    assert np.all(np.asarray(padded[:, 7:]) == 0)


def test_gradients_match_finite_differences(layer_checks):
    """Reverse-mode gradients w.r.t. x and every parameter (the learnable feature map's included) equal central
    differences in float64."""
    c = layer_checks
    with jax.enable_x64(True):
        layer = attn.build(
            "linear", num_heads=2, head_dim=4, feature_map="learnable", dtype=jnp.float64, param_dtype=jnp.float64
        )
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 8)))
        params = {"params": layer.init(jax.random.key(1), x, mask=c.CAUSAL)["params"]}
        assert "feature_map" in params["params"]
        forward = jax.jit(lambda x, p: layer.apply(p, x, mask=c.CAUSAL))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_errors_name_the_problem(layer_checks):
    c = layer_checks
    x = c.inputs()
    layer = c.build("linear")
    variables = c.init(layer, x)
    ids = jnp.zeros(x.shape[:2], jnp.int32)
    with pytest.raises(ValueError, match=r"linear cannot honour the mask part\(s\) q_segment_ids"):
        layer.apply(variables, x, mask=attn.Mask(causal=True, q_segment_ids=ids, kv_segment_ids=ids))
    with pytest.raises(ValueError, match="decode=True needs a causal mask"):
        layer.apply(variables, x, mask=None, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="feature_map='exp' must be one of"):
        c.build("linear", feature_map="exp").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
        c.build("linear", chunk_size=0).init(jax.random.key(0), x)
