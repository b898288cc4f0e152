"""`s2_attention` (S2-Attention): the head patterns match the paper's rule written with loops, together cover every
causal pair, the layer equals dense attention under them, vert_stride=1 is causal softmax, decode, errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import random_params

import attn
from attn import functional as F
from attn.local.s2_attention import s2_mask

B, E = 2, 16


def loop_pattern(length, heads, kv_heads, block, local, stride, offset=0):
    """bool [H, T, T]: DKernel's local-stride rule, one (head, query, key) at a time."""
    mask = np.zeros((heads, length, length), bool)
    for h, i, j in itertools.product(range(heads), range(length), range(length)):
        g = h // (heads // kv_heads)
        bq, bk = i // block, j // block
        mask[h, i, j] = j <= i and (bq - bk < local or (bk + g + offset) % stride == 0)
    return mask


def init(x, mask, **options):
    """The layer and random parameters shaped by tracing init (no compilation)."""
    layer = attn.build("s2_attention", **options)
    return layer, random_params(layer, x)


def apply(layer, params, x, mask):
    return jax.jit(lambda p, x: layer.apply(p, x, mask=mask))(params, x)


@pytest.mark.parametrize(
    "length, heads, kv_heads, block, local, stride, offset",
    [(37, 4, 4, 4, 2, 4, 0), (40, 8, 4, 4, 1, 4, 1), (30, 6, 3, 3, 2, 3, 2), (24, 2, 2, 5, 1, 2, 0)],
)
def test_head_patterns_follow_the_rule_and_cover_the_causal_mask(length, heads, kv_heads, block, local, stride, offset):
    expected = loop_pattern(length, heads, kv_heads, block, local, stride, offset)
    mask = s2_mask(
        length,
        num_heads=heads,
        num_kv_heads=kv_heads,
        block_size=block,
        local_blocks=local,
        vert_stride=stride,
        stride_offset=offset,
    )
    assert mask.causal and mask.block_size == (block, block) and mask.block_mask.shape[:2] == (1, heads)
    np.testing.assert_array_equal(np.asarray(mask.materialize(length, length))[0], expected)
    # the paper's claim: the union of the heads' shards is the full causal context ...
    np.testing.assert_array_equal(expected.any(axis=0), np.tril(np.ones((length, length), bool)))
    # ... while each head alone is sparse: outside its local window it keeps at most ceil(blocks / stride) key
    # blocks (its KV footprint is ~1/stride of the context plus the local window)
    blocks = -(-length // block)
    q_block, k_block = np.arange(length)[:, None] // block, np.arange(length)[None, :] // block
    far = q_block - k_block >= local
    for h in range(heads):
        kept = np.unique(np.nonzero(expected[h] & far)[1] // block)
        assert len(kept) <= -(-blocks // stride), (h, kept)
    # query heads sharing a kv head share its pattern (the KV cache of a kv head serves its whole group)
    group = heads // kv_heads
    np.testing.assert_array_equal(expected[::group].repeat(group, axis=0), expected)


def test_layer_equals_dense_attention_under_the_loop_mask():
    length, heads, kv_heads = 22, 8, 4
    x = jax.random.normal(jax.random.key(0), (B, length, E))
    options = dict(num_heads=heads, head_dim=4, num_kv_heads=kv_heads, position="none", block_size=4)
    options.update(local_blocks=1, vert_stride=4, stride_offset=1)
    layer, params = init(x, None, **options)
    # the layer is causal by construction; the mask adds padding (row 1 has 15 valid keys)
    mask = attn.Mask(kv_lengths=jnp.array([length, 15]))
    allowed = (
        loop_pattern(length, heads, kv_heads, 4, 1, 4, 1)[None]
        & (np.arange(length) < np.array([[22], [15]]))[:, None, None, :]
    )

    @jax.jit
    def reference(params, x):
        p = nn.unbox(params)["params"]
        proj = lambda name: jnp.einsum("bte,ehd->bthd", x, p[name]["kernel"])
        heads_out = F.softmax_attention(proj("query"), proj("key"), proj("value"), mask=jnp.asarray(allowed))
        return jnp.einsum("bthd,hde->bte", heads_out, p["out"]["kernel"])

    np.testing.assert_allclose(apply(layer, params, x, mask), reference(params, x), atol=2e-5)


def test_vert_stride_one_is_causal_softmax():
    x = jax.random.normal(jax.random.key(2), (B, 19, E))
    mask = attn.Mask(causal=True)
    layer, params = init(x, mask, num_heads=2, head_dim=8, block_size=4, local_blocks=1, vert_stride=1)
    softmax = attn.build("softmax", num_heads=2, head_dim=8)
    np.testing.assert_allclose(apply(layer, params, x, mask), apply(softmax, params, x, mask), atol=1e-6)


def test_causal_decode_and_gradients():
    length = 20
    x = jax.random.normal(jax.random.key(3), (B, length, E))
    mask = attn.Mask(causal=True)
    layer, params = init(x, mask, num_heads=4, head_dim=4, num_kv_heads=2, block_size=3, local_blocks=1, vert_stride=2)
    full = apply(layer, params, x, mask)
    # causality: changing the future changes no earlier output
    x2 = x.at[:, 12:].set(jax.random.normal(jax.random.key(4), (B, length - 12, E)))
    np.testing.assert_allclose(apply(layer, params, x2, mask)[:, :12], full[:, :12], atol=1e-6)
    # decode: prefill then single tokens through the KV cache reproduce the full forward
    shapes = jax.eval_shape(lambda k, x: layer.init(k, x, mask=mask, decode=True), jax.random.key(0), x)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = jax.jit(lambda v, chunk: layer.apply(v, chunk, mask=mask, decode=True, mutable=["cache"]))
    outs, start = [], 0
    for size in (length - 3, 1, 1, 1):
        y, mutated = step({**params, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
    # jit + finite, non-zero gradients
    loss = lambda p: jnp.sum(layer.apply(p, x, mask=mask) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) and any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(vert_stride=4, num_kv_heads=2),
            r"vert_stride=4 needs at least 4 distinct head patterns .* num_kv_heads=2",
        ),
        (dict(block_size=0), "block_size=0 must be a positive int"),
        (dict(local_blocks=0), "local_blocks=0 must be a positive int"),
        (dict(vert_stride=2, stride_offset=2), r"stride_offset=2 must be an int in \[0, vert_stride=2\)"),
    ],
)
def test_bad_options_name_the_option(options, message):
    x = jnp.zeros((1, 8, E))
    with pytest.raises(ValueError, match=message):
        layer = attn.build("s2_attention", **{"num_heads": 4, "head_dim": 4, **options})
        jax.eval_shape(lambda k, x: layer.init(k, x), jax.random.key(0), x)


def test_context_and_foreign_block_masks_are_rejected():
    layer = attn.build("s2_attention", num_heads=4, head_dim=4, vert_stride=2)
    x = jnp.zeros((1, 8, E))
    with pytest.raises(ValueError, match="cross-attention is not supported"):
        jax.eval_shape(lambda k, x: layer.init(k, x, context=x), jax.random.key(0), x)
    foreign = attn.Mask(block_mask=jnp.ones((2, 2), bool), block_size=(4, 4))
    with pytest.raises(ValueError, match="builds its own per-head block_mask"):
        jax.eval_shape(lambda k, x: layer.init(k, x, mask=foreign), jax.random.key(0), x)
