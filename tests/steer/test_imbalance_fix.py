"""attn.steer.imbalance_fix: visual sensitivity and the dual-stream selection against numpy loops, the modulation
against a numpy softmax of the boosted logits, the exact no-op settings, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, ImbalanceFix
from attn.steer import imbalance_fix as fix_lib
from tests.steer.vlm_helpers import IMAGES, SPAN, TOKENS, H, N, logits_under, prefix_map, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def test_sensitivity_and_selection_match_loops():
    maps = [prefix_map(0, boost=1), prefix_map(1, boost=2)]  # [1, 2, 8, 8] each
    saliency = np.array([[0.1, 0.5, 0.2, 0.9]])
    sens = np.asarray(fix_lib.visual_sensitivity([jnp.asarray(m) for m in maps], SPAN))
    picked = np.asarray(
        fix_lib.dual_stream_selection([jnp.asarray(m) for m in maps], jnp.asarray(saliency), SPAN, 1, 1)
    )
    t = maps[0].shape[-1]
    for layer, a in enumerate(maps):
        for h in range(2):
            want = np.mean([sum(a[0, h, i, j] for j in range(N)) for i in range(N, t)])
            assert sens[layer, 0, h] == pytest.approx(want, rel=1e-5)
        read = [np.mean([a[0, h, i, j] for h in range(2) for i in range(N, t)]) for j in range(N)]
        assert set(np.flatnonzero(picked[layer, 0])) == {int(np.argmax(read)), 3}


def test_modulation_boosts_the_selected_keys_for_text_queries(vlm):
    model, variables = vlm
    sens = jnp.asarray(np.array([[[0.2, 0.4, 0.1, 0.0]] * 2, [[1.0, 1.0, 1.0, 1.0]] * 2], np.float32))  # [2, 2, 4]
    selected = jnp.asarray(np.array([[[True, False, True, False]] * 2] * 2))
    rules = ImbalanceFix(gamma=2.0, layers=[0]).rules(model, sens, selected, SPAN)
    path = "decoder/layers_0/attention"

    @jax.jit
    def run(variables):
        clean = run_with_cache(model, variables, IMAGES, TOKENS, names=("attention_logits",), layers=[path])[1]
        with attn.intervene(*rules):
            steered = run_with_cache(model, variables, IMAGES, TOKENS, names=("attention_weights",), layers=[path])[1]
        return clean[path]["attention_logits"], steered[path]["attention_weights"]

    logits, steered = (np.asarray(x, np.float64) for x in run(variables))
    boost = 2.0 * (1 / 2) * np.array([0.2, 0.4, 0.1, 0.0]) / 0.4  # gamma (l + 1) / L v / max v, layer 0
    want = logits.copy()
    for h in range(H):
        for i in range(SPAN[1], logits.shape[2]):
            for j in (0, 2):
                want[:, h, i, j] += boost[h]
    want = np.exp(want - want.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(steered, want, rtol=1e-5, atol=1e-6)


def test_gamma_zero_and_no_layers_are_bit_identical(vlm):
    model, variables = vlm
    sens, selected = jax.jit(lambda v: ImbalanceFix().analyse(model, v, IMAGES, TOKENS))(variables)
    assert sens.shape == (2, 2, H) and selected.shape == (2, 2, N) and bool(selected.any())
    clean, same, moved = logits_under(
        model,
        variables,
        (),
        ImbalanceFix(gamma=0.0).rules(model, sens, selected, SPAN),
        ImbalanceFix(gamma=5.0).rules(model, sens, selected, SPAN),
    )
    np.testing.assert_array_equal(same, clean)
    assert not np.array_equal(moved, clean)
    assert ImbalanceFix(layers=()).rules(model, sens, selected, SPAN) == ()
    assert "gamma=0" in STEERERS["imbalance_fix"].no_op


def test_bad_input_names_the_argument(vlm):
    model, variables = vlm
    sens, selected = jnp.ones((2, 2, H)), jnp.ones((2, 2, N), bool)
    with pytest.raises(ValueError, match="layers=.*out of range"):
        ImbalanceFix(layers=[-1]).rules(model, sens, selected, SPAN)
    with pytest.raises(ValueError, match="sensitivity must be"):
        ImbalanceFix().rules(model, sens[0], selected, SPAN)
    with pytest.raises(ValueError, match="selected must be"):
        ImbalanceFix().rules(model, sens, selected, (0, 3))
    with pytest.raises(ValueError, match="image_span"):
        ImbalanceFix().rules(model, sens, selected, (2, 2))
    with pytest.raises(ValueError, match="k_local=9"):
        ImbalanceFix(k_local=9).analyse(model, variables, IMAGES, TOKENS)
    with pytest.raises(ValueError, match="gamma"):
        ImbalanceFix(gamma=-1.0)
    with pytest.raises(ValueError, match="no attention probability matrix"):
        ImbalanceFix().rules(model.clone(attention="cca"), sens, selected, SPAN)
