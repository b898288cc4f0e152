"""attn.steer.damro: outlier scores from the image encoder's attention (class token or column mean), the outlier-only
pass against the decoder run on the outlier tokens alone, the contrastive rule against numpy, the exact no-op
settings, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, Damro
from attn.steer import damro as damro_lib
from tests.steer.vlm_helpers import IMAGES, SPAN, TOKENS, N, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def scores_and_map(model, variables):
    """(outlier_scores [B, N], the last encoder layer's attention float64 [B, H, S, S]) in one jitted call."""
    path = "image_encoder/layers_0/attention"

    @jax.jit
    def run(variables):
        scores = damro_lib.outlier_scores(model, variables["params"], IMAGES)
        cache = run_with_cache(model, variables, IMAGES, TOKENS, names=("attention_weights",), layers=[path])[1]
        return scores, cache[path]["attention_weights"]

    scores, weights = run(variables)
    return np.asarray(scores), np.asarray(weights, np.float64)


def test_scores_read_the_last_encoder_layer(vlm):
    model, variables = vlm
    scores, a = scores_and_map(model, variables)
    want = np.array([[a[b, :, :, j].mean() for j in range(N)] for b in range(a.shape[0])])  # column means
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    scores, a = scores_and_map(*tiny_vlm(vision_cls_token=True))
    np.testing.assert_allclose(scores, a[:, :, 0, 1:].mean(axis=1), rtol=1e-5)  # the class token's row
    top = np.asarray(Damro(k=2).outliers(jnp.asarray(scores)))
    for b in range(scores.shape[0]):
        assert set(np.flatnonzero(top[b])) == set(np.argsort(-scores[b])[:2])


def test_outlier_pass_is_the_decoder_on_the_outliers_alone():
    model, variables = tiny_vlm(attention_options=FrozenDict(position="none"))  # deleting tokens moves no position
    chosen = np.array([[True, False, False, True], [False, True, False, False]])
    rules = Damro(k=2).rules(model, jnp.asarray(chosen), SPAN)

    @jax.jit
    def run(variables):
        prefix = model.apply(variables, IMAGES, method="encode")
        with attn.intervene(*rules):
            masked = model.apply(variables, IMAGES, TOKENS)
        alone = [
            model.apply(variables, TOKENS[b : b + 1], prefix[b : b + 1][:, np.flatnonzero(chosen[b])], method="decode")
            for b in range(2)
        ]
        return masked, jnp.concatenate(alone)

    masked, alone = run(variables)
    np.testing.assert_allclose(masked, alone, rtol=1e-5, atol=1e-5)


def test_contrast_matches_numpy():
    rng = np.random.default_rng(0)
    logits, other = rng.normal(size=(2, 3, 7)).astype(np.float32), rng.normal(size=(2, 3, 7)).astype(np.float32)
    out = np.asarray(Damro(alpha=0.7, beta=0.3).combine(jnp.asarray(logits), jnp.asarray(other)))
    cut = np.log(0.3) + logits.max(-1, keepdims=True)
    want = np.where(logits < cut, -np.inf, 1.7 * logits - 0.7 * other)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert np.isinf(want).any() and np.isfinite(want).any()


def test_alpha_zero_is_a_no_op():
    rng = np.random.default_rng(1)
    logits, other = jnp.asarray(rng.normal(size=(4, 9))), jnp.asarray(rng.normal(size=(4, 9)))
    np.testing.assert_array_equal(Damro(alpha=0.0, beta=0.0).combine(logits, other), logits)
    kept = Damro(alpha=0.0, beta=0.5).combine(logits, other)
    np.testing.assert_array_equal(jnp.argmax(kept, -1), jnp.argmax(logits, -1))
    assert "alpha=0 with beta=0" in STEERERS["damro"].no_op


def test_bad_input_names_the_argument(vlm):
    model, _ = vlm
    with pytest.raises(ValueError, match="k=9 exceeds"):
        Damro(k=9).outliers(jnp.ones((2, N)))
    with pytest.raises(ValueError, match="outliers must be"):
        Damro().rules(model, jnp.ones((2, 3), bool), SPAN)
    with pytest.raises(ValueError, match="image_span"):
        Damro().rules(model, jnp.ones((2, 4), bool), (4, 2))
    with pytest.raises(ValueError, match="beta"):
        Damro(beta=2.0)
    with pytest.raises(ValueError, match="model"):
        Damro().rules(tiny_vlm(fusion="cross")[0], jnp.ones((2, 4), bool), SPAN)
    with pytest.raises(ValueError, match="no attention probability matrix"):
        damro_lib.outlier_scores(model.clone(vision_attention="cca"), None, IMAGES)
