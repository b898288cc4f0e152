"""ULSAM: 3C + g parameters, per-subspace spatial softmax maps summing to one, F + A * F by hand."""

import jax
import numpy as np
import pytest

import attn


def max_pool_3x3(z):
    """3x3 max pool, stride 1, -inf padding, over axes 1 and 2 of z [B, H, W, C]."""
    padded = np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h, w = z.shape[1:3]
    return np.max([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)


@pytest.mark.parametrize("groups", [1, 4])
def test_matches_the_paper_equations(groups, quick_params, count, features, jitted):
    x = features((2, 5, 6, 16))
    module = attn.build("ulsam", num_subspaces=groups)
    p = quick_params(module, x)
    assert count(p) == 3 * 16 + groups
    m = 16 // groups
    dw = x * p["dw_kernel"].reshape(16) + p["dw_bias"].reshape(16)
    pooled = max_pool_3x3(dw).reshape(2, 5, 6, groups, m)
    logits = np.einsum("bhwgm,gm->bhwg", pooled, p["pw_kernel"]) + p["pw_bias"]
    maps = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    expected = x + x * np.repeat(maps, m, axis=-1)

    out, state = jitted(module)({"params": p}, x, mutable=("intermediates",))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    attention = np.asarray(state["intermediates"]["attention_map"][0])
    assert attention.shape == (2, 5, 6, groups)
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_bad_number_of_subspaces_names_the_option():
    with pytest.raises(ValueError, match="num_subspaces=3 must divide the number of channels"):
        jax.eval_shape(attn.build("ulsam", num_subspaces=3).init, jax.random.key(0), np.zeros((1, 4, 4, 16)))
    with pytest.raises(ValueError, match="num_subspaces=0"):
        jax.eval_shape(attn.build("ulsam", num_subspaces=0).init, jax.random.key(0), np.zeros((1, 4, 4, 16)))
