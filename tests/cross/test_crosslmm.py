"""`crosslmm`: frame pooling by explicit loops, the two reductions (plain cross-attention, self-attention over the
visual tokens), a numpy reference of the dual cross-attention, frame locality of V2V, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.cross.crosslmm import pool_frames

B, E, H, D = 2, 8, 2, 4
FRAMES, PER_FRAME, POOLED, TEXT = 2, 4, 2, 3  # context 2 frames x 4 tokens; one pooled token per frame; 3 text
CONTEXT = jax.random.normal(jax.random.key(1), (B, FRAMES * PER_FRAME, E))
X = jax.random.normal(jax.random.key(0), (B, POOLED + TEXT, E))


def test_pooling_averages_groups_within_frames():
    tokens = np.asarray(CONTEXT)
    pooled = np.asarray(pool_frames(CONTEXT, FRAMES, 2))
    assert pooled.shape == (B, FRAMES * PER_FRAME // 2, E)
    for b in range(B):
        for f in range(FRAMES):
            for g in range(PER_FRAME // 2):
                group = [tokens[b, f * PER_FRAME + 2 * g + t] for t in range(2)]
                np.testing.assert_allclose(pooled[b, f * PER_FRAME // 2 + g], sum(group) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="factor=3 does not divide the 4 tokens per frame"):
        pool_frames(CONTEXT, FRAMES, 3)


def init(x=X, context=CONTEXT, **options):
    layer = attn.build("crosslmm", num_heads=H, head_dim=D, **options)
    return layer, nn.unbox(layer.init(jax.random.key(2), x, context=context))


def test_no_visual_tokens_is_plain_cross_attention():
    layer, params = init(visual_tokens=0, num_frames=FRAMES)
    softmax = attn.build("softmax", num_heads=H, head_dim=D)
    run = jax.jit(lambda module: module.apply(params, X, context=CONTEXT), static_argnums=0)
    np.testing.assert_allclose(run(layer), run(softmax), atol=1e-6, rtol=1e-6)


def test_unpooled_single_frame_v2v_is_self_attention_over_the_visual_tokens():
    tokens = CONTEXT.shape[1]
    visual = pool_frames(CONTEXT, 1, 1)
    layer, params = init(x=visual, visual_tokens=tokens, num_frames=1)
    p = params["params"]
    renamed = {"params": {name: p[f"v2v_{name}"] for name in ("query", "key", "value", "out")}}
    softmax = attn.build("softmax", num_heads=H, head_dim=D, position="none")
    np.testing.assert_allclose(
        layer.apply(params, visual, context=CONTEXT), softmax.apply(renamed, CONTEXT), atol=1e-6, rtol=1e-6
    )


def attention(q, k, v, allowed):
    logits = np.where(allowed, k @ q / np.sqrt(D), -np.inf)
    w = np.exp(logits - logits.max())
    return (w / w.sum()) @ v


def test_layer_matches_a_numpy_reference():
    layer, params = init(visual_tokens=POOLED, num_frames=FRAMES)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x, c = np.asarray(X, np.float64), np.asarray(CONTEXT, np.float64)
    proj = lambda a, name: np.einsum("bte,ehd->bthd", a, p[name]["kernel"])  # noqa: E731
    want = np.zeros(X.shape)
    for b in range(B):
        for i in range(POOLED + TEXT):
            prefix = "v2v_" if i < POOLED else ""
            q, k, v = proj(x, prefix + "query"), proj(c, prefix + "key"), proj(c, prefix + "value")
            if i < POOLED:  # pooled token of frame i // (POOLED / FRAMES) sees the tokens of its frame
                allowed = np.arange(c.shape[1]) // PER_FRAME == i // (POOLED // FRAMES)
            else:
                allowed = np.ones(c.shape[1], bool)
            heads = np.stack([attention(q[b, i, h], k[b, :, h], v[b, :, h], allowed) for h in range(H)])
            want[b, i] = np.einsum("hd,hde->e", heads, p[prefix + "out"]["kernel"])
    y = jax.jit(lambda params: layer.apply(params, X, context=CONTEXT))(params)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # a second compile of the layer; the numpy reference covers the same mask
def test_a_pooled_token_reads_only_its_own_frame():
    layer, params = init(visual_tokens=POOLED, num_frames=FRAMES)
    run = jax.jit(lambda c: layer.apply(params, X, context=c))
    changed = CONTEXT.at[:, PER_FRAME:].set(jax.random.normal(jax.random.key(3), (B, PER_FRAME, E)))
    y, y2 = run(CONTEXT), run(changed)
    np.testing.assert_array_equal(y[:, 0], y2[:, 0])  # frame 0's pooled token
    assert float(jnp.abs(y[:, 1:] - y2[:, 1:]).min(axis=-1).max()) > 1e-4  # frame 1's token and the text


def test_bad_input_names_the_argument():
    layer, params = init(visual_tokens=POOLED, num_frames=FRAMES)
    with pytest.raises(ValueError, match="needs context"):
        layer.apply(params, X)
    with pytest.raises(ValueError, match="num_frames=2 does not divide the context length 7"):
        layer.apply(params, X, context=CONTEXT[:, :7])
    with pytest.raises(ValueError, match="context has width 4"):
        layer.apply(params, X, context=CONTEXT[..., :4])
    with pytest.raises(ValueError, match="accepts only context padding"):
        layer.apply(params, X, context=CONTEXT, mask=attn.Mask(causal=True))
    odd = attn.build("crosslmm", num_heads=H, head_dim=D, visual_tokens=3, num_frames=FRAMES)
    with pytest.raises(ValueError, match="visual_tokens=3 must be a multiple of num_frames=2"):
        odd.init(jax.random.key(0), X, context=CONTEXT)
    with pytest.raises(ValueError, match="visual_tokens=-1 must be a non-negative int"):
        attn.build("crosslmm", num_heads=H, head_dim=D, visual_tokens=-1)
