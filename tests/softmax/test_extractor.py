"""`extractor` (SHE/HE/WE/ME): the implemented closed form per variant, the identity initialisation, causality,
decoding with the running-sum state and option errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from layer_checks import assert_causal, assert_decode_matches, init, trace_init

import attn

B, T, E, H, D, L = 2, 6, 16, 2, 4, 8
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))


def randomized(params, key=5):
    """Replaces the (identity-initialised) position weights by random ones, so the test sees them."""
    p = nn.unbox(params)["params"]
    if "position_weights" in p:
        p["position_weights"] = 1.0 + 0.5 * jax.random.normal(jax.random.key(key), p["position_weights"].shape)
    return {"params": p}


def closed_form(p, variant, scaling):
    """y_t = (g_t ⊙ (1/n(t)) sum_{s<=t} e_s) W_o, written as an explicit loop over t and s."""
    v = np.einsum("bte,ehd->bthd", X, p["value"]["kernel"])
    g = np.einsum("bte,ehd->bthd", X, p["adjust"]["kernel"])
    w = np.asarray(p.get("position_weights", 0.0))
    out = np.zeros((B, T, H, D))
    for t in range(T):
        total = np.zeros((B, H, D))
        for s in range(t + 1):
            if variant == "she":
                total += np.einsum("bhd,hde->bhe", v[:, s], w[s])
            elif variant == "he":
                total += v[:, s] * w[s]
            elif variant == "we":
                total += v[:, s] * w[s][:, None]
            else:
                total += v[:, s]
        n = {"sqrt": np.sqrt(t + 1), "mean": t + 1.0, "none": 1.0}[scaling]
        out[:, t] = g[:, t] * total / n
    return np.einsum("bthd,hde->bte", out, p["out"]["kernel"])


@pytest.mark.parametrize("variant, scaling", [("she", "sqrt"), ("he", "mean"), ("we", "none"), ("me", "sqrt")])
def test_each_variant_matches_its_closed_form(variant, scaling):
    layer, params = init(
        "extractor", X, MASK, num_heads=H, head_dim=D, max_length=L, variant=variant, length_scaling=scaling
    )
    params = randomized(params)
    np.testing.assert_allclose(
        layer.apply(params, X, mask=MASK), closed_form(params["params"], variant, scaling), atol=1e-4, rtol=1e-4
    )


def test_every_variant_starts_as_the_minimalist_extractor():
    me, me_params = init("extractor", X, MASK, num_heads=H, head_dim=D, max_length=L, variant="me")
    want = me.apply(me_params, X, mask=MASK)
    for variant in ("she", "he", "we"):
        layer = attn.build("extractor", num_heads=H, head_dim=D, max_length=L, variant=variant)
        params = layer.init(jax.random.key(1), X, mask=MASK)
        assert params["params"]["position_weights"].value.shape[0] == L
        np.testing.assert_allclose(layer.apply(params, X, mask=MASK), want, atol=1e-5)


@pytest.mark.parametrize("variant", ["she", "we"])
def test_causality_and_decoding(variant):
    layer, params = init("extractor", X, MASK, num_heads=H, head_dim=D, max_length=L, variant=variant)
    params = randomized(params)
    assert_causal(layer, params, X, cut=3)
    assert_decode_matches(layer, params, X, MASK, atol=1e-5)


@pytest.mark.parametrize("variant", ["she", "we"])
def test_gradients_match_finite_differences(variant):
    """Reverse-mode gradients w.r.t. x and every parameter (random position weights) equal central differences in
    float64 (the running sums included: they accumulate in float64 for float64 inputs)."""
    with jax.enable_x64(True):
        options = dict(num_heads=2, head_dim=2, max_length=5, variant=variant)
        layer = attn.build("extractor", dtype=jnp.float64, param_dtype=jnp.float64, **options)
        x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 5, 4)))
        params = randomized(layer.init(jax.random.key(1), x, mask=MASK))
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        forward = jax.jit(lambda x, p: layer.apply(p, x, mask=MASK))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options, kwargs, message",
    [
        (dict(variant="xe"), dict(), r"variant='xe' must be one of"),
        (dict(length_scaling="log"), dict(), r"length_scaling='log' must be one of"),
        (dict(max_length=4), dict(), r"sequence length 6 exceeds max_length=4 of extractor"),
        (dict(), dict(mask=attn.Mask(window=(2, 0), causal=True)), r"unsupported parts \['window'\]"),
        (dict(), dict(mask=attn.Mask(kv_lengths=jnp.array([3, 4]))), r"extractor is a causal sequence mixer"),
        (dict(), dict(positions=jnp.arange(T)), r"positions must be None"),
        (dict(), dict(context=X), r"extractor mixes its own sequence"),
        (dict(num_kv_heads=1), dict(), r"num_kv_heads=1 is not supported by extractor"),
    ],
)
def test_bad_options_name_the_option(options, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("extractor", **{"num_heads": H, "head_dim": D, "max_length": L, **options})
        trace_init(layer, X, **{"mask": MASK, **kwargs})
