"""xattn_saliency [32]: Pearson correlation against numpy's, and a known answer on an encoder-decoder whose
cross-attention is planted (an intervention hook) to read exactly one source frame per target position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.interventions import hook
from attn.models import DecoderLM, EncoderDecoder
from eval.analysis import TOOLS
from eval.analysis.xattn_saliency import XAttnSaliency, occlusion_score, pearson_rows

S, T = 6, 5  # source and target lengths


def test_pearson_rows_matches_numpy_on_the_valid_prefix():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    lengths = np.array([7, 5, 3, 1])
    valid = np.arange(7)[None, :] < lengths[:, None]
    got = pearson_rows(a, b, valid)
    for row in range(3):
        n = lengths[row]
        assert got[row] == pytest.approx(np.corrcoef(a[row, :n], b[row, :n])[0, 1], abs=1e-12)
    assert np.isnan(got[3])  # one valid position: no correlation
    assert np.isnan(pearson_rows(np.ones((1, 4)), b[:1, :4], np.ones((1, 4), bool))[0])  # constant vector
    assert pearson_rows(a, 3 * a + 1, np.ones_like(valid))[0] == pytest.approx(1.0)


def test_occlusion_scorers_match_their_formulas():
    """SPES's scorers from the equations, in float64 numpy: KL(p || q) summed over the vocabulary and p_y - q_y."""
    rng = np.random.default_rng(2)
    base, perturbed = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))  # [B, T, V]
    targets = rng.integers(0, 5, size=(2, 3))
    p = np.exp(base) / np.exp(base).sum(-1, keepdims=True)
    q = np.exp(perturbed) / np.exp(perturbed).sum(-1, keepdims=True)
    kl = np.zeros((2, 3))
    diff = np.zeros((2, 3))
    for b in range(2):
        for t in range(3):
            kl[b, t] = sum(p[b, t, v] * np.log(p[b, t, v] / q[b, t, v]) for v in range(5))
            diff[b, t] = p[b, t, targets[b, t]] - q[b, t, targets[b, t]]
    args = (jnp.asarray(base, jnp.float32), jnp.asarray(perturbed, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(occlusion_score(*args, "kl"), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(occlusion_score(*args, "predicted_token_diff"), diff, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(occlusion_score(args[0], args[0], args[2], "kl"), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="scorer='l2' must be one of"):
        XAttnSaliency(scorer="l2")


@pytest.fixture(scope="module")
def planted():
    """One decoder block, no encoder blocks (frame j of the encoder output depends on source token j only)."""
    model = EncoderDecoder(vocab_size=11, num_layers=1, encoder_layers=0, d_model=16, num_heads=2, mlp_dim=16)
    rng = np.random.default_rng(1)
    sources = rng.integers(1, 11, size=(3, S)).astype(np.int32)  # never the occlusion token 0
    inputs = rng.integers(1, 11, size=(3, T)).astype(np.int32)
    targets = rng.integers(1, 11, size=(3, T)).astype(np.int32)
    params = model.init(jax.random.key(0), sources, inputs)["params"]
    return model, params, {"sources": sources, "inputs": inputs, "targets": targets}


def _point_at(target_of_query):
    """Cross-attention logits 0 on key target_of_query[i] for query i, -1e9 elsewhere (every head)."""

    def fn(logits, _path):
        keys = jnp.arange(logits.shape[-1])[None, :]
        chosen = jnp.asarray(target_of_query)[: logits.shape[-2], None]
        return jnp.broadcast_to(jnp.where(keys == chosen, 0.0, -1e9), logits.shape).astype(logits.dtype)

    return hook("attention_logits", fn, module="*/cross_attention")


def test_planted_cross_attention_agrees_with_saliency(planted):
    model, params, batch = planted
    reverse = np.arange(S)[::-1][:T]  # target position i reads source position S - 1 - i
    with attn.intervene(_point_at(reverse)):
        result = XAttnSaliency().evaluate(model, params, [batch])
    assert result["layers"] == [0] and result["scored"] == 3 * T
    # Only the attended frame can move the prediction: both saliencies are one-hot where the attention is.
    np.testing.assert_allclose(result["pearson_input"], [[1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(result["pearson_encoder"], [[1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(result["top1_input"], [[1.0, 1.0]])
    assert result["all_pearson_input"] == pytest.approx(1.0, abs=1e-6)
    assert result["fidelity"] == "reconstructed" and TOOLS["xattn_saliency"] is XAttnSaliency


@pytest.mark.slow
def test_split_heads_halve_the_per_head_agreement(planted):
    """Head 0 reads frame S-1-i, head 1 frame i: the prediction depends on both, each head sees half of it."""
    model, params, batch = planted
    reverse, identity = np.arange(S)[::-1][:T], np.arange(T)

    def fn(logits, _path):
        keys = jnp.arange(logits.shape[-1])[None, None, :]
        chosen = jnp.stack([jnp.asarray(reverse), jnp.asarray(identity)])[:, :, None]  # [H, T, 1]
        return jnp.broadcast_to(jnp.where(keys == chosen, 0.0, -1e9), logits.shape).astype(logits.dtype)

    with attn.intervene(hook("attention_logits", fn, module="*/cross_attention")):
        result = XAttnSaliency().evaluate(model, params, [{**batch, "weights": np.ones((3, T)) * (np.arange(T) != 2)}])
    assert result["scored"] == 3 * (T - 1)  # position 2 is left out by its weight 0
    heads = np.asarray(result["pearson_input"])[0]
    assert (heads < 0.99).all()  # two salient frames, one attended by each head
    # Every other frame has saliency 0, so the most salient frame is the one head 0 or head 1 reads, never both.
    assert sum(result["top1_input"][0]) == pytest.approx(1.0)
    # The head average attends 1/2 to both salient frames: r >= 0.63 (a two-hot against any mix of the same two).
    assert result["all_pearson_input"] > 0.6


def test_bad_input_is_one_clear_error(planted):
    model, params, batch = planted
    with pytest.raises(ValueError, match="needs an encoder-decoder"):
        lm = DecoderLM(vocab_size=11, num_layers=1, d_model=8, num_heads=2, mlp_dim=8)
        XAttnSaliency().evaluate(lm, {}, [batch])  # refused before any parameter is read
    with pytest.raises(ValueError, match="has no 'sources'"):
        XAttnSaliency().evaluate(model, params, [{"inputs": batch["inputs"], "targets": batch["targets"]}])
    with pytest.raises(ValueError, match="occlusion_token=-1"):
        XAttnSaliency(occlusion_token=-1)
    with pytest.raises(ValueError, match="occlusion_token=11 is outside the source vocabulary of 11"):
        XAttnSaliency(occlusion_token=11).evaluate(model, params, [batch])
