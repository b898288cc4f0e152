"""VisionLanguageModel's visual_prefix_pool (CrossLMM's pooled visual tokens in the decoder's sequence): the pooled
prefix is the mean of consecutive image tokens (checked with numpy), the logits equal the decoder run by hand on it,
and bad settings name the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models import VisionLanguageModel

FRAMES, FRAME, PATCH, POOL = 2, 8, 4, 2  # 2 frames of 8x8 px -> 4 patch tokens per frame -> 2 pooled per frame


def _model(**overrides):
    options = dict(
        vocab_size=11,
        num_layers=1,
        d_model=16,
        num_heads=2,
        mlp_dim=32,
        patch_size=PATCH,
        vision_layers=1,
        cross_attention="crosslmm",
        cross_attention_options={"visual_tokens": FRAMES * (FRAME // PATCH) ** 2 // POOL, "num_frames": FRAMES},
        visual_prefix_pool=POOL,
    )
    options.update(overrides)
    return VisionLanguageModel(**options)


def _inputs():
    images = jax.random.uniform(jax.random.key(0), (3, FRAMES * FRAME, FRAME, 3))  # frames stacked vertically
    tokens = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    return images, tokens


def test_logits_equal_the_decoder_on_numpy_pooled_image_tokens():
    model = _model()
    images, tokens = _inputs()
    params = model.init(jax.random.key(2), images, tokens)
    logits = model.apply(params, images, tokens)
    assert logits.shape == (3, 5, 11)  # text positions only

    encoded = np.asarray(model.apply(params, images, method=model.encode))  # [3, 8, 16], frame-major
    pooled = encoded.reshape(3, encoded.shape[1] // POOL, POOL, 16).mean(axis=2)
    by_hand = model.apply(
        params,
        tokens,
        method=lambda m, t: m.decoder(t, context=jnp.asarray(encoded), prefix=jnp.asarray(pooled)),
    )
    np.testing.assert_allclose(np.asarray(logits), np.asarray(by_hand), rtol=1e-5, atol=1e-5)


def test_pooled_prefix_changes_the_text_logits_and_zero_pool_is_the_plain_model():
    images, tokens = _inputs()
    plain = _model(cross_attention="softmax", cross_attention_options={}, visual_prefix_pool=0)
    pooled = _model(cross_attention="softmax", cross_attention_options={})
    params = plain.init(jax.random.key(2), images, tokens)  # same parameters: the prefix adds none
    a = plain.apply(params, images, tokens)
    b = pooled.apply(params, images, tokens)
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # the text attends the pooled tokens


def test_bad_settings_name_the_argument():
    images, tokens = _inputs()
    with pytest.raises(ValueError, match=r"visual_prefix_pool=2 with fusion='prefix'"):
        _model(fusion="prefix", cross_attention=None).init(jax.random.key(0), images, tokens)
    with pytest.raises(ValueError, match=r"visual_prefix_pool=-1"):
        _model(visual_prefix_pool=-1).init(jax.random.key(0), images, tokens)
    with pytest.raises(ValueError, match=r"factor=3 does not divide the 8 tokens per frame"):
        _model(visual_prefix_pool=3).init(jax.random.key(0), images, tokens)
    model = _model(cross_attention="softmax", cross_attention_options={})
    params = model.init(jax.random.key(0), images, tokens)
    encoded = model.apply(params, images, method=model.encode)
    with pytest.raises(ValueError, match=r"visual_prefix_pool=2 does not decode with a KV cache"):
        model.apply(params, tokens, encoded, decode=True, method=model.decode, mutable=["cache"])
