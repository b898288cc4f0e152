"""The registered `softmax` layer: decode equals full forward, causality, captured weights, logical names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn.core import positions as pos

B, T, E = 2, 10, 32


def setup(**options):
    layer = attn.build("softmax", num_heads=4, head_dim=8, **options)
    x = jax.random.normal(jax.random.key(0), (B, T, E))
    params = layer.init(jax.random.key(1), x, mask=attn.Mask(causal=True))
    return layer, x, params


def decode_all(layer, params, x, mask, chunks):
    cache = layer.init(jax.random.key(1), x, mask=mask, decode=True)["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)
    step = jax.jit(lambda variables, chunk: layer.apply(variables, chunk, mask=mask, decode=True, mutable=["cache"]))
    outs, start = [], 0
    for size in chunks:
        y, mutated = step({**params, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_kv_heads=2),
        dict(num_kv_heads=1, position="alibi"),
        dict(position="t5"),
        dict(position="shaw"),
        dict(position="none", window=(3, 0), softcap=4.0),
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, qk_norm=True),
    ],
    ids=["mha_rope", "gqa", "mqa_alibi", "t5", "shaw", "window_softcap", "yarn_qknorm"],
)
def test_decode_equals_full_forward(options):
    layer, x, params = setup(**options)
    mask = attn.Mask(causal=True)
    full = jax.jit(lambda p, x: layer.apply(p, x, mask=mask))(params, x)
    np.testing.assert_allclose(decode_all(layer, params, x, mask, [1] * T), full, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(decode_all(layer, params, x, mask, [4, 1, 3, 2]), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["rope", "alibi", "t5", "shaw"])
def test_layer_causality(position):
    layer, x, params = setup(position=position)
    mask = attn.Mask(causal=True)
    y = layer.apply(params, x, mask=mask)
    x2 = x.at[:, 6:].set(jax.random.normal(jax.random.key(5), x[:, 6:].shape))
    y2 = layer.apply(params, x2, mask=mask)
    np.testing.assert_array_equal(y[:, :6], y2[:, :6])
    assert float(jnp.abs(y[:, 6:] - y2[:, 6:]).max()) > 1e-4


def test_rope_layer_equals_functional_with_explicit_rope():
    layer, x, params = setup()
    p = params["params"]
    proj = lambda name: jnp.einsum("bte,ehd->bthd", x, p[name]["kernel"].unbox())
    inv_freq, _ = pos.rope_frequencies(8)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    q, k = (pos.apply_rope(proj(n), positions, inv_freq) for n in ("query", "key"))
    o = attn.functional.softmax_attention(q, k, proj("value"), causal=True)
    want = jnp.einsum("bthd,hde->bte", o, p["out"]["kernel"].unbox())
    np.testing.assert_allclose(layer.apply(params, x, mask=attn.Mask(causal=True)), want, atol=1e-5)


def test_captured_weights_and_cross_attention():
    layer, x, params = setup(capture=True)
    y, state = layer.apply(params, x, mask=attn.Mask(causal=True), mutable=["intermediates"])
    (probs,) = state["intermediates"]["attention_weights"]
    assert probs.shape == (B, 4, T, T)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    context = jax.random.normal(jax.random.key(3), (B, 7, E))
    cross = attn.build("softmax", num_heads=4, head_dim=8)
    cp = cross.init(jax.random.key(0), x, context=context)
    assert cross.apply(cp, x, context=context).shape == (B, T, E)

    # Decoding with a context: the creating call caches the projected context keys/values, later calls reuse
    # them, so token-by-token decoding equals the full (non-causal over the context) forward.
    full = cross.apply(cp, x, context=context)
    _, state = cross.apply(cp, x[:, :1], context=context, decode=True, mutable=["cache"])
    assert state["cache"]["cross_key"].shape == (B, 7, 4, 8)
    steps = []
    for t in range(T):
        y, state = cross.apply({**cp, **state}, x[:, t : t + 1], context=context, decode=True, mutable=["cache"])
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    # The cached keys are used, not the context passed later: a different context of the same shape changes nothing.
    other = cross.apply({**cp, **state}, x[:, :1], context=context * 3.0, decode=True, mutable=["cache"])[0]
    np.testing.assert_allclose(other, full[:, :1], atol=1e-5)
    with pytest.raises(ValueError, match="the cache was created for"):
        cross.apply({**cp, **state}, x[:, :1], context=context[:, :5], decode=True, mutable=["cache"])


def test_every_parameter_has_logical_axis_names():
    _, _, params = setup(position="t5", num_kv_heads=2, qk_norm=True, use_bias=True)
    leaves = jax.tree.leaves(params, is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)
    specs = nn.get_partition_spec(params)["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(specs["key"]["kernel"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(specs["out"]["kernel"]) == ("heads", "head_dim", "embed")


@pytest.mark.parametrize("deterministic", [True, False], ids=["eval", "dropout"])
def test_gradients_match_finite_differences(deterministic):
    """Reverse-mode gradients w.r.t. x and every parameter (GQA, RoPE, causal; with a fixed dropout mask when
    training) equal central differences in float64."""
    with jax.enable_x64(True):
        layer = attn.build(
            "softmax",
            num_heads=2,
            head_dim=4,
            num_kv_heads=1,
            position="rope",
            dropout_rate=0.3,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 8)))
        mask = attn.Mask(causal=True)
        params = {"params": layer.init(jax.random.key(1), x, mask=mask)["params"]}
        rngs = {"dropout": jax.random.key(2)}
        forward = jax.jit(lambda x, p: layer.apply(p, x, mask=mask, deterministic=deterministic, rngs=rngs))
        # all float64: step 1e-4 keeps the truncation error (~1e-7) under the 1e-5 tolerance
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-4, atol=1e-5, rtol=1e-5)


def test_configured_window_longer_than_the_sequence_is_full_attention_and_a_short_one_is_a_band():
    """A layer configured with Mistral's kind of window (sliding_window=4096) runs on a short sequence: a side
    longer than the sequence reaches every key; a short window equals the explicit band mask (|i - j| rules)."""
    layer, x, params = setup()
    causal = attn.Mask(causal=True)
    full = layer.apply(params, x, mask=causal)
    long_window = attn.build("softmax", num_heads=4, head_dim=8, window=(4096, 0))
    np.testing.assert_array_equal(np.asarray(long_window.apply(params, x, mask=causal)), np.asarray(full))
    band = np.tril(np.ones((T, T), bool)) & ~np.tril(np.ones((T, T), bool), -3)  # keys i-2..i
    dense = jnp.asarray(band)[None, None]
    expected = layer.apply(params, x, mask=dense)
    short = attn.build("softmax", num_heads=4, head_dim=8, window=(2, 0)).apply(params, x, mask=causal)
    np.testing.assert_allclose(np.asarray(short), np.asarray(expected), atol=1e-6, rtol=1e-6)
    decoded = decode_all(long_window, params, x, causal, [4, 1, 5])
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=1e-5, rtol=1e-5)
