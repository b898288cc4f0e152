"""`focus_detr`: a numpy reference of the whole layer (score MLP, top-k foreground, object self-attention, foreground
queries over all tokens, zeros elsewhere), the keep_ratio = 1 reduction to softmax, the kept-token count, gradients
into every learnable part, and bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn

B, T, E, H, D = 2, 8, 16, 2, 4
X = jax.random.normal(jax.random.key(0), (B, T, E))


def init(**options):
    layer = attn.build("focus_detr", num_heads=H, head_dim=D, scorer_hidden=8, **options)
    return layer, nn.unbox(layer.init(jax.random.key(1), X)["params"])


def gelu(x):  # flax's nn.gelu (tanh approximation)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def ref_scores(p, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    normed = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
    h = gelu(dense(p["in"], normed))
    half = h.shape[-1] // 2
    h = np.concatenate([h[:, :half], np.repeat(h[:, half:].mean(0, keepdims=True), len(h), 0)], -1)
    h = gelu(dense(p["hidden_1"], gelu(dense(p["hidden_0"], h))))
    return dense(p["score"], h)[:, 0]


def heads(p, x):
    return np.einsum("te,ehd->thd", x, np.asarray(p["kernel"], np.float64))


def ref_attention(q, k, v):
    """q [Tq, H, D], k/v [Tk, H, D] -> [Tq, H, D] by explicit loops over queries and heads."""
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            logits = np.array([q[i, h] @ k[j, h] / math.sqrt(q.shape[-1]) for j in range(k.shape[0])])
            w = np.exp(logits - logits.max())
            out[i, h] = (w / w.sum()) @ v[:, h]
    return out


def top(values, count):
    return list(np.argsort(-values, kind="stable")[:count])


def reference(p, x, keep_ratio, object_tokens):
    """The layer on one example x [T, E] from the equations of the module docstring."""
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    score = ref_scores(p["scorer"], x)
    fore = top(score, max(1, math.ceil(keep_ratio * len(x))))
    tokens = x[fore].copy()
    if object_tokens:
        rank = sig(dense(p["classes"], tokens)).max(-1) * sig(score[fore])
        chosen = top(rank, object_tokens)
        objects = tokens[chosen]
        y = ref_attention(*(heads(p[f"object_{n}"], objects) for n in ("query", "key", "value")))
        tokens[chosen] = objects + np.einsum("thd,hde->te", y, np.asarray(p["object_out"]["kernel"], np.float64))
    y = ref_attention(heads(p["query"], tokens), heads(p["key"], x), heads(p["value"], x))
    full = np.zeros((len(x), H, D))
    full[fore] = y
    return np.einsum("thd,hde->te", full, np.asarray(p["out"]["kernel"], np.float64))


@pytest.mark.parametrize("keep_ratio,object_tokens", [(0.5, 2), (0.3, 3)])
def test_matches_the_numpy_reference(keep_ratio, object_tokens):
    layer, params = init(keep_ratio=keep_ratio, object_tokens=object_tokens)
    got = np.asarray(jax.jit(layer.apply)({"params": params}, X))
    x = np.asarray(X, np.float64)
    want = np.stack([reference(params, x[b], keep_ratio, object_tokens) for b in range(B)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_keep_ratio_one_is_plain_softmax_self_attention():
    layer, params = init(keep_ratio=1.0)
    plain = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    want = plain.apply({"params": {n: params[n] for n in ("query", "key", "value", "out")}}, X)
    np.testing.assert_allclose(layer.apply({"params": params}, X), want, atol=1e-6)


def test_only_the_kept_tokens_change_and_scores_are_sown():
    layer, params = init(keep_ratio=0.4, object_tokens=1)  # ceil(0.4 * 8) = 4 tokens
    y, state = layer.apply({"params": params}, X, mutable=["intermediates"])
    changed = np.abs(np.asarray(y)).sum(-1) > 0
    np.testing.assert_array_equal(changed.sum(-1), [4, 4])
    scores = np.asarray(state["intermediates"]["foreground_scores"][0])
    for b in range(B):  # the changed tokens are the four highest scores
        assert set(np.flatnonzero(changed[b])) == set(np.argsort(-scores[b])[:4])


def test_gradients_reach_every_learnable_part():
    layer, params = init(keep_ratio=0.5, object_tokens=2)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X) ** 2)))(params)
    for name, tree in grads.items():
        for leaf in jax.tree_util.tree_leaves(tree):
            assert np.isfinite(leaf).all() and np.abs(leaf).sum() > 0, name


@pytest.mark.parametrize(
    "options,call,match",
    [
        ({"keep_ratio": 0.25, "object_tokens": 3}, {}, "object_tokens=3 exceeds the 2 foreground"),
        ({"keep_ratio": 0.0}, {}, "keep_ratio"),
        ({"keep_ratio": 1.5}, {}, "keep_ratio"),
        ({"position": "rope"}, {}, "position"),
        ({}, {"mask": attn.Mask(causal=True)}, "takes no mask"),
        ({}, {"context": X}, "encoder self-attention"),
    ],
)
def test_bad_input(options, call, match):
    with pytest.raises(ValueError, match=match):
        attn.build("focus_detr", num_heads=H, head_dim=D, **options).init(jax.random.key(0), X, **call)
