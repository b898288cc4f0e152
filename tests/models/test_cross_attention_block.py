"""TransformerBlock's cross-attention sublayer: a numpy reference of the whole block, padded context keys, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.models.block import TransformerBlock

B, T, TC, E, H, D, M = 2, 5, 6, 16, 4, 4, 32


def block(**fields) -> TransformerBlock:
    config = dict(
        mechanism="softmax",
        num_heads=H,
        head_dim=D,
        mlp_dim=M,
        mlp="gelu",
        attention_options={"position": "none"},
        cross_attention="softmax",
        cross_attention_options={"position": "none"},
    )
    return TransformerBlock(**{**config, **fields})


def inputs(seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, T, E))
    context = jax.random.normal(jax.random.key(seed + 1), (B, TC, E))
    return x, context


def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def attention(p, x, source, key_valid):
    """Multi-head softmax attention from x [B, T, E] to source [B, S, E] with key_valid bool [B, S]."""
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bse,ehd->bshd", source, p["key"]["kernel"])
    v = np.einsum("bse,ehd->bshd", source, p["value"]["kernel"])
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    logits = np.where(key_valid[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    y = np.einsum("bhts,bshd->bthd", weights, v)
    return np.einsum("bthd,hde->bte", y, p["out"]["kernel"])


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_block(p, x, context, lengths):
    """x + self(norm x); x + cross(norm x, context); x + mlp(norm x), from the equations, in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x, context = np.asarray(x, np.float64), np.asarray(context, np.float64)
    h = rms_norm(x, p["attention_norm"]["scale"])
    x = x + attention(p["attention"], h, h, np.ones((B, T), bool))
    valid = np.arange(TC)[None, :] < np.asarray(lengths)[:, None]
    x = x + attention(p["cross_attention"], rms_norm(x, p["cross_attention_norm"]["scale"]), context, valid)
    h = rms_norm(x, p["mlp_norm"]["scale"])
    ff = p["feed_forward"]
    return x + gelu(h @ ff["wi"]["kernel"]) @ ff["wo"]["kernel"]


def test_block_with_cross_attention_matches_the_equations():
    model = block()
    x, context = inputs()
    lengths = jnp.array([TC, 3])
    mask = attn.Mask(kv_lengths=lengths)
    variables = model.init(jax.random.key(0), x, context=context, context_mask=mask)
    params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    # Non-trivial norm scales, so a swapped norm would show.
    rng = np.random.default_rng(0)
    for name in ("attention_norm", "cross_attention_norm", "mlp_norm"):
        params[name]["scale"] = rng.uniform(0.5, 1.5, E).astype(np.float32)
    out = model.apply({"params": params}, x, context=context, context_mask=mask)
    np.testing.assert_allclose(out, reference_block(params, x, context, lengths), rtol=2e-5, atol=2e-5)


def test_padded_context_tokens_change_nothing_and_valid_ones_do():
    model = block()
    x, context = inputs(1)
    mask = attn.Mask(kv_lengths=jnp.array([TC, 3]))
    variables = model.init(jax.random.key(0), x, context=context, context_mask=mask)
    apply = jax.jit(lambda c: model.apply(variables, x, context=c, context_mask=mask))
    out = apply(context)
    padded_changed = context.at[1, 3:].set(100.0)
    np.testing.assert_array_equal(apply(padded_changed), out)
    valid_changed = context.at[1, 2].add(1.0)
    assert np.abs(apply(valid_changed)[1] - out[1]).max() > 1e-3
    np.testing.assert_array_equal(apply(valid_changed)[0], out[0])  # rows do not mix


def test_cross_attention_sublayer_paths():
    x, context = inputs()
    params = block().init(jax.random.key(0), x, context=context)["params"]
    assert {"attention", "cross_attention", "cross_attention_norm"} <= set(params)
    assert "cross_attention" not in block(cross_attention=None).init(jax.random.key(0), x)["params"]


def test_mechanism_that_cannot_take_a_context_is_rejected_by_name():
    x, context = inputs()
    # cca is causal self-attention over its own sequence: it refuses a context when called.
    with pytest.raises(ValueError, match="cross_attention='cca' cannot attend to a context of shape"):
        block(cross_attention="cca", cross_attention_options={}).init(jax.random.key(0), x, context=context)
    # A channel mechanism is refused by its registry input kind before anything runs.
    with pytest.raises(ValueError, match="cross_attention='eca' has input kind 'channels'"):
        block(cross_attention="eca", cross_attention_options={}).init(jax.random.key(0), x, context=context)


def test_context_and_cross_attention_must_come_together():
    x, context = inputs()
    with pytest.raises(ValueError, match="no cross_attention sublayer"):
        block(cross_attention=None).init(jax.random.key(0), x, context=context)
    with pytest.raises(ValueError, match=r"cross_attention='softmax' needs context \[batch, context_length, embed\]"):
        block().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cross_attention_options for 'softmax' set \\['num_heads'\\]"):
        block(cross_attention_options={"num_heads": 2}).init(jax.random.key(0), x, context=context)
