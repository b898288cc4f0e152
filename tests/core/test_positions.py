"""Positional encodings: RoPE's relative property and scalings, ALiBi slopes, T5 buckets, Shaw logits."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core import positions as pos


def test_rope_scores_depend_only_on_relative_position():
    r = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(r[0], (1, 1, 1, 16))
    k = jax.random.normal(r[1], (1, 1, 1, 16))
    inv_freq, _ = pos.rope_frequencies(16)
    score = lambda i, j: float(
        jnp.sum(pos.apply_rope(q, jnp.array([[i]]), inv_freq) * pos.apply_rope(k, jnp.array([[j]]), inv_freq))
    )
    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    # rotation preserves norms
    rotated = pos.apply_rope(q, jnp.array([[11]]), inv_freq)
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-6)


def test_rope_scalings():
    plain, m = pos.rope_frequencies(32, base=10000.0)
    assert m == 1.0
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 32, 2) / 32))
    linear, _ = pos.rope_frequencies(32, scaling="linear", factor=4.0)
    np.testing.assert_allclose(linear, plain / 4.0)
    ntk, _ = pos.rope_frequencies(32, scaling="ntk", factor=4.0)
    assert ntk[0] == pytest.approx(1.0) and ntk[-1] < plain[-1]
    yarn, mult = pos.rope_frequencies(32, scaling="yarn", factor=4.0, original_max_len=2048)
    assert mult == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert yarn[0] == pytest.approx(plain[0])  # high frequencies extrapolate
    assert yarn[-1] == pytest.approx(plain[-1] / 4.0)  # low frequencies interpolate
    same, _ = pos.rope_frequencies(32, scaling="yarn", factor=1.0)
    np.testing.assert_allclose(same, plain)
    with pytest.raises(ValueError, match="head_dim=15 must be even"):
        pos.rope_frequencies(15)


def yarn_code_reference(head_dim, base, factor, original_max_len, beta_fast=32.0, beta_slow=1.0):
    """YaRN's released ramp (jquesnelle/yarn `find_correction_range` + `linear_ramp_mask`, transformers
    `_compute_yarn_parameters`), one frequency pair at a time."""
    dim_of = lambda turns: head_dim * math.log(original_max_len / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), head_dim - 1)
    out = []
    for i in range(head_dim // 2):
        theta = base ** (-2 * i / head_dim)
        w = min(max((i - low) / (high - low), 0.0), 1.0)  # 1 = interpolate (theta / s), 0 = extrapolate
        out.append(w * theta / factor + (1 - w) * theta)
    return np.array(out)


def yarn_paper_reference(head_dim, base, factor, original_max_len, alpha=1.0, beta=32.0):
    """YaRN paper Sec. 3.2: r = L / lambda_d, gamma(r) = 0 below alpha, 1 above beta, linear between;
    h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d."""
    out = []
    for i in range(head_dim // 2):
        theta = base ** (-2 * i / head_dim)
        r = original_max_len / (2 * math.pi / theta)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        out.append((1 - gamma) * theta / factor + gamma * theta)
    return np.array(out)


@pytest.mark.parametrize("head_dim, base, factor, original_max_len", [(64, 1e4, 4.0, 2048), (128, 1e6, 4.0, 32768)])
def test_yarn_ramps_equal_their_references(head_dim, base, factor, original_max_len):
    options = dict(base=base, scaling="yarn", factor=factor, original_max_len=original_max_len)
    code, code_mult = pos.rope_frequencies(head_dim, **options)
    paper, paper_mult = pos.rope_frequencies(head_dim, yarn_ramp="paper", **options)
    np.testing.assert_allclose(code, yarn_code_reference(head_dim, base, factor, original_max_len), rtol=1e-12)
    np.testing.assert_allclose(paper, yarn_paper_reference(head_dim, base, factor, original_max_len), rtol=1e-12)
    assert code_mult == paper_mult == pytest.approx(0.1 * math.log(factor) + 1.0)


def test_yarn_code_and_paper_ramps_differ_in_the_transition_pairs():
    code, _ = pos.rope_frequencies(64, scaling="yarn", factor=4.0, original_max_len=2048)
    paper, _ = pos.rope_frequencies(64, scaling="yarn", factor=4.0, original_max_len=2048, yarn_ramp="paper")
    ratio = code / paper
    differing = np.nonzero(np.abs(ratio - 1) > 1e-9)[0]
    np.testing.assert_array_equal(differing, np.arange(9, 21))
    assert ratio.max() == pytest.approx(1.8, abs=0.01)  # the code ramp keeps pair 15 nearer to extrapolation
    with pytest.raises(ValueError, match=r"rope_yarn_ramp='gamma' is not supported; expected one of 'code', 'paper'"):
        pos.rope_frequencies(64, scaling="yarn", factor=4.0, yarn_ramp="gamma")


def test_softmax_layer_rotates_with_the_chosen_yarn_ramp():
    """The layer's option reaches RoPE: the layer's logits equal q . k rotated with that ramp's frequencies."""
    x = jax.random.normal(jax.random.key(2), (1, 2, 8))
    positions = jnp.array([[0, 1500]])
    options = dict(num_heads=1, head_dim=64, rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=2048)
    for ramp in ("code", "paper"):
        layer = attn.build("softmax", rope_yarn_ramp=ramp, **options)
        params = layer.init(jax.random.key(0), x, positions=positions)
        _, state = layer.apply(params, x, positions=positions, mutable=["intermediates"])
        (weights,) = state["intermediates"]["attention_weights"]
        p = nn.meta.unbox(params)["params"]
        q = jnp.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
        k = jnp.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
        inv_freq, mult = pos.rope_frequencies(64, scaling="yarn", factor=4.0, original_max_len=2048, yarn_ramp=ramp)
        q, k = pos.apply_rope(q, positions, inv_freq, mult), pos.apply_rope(k, positions, inv_freq, mult)
        expected = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, axis=-1)
        np.testing.assert_allclose(weights, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"rope_yarn_ramp='gamma' must be one of"):
        attn.build("softmax", rope_yarn_ramp="gamma", **options).init(jax.random.key(0), x)


