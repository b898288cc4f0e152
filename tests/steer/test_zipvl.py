"""zipvl: per-layer important image tokens = the fewest covering tau of the attention mass (numpy reference with
explicit loops, layer by layer), tau 1 is bit-identical, the dropped keys get no attention, bad input is refused."""

import numpy as np
import pytest

import attn
from attn import interventions as iv
from attn.steer import STEERERS, ZipVL
from attn.steer import visual_tokens as vt
from tests.steer.prefix_vlm import IMAGES, TOKENS, N, full_logits, image_tokens, model_only, tiny_vlm


def captured(model, params, layer, masks):
    """Decoder layer `layer`'s weights float64 [B, H, S, S] with the earlier layers' key masks applied by a hook."""

    def rule(i, keep):
        def fn(logits, path):
            return np.where(np.pad(~keep, ((0, 0), (0, logits.shape[-1] - N)))[:, None, None, :], -np.inf, logits)

        return iv.hook("attention_logits", fn, layers=[f"decoder/layers_{i}"], module="decoder/*/attention")

    with attn.intervene(*[rule(i, keep) for i, keep in enumerate(masks)]):
        _, cache = iv.run_with_cache(
            model, {"params": params}, TOKENS, image_tokens(model, params), names=("attention_weights",),
            layers=[f"decoder/layers_{layer}/attention"], method="decode",
        )  # fmt: skip
    return np.asarray(cache[f"decoder/layers_{layer}/attention"]["attention_weights"], np.float64)


def reference_keep(weights, tau):
    b, h, s, _ = weights.shape
    keep = np.zeros((b, N), bool)
    for row in range(b):
        scores = [sum(weights[row, head, i, j] for head in range(h) for i in range(s)) / (h * s) for j in range(N)]
        order = sorted(range(N), key=lambda j: (-scores[j], j))
        total, covered = sum(scores), 0.0
        for j in order:
            keep[row, j] = True
            covered += scores[j]
            if covered >= tau * total * (1 - 1e-6):
                break
    return keep


def test_registered_with_its_record():
    assert STEERERS["zipvl"].cls is ZipVL and "tau=1" in STEERERS["zipvl"].no_op


@pytest.mark.parametrize("tau", [0.5, pytest.param(0.9, marks=pytest.mark.slow)])
def test_masks_match_the_reference_layer_by_layer(tau):
    model, params = tiny_vlm()
    reduction = ZipVL(tau).reduce(model, params, IMAGES, TOKENS)
    masks = np.asarray(reduction.masks)
    assert masks.shape == (2, 2, N)
    for layer in range(2):
        expected = reference_keep(captured(model, params, layer, list(masks[:layer])), tau)
        np.testing.assert_array_equal(masks[layer], expected)
    np.testing.assert_allclose(reduction.kept, masks.mean(-1).T)
    assert 0 < masks.sum() < masks.size  # tau < 1 drops some tokens here


def test_dropped_keys_get_no_attention_and_rows_stay_normalised():
    model, params = tiny_vlm()
    reduction = ZipVL(0.5).reduce(model, params, IMAGES, TOKENS)
    with attn.intervene(*reduction.rules(model)):
        _, cache = iv.run_with_cache(
            model, {"params": params}, TOKENS, reduction.prefix, names=("attention_weights",), method="decode"
        )
    for layer in range(2):
        weights = np.asarray(cache[f"decoder/layers_{layer}/attention"]["attention_weights"])
        dropped = ~np.asarray(reduction.masks[layer])
        assert np.all(np.where(dropped[:, None, None, :], weights[..., :N], 0.0) == 0.0)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert np.isfinite(np.asarray(vt.reduced_logits(model, params, reduction, TOKENS))).all()


def test_tau_one_is_bit_identical():
    model, params = tiny_vlm()
    reduction = ZipVL(1.0).reduce(model, params, IMAGES, TOKENS)
    assert reduction.masks is None
    logits = vt.reduced_logits(model, params, reduction, TOKENS)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(full_logits(model, params)))


def test_bad_input_names_the_argument():
    model, params = tiny_vlm()
    for tau in (0.0, 1.01, False):
        with pytest.raises(ValueError, match="tau="):
            ZipVL(tau)
    with pytest.raises(ValueError, match=r"span=\(10, 40\) lies outside the sequence"):
        ZipVL(0.5, span=(10, 40)).reduce(model, params, IMAGES, TOKENS)
    with pytest.raises(ValueError, match="layers has 5"):
        ZipVL(0.5, layers=[5]).check(model)
    with pytest.raises(ValueError, match="model=.*must be attn.models.VisionLanguageModel"):
        ZipVL(0.5).check(model_only(fusion="cross"))
    with pytest.raises(ValueError, match="model: zipvl reads attention weights.*'lightning'"):
        ZipVL(0.5).check(model_only(attention="lightning"))
