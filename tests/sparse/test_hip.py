"""`hip`: the selection against a loop-by-loop numpy re-implementation of HiP's hierarchical pruning, the output
against dense softmax masked to the chosen blocks, the top_k >= num_blocks reduction to `softmax`, planted-block
recall, and the argument errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_sparse_attention
from attn.sparse.hip import hip_block_indices
from tests.sparse.sparse_reference import (
    blocks_to_token_mask,
    indices_to_sets,
    masked_softmax_attention,
    random_qk,
)

OPTION_NAMES = ("block_size", "top_k", "causal", "q_offset", "representative", "query_reduce")
# One compiled program per shape and options (much cheaper on CPU than the selection's ops run one by one).
select = jax.jit(hip_block_indices, static_argnames=OPTION_NAMES)

attend = jax.jit(block_sparse_attention, static_argnames=("block_size", "causal", "q_offset"))


def numpy_hip(q, k, block_size, top_k, causal, q_offset, representative, reduce):
    """HiP's selection by explicit loops: list [B][H][nq] of sorted block lists."""
    batch, q_len, heads, dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    kept = min(top_k, n_k)
    scale = dim**-0.5
    out = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            per_block = []
            for i in range(n_q):
                queries = [t for t in range(i * block_size, min(q_len, (i + 1) * block_size))]
                if reduce == "first":
                    queries = queries[:1]
                if causal:
                    visible = min(n_k, (q_offset + queries[-1]) // block_size + 1)
                else:
                    visible = n_k
                ranges = [(r * visible // kept, (r + 1) * visible // kept) for r in range(kept)]
                ranges = [(s, e) for s, e in ranges if s < e]
                longest = -(-n_k // kept)
                rounds = 0
                while (1 << rounds) < longest:
                    rounds += 1
                for _ in range(rounds):
                    children = []
                    for s, e in sorted(ranges):
                        middle = s + (e - s + 1) // 2
                        children += [(s, middle), (middle, e)]
                    scored = []
                    for s, e in children:
                        if s >= e:
                            continue
                        c = s + (e - s - 1) // 2 if representative == "center" else s
                        best = -np.inf
                        for t in queries:
                            for j in range(c * block_size, min(kv_len, (c + 1) * block_size)):
                                if causal and j > q_offset + t:
                                    continue
                                best = max(best, scale * float(np.dot(q[b, t, h], k[b, j, h // group])))
                        scored.append((-best, s, e))
                    ranges = [(s, e) for _, s, e in sorted(scored)[:kept]]
                assert all(e - s == 1 for s, e in ranges)
                per_block.append(sorted(s for s, _ in ranges))
            per_head.append(per_block)
        out.append(per_head)
    return out


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, head_dim, block_size, top_k, causal, q_offset, representative, reduce
    (2, 13, 13, 2, 2, 4, 2, 2, True, 0, "center", "first"),
    (1, 16, 16, 4, 2, 4, 2, 3, True, 0, "first", "max"),
    (2, 9, 21, 2, 1, 8, 3, 2, False, 0, "center", "max"),
    (1, 6, 20, 2, 2, 4, 2, 3, True, 14, "center", "first"),
    (1, 10, 10, 2, 2, 4, 4, 5, False, 0, "first", "first"),  # top_k > num_k_blocks: every block
]


@pytest.mark.parametrize("case", CASES)
def test_selection_and_output_match_numpy(case):
    batch, q_len, kv_len, heads, kv_heads, dim, bs, top_k, causal, offset, rep, reduce = case
    q, k, v = random_qk(sum(case[:8]), batch, q_len, kv_len, heads, kv_heads, dim)
    indices = select(
        q, k, block_size=bs, top_k=top_k, causal=causal, q_offset=offset, representative=rep, query_reduce=reduce
    )
    assert indices.dtype == jnp.int32 and indices.shape == (batch, heads, -(-q_len // bs), min(top_k, -(-kv_len // bs)))
    expected = numpy_hip(q, k, bs, top_k, causal, offset, rep, reduce)
    assert indices_to_sets(indices) == expected

    out = attend(q, k, v, block_indices=indices, block_size=bs, causal=causal, q_offset=offset)
    chosen = np.zeros((batch, heads, -(-q_len // bs), -(-kv_len // bs)), bool)
    for b in range(batch):
        for h in range(heads):
            for i, row in enumerate(expected[b][h]):
                chosen[b, h, i, row] = True
    allowed = blocks_to_token_mask(chosen, q_len, kv_len, bs, causal, offset)
    np.testing.assert_allclose(out, masked_softmax_attention(q, k, v, allowed, dim**-0.5), atol=2e-5, rtol=2e-5)


def test_gqa_selection_equals_mha_with_repeated_keys():
    q, k, _ = random_qk(3, 2, 12, 12, 4, 2, 4)
    gqa = select(q, k, block_size=2, top_k=2, causal=True)
    mha = select(q, np.repeat(k, 2, axis=2), block_size=2, top_k=2, causal=True)
    np.testing.assert_array_equal(gqa, mha)


def test_planted_key_block_is_found():
    """Attention locality (HiP's premise): with key scores falling off around one block, the hierarchical search
    finds that block for every query block, wherever it sits."""
    rng = np.random.default_rng(0)
    q = np.abs(rng.normal(size=(1, 32, 1, 8))).astype(np.float32) + 0.5
    for planted in (1, 6, 13):
        height = 3.0 - 0.4 * np.abs(np.arange(32) // 2 - planted)  # per key, by its block's distance to `planted`
        k = (height[None, :, None, None] + 0.01 * rng.normal(size=(1, 32, 1, 8))).astype(np.float32)
        indices = np.asarray(select(q, k, block_size=2, top_k=2, query_reduce="max"))
        assert all(planted in row for row in indices[0, 0]), (planted, indices[0, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_all_blocks_kept_equals_softmax_layer(causal):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 16)), jnp.float32)
    mask = attn.Mask(causal=True) if causal else None
    hip = attn.build("hip", num_heads=2, head_dim=4, num_kv_heads=1, block_size=2, top_k=5)
    params = jax.jit(lambda x: hip.init(jax.random.key(0), x, mask=mask))(x)
    softmax = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)
    y = jax.jit(lambda p, x: hip.apply(p, x, mask=mask))(params, x)
    np.testing.assert_allclose(y, jax.jit(lambda p, x: softmax.apply(p, x, mask=mask))(params, x), atol=2e-6, rtol=2e-5)


def test_captured_weights_vanish_outside_the_selected_blocks():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 12, 16)), jnp.float32)
    layer = attn.build("hip", num_heads=2, head_dim=4, block_size=2, top_k=2, position="none")
    params = {"params": nn.unbox(layer.init(jax.random.key(0), x)["params"])}
    y, state = layer.apply(params, x, mutable=["intermediates"])
    np.testing.assert_array_equal(y, layer.apply(params, x))  # capturing does not change the output
    (weights,) = state["intermediates"]["attention_weights"]
    q = jnp.einsum("bte,ehd->bthd", x, params["params"]["query"]["kernel"])
    k = jnp.einsum("bte,ehd->bthd", x, params["params"]["key"]["kernel"])
    chosen = indices_to_sets(select(q, k, block_size=2, top_k=2))
    for h in range(2):
        for i in range(12):
            outside = [j for j in range(12) if j // 2 not in chosen[0][h][i // 2]]
            assert np.all(np.asarray(weights)[0, h, i, outside] == 0.0)
    np.testing.assert_allclose(np.sum(weights, -1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 2.5}, "block_size=2.5"),
        ({"block_size": True}, "block_size=True"),
        ({"top_k": 0}, "top_k=0"),
        ({"representative": "middle"}, "representative='middle'"),
        ({"query_reduce": "mean"}, "query_reduce='mean'"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    q, k, _ = random_qk(0, 1, 8, 8, 2, 2, 4)
    with pytest.raises(ValueError, match=message):
        hip_block_indices(q, k, **{"block_size": 2, "top_k": 2, **kwargs})
    with pytest.raises(ValueError, match=message):
        attn.build("hip", num_heads=2, head_dim=4, **{"block_size": 2, "top_k": 2, **kwargs})


def test_decode_raises():
    x = jnp.ones((1, 4, 16))
    layer = attn.build("hip", num_heads=2, head_dim=4, block_size=2, top_k=2)
    with pytest.raises(ValueError, match="decode=True is not supported by hip"):
        layer.init(jax.random.key(0), x, mask=attn.Mask(causal=True), decode=True)