def test_alibi_slopes_and_bias():
    np.testing.assert_allclose(pos.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    s6 = pos.alibi_slopes(6)  # 4 geometric slopes then every other slope of the 8-head series
    np.testing.assert_allclose(s6, list(2.0 ** (-2.0 * np.arange(1, 5))) + [2.0**-1, 2.0**-3])
    bias = pos.alibi_bias(8, jnp.arange(5), jnp.arange(5))
    assert bias.shape == (1, 8, 5, 5)
    assert float(bias[0, 0, 4, 1]) == pytest.approx(-0.5 * 3)


def test_t5_buckets():
    rel = jnp.arange(-200, 201)
    bi = pos.t5_relative_buckets(rel, bidirectional=True, num_buckets=32, max_distance=128)
    uni = pos.t5_relative_buckets(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert int(bi.min()) >= 0 and int(bi.max()) <= 31 and int(uni.max()) <= 31
    # small distances get their own bucket, far ones saturate
    np.testing.assert_array_equal(uni[200 - 7 : 201][::-1], np.arange(8))
    assert int(uni[0]) == int(uni[200 - 130]) == 31
    assert np.all(np.diff(np.asarray(uni[:201])) <= 0)  # monotone in distance for keys before the query
    assert np.all(np.asarray(uni[201:]) == 0)  # unidirectional: future keys share bucket 0
    assert int(bi[200 + 1]) == 16 + 1 and int(bi[200 - 1]) == 1


def test_shaw_equals_explicit_loop():
    module = pos.ShawRelativeLogits(head_dim=4, max_distance=2)
    q = jax.random.normal(jax.random.key(1), (1, 5, 2, 4))
    p = jnp.arange(5)
    params = module.init(jax.random.key(2), q, p, p)
    got = module.apply(params, q, p, p)
    table = np.asarray(params["params"]["relative_keys"].unbox())
    want = np.zeros((1, 2, 5, 5))
    for h in range(2):
        for i in range(5):
            for j in range(5):
                want[0, h, i, j] = np.dot(np.asarray(q[0, i, h]), table[np.clip(j - i, -2, 2) + 2])
    np.testing.assert_allclose(got, want, atol=1e-5)
