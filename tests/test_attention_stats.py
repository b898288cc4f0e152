"""attn.attention_stats: per-layer entropy and first-key mass of sown attention weights, against numpy sums."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn import attention_stats

RNG = np.random.default_rng(0)


def causal_probs(batch: int, heads: int, length: int) -> np.ndarray:
    """Row-stochastic [B, H, T, T] weights with exact zeros above the diagonal (masked keys)."""
    logits = RNG.standard_normal((batch, heads, length, length))
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def numpy_entropy(p: np.ndarray) -> float:
    total = 0.0
    for row in p.reshape(-1, p.shape[-1]).astype(np.float64):
        total -= sum(x * np.log(x) for x in row if x > 0)
    return total / (p.size // p.shape[-1])


def test_layer_stats_match_numpy_and_ignore_masked_keys():
    p = causal_probs(2, 3, 5)
    out = attention_stats.layer_stats(jnp.asarray(p))
    assert np.isfinite(float(out["entropy"]))  # the exact zeros of masked keys add 0, not nan
    assert float(out["entropy"]) == pytest.approx(numpy_entropy(p), rel=1e-5)
    assert float(out["first_key_mass"]) == pytest.approx(p[..., 0].astype(np.float64).mean(), rel=1e-5)
    uniform = np.full((1, 1, 4, 4), 0.25, np.float32)
    assert float(attention_stats.layer_stats(jnp.asarray(uniform))["entropy"]) == pytest.approx(np.log(4), rel=1e-6)


def test_layers_are_found_by_index_and_the_last_sown_value_wins():
    first, last, other = (jnp.asarray(causal_probs(1, 2, 4)) for _ in range(3))
    intermediates = {
        "model": {
            "layers_0": {"attention": {"attention_weights": (first, last), "head_outputs": (other,)}},
            "layers_3": {"attention": {"attention_weights": (other,)}},
            "embed": {"attention_weights": (other,)},  # outside any layers_<i>: not a layer
        }
    }
    by_layer = attention_stats.attention_weights_by_layer(intermediates)
    assert sorted(by_layer) == [0, 3]
    np.testing.assert_array_equal(by_layer[0], last)
    assert sorted(attention_stats.sown_by_layer(intermediates, "head_outputs")) == [0]
    scalars = attention_stats.attention_stats(intermediates["model"])
    assert sorted(scalars) == [
        "attention/entropy/layer_0",
        "attention/entropy/layer_3",
        "attention/first_key_mass/layer_0",
        "attention/first_key_mass/layer_3",
    ]
    assert float(scalars["attention/first_key_mass/layer_3"]) == pytest.approx(float(np.mean(other[..., 0])))
    assert attention_stats.attention_stats({}) == {}


def test_stacks_and_cross_attention_of_multi_stack_models_stay_apart():
    a, b, c = (jnp.asarray(causal_probs(1, 2, 4)) for _ in range(3))
    intermediates = {
        "encoder": {"layers_0": {"attention": {"attention_weights": (a,)}}},
        "decoder": {
            "layers_0": {"attention": {"attention_weights": (b,)}, "cross_attention": {"attention_weights": (c,)}}
        },
    }
    scalars = attention_stats.attention_stats(intermediates)
    assert sorted(k for k in scalars if "entropy" in k) == [
        "attention/entropy/decoder/layer_0",
        "attention/entropy/decoder/layer_0/cross_attention",
        "attention/entropy/encoder/layer_0",
    ]
    assert float(scalars["attention/first_key_mass/decoder/layer_0/cross_attention"]) == pytest.approx(
        float(np.mean(c[..., 0]))
    )
