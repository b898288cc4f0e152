"""Attention-Gate (`attention_gate`): the forward and decoding equal a numpy replay of the gate's decisions (causal
MHA' over the chunk, a flag per token and kv head, flagged keys seen only by their own query, the cache keeping the
latest `budget` kept tokens) on float64 q/k/v; a gate that keeps everything is causal softmax attention; the eviction
loss and its straight-through gradient; the cache is allocated at the budget; bad options are named; a few training
steps from configs/kv_attention_gate.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.kv import attention_gate
from tests.kv.decoding import decode_cache_bytes, decode_pieces
from tests.kv.score_reference import np_rope, projections

B, T, E, H, D, KVH = 2, 10, 16, 4, 8, 2
BUDGET, GATE_HEADS, GATE_DIM = 5, 2, 4
CAUSAL = attn.Mask(causal=True)


def build(**options):
    defaults = {"budget": BUDGET, "gate_heads": GATE_HEADS, "gate_dim": GATE_DIM, "num_kv_heads": KVH}
    return attn.build("attention_gate", num_heads=H, head_dim=D, **{**defaults, **options})


def inputs(seed=0, length=T):
    return 3.0 * jax.random.normal(jax.random.key(seed), (B, length, E))


@functools.cache
def base_params():
    """The parameters of build() (the same for every budget, target rate and length): one init per test run."""
    return nn.meta.unbox(jax.jit(lambda x: build().init(jax.random.key(1), x, mask=CAUSAL))(inputs()))


def init(gate_bias=0.0):
    """build()'s params with the gate's output bias set to `gate_bias` (0: about half the tokens flagged)."""
    params = {"params": dict(base_params()["params"])}
    params["params"]["gate_out_bias"] = jnp.full_like(params["params"]["gate_out_bias"], gate_bias)
    return params


def numpy_gate_logits(params, x):
    """float64 [B, T, KVH]: the gate's logits for x [B, T, E], from its equations (causal MHA', then linear)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)
    batch, length = x.shape[:2]
    gq, gk, gv = (np.einsum("bte,ehd->bthd", x, p[name]["kernel"]) for name in ("gate_query", "gate_key", "gate_value"))
    mixed = np.zeros((batch, length, GATE_HEADS, GATE_DIM))
    for b in range(batch):
        for h in range(GATE_HEADS):
            for i in range(length):
                logits = np.array([gq[b, i, h] @ gk[b, j, h] / np.sqrt(GATE_DIM) for j in range(i + 1)])
                w = np.exp(logits - logits.max())
                mixed[b, i, h] = (w / w.sum()) @ gv[b, : i + 1, h]
    return np.einsum("bthd,hdg->btg", mixed, p["gate_out_kernel"]) + p["gate_out_bias"]


def reference(params, x, pieces, budget):
    """(y [B, T, E], per (b, g) the cached positions, the number of flagged tokens, of tokens the budget pushed out):
    the gate flags every token from the tokens up to it; query t sees the cache, the chunk's kept tokens before t, and
    t itself; the cache then keeps the latest `budget` of its entries and the chunk's kept tokens."""
    q, k, v, out_kernel = projections(params, x)
    group = H // KVH
    out = np.zeros(q.shape)
    cache = [[[] for _ in range(KVH)] for _ in range(B)]
    flagged = pushed = 0
    keep = numpy_gate_logits(params, x) > 0  # [B, T, KVH]
    start = 0
    for size in pieces:
        chunk = list(range(start, start + size))
        for b in range(B):
            for g in range(KVH):
                for h in range(g * group, (g + 1) * group):
                    for t in chunk:
                        seen = cache[b][g] + [j for j in chunk if j == t or (j < t and keep[b, j, g])]
                        keys = np.stack([np_rope(k[b, j, g], j) for j in seen])
                        logits = keys @ np_rope(q[b, t, h], t) / np.sqrt(D)
                        w = np.exp(logits - logits.max())
                        out[b, t, h] = (w / w.sum()) @ v[b, seen, g]
                kept = cache[b][g] + [j for j in chunk if keep[b, j, g]]
                flagged += size - int(keep[b, chunk, g].sum())
                pushed += max(len(kept) - budget, 0)
                cache[b][g] = kept[-budget:]
        start += size
    return np.einsum("bthd,hde->bte", out, out_kernel), cache, flagged, pushed


def test_forward_and_decode_equal_the_gate_replay():
    layer = build()
    x = inputs()
    params = init()
    forward = jax.jit(lambda p, x: layer.apply(p, x, mask=CAUSAL))(params, x)
    expected, _, flagged, _ = reference(params, x, (T,), BUDGET)
    assert 0 < flagged < B * KVH * T  # the gate evicts some tokens and keeps others
    np.testing.assert_allclose(forward, expected, atol=5e-5, rtol=1e-4)

    pieces = (6, 1, 1, 1, 1)  # a prompt, then token by token (one compile per chunk size)
    y, cache = decode_pieces(layer, params, x, pieces)
    expected, kept, flagged, pushed = reference(params, x, pieces, BUDGET)
    assert flagged > 0 and pushed > 0  # both the gate's flags and the budget evicted
    np.testing.assert_allclose(y, expected, atol=5e-5, rtol=1e-4)
    for b in range(B):
        for g in range(KVH):
            count = len(kept[b][g])
            assert int(cache["cache_lengths"][b, g]) == count
            np.testing.assert_array_equal(cache["cache_positions"][b, g, :count], kept[b][g])
            np.testing.assert_allclose(cache["cached_key"][b, :count, g], np.asarray(projections(params, x)[1])[
                b, kept[b][g], g], atol=1e-5)  # fmt: skip


