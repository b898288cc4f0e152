"""`spatial_sparse` (Direct3D-S2 SSA): each branch equals its dense reference written with loops (block pooling,
block scores and top-k, window mask), all blocks selected = full attention, the layer is the gated sum; attention
dropout (off when deterministic, the selection unchanged by it); errors."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_reference import dense_attention, loop_window_mask, normal, random_params

import attn
from attn import functional as F
from attn.local.spatial_sparse import spatial_sparse_attention


def block_of(spatial, block):
    """int [N]: row-major index of the block (block tokens per axis) holding each row-major token."""
    coords = list(itertools.product(*[range(n) for n in spatial]))
    grid = [n // b for n, b in zip(spatial, block, strict=True)]
    return np.array(
        [np.ravel_multi_index(tuple(c // b for c, b in zip(co, block, strict=True)), grid) for co in coords]
    )


def loop_branches(q, k, v, spatial, comp, sel, topk, window, shift, key_pe):
    """The three SSA branches from loops over blocks and tokens (numpy/float64 where it is the reference)."""
    batch, tokens, heads = q.shape[0], math.prod(spatial), q.shape[-2]
    kv_heads, dim = k.shape[-2], q.shape[-1]
    group = heads // kv_heads
    qf, kf, vf = (np.asarray(t, np.float64).reshape(batch, tokens, -1, dim) for t in (q, k, v))
    comp_of, sel_of = block_of(spatial, comp), block_of(spatial, sel)
    num_comp, num_sel = comp_of.max() + 1, sel_of.max() + 1
    within = np.zeros(tokens, int)  # position of each token inside its compression block (row-major)
    coords = list(itertools.product(*[range(n) for n in spatial]))
    for t, co in enumerate(coords):
        within[t] = np.ravel_multi_index(tuple(c % b for c, b in zip(co, comp, strict=True)), comp)
    kc = np.zeros((batch, num_comp, kv_heads, dim))
    vc = np.zeros((batch, num_comp, kv_heads, dim))
    for t in range(tokens):
        kc[:, comp_of[t]] += (kf[:, t] + np.asarray(key_pe)[within[t]]) / math.prod(comp)
        vc[:, comp_of[t]] += vf[:, t] / math.prod(comp)
    o_cmp = F.softmax_attention(
        jnp.asarray(qf, jnp.float32), jnp.asarray(kc, jnp.float32), jnp.asarray(vc, jnp.float32)
    )

    # compressed probabilities, block scores per kv group, top-k, then the token mask of the selected blocks
    logits = np.einsum("bnhd,bchd->bhnc", qf, np.repeat(kc, group, axis=2)) / math.sqrt(dim)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    allowed = np.zeros((batch, heads, tokens, tokens), bool)
    for b, g, i in itertools.product(range(batch), range(kv_heads), range(tokens)):
        score = np.zeros(num_sel)
        for h in range(g * group, (g + 1) * group):
            for c in range(num_comp):
                sel_block = sel_of[np.nonzero(comp_of == c)[0][0]]
                score[sel_block] += probs[b, h, i, c]
        chosen = np.argsort(-score, kind="stable")[: min(topk, num_sel)]
        allowed[b, g * group : (g + 1) * group, i] = np.isin(sel_of, chosen)[None]
    o_slc = F.softmax_attention(*(t.reshape(batch, tokens, -1, dim) for t in (q, k, v)), mask=jnp.asarray(allowed))
    o_win = dense_attention(q, k, v, loop_window_mask(spatial, window, shift))
    shape = q.shape
    return o_cmp.reshape(shape), o_slc.reshape(shape), o_win


@pytest.mark.parametrize(
    "spatial, comp, sel, topk, window, shift",
    [((8, 8), 2, 4, 2, 4, 2), ((4, 4, 4), 2, 2, 3, (2, 4, 2), (1, 0, 0)), ((16,), 2, 4, 1, 5, 0)],
    ids=["2d", "3d", "1d_partial_windows"],
)
def test_branches_equal_their_loop_references(spatial, comp, sel, topk, window, shift):
    rank = len(spatial)
    comp, sel = (comp,) * rank, (sel,) * rank
    q, k, v = normal((2, *spatial, 4, 8), 0), normal((2, *spatial, 2, 8), 1), normal((2, *spatial, 2, 8), 2)
    pe = normal((math.prod(comp), 2, 8), 3, 0.5)
    run = jax.jit(
        lambda q, k, v, pe: spatial_sparse_attention(
            q, k, v, compression_block=comp, selection_block=sel, topk=topk, window_size=window, shift=shift, key_pe=pe
        )
    )
    o_cmp, o_slc, o_win, aux = run(q, k, v, pe)
    assert aux["selected"].shape == (2, 2, math.prod(spatial), topk)
    want = loop_branches(q, k, v, spatial, comp, sel, topk, window, shift, pe)
    for got, ref in zip((o_cmp, o_slc, o_win), want, strict=True):
        np.testing.assert_allclose(got, ref, atol=2e-5)


def test_all_blocks_selected_or_whole_window_is_full_attention():
    spatial = (4, 8)
    q, k, v = normal((1, *spatial, 4, 8), 4), normal((1, *spatial, 4, 8), 5), normal((1, *spatial, 4, 8), 6)
    _, o_slc, o_win, _ = jax.jit(
        lambda q, k, v: spatial_sparse_attention(
            q, k, v, compression_block=2, selection_block=2, topk=8, window_size=8, pool_weights=jnp.full((4,), 0.3)
        )
    )(q, k, v)
    full = dense_attention(q, k, v)
    np.testing.assert_allclose(o_slc, full, atol=2e-5)
    np.testing.assert_allclose(o_win, full, atol=2e-5)


def test_layer_is_the_gated_sum_of_the_branches_and_trains():
    spatial, features = (4, 4, 4), 16
    layer = attn.build(
        "spatial_sparse",
        num_heads=4,
        head_dim=4,
        num_kv_heads=2,
        compression_block=2,
        selection_block=2,
        topk=2,
        window_size=2,
        shift=1,
        pooling="learned",
    )
    x = normal((2, *spatial, features), 7)
    params = random_params(layer, x)
    p = nn.unbox(params)["params"]
    assert p["key_pe"].shape == (8, 2, 4) and p["gate"].shape == (features, 3)
    assert p["pool_weights"].shape == (8,)

    @jax.jit
    def reference(params, x):
        p = nn.unbox(params)["params"]
        proj = lambda name: jnp.einsum("...e,ehd->...hd", x, p[name]["kernel"])
        branches = spatial_sparse_attention(
            proj("query"),
            proj("key"),
            proj("value"),
            compression_block=2,
            selection_block=2,
            topk=2,
            window_size=2,
            shift=1,
            key_pe=p["key_pe"],
            pool_weights=p.get("pool_weights"),
        )[:3]
        gates = jax.nn.sigmoid(x @ p["gate"])
        mixed = sum(gates[..., i, None, None] * o for i, o in enumerate(branches))
        return jnp.einsum("...hd,hde->...e", mixed, p["out"]["kernel"])

    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), reference(params, x), atol=2e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    g = nn.unbox(grads)["params"]
    assert all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree.leaves(g))
    for name in ("key_pe", "pool_weights", "gate", "query", "out"):
        assert float(max(jnp.abs(t).max() for t in jax.tree.leaves(g[name]))) > 0, name


@pytest.mark.parametrize(
    "options, spatial, message",
    [
        (dict(compression_block=2, selection_block=3), (6, 6), r"selection_block=\(3, 3\) must be a multiple of "),
        (dict(compression_block=2, selection_block=4), (6, 8), r"spatial shape \(6, 8\) must be a multiple of "),
        (dict(compression_block=2, selection_block=2, topk=0), (4, 4), "topk=0 must be a positive int"),
        (dict(compression_block=2, selection_block=2, pooling="max"), (4, 4), "pooling='max' must be one of"),
        (dict(compression_block=2, selection_block=2, window_size=2, shift=2), (4, 4), r"shift=\(2, 2\) must satisfy"),
    ],
)
def test_bad_options_name_the_option(options, spatial, message):
    x = jnp.zeros((1, *spatial, 8))
    with pytest.raises(ValueError, match=message):
        layer = attn.build("spatial_sparse", num_heads=2, head_dim=4, **options)
        jax.eval_shape(lambda k, x: layer.init(k, x), jax.random.key(0), x)


def test_dropout_is_off_when_deterministic_and_leaves_the_selection_alone():
    options = dict(num_heads=2, head_dim=4, compression_block=2, selection_block=2, topk=2, window_size=2)
    x = normal((1, 4, 4, 8))
    plain = attn.build("spatial_sparse", **options)
    dropped = attn.build("spatial_sparse", dropout_rate=0.5, **options)
    params = random_params(plain, x)
    y = plain.apply(params, x)
    np.testing.assert_array_equal(dropped.apply(params, x, deterministic=True), y)
    noisy = dropped.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert bool(jnp.all(jnp.isfinite(noisy))) and float(jnp.max(jnp.abs(noisy - y))) > 1e-3

    q, k, v = normal((1, 4, 4, 2, 4), 1), normal((1, 4, 4, 1, 4), 2), normal((1, 4, 4, 1, 4), 3)
    branch = dict(compression_block=2, selection_block=2, topk=2, window_size=2)
    *clean, aux = spatial_sparse_attention(q, k, v, **branch)
    *noisy, noisy_aux = spatial_sparse_attention(q, k, v, **branch, dropout_rate=0.5, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(noisy_aux["selected"], aux["selected"])
    np.testing.assert_array_equal(noisy_aux["compressed_probs"], aux["compressed_probs"])
    for a, b in zip(clean, noisy, strict=True):
        assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # every branch drops weights
