"""`concept_centric` (Concept-Centric Transformers): slot competition by explicit loops, a numpy reference of the
workspace (slot attention with a GRU) and the concept cross-attention, context padding, the concept explanation
capture, gradients into the workspace, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.concept_centric import slot_assignment, slot_updates

B, T, N, E, EC, H, D, S, ITERS = 2, 3, 5, 8, 6, 2, 4, 3, 2
X = jax.random.normal(jax.random.key(0), (B, T, E))
CONTEXT = jax.random.normal(jax.random.key(1), (B, N, EC))
PADDING = attn.Mask(kv_lengths=jnp.array([5, 3]))


def test_slots_compete_for_each_token_and_padded_tokens_add_nothing():
    keys = np.asarray(jax.random.normal(jax.random.key(2), (B, N, EC)))
    queries = np.asarray(jax.random.normal(jax.random.key(3), (B, S, EC)))
    values = np.asarray(jax.random.normal(jax.random.key(4), (B, N, EC)))
    valid = np.arange(N)[None, :] < np.array([5, 3])[:, None]
    a = np.asarray(slot_assignment(keys, queries, valid))
    u = np.asarray(slot_updates(a, values, 1e-8, valid))
    for b in range(B):
        for n in range(N):
            logits = [keys[b, n] @ queries[b, s] for s in range(S)]
            want = np.exp(logits - np.max(logits)) / np.exp(logits - np.max(logits)).sum() if valid[b, n] else 0.0
            np.testing.assert_allclose(a[b, n], want, atol=1e-6)
        for s in range(S):
            weights = [a[b, n, s] + 1e-8 if valid[b, n] else 0.0 for n in range(N)]
            want = sum(w * values[b, n] for n, w in enumerate(weights)) / sum(weights)
            np.testing.assert_allclose(u[b, s], want, atol=1e-5)


def init(**options):
    layer = attn.build("concept_centric", num_heads=H, head_dim=D, num_concepts=S, slot_iterations=ITERS, **options)
    return layer, nn.unbox(layer.init(jax.random.key(5), X, context=CONTEXT))


def layer_norm(x, p):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def reference(params, lengths):
    """The layer by explicit loops in float64: LN, slot rounds (softmax over slots, weighted mean, GRU), concepts,
    multi-head cross-attention of x over the concepts, output projection."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x, c = np.asarray(X, np.float64), np.asarray(CONTEXT, np.float64)
    out = np.zeros((B, T, E))
    for b in range(B):
        valid = range(lengths[b])
        normed = layer_norm(c[b], p["context_norm"])
        keys = normed @ p["slot_key"]["kernel"] / np.sqrt(EC)
        values = normed @ p["slot_value"]["kernel"]
        slots = p["slot_init"].copy()
        for _ in range(ITERS):
            queries = layer_norm(slots, p["slot_norm"]) @ p["slot_query"]["kernel"]
            assign = np.zeros((N, S))
            for n in valid:
                logits = queries @ keys[n]
                assign[n] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            updates = np.zeros((S, EC))
            for s in range(S):
                weights = np.array([assign[n, s] + 1e-8 for n in valid])
                updates[s] = weights @ values[: lengths[b]] / weights.sum()
            gx = updates @ p["slot_gru_input"]["kernel"] + p["slot_gru_input"]["bias"]
            gh = slots @ p["slot_gru_hidden"]["kernel"] + p["slot_gru_hidden"]["bias"]
            r = sigmoid(gx[:, :EC] + gh[:, :EC])
            z = sigmoid(gx[:, EC : 2 * EC] + gh[:, EC : 2 * EC])
            cand = np.tanh(gx[:, 2 * EC :] + r * gh[:, 2 * EC :])
            slots = (1 - z) * cand + z * slots
        concepts = slots + p["concept_position"]
        for h in range(H):
            k = concepts @ p["key"]["kernel"][:, h]
            v = concepts @ p["value"]["kernel"][:, h]
            for i in range(T):
                logits = k @ (x[b, i] @ p["query"]["kernel"][:, h]) / np.sqrt(D)
                w = np.exp(logits - logits.max())
                out[b, i] += ((w / w.sum()) @ v) @ p["out"]["kernel"][h]
    return out


def test_layer_matches_the_reference_with_context_padding():
    layer, params = init()
    params = {"params": {**params["params"], "concept_position": 0.5 * jax.random.normal(jax.random.key(6), (S, EC))}}
    run = jax.jit(lambda p, c: layer.apply(p, X, context=c, mask=PADDING))
    y = run(params, CONTEXT)
    np.testing.assert_allclose(y, reference(params, [5, 3]), atol=2e-5, rtol=1e-5)
    changed = CONTEXT.at[1, 3:].set(jax.random.normal(jax.random.key(7), (2, EC)))  # padded tokens of row 1
    np.testing.assert_array_equal(run(params, changed), y)


def test_the_concept_explanation_is_captured():
    layer, params = init()
    y, state = layer.apply(params, X, context=CONTEXT, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    (assignment,) = state["intermediates"]["concept_assignment"]
    assert weights.shape == (B, H, T, S) and assignment.shape == (B, N, S)
    np.testing.assert_allclose(weights.mean(axis=1).sum(-1), 1.0, atol=1e-6)  # explanation: a distribution over S
    np.testing.assert_allclose(assignment.sum(-1), 1.0, atol=1e-6)  # every token is shared out among the slots
    np.testing.assert_array_equal(y, layer.apply(params, X, context=CONTEXT))


def test_gradients_reach_the_workspace():
    layer, params = init()
    loss = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, X, context=CONTEXT) ** 2)))
    grads = loss(params)["params"]
    for name in ("slot_init", "slot_key", "slot_query", "slot_gru_input", "slot_gru_hidden", "context_norm"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[name])) > 0, name


def test_bad_input_names_the_argument():
    layer, params = init()
    with pytest.raises(ValueError, match="needs context"):
        layer.apply(params, X)
    with pytest.raises(ValueError, match="context has width 4"):
        layer.apply(params, X, context=CONTEXT[..., :4])
    with pytest.raises(ValueError, match="accepts only context padding"):
        layer.apply(params, X, context=CONTEXT, mask=attn.Mask(causal=True))
    with pytest.raises(ValueError, match="does not decode"):
        layer.apply(params, X, context=CONTEXT, decode=True)
    with pytest.raises(ValueError, match="num_concepts=0 must be a positive int"):
        attn.build("concept_centric", num_heads=H, head_dim=D, num_concepts=0)
