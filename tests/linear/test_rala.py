"""`rala`: the official RALA computation written out, the reduction to `linear`, padding, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attn
from attn.core import positions as pos

# rbg keys: XLA compiles a jitted init ~5x faster than with threefry keys.
KEY = jax.random.key(1, impl="rbg")


def inputs(batch=2, length=11, features=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, features)), jnp.float32)


def project(params, x, name):
    return jnp.einsum("bte,ehd->bthd", x, params[name]["kernel"])


def test_matches_the_official_computation():
    """phi = elu + 1; k~_j = N softmax_j(s mean(q) . k_j) k_j; y_i = R(q_i) (sum_j R(k~_j) v_j^T / N) /
    (q_i . mean(k~) + eps); out = (y + LePE(v)) * (x W_g), then W_o (RoPE and LePE as in GateLinearAttentionNoSilu)."""
    length, heads, dim = 11, 4, 8
    layer = attn.build("rala", num_heads=heads, head_dim=dim, num_kv_heads=2)
    x = inputs()
    params = nn.unbox(jax.jit(layer.init)(KEY, x)["params"])
    phi = lambda t: jax.nn.elu(t) + 1  # noqa: E731
    q = phi(project(params, x, "query"))
    k = jnp.repeat(phi(project(params, x, "key")), 2, axis=2)
    v = jnp.repeat(project(params, x, "value"), 2, axis=2)
    weights = jax.nn.softmax(jnp.einsum("bhd,bshd->bsh", dim**-0.5 * q.mean(1), k), axis=1)
    k = k * (length * weights)[..., None]
    inv_freq, _ = pos.rope_frequencies(dim)
    positions = jnp.arange(length)
    q_rot, k_rot = pos.apply_rope(q, positions, inv_freq), pos.apply_rope(k, positions, inv_freq)
    kv = jnp.einsum("bshd,bshe->bhde", k_rot / np.sqrt(length), v / np.sqrt(length))
    z = 1 / (jnp.einsum("bthd,bhd->bth", q, k.mean(1)) + 1e-6)
    y = jnp.einsum("bthd,bhde->bthe", q_rot, kv) * z[..., None]
    kernel, bias = params["lepe"]["kernel"], params["lepe"]["bias"]
    padded = jnp.pad(v, ((0, 0), (2, 2), (0, 0), (0, 0)))
    y = y + sum(padded[:, i : i + length] * kernel[i] for i in range(5)) + bias
    expected = jnp.einsum("bthd,hde->bte", y * project(params, x, "gate"), params["out"]["kernel"])
    np.testing.assert_allclose(jax.jit(layer.apply)({"params": params}, x), expected, atol=2e-5, rtol=2e-5)


def test_without_the_augmentations_it_is_linear_attention():
    """kv_weighting=False, gate=False, no RoPE, no LePE: the non-causal normalised elu+1 `linear` layer (same
    parameters; RALA adds its eps to the mean-normalised denominator, i.e. N eps to the summed one)."""
    options = dict(num_heads=4, head_dim=8, num_kv_heads=2)
    plain = attn.build("rala", kv_weighting=False, gate=False, position="none", lepe_kernel_size=0, **options)
    x = inputs()
    params = jax.jit(plain.init)(KEY, x)
    linear = attn.build("linear", feature_map="elu_plus_one", normalize=True, **options)
    np.testing.assert_allclose(jax.jit(plain.apply)(params, x), jax.jit(linear.apply)(params, x), atol=1e-5, rtol=1e-4)
    # The KV-buffer weighting changes the result (it is not the identity at init).
    weighted = attn.build("rala", gate=False, position="none", lepe_kernel_size=0, **options)
    assert float(jnp.abs(jax.jit(weighted.apply)(params, x) - jax.jit(plain.apply)(params, x)).max()) > 1e-4


def test_padding_lengths_equal_the_unpadded_sequence():
    layer = attn.build("rala", num_heads=4, head_dim=8)
    x = inputs(batch=1)
    apply = jax.jit(layer.apply)
    params = jax.jit(layer.init)(KEY, x)
    lengths = jnp.asarray([7])
    padded = apply(params, x, mask=attn.Mask(q_lengths=lengths, kv_lengths=lengths))
    np.testing.assert_allclose(padded[:, :7], apply(params, x[:, :7]), atol=2e-5)
    assert np.all(np.asarray(padded[:, 7:]) == 0)


def test_gradients_match_finite_differences():
    """Reverse-mode gradients w.r.t. x and every parameter equal central differences in float64 (tolerance 1e-3:
    rala computes a stage in float32 whatever the dtype)."""
    with jax.enable_x64(True):
        layer = attn.build("rala", num_heads=2, head_dim=4, num_kv_heads=1, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 8)))
        params = {"params": layer.init(KEY, x)["params"]}
        forward = jax.jit(lambda x, p: layer.apply(p, x))
        check_grads(forward, (x, params), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_errors_name_the_problem():
    x = jnp.zeros((1, 5, 16))
    build = lambda **o: attn.build("rala", num_heads=4, head_dim=8, **o)  # noqa: E731
    with pytest.raises(ValueError, match="rala is not causal"):
        build().init(KEY, x, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match="decode=True is not supported by rala"):
        build().init(KEY, x, decode=True)
    with pytest.raises(ValueError, match="lepe_kernel_size=4 must be 0 \\(off\\) or a positive odd int"):
        build(lepe_kernel_size=4).init(KEY, x)
    with pytest.raises(ValueError, match="position='alibi' must be one of"):
        build(position="alibi").init(KEY, x)
    with pytest.raises(ValueError, match="eps=0"):
        build(eps=0.0).init(KEY, x)
    spec = attn.get("rala")
    assert not spec.supports_causal and not spec.supports_decode and spec.catalog == 120
