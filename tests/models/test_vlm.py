"""VisionLanguageModel: both fusions run and condition on the image, prefix-LM and causal masking, cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models import VisionLanguageModel, generate_encoder_decoder

VOCAB, BATCH, TEXT, SIZE = 16, 2, 5, 16


def small_model(**fields) -> VisionLanguageModel:
    config = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, patch_size=4, vision_layers=1)
    return VisionLanguageModel(**{**config, **fields})


def images(seed=0):
    return jax.random.uniform(jax.random.key(seed), (BATCH, SIZE, SIZE, 3))


def text(seed=1):
    return jax.random.randint(jax.random.key(seed), (BATCH, TEXT), 0, VOCAB)


@pytest.mark.parametrize("fusion", ["cross", "prefix"])
def test_both_fusions_run_condition_on_the_image_and_keep_text_causal(fusion, quick_params):
    model = small_model(fusion=fusion)
    params = quick_params(model, images(), text())
    decoder = params["params"]["decoder"]["layers_0"]
    assert ("cross_attention" in decoder) == (fusion == "cross")
    forward = jax.jit(lambda im, tok: model.apply(params, im, tok))
    out = forward(images(), text())
    assert out.shape == (BATCH, TEXT, VOCAB) and out.dtype == jnp.float32 and np.isfinite(out).all()
    # Every text position sees the whole image (a prefix is bidirectional to the text; cross-attention is unmasked).
    other = images().at[:, -4:, -4:].set(0.0)  # only the last patch changes
    assert np.abs(forward(other, text())[:, 0] - out[:, 0]).max() > 1e-4
    later = text().at[:, 3:].set((text()[:, 3:] + 1) % VOCAB)
    np.testing.assert_allclose(forward(images(), later)[:, :3], out[:, :3], rtol=1e-6, atol=1e-6)


def test_spatial_mechanism_in_the_image_encoder(quick_params):
    model = small_model(vision_attention="neighborhood", vision_attention_options={"kernel_size": 3})
    params = quick_params(model, images(), text())
    assert "patch_embedding" in params["params"]["image_encoder"]
    assert jax.jit(model.apply)(params, images(), text()).shape == (BATCH, TEXT, VOCAB)


@pytest.mark.parametrize("fusion", ["cross", "prefix"])
def test_cached_generation_equals_greedy_full_forwards(fusion, quick_params):
    """Cross fusion caches the projected image keys; prefix fusion writes the image tokens into the self-attention
    cache on the prefill and continues without them."""
    model = small_model(fusion=fusion)
    params = quick_params(model, images(), text())
    generated = generate_encoder_decoder(model, params, images(), 4, start_token=1)
    forward = jax.jit(lambda tok: model.apply(params, images(), tok))
    target = jnp.zeros((BATCH, 5), jnp.int32).at[:, 0].set(1)
    for i in range(4):
        target = target.at[:, i + 1].set(jnp.argmax(forward(target)[:, i], axis=-1).astype(jnp.int32))
    np.testing.assert_array_equal(generated, target[:, 1:])


def test_bad_fields_are_rejected():
    with pytest.raises(ValueError, match="fusion"):
        jax.eval_shape(small_model(fusion="late").init, jax.random.key(0), images(), text())
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        jax.eval_shape(small_model(patch_size=5).init, jax.random.key(0), images(), text())
    model = small_model(fusion="prefix")
    params = jax.eval_shape(model.init, jax.random.key(0), images(), text())
    with pytest.raises(ValueError, match="encoded=None continues a cached sequence"):
        jax.eval_shape(lambda p: model.apply(p, text(), None, method="decode"), params)
    cross = small_model(fusion="cross")
    cross_params = jax.eval_shape(cross.init, jax.random.key(0), images(), text())
    with pytest.raises(ValueError, match="needs the image tokens"):
        jax.eval_shape(lambda p: cross.apply(p, text(), None, method="decode"), cross_params)


def test_vision_position_embedding_sincos2d_replaces_the_table(quick_params):
    learned = jax.eval_shape(small_model().init, jax.random.key(0), images(), text())["params"]
    assert "position_embedding" in learned["image_encoder"]  # the default keeps the parameter and its name
    model = small_model(fusion="prefix", vision_position_embedding="sincos2d", vision_cls_token=True)
    params = quick_params(model, images(), text())
    assert "position_embedding" not in params["params"]["image_encoder"]
    # Fixed positions alone tell the patches apart: a uniform image gives a different token at every place.
    uniform = jnp.full((1, SIZE, SIZE, 3), 0.5)
    tokens = jax.jit(lambda im: model.apply(params, im, method="encode"))(uniform)[0]
    assert tokens.shape == ((SIZE // 4) ** 2, 32)
    assert np.abs(np.asarray(tokens)[:, None] - np.asarray(tokens)[None]).max(-1)[np.triu_indices(16, 1)].min() > 1e-3
    with pytest.raises(ValueError, match="position_embedding"):
        jax.eval_shape(small_model(vision_position_embedding="rope").init, jax.random.key(0), images(), text())
