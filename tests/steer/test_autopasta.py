"""attn.steer.autopasta: the model's own choice of key sentence, mapped onto the context and steered with PASTA;
coarse-to-fine head profiling; the exact no-op setting; bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.steer import STEERERS, AutoPasta, Pasta
from attn.steer import autopasta as autopasta_lib
from tests.steer.helpers import TOKENS, B, T, V, tiny_lm

SENTENCES = [(0, 3), (3, 6), (6, 8)]
ANSWERS = [5, 9, 11]  # the token the model answers with for each sentence


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_identify_takes_the_best_scored_candidate_and_steers_its_span(lm):
    model, variables = lm
    steer = AutoPasta({0: [1], 1: [0, 2]}, SENTENCES, ANSWERS, alpha=0.05)
    prompts = (TOKENS + 1) % V
    chosen = np.asarray(steer.identify(model, variables["params"], prompts))
    last = np.asarray(model.apply(variables, prompts)[:, -1])
    want = [int(np.argmax([last[b, t] for t in ANSWERS])) for b in range(B)]
    np.testing.assert_array_equal(chosen, want)
    mask = np.asarray(steer.spans(jnp.asarray(chosen), T))
    for b in range(B):
        start, stop = SENTENCES[want[b]]
        assert mask[b].tolist() == [1.0 if start <= j < stop else 0.0 for j in range(T)]
    with attn.intervene(*steer.rules(model, variables["params"], prompts, T)):
        auto = model.apply(variables, TOKENS)
    spans = [SENTENCES[w] for w in want]
    with attn.intervene(*Pasta({0: [1], 1: [0, 2]}, 0.05).rules(model, spans, seq_len=T)):
        given = model.apply(variables, TOKENS)
    np.testing.assert_array_equal(auto, given)
    assert not np.allclose(auto, model.apply(variables, TOKENS))


def test_alpha_one_is_bit_identical(lm):
    model, variables = lm
    steer = AutoPasta({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, SENTENCES, ANSWERS, alpha=1.0)
    with attn.intervene(*steer.rules(model, variables["params"], TOKENS, T)):
        np.testing.assert_array_equal(model.apply(variables, TOKENS), model.apply(variables, TOKENS))
    assert STEERERS["autopasta"].fidelity == "reconstructed"


def test_coarse_to_fine_profiling(lm):
    model, _ = lm
    calls = []

    def score(config):
        calls.append(config)
        ((layer, heads),) = config.items()
        if len(heads) > 1:
            return [0.2, 0.7][layer]  # layer 1 is the better layer
        return [0.9, 0.1, 0.6, 0.3][heads[0]] if layer == 1 else 1.0

    config, scores = autopasta_lib.select_heads(score, model, top_layers=1, k=2)
    assert config == {1: (0, 2)}  # layer 0's heads are never scored alone
    assert len(calls) == 2 + 4
    assert np.isnan(scores["head_scores"][0]).all()
    np.testing.assert_array_equal(scores["layer_scores"], [0.2, 0.7])


def test_bad_input_names_the_argument(lm):
    model, variables = lm
    with pytest.raises(ValueError, match="sentences \\(3\\) and sentence_tokens \\(2\\)"):
        AutoPasta({0: [0]}, SENTENCES, [1, 2])
    with pytest.raises(ValueError, match="sentence_tokens holds \\[99\\]"):
        AutoPasta({0: [0]}, SENTENCES, [1, 2, 99]).identify(model, variables["params"], TOKENS)
    with pytest.raises(ValueError, match=r"sentences\[2\]=\(6, 12\) lies outside the sequence"):
        AutoPasta({0: [0]}, [(0, 3), (3, 6), (6, 12)], ANSWERS).rules(model, variables["params"], TOKENS, T)
    with pytest.raises(ValueError, match="head_config has layer 4"):
        AutoPasta({4: [0]}, SENTENCES, ANSWERS).rules(model, variables["params"], TOKENS, T)
    with pytest.raises(ValueError, match="top_layers=3"):
        autopasta_lib.select_heads(lambda c: 0.0, model, top_layers=3, k=1)
    with pytest.raises(ValueError, match="alpha=2"):
        AutoPasta({0: [0]}, SENTENCES, ANSWERS, alpha=2)