def test_gate_that_keeps_everything_is_softmax():
    x = inputs(seed=3, length=8)
    layer = build(budget=8)
    params = init(gate_bias=1e4)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=KVH)
    base = {"params": {n: w for n, w in params["params"].items() if not n.startswith("gate")}}
    both = jax.jit(lambda p, base, x: (layer.apply(p, x, mask=CAUSAL), softmax.apply(base, x, mask=CAUSAL)))
    forward, expected = both(params, base, x)
    np.testing.assert_allclose(forward, expected, atol=2e-5)
    y, cache = decode_pieces(layer, params, x, (4, 4))
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_array_equal(cache["cache_positions"], np.broadcast_to(range(8), (B, KVH, 8)))


def test_eviction_loss_and_straight_through_gradient():
    logits = jnp.array([[[2.0, -1.0], [0.5, -3.0]]])  # [1, 2, 2]
    s = 1.0 / (1.0 + np.exp(-np.array([2.0, -1.0, 0.5, -3.0])))
    expected = (np.mean(1.0 - s) - 0.25) ** 2
    np.testing.assert_allclose(attention_gate.eviction_loss(logits, 0.25), expected, rtol=1e-6)
    flags = attention_gate.straight_through(logits)
    np.testing.assert_array_equal(flags, [[[1.0, 0.0], [1.0, 0.0]]])
    grad = jax.grad(lambda z: jnp.sum(attention_gate.straight_through(z) * jnp.arange(4.0).reshape(1, 2, 2)))(logits)
    np.testing.assert_allclose(grad.ravel(), np.arange(4.0) * s * (1 - s), rtol=1e-6)


def test_forward_sows_the_eviction_loss_and_the_gate_gets_a_gradient():
    layer = build(target_rate=0.3)
    x = inputs(seed=4, length=6)
    params = init()

    def loss(p):
        y, state = layer.apply(p, x, mask=CAUSAL, mutable=["losses"])
        return jnp.sum(y**2), state["losses"]["attention_gate"][0]

    (_, sown), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    soft = 1.0 / (1.0 + np.exp(-numpy_gate_logits(params, x)))
    np.testing.assert_allclose(sown, (np.mean(1.0 - soft) - 0.3) ** 2, rtol=1e-4)
    assert float(jnp.abs(grads["params"]["gate_query"]["kernel"]).max()) > 0  # through the straight-through flags


def test_cache_is_allocated_at_the_budget():
    x = inputs(length=20)
    small, large = build(), build(budget=3 * BUDGET)
    params = jax.eval_shape(init)

    def cache_bytes(layer, length):
        return decode_cache_bytes(layer, params, x[:, :length])

    gate_per_token = B * GATE_HEADS * GATE_DIM * 2 * 4  # the gate's own keys and values (float32), a dense cache
    assert cache_bytes(small, 20) - cache_bytes(small, 8) == 12 * gate_per_token
    per_slot = B * KVH * (2 * D * 4 + 4)  # keys, values (float32) and the original position
    assert cache_bytes(large, 20) - cache_bytes(small, 20) == 2 * BUDGET * per_slot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "budget=0 must be a positive int"),
        ({"gate_heads": 0}, "gate_heads=0 must be a positive int"),
        ({"gate_dim": -2}, "gate_dim=-2 must be a positive int"),
        ({"target_rate": 1.5}, "target_rate=1.5 must be"),
        ({"window": 3}, "window=3 must be None"),
        ({"cache_bits": 3}, "cache_bits=3 must be None or one of"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options).init(jax.random.key(0), inputs())


@pytest.mark.slow  # a few jitted train steps of a tiny model
def test_config_trains_the_gate_with_the_eviction_loss():
    from configs import kv_attention_gate
    from tests.train.test_techniques import _train

    config = kv_attention_gate.get_config("smoke")
    params, metrics = _train(config, steps=3)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert all(float(m["aux_loss"]) > 0 for m in metrics)  # the sown eviction losses join the objective
    paths = jax.tree_util.tree_leaves_with_path(params[0])
    gates = [i for i, (path, _) in enumerate(paths) if "gate_query" in jax.tree_util.keystr(path)]
    assert len(gates) == config.model.num_layers
    first, last = jax.tree.leaves(params[0]), jax.tree.leaves(params[-1])
    assert all(np.abs(first[i] - last[i]).max() > 0 for i in gates)  # every layer's gate trained
