"""sdim: SimHash sampling target attention, against an independent numpy reference of the hashing and aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.sdim import simhash_rotations, simhash_signatures


def _signature(u, rotations, i):
    """Explicit loop over the bits of hash i: sum_b [u . R[:, i, b] > 0] 2^b."""
    return sum((1 << b) for b in range(rotations.shape[2]) if float(u @ rotations[:, i, b]) > 0)


def _reference(x, context, kernel_out, rotations, weighting, visible=None):
    """Numpy SDIM from the equations: per head, counts of colliding hashes, weights, sum of values, output map."""
    heads, head_dim, _ = kernel_out.shape
    num_hashes = rotations.shape[1]
    batch, tq, _ = x.shape
    length = context.shape[1]
    out = np.zeros((batch, tq, heads, head_dim))
    for b in range(batch):
        for h in range(heads):
            q = x[b, :, h * head_dim : (h + 1) * head_dim]
            kv = context[b, :, h * head_dim : (h + 1) * head_dim]
            for t in range(tq):
                counts = np.zeros(length)
                for j in range(length):
                    if visible is not None and not visible[b, j]:
                        continue
                    counts[j] = sum(
                        _signature(q[t], rotations, i) == _signature(kv[j], rotations, i) for i in range(num_hashes)
                    )
                if weighting == "l2":
                    norm = np.sqrt((counts**2).sum())
                    weights = counts / norm if norm > 0 else counts
                else:
                    weights = counts / num_hashes
                out[b, t, h] = weights @ kv
    return np.einsum("bthd,hde->bte", out, kernel_out)


def _layer(**options):
    options = {"num_heads": 2, "head_dim": 4, "num_hashes": 5, "hash_bits": 2, **options}
    return attn.build("sdim", **options)


def _inputs(seed=0, batch=2, tq=3, length=7, width=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, tq, width)), rng.standard_normal((batch, length, width))


def test_signatures_match_the_bitwise_loop():
    rotations = np.asarray(simhash_rotations(3, 4, 6, 3))
    u = np.random.default_rng(1).standard_normal((5, 4))
    got = np.asarray(simhash_signatures(jnp.asarray(u), jnp.asarray(rotations)))
    assert got.shape == (5, 6) and got.max() < 8
    expected = [[_signature(u[r], rotations, i) for i in range(6)] for r in range(5)]
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("weighting", ["l2", "hashes"])
def test_layer_equals_the_numpy_reference(weighting):
    layer = _layer(weighting=weighting, seed=4)
    x, context = _inputs()
    params = layer.init(jax.random.key(0), jnp.asarray(x), context=jnp.asarray(context))
    got = layer.apply(params, jnp.asarray(x), context=jnp.asarray(context))
    kernel = np.asarray(params["params"]["out"]["kernel"].value)
    rotations = np.asarray(simhash_rotations(4, 4, 5, 2))
    np.testing.assert_allclose(np.asarray(got), _reference(x, context, kernel, rotations, weighting), atol=1e-5)


def test_padded_behaviours_get_no_weight():
    layer = _layer()
    x, context = _inputs(seed=2)
    lengths = np.array([4, 7])
    mask = attn.Mask(kv_lengths=jnp.asarray(lengths))
    params = layer.init(jax.random.key(0), jnp.asarray(x), context=jnp.asarray(context), mask=mask)
    got = layer.apply(params, jnp.asarray(x), context=jnp.asarray(context), mask=mask)
    kernel = np.asarray(params["params"]["out"]["kernel"].value)
    visible = np.arange(7)[None, :] < lengths[:, None]
    expected = _reference(x, context, kernel, np.asarray(simhash_rotations(0, 4, 5, 2)), "l2", visible)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_zero_bits_gather_every_behaviour_and_identical_items_always_collide():
    x, context = _inputs(seed=3, length=9)
    layer = _layer(hash_bits=0)
    params = layer.init(jax.random.key(0), jnp.asarray(x), context=jnp.asarray(context))
    _, state = layer.apply(params, jnp.asarray(x), context=jnp.asarray(context), mutable=["intermediates"])
    weights = np.asarray(state["intermediates"]["attention_weights"][0])
    np.testing.assert_allclose(weights, np.full((2, 2, 3, 9), 1 / 3), atol=1e-6)  # 5 / ||(5,) * 9|| = 1 / 3
    same = np.concatenate([x[:, :1], context[:, 1:]], axis=1)  # behaviour 0 is target 0
    layer = _layer(weighting="hashes", hash_bits=6)
    params = layer.init(jax.random.key(0), jnp.asarray(x), context=jnp.asarray(same))
    _, state = layer.apply(params, jnp.asarray(x), context=jnp.asarray(same), mutable=["intermediates"])
    assert np.all(np.asarray(state["intermediates"]["attention_weights"][0])[:, :, 0, 0] == 1.0)


def test_bad_input_names_the_argument():
    x, context = _inputs()
    layer = _layer()
    with pytest.raises(ValueError, match="context has width 6"):
        layer.init(jax.random.key(0), jnp.asarray(x), context=jnp.asarray(context[..., :6]))
    with pytest.raises(ValueError, match="weighting"):
        _layer(weighting="softmax")
    with pytest.raises(ValueError, match="hash_bits"):
        _layer(hash_bits=-1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        _layer(num_kv_heads=1)
