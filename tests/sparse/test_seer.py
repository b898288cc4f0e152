"""`seer`: pooling, gate, selection and distillation target against loop-by-loop numpy, the output against dense
softmax masked to the kept blocks, the reductions to `softmax`, the self-distillation mode (dense output, the loss
reaching only the gate), the argument errors, and `block_mask_to_indices`'s static max_selected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_mask_to_indices, block_sparse_attention
from attn.sparse.seer import (
    seer_block_indices,
    seer_distillation_target,
    seer_gate_loss,
    seer_gate_probs,
    seer_pool,
    visible_blocks,
)
from tests.sparse.sparse_reference import blocks_to_token_mask, indices_to_sets, masked_softmax_attention, random_qk

POOL = {"avg": np.mean, "max": np.max, "min": np.min}


def numpy_pool(x, bs, poolings):
    batch, length, heads, dim = x.shape
    n = -(-length // bs)
    out = np.zeros((batch, n, heads, dim * len(poolings)))
    for r in range(n):
        tokens = x[:, r * bs : min((r + 1) * bs, length)]
        for i, name in enumerate(poolings):
            out[:, r, :, i * dim : (i + 1) * dim] = POOL[name](tokens, axis=1)
    return out


def numpy_seer(q, k, wq, bq, wk, bk, bs, causal, q_offset, top_k, threshold):
    """(gate probs [B, H, nq, nk], kept sets) by loops, from the gate's weights wq [H, Fq, F], wk [KVH, Fk, F]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, q_len, heads, _ = q.shape
    group = heads // k.shape[2]
    qp, kp = numpy_pool(q, bs, ("avg",)), numpy_pool(k, bs, ("max", "min", "avg"))
    n_q, n_k, width = qp.shape[1], kp.shape[1], wq.shape[-1]
    probs = np.zeros((batch, heads, n_q, n_k))
    kept = [[[[] for _ in range(n_q)] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for r in range(n_q):
                last = q_offset + min((r + 1) * bs, q_len) - 1
                visible = [c for c in range(n_k) if not causal or c * bs <= last]
                gq = qp[b, r, h] @ wq[h] + bq[h]
                logits = np.array([gq @ (kp[b, c, h // group] @ wk[h // group] + bk[h // group]) for c in visible])
                e = np.exp(logits / np.sqrt(width) - np.max(logits / np.sqrt(width)))
                probs[b, h, r, visible] = e / e.sum()
                if top_k is not None:
                    order = sorted(visible, key=lambda c: (-probs[b, h, r, c], c))
                    kept[b][h][r] = sorted(order[:top_k])
                else:
                    kept[b][h][r] = [c for c in visible if probs[b, h, r, c] > threshold]
    return probs, kept


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, dim, block_size, causal, q_offset, top_k, threshold
    (2, 12, 12, 2, 1, 4, 3, True, 0, 2, 0.0),
    (1, 11, 11, 4, 2, 4, 2, True, 0, None, 0.15),  # partial last block; threshold
    (1, 6, 14, 2, 2, 4, 2, True, 8, 3, 0.0),  # chunked prefill after 8 cached keys
    (1, 9, 7, 2, 1, 4, 3, False, 0, None, 0.3),  # cross-length, not causal
]


@pytest.mark.parametrize("case", CASES)
def test_gate_selection_and_output_match_numpy(case):
    batch, q_len, kv_len, heads, kv_heads, dim, bs, causal, offset, top_k, threshold = case
    q, k, v = random_qk(sum(case[:7]), batch, q_len, kv_len, heads, kv_heads, dim)
    rng = np.random.default_rng(7)
    width = 5
    wq, bq = rng.normal(size=(heads, dim, width)), rng.normal(size=(heads, width))
    wk, bk = rng.normal(size=(kv_heads, 3 * dim, width)), rng.normal(size=(kv_heads, width))

    def run(q, k, v):
        visible = visible_blocks(q_len, kv_len, bs, causal, offset)
        qg = jnp.einsum("brhd,hdf->brhf", seer_pool(q, bs, ("avg",)), wq) + bq
        kg = jnp.einsum("bchd,hdf->bchf", seer_pool(k, bs, ("max", "min", "avg")), wk) + bk
        probs = seer_gate_probs(qg, kg, visible)
        ids = seer_block_indices(probs, visible, top_k=top_k, threshold=threshold, max_selected=-(-kv_len // bs))
        out = block_sparse_attention(q, k, v, block_indices=ids, block_size=bs, causal=causal, q_offset=offset)
        return probs, ids, out

    with jax.enable_x64(True):
        probs, ids, out = jax.jit(run)(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
        np.testing.assert_allclose(seer_pool(jnp.asarray(k, jnp.float64), bs, ("min",)), numpy_pool(k, bs, ("min",)))
    expected_probs, expected_kept = numpy_seer(q, k, wq, bq, wk, bk, bs, causal, offset, top_k, threshold)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-9, atol=1e-12)
    assert indices_to_sets(ids) == expected_kept

    n_k = -(-kv_len // bs)
    mask = np.array([[[[c in row for c in range(n_k)] for row in head] for head in b] for b in expected_kept])
    allowed = blocks_to_token_mask(mask, q_len, kv_len, bs, causal, offset)
    np.testing.assert_allclose(out, masked_softmax_attention(q, k, v, allowed, dim**-0.5), atol=1e-10, rtol=1e-10)


def test_distillation_target_and_loss_match_numpy():
    q, k, _ = random_qk(3, 1, 7, 7, 2, 1, 4)
    bs, n = 2, 4
    target = np.asarray(jax.jit(lambda q, k: seer_distillation_target(q, k, block_size=bs, causal=True))(q, k))
    expected = np.zeros((1, 2, n, n))
    for h in range(2):
        logits = q[0, :, h].astype(np.float64) @ k[0, :, 0].T / 2.0
        for i in range(7):
            row = np.exp(logits[i, : i + 1] - logits[i, : i + 1].max())
            for j in range(i + 1):
                expected[0, h, i // bs, j // bs] = max(expected[0, h, i // bs, j // bs], row[j] / row.sum())
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-7)

    gate = np.random.default_rng(0).dirichlet(np.ones(n), size=(1, 2, n))
    loss = float(seer_gate_loss(jnp.asarray(gate, jnp.float32), jnp.asarray(expected, jnp.float32)))
    rows = [(h, r) for h in range(2) for r in range(n // 4, n)]
    kl = [
        sum(p * np.log(p / g) for p, g in zip(expected[0, h, r], gate[0, h, r], strict=True) if p > 0) for h, r in rows
    ]
    np.testing.assert_allclose(loss, np.mean(kl), rtol=1e-5)
    assert float(seer_gate_loss(jnp.asarray(expected), jnp.asarray(expected))) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
@pytest.mark.parametrize("options", [{"top_k": 6}, {"threshold": 0.0}])
def test_every_block_kept_equals_softmax(options):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    seer = attn.build("seer", num_heads=2, head_dim=4, num_kv_heads=1, block_size=2, gate_dim=4, **options)
    softmax_layer = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def both(x):
        params = seer.init(jax.random.key(0), x, mask=mask)["params"]
        base = {name: p for name, p in params.items() if not name.startswith("gate")}
        return seer.apply({"params": params}, x, mask=mask), softmax_layer.apply({"params": base}, x, mask=mask)

    y, expected = jax.jit(both)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.slow  # a jitted layer init + apply: 13-35 s measured on 2 cores shared with other jobs
def test_distill_mode_is_dense_and_its_loss_trains_only_the_gate():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 12, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    options = dict(num_heads=2, head_dim=4, block_size=3, gate_dim=4)
    seer, teacher = attn.build("seer", distill=True, top_k=1, **options), attn.build("seer", top_k=4, **options)

    def run(x):
        params = seer.init(jax.random.key(0), x, mask=mask)["params"]

        def loss(params):
            _, sown = seer.apply({"params": params}, x, mask=mask, mutable=["losses"])
            return sown["losses"]["seer_gate"][0]

        value, grads = jax.value_and_grad(loss)(params)
        return seer.apply({"params": params}, x, mask=mask), teacher.apply({"params": params}, x, mask=mask), grads

    y, dense, grads = jax.jit(run)(x)
    np.testing.assert_allclose(y, dense, atol=2e-6, rtol=2e-5)  # top_k=1 would differ: the output is the teacher's
    for name in ("query", "key", "value", "out"):
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[name]))
    assert float(jnp.max(jnp.abs(grads["gate_query"]["kernel"].value))) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 0}, "top_k=0"),
        ({"threshold": 1.0}, "threshold=1.0"),
        ({"threshold": -0.1}, "threshold=-0.1"),
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 2.5}, "block_size=2.5"),
        ({"gate_dim": 0}, "gate_dim=0"),
        ({"k_pooling": ("max", "mean")}, "k_pooling="),
        ({"q_pooling": ()}, "q_pooling=()"),
    ],
)
def test_bad_options_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attn.build("seer", num_heads=2, head_dim=4, **{"block_size": 2, **kwargs})


def test_bad_selection_arguments_raise():
    probs, visible = jnp.full((1, 1, 2, 2), 0.5), jnp.ones((2, 2), bool)
    with pytest.raises(ValueError, match="top_k=0"):
        seer_block_indices(probs, visible, top_k=0)
    with pytest.raises(ValueError, match="threshold=1.5"):
        seer_block_indices(probs, visible, threshold=1.5)
    q, k, _ = random_qk(0, 1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match="block_size=0"):
        seer_distillation_target(q, k, block_size=0, causal=True)


def test_block_mask_to_indices_static_max_selected():
    mask = np.array([[[[True, False, True, False], [False, False, False, False], [True, True, True, False]]]])
    traced = jax.jit(lambda m: block_mask_to_indices(m, 2))(mask)
    np.testing.assert_array_equal(traced, [[[[0, 2], [-1, -1], [0, 1]]]])  # a traced row over 2 keeps its first 2
    np.testing.assert_array_equal(block_mask_to_indices(mask, 5)[0, 0, 0], [0, 2, -1, -1, -1])
    with pytest.raises(ValueError, match="max_selected=2 is below the block mask's largest row count 3"):
        block_mask_to_indices(mask, 2)
    with pytest.raises(ValueError, match="max_selected=0 must be None or a positive int"):
        block_mask_to_indices(mask, 0)
    with pytest.raises(ValueError, match="max_selected is a traced value"):
        jax.jit(lambda m, s: block_mask_to_indices(m, s))(mask, 2)
