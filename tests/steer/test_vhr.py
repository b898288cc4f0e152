"""attn.steer.vhr: head divergence against the decoder run on the text alone, the reinforcement rule on the chosen
heads and text positions only, the exact no-op settings, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, Vhr
from attn.steer import vhr as vhr_lib
from tests.steer.vlm_helpers import IMAGES, SPAN, TOKENS, H, logits_under, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def test_divergence_is_the_distance_to_the_text_only_decoder(vlm):
    model, variables = vlm

    @jax.jit
    def outputs(variables):
        scores = vhr_lib.head_divergence(model, variables, IMAGES, TOKENS)
        with_image = run_with_cache(model, variables, IMAGES, TOKENS, names=("head_outputs",))[1]
        text_only = run_with_cache(model, variables, TOKENS, names=("head_outputs",), method=lambda m, t: m.decoder(t))[
            1
        ]
        return scores, with_image, text_only

    scores, with_image, text_only = outputs(variables)
    scores = np.asarray(scores)
    assert scores.shape == (2, 2, H)
    for layer in range(2):
        a = np.asarray(with_image[f"decoder/layers_{layer}/attention"]["head_outputs"][:, -1], np.float64)
        b = np.asarray(text_only[f"decoder/layers_{layer}/attention"]["head_outputs"][:, -1], np.float64)
        want = np.sqrt(((a - b) ** 2).sum(-1))  # [B, H]
        np.testing.assert_allclose(scores[layer], want, rtol=1e-4, atol=1e-5)
    assert scores.max() > 0


def test_rule_scales_the_top_heads_at_text_positions(vlm):
    model, variables = vlm
    scores = jnp.asarray(np.arange(2 * 2 * H, dtype=np.float32).reshape(2, 2, H) % 5)  # row 0 of layer 0: head 0
    rules = Vhr(alpha=3.0, k=1, layers=[0]).rules(model, scores, SPAN)
    path = "decoder/layers_0/attention"

    @jax.jit
    def heads(variables):
        base = run_with_cache(model, variables, IMAGES, TOKENS, names=("head_outputs",), layers=[path])[1]
        with attn.intervene(*rules):
            steered = run_with_cache(model, variables, IMAGES, TOKENS, names=("head_outputs",), layers=[path])[1]
        return base[path]["head_outputs"], steered[path]["head_outputs"]

    base, steered = (np.asarray(x, np.float64) for x in heads(variables))
    top = np.argmax(np.asarray(scores[0]), axis=-1)  # [B]
    for b in range(2):
        for h in range(H):
            factor = 3.0 if h == top[b] else 1.0
            np.testing.assert_allclose(steered[b, SPAN[1] :, h], factor * base[b, SPAN[1] :, h], rtol=1e-6)
            np.testing.assert_array_equal(steered[b, : SPAN[1], h], base[b, : SPAN[1], h])  # image positions


def test_alpha_one_and_no_heads_are_bit_identical(vlm):
    model, variables = vlm
    scores = jnp.ones((2, 2, H))
    clean, same, moved = logits_under(
        model,
        variables,
        (),
        Vhr(alpha=1.0, k=H).rules(model, scores, SPAN),
        Vhr(alpha=4.0, k=2).rules(model, scores, SPAN),
    )
    np.testing.assert_array_equal(same, clean)
    assert not np.array_equal(moved, clean)
    assert Vhr(k=0).rules(model, scores, SPAN) == () and Vhr(layers=()).rules(model, scores, SPAN) == ()
    assert "alpha=1" in STEERERS["vhr"].no_op


def test_bad_input_names_the_argument(vlm):
    model, _ = vlm
    scores = jnp.ones((2, 2, H))
    with pytest.raises(ValueError, match="layers=.*out of range"):
        Vhr(layers=[5]).rules(model, scores, SPAN)
    with pytest.raises(ValueError, match="k=5 exceeds"):
        Vhr(k=5).rules(model, scores, SPAN)
    with pytest.raises(ValueError, match="scores must be"):
        Vhr().rules(model, scores[0], SPAN)
    with pytest.raises(ValueError, match="image_span"):
        Vhr().rules(model, scores, (3, 1))
    with pytest.raises(ValueError, match="alpha"):
        Vhr(alpha=-1.0)
    with pytest.raises(ValueError, match="model"):
        Vhr().rules(tiny_vlm(fusion="cross")[0], scores, SPAN)
    with pytest.raises(ValueError, match="no attention probability matrix"):
        vhr_lib.head_divergence(model.clone(attention="cca"), None, IMAGES, TOKENS)
