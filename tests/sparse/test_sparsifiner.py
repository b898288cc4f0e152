"""`sparsifiner`: the predictor's approximate attention and the kept keys against loop-by-loop numpy, the output
against dense softmax masked to them, the reduction to `softmax` (keep_rate 1), the reconstruction loss reaching only
the predictor, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.core.block_sparse import block_sparse_attention
from attn.sparse.sparsifiner import reconstruction_loss, sparsifiner_approx_attention, sparsifiner_indices
from tests.sparse.sparse_reference import blocks_to_token_mask, indices_to_sets, masked_softmax_attention, random_qk


def numpy_predictor(q_low, k_low, down, basis, coef_k, scale, budget, causal, cls_token):
    batch, length, heads, _ = q_low.shape
    group = heads // k_low.shape[2]
    approx = np.zeros((batch, heads, length, length))
    kept = [[[] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            k_down = down.T @ k_low[b, :, h // group]  # [n, c]
            for i in range(length):
                logits = scale * k_down @ q_low[b, i, h]
                coef = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                top = sorted(range(len(coef)), key=lambda m: (-coef[m], m))[:coef_k]
                sparse = np.zeros_like(coef)
                sparse[top] = coef[top]
                approx[b, h, i] = sparse @ basis
                visible = [j for j in range(length) if not causal or j <= i]
                order = sorted(visible, key=lambda j: (-approx[b, h, i, j], j))
                kept[b][h].append(sorted(order if cls_token and i == 0 else order[:budget]))
    return approx, kept


@pytest.mark.parametrize("causal, cls_token", [(False, True), (True, False)])
def test_predictor_selection_and_output_match_numpy(causal, cls_token):
    batch, length, heads, kv_heads, dim, low, rows, budget = 2, 9, 2, 1, 4, 2, 3, 3
    q, k, v = random_qk(int(causal) + 2 * int(cls_token), batch, length, length, heads, kv_heads, dim)
    rng = np.random.default_rng(5)
    q_low, k_low = rng.normal(size=(batch, length, heads, low)), rng.normal(size=(batch, length, kv_heads, low))
    down = rng.normal(size=(length, rows))
    basis = np.abs(rng.normal(size=(rows, length)))
    basis[basis < 0.5] = 0.0  # a sparse basis: ties at zero, broken by the lower key id

    def run(q_low, k_low, q, k, v):
        approx = sparsifiner_approx_attention(q_low, k_low, down, basis, basis_top_k=2, scale=0.7)
        ids = sparsifiner_indices(approx, budget=budget, causal=causal, cls_token=cls_token)
        return approx, ids, block_sparse_attention(q, k, v, block_indices=ids, block_size=1, causal=causal)

    with jax.enable_x64(True):
        approx, ids, out = jax.jit(run)(*(jnp.asarray(x, np.float64) for x in (q_low, k_low, q, k, v)))
    expected, kept = numpy_predictor(q_low, k_low, down, basis, 2, 0.7, budget, causal, cls_token)
    np.testing.assert_allclose(approx, expected, rtol=1e-10, atol=1e-12)
    assert indices_to_sets(ids) == kept
    mask = np.array([[[[j in row for j in range(length)] for row in head] for head in b] for b in kept])
    allowed = blocks_to_token_mask(mask, length, length, 1, causal)
    np.testing.assert_allclose(out, masked_softmax_attention(q, k, v, allowed, dim**-0.5), atol=1e-10, rtol=1e-10)


def test_reconstruction_loss_matches_numpy():
    q, k, _ = random_qk(3, 1, 5, 5, 2, 1, 4)
    approx = np.random.default_rng(0).uniform(size=(1, 2, 5, 5))
    loss = float(reconstruction_loss(jnp.asarray(approx), q, k, scale=0.5, causal=True))
    total = 0.0
    for h in range(2):
        logits = 0.5 * q[0, :, h].astype(np.float64) @ k[0, :, 0].T
        for i in range(5):
            row = np.exp(logits[i, : i + 1] - logits[i, : i + 1].max())
            target = np.zeros(5)
            target[: i + 1] = row / row.sum()
            total += np.sum((approx[0, h, i] - target) ** 2)
    np.testing.assert_allclose(loss, total / 10, rtol=1e-5)


@pytest.mark.slow  # jitted layer init + apply and a gradient: ~15 s on 2 cores shared with other jobs
def test_keep_everything_equals_softmax_and_the_loss_trains_only_the_predictor():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 16)), jnp.float32)
    mask = attn.Mask(causal=True)
    options = dict(num_heads=2, head_dim=4, num_kv_heads=1, reduce_n_factor=2)
    layer = attn.build("sparsifiner", keep_rate=1.0, distill=True, **options)
    base = attn.build("softmax", num_heads=2, head_dim=4, num_kv_heads=1)

    def run(x):
        params = layer.init(jax.random.key(0), x, mask=mask)["params"]
        plain = {name: p for name, p in params.items() if not name.startswith("predictor")}

        def loss(params):
            _, sown = layer.apply({"params": params}, x, mask=mask, mutable=["losses"])
            return sown["losses"]["sparsifiner_reconstruction"][0]

        grads = jax.grad(loss)(params)
        return layer.apply({"params": params}, x, mask=mask), base.apply({"params": plain}, x, mask=mask), grads

    y, expected, grads = jax.jit(run)(x)
    np.testing.assert_allclose(y, expected, atol=2e-6, rtol=2e-5)
    for name in ("query", "key", "value", "out"):
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[name]))
    assert float(jnp.max(jnp.abs(grads["predictor_basis"].value))) > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="keep_rate=0.0"):
        attn.build("sparsifiner", num_heads=2, head_dim=4, keep_rate=0.0)
    with pytest.raises(ValueError, match="basis_top_k=0"):
        attn.build("sparsifiner", num_heads=2, head_dim=4, basis_top_k=0)
    with pytest.raises(ValueError, match="budget=0"):
        sparsifiner_indices(jnp.zeros((1, 1, 3, 3)), budget=0)
    with pytest.raises(ValueError, match="block_size=2"):
        attn.build("sparsifiner", num_heads=2, head_dim=4, block_size=2)
