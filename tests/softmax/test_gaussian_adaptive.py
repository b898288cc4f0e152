"""`gaussian_adaptive` (GAAM): the official formula, the uniform limit, padding, causality of the feature gate,
decode, gradients and option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, init

import attn
from attn.softmax.gaussian_adaptive import gaussian_adaptive_attention, gaussian_adaptive_weights

B, T, E, H, D, G = 2, 7, 8, 2, 4, 3
X = jax.random.normal(jax.random.key(0), (B, T, E))
V = jax.random.normal(jax.random.key(1), (B, T, H, D)) * 2.0 + 0.5
OFFSETS = jax.random.normal(jax.random.key(2), (H, G)) * 0.5
SCALES = jnp.exp(jax.random.normal(jax.random.key(3), (H, G)) * 0.3)
LOGITS = jax.random.normal(jax.random.key(4), (H, G))
LENGTHS = jnp.array([7, 4])
PADDED = attn.Mask(q_lengths=LENGTHS, kv_lengths=LENGTHS)


def official_mixture(v, offsets, scales, logits, axis, n_valid=None):
    """The official GAAM head in numpy (MHGAAM.py form), with masked population statistics."""
    v = np.asarray(v, np.float64)
    out = np.zeros_like(v)
    for b in range(v.shape[0]):
        n = v.shape[1] if n_valid is None else int(n_valid[b])
        x = v[b, :n]  # [n, H, D]
        ax = 0 if axis == "sequence" else 2
        mean, var = x.mean(ax, keepdims=True), x.var(ax, keepdims=True) + 1e-8
        w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [H, G]
        g = 0.0
        for j in range(offsets.shape[1]):
            y = (x - (mean + offsets[None, :, None, j])) / np.sqrt(var)
            g = g + w[None, :, None, j] * np.exp(-(y**2) / (2 * (scales[None, :, None, j] ** 2 + 1e-8)))
        out[b, :n] = x * g / g.sum(ax, keepdims=True)
    return out


@pytest.mark.parametrize("axis", ["sequence", "features"])
def test_functional_equals_the_official_mixture_formula(axis):
    lengths = LENGTHS if axis == "sequence" else None
    out = gaussian_adaptive_attention(V, OFFSETS, SCALES, mixture_logits=LOGITS, axis=axis, lengths=lengths)
    want = official_mixture(*map(np.asarray, (V, OFFSETS, SCALES, LOGITS)), axis, lengths)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def test_weights_are_distributions_over_the_axis_and_zero_on_padding():
    w = gaussian_adaptive_weights(V, OFFSETS, SCALES, mixture_logits=LOGITS, lengths=LENGTHS)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert float(jnp.abs(w[1, 4:]).max()) == 0.0
    wf = gaussian_adaptive_weights(V, OFFSETS, SCALES, axis="features")
    np.testing.assert_allclose(wf.sum(-1), 1.0, atol=1e-5)


def test_identical_components_equal_one_gaussian_whatever_the_mixture_weights():
    same_o, same_s = jnp.repeat(OFFSETS[:, :1], G, 1), jnp.repeat(SCALES[:, :1], G, 1)
    mixed = gaussian_adaptive_attention(V, same_o, same_s, mixture_logits=LOGITS)
    single = gaussian_adaptive_attention(V, OFFSETS[:, :1], SCALES[:, :1])
    np.testing.assert_allclose(mixed, single, atol=1e-6)


def test_huge_variance_gives_uniform_weights_so_the_layer_is_x_over_n():
    # Zero offsets and c -> inf: every Gaussian is 1, so x is divided by the number of valid tokens.
    layer, params = init("gaussian_adaptive", X, PADDED, num_heads=H, head_dim=D, projections=False, initial_scale=1e6)
    y = apply(layer, params, X, mask=PADDED)
    want = np.where(np.arange(T)[None, :, None] < LENGTHS[:, None, None], X / LENGTHS[:, None, None], 0.0)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    layer, params = init(
        "gaussian_adaptive", X, num_heads=H, head_dim=D, projections=False, initial_scale=1e6, axis="features"
    )
    np.testing.assert_allclose(apply(layer, params, X), X / D, rtol=1e-5, atol=1e-6)


def test_padded_tokens_change_nothing():
    layer, params = init("gaussian_adaptive", X, PADDED, num_heads=H, head_dim=D)
    y = apply(layer, params, X, mask=PADDED)
    x2 = X.at[1, 4:].set(100.0 * jax.random.normal(jax.random.key(9), (T - 4, E)))
    y2 = apply(layer, params, x2, mask=PADDED)
    np.testing.assert_allclose(y[:, :4], y2[:, :4], atol=1e-6)
    np.testing.assert_allclose(y[0], y2[0], atol=1e-6)
    # ... while the valid tokens do matter: the statistics span the sequence (non-causal).
    x3 = X.at[1, 3].add(3.0)
    assert float(jnp.abs(apply(layer, params, x3, mask=PADDED)[1, 0] - y[1, 0]).max()) > 1e-5


def test_feature_axis_is_a_causal_per_token_gate_and_decodes_without_a_cache():
    causal = attn.Mask(causal=True)
    layer, params = init("gaussian_adaptive", X, causal, num_heads=H, head_dim=D, axis="features")
    y = apply(layer, params, X, mask=causal)
    x2 = X.at[:, 4:].set(jax.random.normal(jax.random.key(5), (B, T - 4, E)))
    np.testing.assert_allclose(apply(layer, params, x2, mask=causal)[:, :4], y[:, :4], atol=1e-6)
    steps = [apply(layer, params, X[:, t : t + 1], mask=causal, decode=True) for t in range(T)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), y, atol=1e-6)


def test_jit_and_finite_gradients_reach_the_gaussian_parameters():
    layer, params = init("gaussian_adaptive", X, PADDED, num_heads=H, head_dim=D, num_gaussians=2)
    boxed = nn.unbox(params)["params"]
    assert boxed["scale"].shape == (H, 2) and boxed["mixture_logits"].shape == (H, 2)
    loss = lambda p, x: jnp.sum(layer.apply(p, x, mask=PADDED) ** 2)  # noqa: E731
    grads = nn.unbox(jax.jit(jax.grad(loss))(params, X))["params"]
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    for name in ("mean_offset", "scale", "mixture_logits"):
        assert float(jnp.abs(grads[name]).max()) > 0, name


@pytest.mark.parametrize(
    ("options", "kwargs", "message"),
    [
        ({"axis": "time"}, {}, "axis='time'"),
        ({"num_gaussians": 0}, {}, "num_gaussians=0"),
        ({"initial_scale": -1.0}, {}, "initial_scale=-1.0"),
        ({"projections": False, "head_dim": 3}, {}, "projections=False needs embed == num_heads * head_dim"),
        ({}, {"mask": attn.Mask(causal=True)}, "may only hold padding lengths"),
        ({}, {"decode": True}, "decode=True is not supported by gaussian_adaptive with axis='sequence'"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(options, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        layer = attn.build("gaussian_adaptive", **{"num_heads": H, "head_dim": D, **options})
        jax.eval_shape(lambda k: layer.init(k, X, **kwargs), jax.random.key(0))


def test_functional_argument_errors():
    with pytest.raises(ValueError, match="combine='sum'"):
        gaussian_adaptive_weights(V, OFFSETS, SCALES, combine="sum")
    with pytest.raises(ValueError, match=r"scales has shape \(2, 2\)"):
        gaussian_adaptive_weights(V, OFFSETS, SCALES[:, :2])
    with pytest.raises(ValueError, match="mixture_logits must be None for combine='product'"):
        gaussian_adaptive_weights(V, OFFSETS, SCALES, mixture_logits=LOGITS, combine="product")
