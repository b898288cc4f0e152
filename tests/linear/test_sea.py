"""`sea`: k = T is softmax attention, the estimate and its top-k, sparse softmax on the selection, decode,
causality, the distillation loss, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.linear.sea import compression, sea_attention, sea_distillation_loss

# rbg keys: XLA compiles a jitted init ~5x faster than with threefry keys.
KEY = jax.random.key(1, impl="rbg")
CAUSAL = attn.Mask(causal=True)


def qkv(batch=2, length=11, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, dim), (batch, length, kv_heads, dim), (batch, length, kv_heads, dim)]
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def test_top_k_of_the_whole_length_is_softmax_attention():
    options = dict(num_heads=4, head_dim=8, num_kv_heads=2)
    sea = attn.build("sea", top_k=11, compressed_length=4, **options)
    softmax = attn.build("softmax", position="rope", **options)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 11, 16)), jnp.float32)
    params = jax.jit(sea.init)(KEY, x)
    shared = {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_allclose(
        jax.jit(sea.apply)(params, x, mask=CAUSAL), jax.jit(softmax.apply)(shared, x, mask=CAUSAL), atol=2e-5
    )


@pytest.mark.parametrize("causal", [True, False])
def test_estimate_selection_and_sparse_softmax_by_hand(causal):
    """elu+1 estimator, one key per bin (compressed_length >= T): Ahat is the normalised linear-attention matrix,
    the selection its per-row top-k, the output exact softmax restricted to the selected (visible) keys."""
    q, k, v = qkv()
    top_k = 4
    run = lambda q, k, v: sea_attention(  # noqa: E731
        q, k, v, top_k=top_k, compressed_length=11, causal=causal, feature_map="elu_plus_one", return_aux=True
    )
    out, aux = jax.jit(run)(q, k, v)
    kh, vh = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    visible = jnp.tril(jnp.ones((11, 11), bool)) if causal else jnp.ones((11, 11), bool)
    scores = jnp.where(visible, jnp.einsum("bthd,bshd->bhts", jax.nn.elu(q) + 1, jax.nn.elu(kh) + 1), 0.0)
    estimate = scores / scores.sum(-1, keepdims=True)
    np.testing.assert_allclose(jnp.moveaxis(aux["estimate"], 2, 1), estimate, atol=1e-5)
    chosen = np.sort(np.asarray(aux["keys"]), axis=-1)
    np.testing.assert_array_equal(chosen, np.sort(np.argsort(-np.asarray(estimate), axis=-1)[..., :top_k], axis=-1))
    selected = (
        jnp.zeros((2, 4, 11, 11), bool)
        .at[
            jnp.arange(2)[:, None, None, None],
            jnp.arange(4)[None, :, None, None],
            jnp.arange(11)[None, None, :, None],
            aux["keys"],
        ]
        .set(True)
    )
    logits = jnp.where(selected & visible, jnp.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(8), -jnp.inf)
    np.testing.assert_allclose(out, jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), vh), atol=1e-5)


def test_bins_compress_the_keys():
    """w = ceil(S / compressed_length) keys per bin, M = ceil(S / w) bins, ceil(top_k / w) bins per row."""
    assert compression(11, 4, 4) == (3, 4, 2)
    assert compression(11, 128, 4) == (1, 11, 4)
    assert compression(1000, 128, 64) == (8, 125, 8)
    q, k, v = qkv()
    _, aux = jax.jit(
        lambda q, k, v: sea_attention(q, k, v, top_k=4, compressed_length=4, causal=True, return_aux=True)
    )(q, k, v)
    keys = np.asarray(aux["keys"])  # decompressed selection: whole bins of 3 consecutive keys
    assert aux["estimate"].shape == (2, 11, 4, 4) and keys.shape == (2, 4, 11, 6)
    np.testing.assert_array_equal(keys.reshape(2, 4, 11, 2, 3) % 3, np.broadcast_to(np.arange(3), (2, 4, 11, 2, 3)))


def test_decode_equals_full_forward_and_is_causal():
    layer = attn.build("sea", num_heads=4, head_dim=8, num_kv_heads=2, top_k=4, compressed_length=6)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 11, 16)), jnp.float32)
    params = {"params": jax.jit(layer.init)(KEY, x, mask=CAUSAL)["params"]}
    forward = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL))
    step = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL, decode=True, mutable=["cache"]))
    shapes = jax.eval_shape(lambda x: layer.init(KEY, x, mask=CAUSAL, decode=True)["cache"], x)
    cache, outs, start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), [], 0
    for size in (5, 1, 5):
        y, mutated = step({**params, "cache": cache}, x[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    full = forward(params, x)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
    after = forward(params, x.at[:, 7:].set(0.5))
    np.testing.assert_allclose(after[:, :7], full[:, :7], atol=1e-6)
    assert float(jnp.abs(after[:, 7:] - full[:, 7:]).max()) > 1e-4


def test_distillation_trains_only_the_estimator():
    """The loss is KL(binned teacher || estimate): 0 for a perfect estimate; its gradient reaches the estimator
    maps only, and the task gradient never reaches them (the top-k is not differentiable)."""
    teacher = jax.nn.softmax(jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 5, 6))), -1)
    bins = jnp.arange(6) // 2
    binned = jnp.moveaxis(teacher.reshape(1, 2, 5, 3, 2).sum(-1), 1, 2)
    assert float(sea_distillation_loss(binned, teacher, bins, 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(sea_distillation_loss(jnp.full_like(binned, 1 / 3), teacher, bins, 3)) > 1e-3

    layer = attn.build("sea", num_heads=4, head_dim=8, top_k=3, compressed_length=6, distill=True)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 11, 16)), jnp.float32)
    params = jax.jit(layer.init)(KEY, x, mask=CAUSAL)["params"]

    def losses(p):
        y, state = layer.apply({"params": p}, x, mask=CAUSAL, mutable=["losses"])
        return jnp.sum(y**2), state["losses"]["sea_distillation"][0]

    task_grads, distill_grads = jax.jit(jax.jacrev(losses))(params)
    norm = lambda tree: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(nn.unbox(tree))))  # noqa: E731
    assert norm(distill_grads["query_estimator"]) > 0 and norm(distill_grads["key_estimator"]) > 0
    assert norm({n: distill_grads[n] for n in ("query", "key", "value", "out")}) == 0
    assert norm(task_grads["query_estimator"]) == 0 and norm(task_grads["query"]) > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves((task_grads, distill_grads)))


def test_errors_name_the_problem():
    x = jnp.zeros((1, 5, 16))
    build = lambda **o: attn.build("sea", num_heads=4, head_dim=8, **o)  # noqa: E731
    with pytest.raises(ValueError, match="top_k=0 must be a positive int"):
        build(top_k=0).init(KEY, x)
    with pytest.raises(ValueError, match="feature_map='softmax' must be one of"):
        build(feature_map="softmax").init(KEY, x)
    with pytest.raises(ValueError, match="sea cannot honour the mask part\\(s\\) window"):
        build().init(KEY, x, mask=attn.Mask(window=2))
    with pytest.raises(ValueError, match="decode=True needs a causal mask"):
        build().init(KEY, x, decode=True)
    q, k, v = qkv(length=5)
    with pytest.raises(ValueError, match="compressed_length=0 must be a positive int"):
        sea_attention(q, k, v, top_k=2, compressed_length=0)
    spec = attn.get("sea")
    assert spec.supports_causal and spec.supports_decode and spec.catalog == 183
