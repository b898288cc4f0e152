"""`ripo` (relative index / pitch / onset attention): reduction to softmax, the factorised relative terms against
the paper's explicit FMS form, transposition invariance, causality and decode with cached attributes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_checks import apply, assert_causal, assert_finite_grads, init, trace_init

import attn
from attn import functional as F
from attn.softmax.relative_music import relative_logits_gathered
from attn.softmax.ripo import fme_frequencies, fms, relative_attribute_logits

B, T, E, H, D = 2, 8, 16, 4, 4
MASK = attn.Mask(causal=True)
X = jax.random.normal(jax.random.key(0), (B, T, E))
PITCH = jnp.array([[60, 62, -1, 67, 65, 64, 62, 60], [48, 55, 52, -1, -1, 57, 59, 60]], jnp.float32)
ONSET = jnp.cumsum(jnp.array([[0, 1, 0.5, 0.5, 1, 2, 1, 1], [0, 0.25, 0.25, 0.5, 1, 1, 0.5, 2]]), axis=1)
POSITIONS = jnp.stack([jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32), (B, T)), PITCH, ONSET], axis=-1)


def explicit_attribute(q, a, w, kernel, bias, unknown=None):
    """The paper's form: the [B, T, T, F] relative embeddings FMS(a_i - a_j), projected, dotted with q_i."""
    emb = fms(a[:, :, None] - a[:, None, :], w)  # [B, Tq, Tk, F]
    if unknown is not None:
        pair = (a[:, :, None] < 0) | (a[:, None, :] < 0)
        emb = jnp.where(pair[..., None], unknown, emb)
    rel = jnp.einsum("bijf,fhd->bijhd", emb, kernel) + bias
    return jnp.einsum("bihd,bijhd->bhij", q, rel)


def test_factorised_terms_equal_the_explicit_relative_embeddings():
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (B, T, H, D))
    w = fme_frequencies(16, 9919.0) * jax.random.uniform(keys[1], (16,), minval=0.5, maxval=1.5)
    kernel, bias = jax.random.normal(keys[2], (16, H, D)), jax.random.normal(keys[3], (H, D))
    unknown = jnp.linspace(-1, 1, 16)
    factorised = jax.jit(relative_attribute_logits)
    np.testing.assert_allclose(
        factorised(q, PITCH, PITCH, w, kernel, bias, unknown),
        explicit_attribute(q, PITCH, w, kernel, bias, unknown),
        atol=2e-4,
    )
    np.testing.assert_allclose(
        factorised(q, ONSET, ONSET, w, kernel, bias), explicit_attribute(q, ONSET, w, kernel, bias), atol=2e-4
    )


def test_no_terms_is_softmax_and_layer_equals_the_formula():
    layer, params = init("ripo", X, MASK, num_heads=H, head_dim=D, relative_terms=(), num_kv_heads=2)
    softmax = attn.build("softmax", num_heads=H, head_dim=D, num_kv_heads=2, position="none")
    shared = {"params": {n: params["params"][n] for n in ("query", "key", "value", "out")}}
    np.testing.assert_array_equal(
        apply(layer, params, X, mask=MASK, positions=POSITIONS), apply(softmax, shared, X, mask=MASK)
    )

    layer, params = init("ripo", X, MASK, num_heads=H, head_dim=D, fme_dim=8, max_distance=5)
    p = nn.unbox(params)["params"]
    proj = lambda name: jnp.einsum("bte,ehd->bthd", X, p[name]["kernel"])
    q = proj("query")
    index = jnp.arange(T)
    s = relative_logits_gathered(q, p["relative_embeddings"], index, index)
    for name, a, unknown in (("pitch", PITCH, p["pitch_unknown"]), ("onset", ONSET, None)):
        s += explicit_attribute(
            q, a, p[f"{name}_frequencies"], p[f"{name}_projection"], p[f"{name}_projection_bias"], unknown
        )
    heads = F.softmax_attention(q, proj("key"), proj("value"), causal=True, bias=s / np.sqrt(D))
    want = jnp.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    np.testing.assert_allclose(apply(layer, params, X, mask=MASK, positions=POSITIONS), want, atol=2e-4)


def test_transposition_and_time_shift_invariance_and_index_only_positions():
    layer, params = init("ripo", X, MASK, num_heads=H, head_dim=D, fme_dim=8, max_distance=6)
    run = jax.jit(lambda positions: layer.apply(params, X, mask=MASK, positions=positions))
    shifted = POSITIONS + jnp.array([7.0, 0.0, 3.5]) + jnp.where(PITCH >= 0, 5.0, 0.0)[..., None] * jnp.array([0, 1, 0])
    np.testing.assert_allclose(run(shifted), run(POSITIONS), atol=1e-4)
    # no pitch / onset: those terms are constant along each row and cancel; None takes the skew path
    index_only = POSITIONS.at[..., 1:].set(0.0)
    np.testing.assert_allclose(run(index_only), apply(layer, params, X, mask=MASK), atol=1e-5)


def test_causal_decode_with_attributes_and_gradients():
    options = dict(num_heads=H, head_dim=D, num_kv_heads=2, fme_dim=8, max_distance=6, position="rope")
    layer, params = init("ripo", X, MASK, **options)
    assert_causal(layer, params, X, cut=5)
    full = apply(layer, params, X, mask=MASK, positions=POSITIONS)
    shapes = trace_init(layer, X, mask=MASK, positions=POSITIONS, decode=True)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = jax.jit(
        lambda v, chunk, pos: layer.apply(v, chunk, mask=MASK, positions=pos, decode=True, mutable=["cache"])
    )
    outs, start = [], 0
    for size in (T - 3, 1, 1, 1):
        y, mutated = step({**params, "cache": cache}, X[:, start : start + size], POSITIONS[:, start : start + size])
        outs.append(y)
        cache, start = mutated["cache"], start + size
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=5e-5)
    assert_finite_grads(layer, params, X, positions=POSITIONS)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(relative_terms=("time",)), r"relative_terms=\('time',\) must be a tuple of distinct entries of"),
        (dict(fme_dim=5), "fme_dim=5 must be a positive even int"),
        (dict(pitch_base=0.0), "pitch_base=0.0 must be a number > 0"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        layer = attn.build("ripo", num_heads=H, head_dim=D, **options)
        trace_init(layer, X)


def test_bad_positions_shape():
    layer = attn.build("ripo", num_heads=H, head_dim=D)
    with pytest.raises(ValueError, match=r"expected \[batch, 8, 3\] \(index, pitch, onset\)"):
        trace_init(layer, X, positions=POSITIONS[..., :2])
