"""attn.steer.pasta: the renormalised down-weighting against an explicit numpy loop, the exact no-op settings,
per-head profiling, jit, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.steer import STEERERS, Pasta
from attn.steer import pasta as pasta_lib
from attn.steer.common import top_heads
from tests.steer.helpers import TOKENS, B, H, T, layer0_weights, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def pasta_reference(weights, heads, emphasis, alpha):
    """weights [B, H, T, T]; each selected head's row: non-emphasised keys times alpha, renormalised to 1."""
    out = weights.copy()
    for b in range(weights.shape[0]):
        for h in heads:
            for i in range(weights.shape[2]):
                row = [weights[b, h, i, j] * (1.0 if emphasis[b][j] else alpha) for j in range(weights.shape[3])]
                total = sum(row)
                out[b, h, i] = [value / total for value in row]
    return out


def test_steered_weights_match_the_renormalised_rule(lm):
    model, variables = lm
    base = layer0_weights(model, variables)
    spans = [(1, 3), [(0, 1), (4, 7)]]
    alpha = 0.1
    emphasis = np.zeros((B, T), bool)
    emphasis[0, 1:3] = True
    emphasis[1, 0:1] = emphasis[1, 4:7] = True
    with attn.intervene(*Pasta({0: [1, 3]}, alpha).rules(model, spans, seq_len=T)):
        steered = layer0_weights(model, variables)
    want = pasta_reference(base, [1, 3], emphasis, alpha)
    np.testing.assert_allclose(steered, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(steered[:, [0, 2]], base[:, [0, 2]])  # unselected heads untouched
    span = emphasis[:, None, None, :]
    assert (np.where(span, steered, 0).sum(-1)[:, [1, 3], 1:] > np.where(span, base, 0).sum(-1)[:, [1, 3], 1:]).all()


@pytest.mark.slow  # 12-24 s: eager forwards under interventions recompile per op
def test_mask_spans_equal_listed_spans_and_unemphasised_rows_stay(lm):
    model, variables = lm
    mask = np.zeros((B, T), np.float32)
    mask[0, 2:5] = 1
    with attn.intervene(*Pasta({0: [0], 1: [2]}, 0.05).rules(model, mask)):
        by_mask = model.apply(variables, TOKENS)
    with attn.intervene(*Pasta({0: [0], 1: [2]}, 0.05).rules(model, [(2, 5), None], seq_len=T)):
        by_list = model.apply(variables, TOKENS)
    clean = model.apply(variables, TOKENS)
    np.testing.assert_array_equal(by_mask, by_list)
    np.testing.assert_array_equal(by_mask[1], clean[1])  # row without a span: unsteered
    assert not np.allclose(by_mask[0], clean[0])


def test_alpha_one_and_no_heads_are_bit_identical(lm):
    model, variables = lm
    clean = model.apply(variables, TOKENS)
    rules = Pasta({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, 1.0).rules(model, [(1, 4), (2, 6)], seq_len=T)
    assert len(rules) == 2
    with attn.intervene(*rules):
        np.testing.assert_array_equal(model.apply(variables, TOKENS), clean)
    assert Pasta({}, 0.01).rules(model, [(1, 4), (2, 6)], seq_len=T) == ()
    assert STEERERS["pasta"].no_op.startswith("alpha=1")


def test_rules_entered_inside_jit_take_the_span_as_an_argument(lm):
    model, variables = lm
    steer = Pasta({1: [0, 3]}, 0.01)

    @jax.jit
    def run(v, tokens, emphasis):
        with attn.intervene(*steer.rules(model, emphasis)):
            return model.apply(v, tokens)

    mask = np.zeros((B, T), np.float32)
    mask[:, 3:6] = 1
    with attn.intervene(*steer.rules(model, mask)):
        eager = model.apply(variables, TOKENS)
    # jit may fuse and reorder float32 sums: 2e-6 differences were seen on CI-like machines
    np.testing.assert_allclose(run(variables, TOKENS, jnp.asarray(mask)), eager, rtol=1e-5, atol=1e-5)


def test_profiling_keeps_the_best_heads(lm):
    model, _ = lm
    table = np.array([[0.1, 0.9, 0.2, 0.3], [0.8, 0.0, 0.95, 0.1]])
    config, scores = pasta_lib.select_heads(lambda c: float(table[next(iter(c)), c[next(iter(c))][0]]), model, 3)
    assert config == {0: (1,), 1: (0, 2)}
    np.testing.assert_array_equal(scores, table)
    assert top_heads(table, 0) == {}


def test_bad_input_names_the_argument(lm):
    model, variables = lm
    with pytest.raises(ValueError, match="head_config has layer 2.*2 layers"):
        Pasta({2: [0]}).rules(model, [(0, 2)] * B, seq_len=T)
    with pytest.raises(ValueError, match=r"head_config\[0\]=\[4\] holds \[4\].*4 heads"):
        Pasta({0: [4]}).rules(model, [(0, 2)] * B, seq_len=T)
    with pytest.raises(ValueError, match=r"spans\[1\]=\(6, 9\) lies outside the sequence"):
        Pasta({0: [0]}).rules(model, [(0, 2), (6, 9)], seq_len=T)
    with pytest.raises(ValueError, match="spans cover 1 rows; the model call at layers_0/attention has batch 2"):
        with attn.intervene(*Pasta({0: [0]}).rules(model, [(0, 2)], seq_len=T)):
            model.apply(variables, TOKENS)
    with pytest.raises(ValueError, match="alpha=0"):
        Pasta({0: [0]}, alpha=0)
    with pytest.raises(ValueError, match="seq_len=None"):
        Pasta({0: [0]}).rules(model, [(0, 2)] * B)
    linear, _ = tiny_lm("linear")
    with pytest.raises(ValueError, match="model: pasta.*'linear'.*no attention probability matrix"):
        Pasta({1: [0]}).rules(linear, [(0, 2)] * B, seq_len=T)
    assert H == 4
