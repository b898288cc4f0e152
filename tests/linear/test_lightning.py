"""`lightning`: the TNL decay schedule, the exact reduction to `linear`, decode == forward, causality, LRPE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.linear.lightning import tnl_decay


def test_tnl_decay_schedule():
    # Layer 0 of 1: lambda_h = exp(-2^(-8h/H)), h = 1..H (ALiBi's slopes), times (1 + 1e-5).
    np.testing.assert_allclose(tnl_decay(8, 0, 1), np.exp(-(2.0 ** -np.arange(1, 9)) * (1 + 1e-5)), rtol=1e-6)
    layers = np.stack([tnl_decay(4, layer, 6) for layer in range(6)])
    assert np.all(np.diff(layers, axis=0) > 0), "deeper layers decay less"
    assert np.all(np.diff(layers, axis=1) > 0), "later heads decay less"
    np.testing.assert_allclose(layers[-1], np.exp(-(2.0 ** -np.arange(2, 10, 2)) * 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="layer_index=3 must lie in"):
        tnl_decay(4, 3, 3)


def test_paper_eq10_decay_form():
    """decay='tnl_paper' is Eq. 10 of the paper as printed: lambda = exp(-(8h/H)(1 - l/L)), h = 1..H, l = 1..L."""
    heads, layers = 4, 3
    for layer in range(layers):
        want = np.exp(-8.0 * np.arange(1, heads + 1) / heads * (1 - (layer + 1) / layers))
        np.testing.assert_allclose(tnl_decay(heads, layer, layers, "tnl_paper"), want, rtol=1e-6)
    np.testing.assert_array_equal(tnl_decay(heads, layers - 1, layers, "tnl_paper"), np.ones(heads, np.float32))
    # the released code's head rates 2^(-8h/H) are far slower than Eq. 10's 8h/H
    assert np.all(tnl_decay(heads, 0, layers) > tnl_decay(heads, 0, layers, "tnl_paper"))
    with pytest.raises(ValueError, match="decay='none' is not supported"):
        tnl_decay(heads, 0, layers, "none")


def test_paper_decay_layer_runs_and_is_causal(layer_checks):
    c = layer_checks
    layer = c.build("lightning", decay="tnl_paper", layer_index=0, num_layers=2, chunk_size=4)
    x = c.inputs()
    variables = c.init(layer, x)
    full = c.forward(layer, variables, x)
    assert bool(jnp.all(jnp.isfinite(full)))
    assert c.causality_gap(layer, variables, x, t=6) < 1e-5


def test_without_decay_norm_gate_and_lrpe_it_is_linear_attention(layer_checks):
    """decay='none', lrpe=False, output_norm='none', gate=False, feature_map='identity' == `linear` with
    feature_map='identity', normalize=False: the same parameters give the same outputs."""
    c = layer_checks
    x = c.inputs()
    lightning = c.build(
        "lightning", decay="none", lrpe=False, output_norm="none", gate=False, feature_map="identity", num_kv_heads=2
    )
    linear = c.build("linear", feature_map="identity", normalize=False, num_kv_heads=2)
    variables = c.init(lightning, x)
    assert set(variables["params"]) == {"query", "key", "value", "out"}
    for mask in (c.CAUSAL, None):
        np.testing.assert_allclose(
            c.forward(lightning, variables, x, mask=mask), c.forward(linear, variables, x, mask=mask), atol=1e-5
        )


def test_decode_with_state_equals_full_forward_and_is_causal(layer_checks):
    c = layer_checks
    layer = c.build("lightning", num_kv_heads=2, layer_index=1, num_layers=4, chunk_size=4, lrpe=True)
    x = c.inputs()
    variables = c.init(layer, x)
    assert {"gate", "lrpe"} <= set(variables["params"])
    full = c.forward(layer, variables, x)
    decoded, cache = c.decode_in_chunks(layer, variables, x, c.CHUNKS)
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=2e-5)
    assert cache["state"].shape == (2, 4, 16, 8)  # LRPE doubles the key features
    assert c.causality_gap(layer, variables, x, t=6) < 1e-5


def test_lrpe_and_decay_depend_on_relative_positions_only(layer_checks):
    c = layer_checks
    layer = c.build("lightning", num_kv_heads=2)
    x = c.inputs()
    variables = c.init(layer, x)
    theta = nn.unbox(variables["params"]["lrpe"]["theta"])
    assert theta.shape == (2, 8)
    base = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    shifted = c.forward(layer, variables, x, positions=base + 37)
    np.testing.assert_allclose(shifted, c.forward(layer, variables, x, positions=base), atol=2e-5, rtol=2e-5)


def test_options_are_checked(layer_checks):
    c = layer_checks
    x = c.inputs()
    with pytest.raises(ValueError, match="decay='learned' must be one of"):
        c.build("lightning", decay="learned").init(jax.random.key(0), x, mask=c.CAUSAL)
    with pytest.raises(ValueError, match="layer_index=4 must lie in"):
        c.build("lightning", layer_index=4, num_layers=4).init(jax.random.key(0), x, mask=c.CAUSAL)
    with pytest.raises(ValueError, match="output_norm='batchnorm' must be one of"):
        c.build("lightning", output_norm="batchnorm").init(jax.random.key(0), x, mask=c.CAUSAL)
    spec = attn.get("lightning")
    assert spec.catalog == 19 and spec.supports_decode and spec.op is attn.functional.linear_attention


def test_lrpe_follows_the_paper_first_layer_only_unless_forced(layer_checks):
    """lrpe=None: LRPE (its theta parameter) in the layer with layer_index 0 only; True / False force it."""
    c = layer_checks
    x = c.inputs()
    has_lrpe = {}
    for index, lrpe in ((0, None), (2, None), (2, True), (0, False)):
        layer = c.build("lightning", layer_index=index, num_layers=4, lrpe=lrpe)
        has_lrpe[index, lrpe] = "lrpe" in jax.eval_shape(lambda layer=layer: c.init(layer, x))["params"]
    assert has_lrpe == {(0, None): True, (2, None): False, (2, True): True, (0, False): False}
    with pytest.raises(ValueError, match="lrpe='first' must be None or one of"):
        c.build("lightning", lrpe="first").init(jax.random.key(0), x, mask=c.CAUSAL)
