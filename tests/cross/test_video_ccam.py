"""`video_ccam`: the causal cross-attention mask by construction, the one-frame reduction, time causality, a numpy
reference of the layer, and bad input."""

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.video_ccam import causal_cross_mask

B, TQ, E, H, D = 2, 5, 8, 2, 4
FRAMES, PER_FRAME = 3, 2
X = jax.random.normal(jax.random.key(0), (B, TQ, E))
CONTEXT = jax.random.normal(jax.random.key(1), (B, FRAMES * PER_FRAME, E))


def loop_mask(query_length, num_frames, per_frame):
    """Query i covers [i/Tq, (i+1)/Tq) of the clip and sees the frames that start (at f/F) before its end."""
    mask = np.zeros((query_length, num_frames * per_frame), bool)
    for i in range(query_length):
        for j in range(num_frames * per_frame):
            mask[i, j] = Fraction(j // per_frame, num_frames) < Fraction(i + 1, query_length)
    return mask


@pytest.mark.parametrize("query_length, num_frames, per_frame", [(5, 3, 2), (6, 3, 1), (2, 4, 3), (7, 7, 2), (4, 1, 3)])
def test_mask_matches_the_explicit_loop(query_length, num_frames, per_frame):
    mask = causal_cross_mask(query_length, num_frames, num_frames * per_frame)
    # the mask function on index grids (numpy: no compilation per shape); Mask.materialize is checked below
    dense = mask.mask_fn(np.arange(query_length)[:, None], np.arange(num_frames * per_frame)[None, :])
    want = loop_mask(query_length, num_frames, per_frame)
    np.testing.assert_array_equal(dense, want)
    assert want[0, :per_frame].all() and want[-1].all()  # the first query sees frame 0, the last sees every frame
    assert (want[1:] >= want[:-1]).all()  # monotone


def test_queries_per_frame_see_frames_up_to_their_group():
    # Tq = G * F: query i sees frames 0..i // G (the query groups' lower-triangular block mask), ANDed with padding
    dense = np.asarray(causal_cross_mask(6, 3, 6, attn.Mask(kv_lengths=jnp.array([6]))).materialize(6, 6))[0, 0]
    for i in range(6):
        np.testing.assert_array_equal(dense[i], np.arange(6) // 2 <= i // 2)


def init(**options):
    layer = attn.build("video_ccam", num_heads=H, head_dim=D, **options)
    return layer, nn.unbox(layer.init(jax.random.key(2), X, context=CONTEXT))


def test_one_frame_is_plain_cross_attention():
    layer, params = init(num_frames=1)
    softmax = attn.build("softmax", num_heads=H, head_dim=D)
    run = jax.jit(lambda module: module.apply(params, X, context=CONTEXT), static_argnums=0)
    np.testing.assert_allclose(run(layer), run(softmax), atol=1e-6, rtol=1e-6)


def test_layer_matches_a_numpy_reference():
    layer, params = init(num_frames=FRAMES)
    p = jax.tree.map(np.asarray, params["params"])
    x, c = np.asarray(X, np.float64), np.asarray(CONTEXT, np.float64)
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bse,ehd->bshd", c, p["key"]["kernel"])
    v = np.einsum("bse,ehd->bshd", c, p["value"]["kernel"])
    allowed = loop_mask(TQ, FRAMES, PER_FRAME)
    heads = np.zeros((B, TQ, H, D))
    for b in range(B):
        for h in range(H):
            for i in range(TQ):
                logits = np.array([q[b, i, h] @ k[b, j, h] / np.sqrt(D) for j in range(c.shape[1])])
                logits = np.where(allowed[i], logits, -np.inf)
                w = np.exp(logits - logits.max())
                heads[b, i, h] = (w / w.sum()) @ v[b, :, h]
    want = np.einsum("bthd,hde->bte", heads, p["out"]["kernel"])
    y = jax.jit(lambda p: layer.apply(p, X, context=CONTEXT))(params)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


def test_later_frames_change_only_the_queries_that_see_them():
    layer, params = init(num_frames=FRAMES)
    changed = CONTEXT.at[:, 2 * PER_FRAME :].set(jax.random.normal(jax.random.key(3), (B, PER_FRAME, E)))
    both = jax.jit(lambda c: layer.apply(params, X, context=c))
    y, y2 = both(CONTEXT), both(changed)
    first_seeing = int(np.argmax(loop_mask(TQ, FRAMES, PER_FRAME)[:, 2 * PER_FRAME]))  # first query that sees frame 2
    np.testing.assert_array_equal(y[:, :first_seeing], y2[:, :first_seeing])
    assert float(jnp.abs(y[:, first_seeing:] - y2[:, first_seeing:]).min(axis=-1).max()) > 1e-4


def test_bad_input_names_the_argument():
    layer, params = init(num_frames=FRAMES)
    with pytest.raises(ValueError, match="needs context"):
        layer.apply(params, X)
    with pytest.raises(ValueError, match="num_frames=3 does not divide the context length 5"):
        layer.apply(params, X, context=CONTEXT[:, :5])
    with pytest.raises(ValueError, match="context has width 4"):
        layer.apply(params, X, context=CONTEXT[..., :4])
    with pytest.raises(ValueError, match="context batch 1 != x batch 2"):
        layer.apply(params, X, context=CONTEXT[:1])
    with pytest.raises(ValueError, match="does not decode"):
        layer.apply(params, X, context=CONTEXT, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="num_frames=0 must be a positive int"):
        attn.build("video_ccam", num_heads=H, head_dim=D, num_frames=0)
