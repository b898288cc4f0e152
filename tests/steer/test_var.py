"""attn.steer.var: the redistribution against an explicit numpy loop of the official rule, sink detection from
normalised hidden states, the rule on a tiny prefix VLM, the exact no-op settings, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.steer import STEERERS, Var
from attn.steer import var as var_lib
from attn.steer.vision import block_inputs
from tests.steer.vlm_helpers import IMAGES, SPAN, TOKENS, forward, logits_under, prefix_map, tiny_vlm


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def var_reference(a, sinks, span, p, rho, summ):
    """One head's map a [T, T] with sink flags [T]: explicit loops over the code's rule (rows of text queries)."""
    t = a.shape[0]
    start, stop = span
    image = list(range(start, stop))
    sink = [j for j in range(t) if sinks[j]]
    if not any(j in image for j in sink):
        return a.copy()
    out = a.copy()
    for i in range(stop, t):
        s = sum(a[i, j] for j in image)
        portion = sum(a[i, j] for j in image if j in sink) / sum(a[i, j] + 1e-6 for j in image)
        base = sum(a[i, j] for j in image if j not in sink)
        if not (portion <= rho and s >= summ) or base == 0:
            continue
        budget = (1 - p) * sum(a[i, j] for j in sink)
        for j in range(t):
            if j in sink:
                out[i, j] = p * a[i, j]
            elif j in image:
                out[i, j] = a[i, j] + budget * a[i, j] / base
    return out


def test_redistribution_matches_the_official_rule_on_a_small_map():
    weights = prefix_map(0, boost=1)
    sinks = np.zeros((1, weights.shape[-1]), bool)
    sinks[0, [1, 4]] = True  # a visual sink and a text sink
    redistribute = jax.jit(var_lib.redistribute, static_argnums=(2, 3, 4, 5))
    weights = weights.astype(np.float32)
    out = np.asarray(redistribute(jnp.asarray(weights), jnp.asarray(sinks), SPAN, 0.6, 0.5, 0.2))
    changed = False
    for h in range(2):
        want = var_reference(weights[0, h].astype(np.float64), sinks[0], SPAN, 0.6, 0.5, 0.2)
        np.testing.assert_allclose(out[0, h], want, rtol=1e-6, atol=1e-7)
        changed |= not np.allclose(want, weights[0, h])
    assert changed
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)  # rows keep their mass
    np.testing.assert_array_equal(out[..., : SPAN[1], :], weights[..., : SPAN[1], :])  # image queries untouched


def test_sinks_are_tokens_with_a_massive_normalised_dimension():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 6, 8))
    hidden[0, 2, 5] = 40.0
    hidden[1, 4, 5] = 40.0
    rms = np.sqrt((hidden**2).mean(-1, keepdims=True) + 1e-6)
    want = (np.abs(hidden / rms)[..., [5]].max(-1)) > 2.0
    np.testing.assert_array_equal(var_lib.sink_tokens(jnp.asarray(hidden), (5,), 2.0), want)
    assert want[0, 2] and want[1, 4] and want.sum() == 2
    assert var_lib.sink_dimensions(jnp.asarray(hidden), 1) == (5,)


def test_rule_redistributes_the_selected_layer(vlm):
    model, variables = vlm
    _, base = forward(model, variables)
    sinks = np.zeros((2, 2, SPAN[1] + TOKENS.shape[1]), bool)
    sinks[0, :, 1] = True  # layer 0: image token 1 is a sink in both rows
    steer = Var(p=0.2, rho=1.0, summ=0.0, layers=[0])
    _, steered = forward(model, variables, steer.rules(model, jnp.asarray(sinks), SPAN))
    for b in range(2):
        for h in range(base.shape[1]):
            want = var_reference(base[b, h], sinks[0, b], SPAN, 0.2, 1.0, 0.0)
            np.testing.assert_allclose(steered[b, h], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(steered, base)


def test_find_sinks_reads_the_hidden_states_entering_each_block(vlm):
    model, variables = vlm
    run = jax.jit(
        lambda v: (
            block_inputs(model, v, IMAGES, TOKENS),
            Var(tau=1.5, sink_dims=(3,)).find_sinks(model, v, IMAGES, TOKENS),
        )
    )
    hidden, sinks = (np.asarray(x) for x in run(variables))
    assert hidden.shape == (2, 2, SPAN[1] + TOKENS.shape[1], 16)
    rms = np.sqrt((hidden.astype(np.float64) ** 2).mean(-1) + 1e-6)
    np.testing.assert_array_equal(sinks, np.abs(hidden[..., 3]) / rms > 1.5)


def test_p_one_and_no_layers_are_bit_identical(vlm):
    model, variables = vlm
    sinks = jnp.ones((2, 2, SPAN[1] + TOKENS.shape[1]), bool).at[:, :, 2:].set(False)
    noop = Var(p=1.0, rho=1.0, summ=0.0, layers=[0, 1]).rules(model, sinks, SPAN)
    moved = Var(p=0.0, rho=1.0, summ=0.0, layers=[0, 1]).rules(model, sinks, SPAN)
    clean, same, steered = logits_under(model, variables, (), noop, moved)
    np.testing.assert_array_equal(same, clean)
    assert not np.array_equal(steered, clean)
    assert Var(layers=()).rules(model, sinks, SPAN) == ()
    assert STEERERS["var"].fidelity == "official-code" and "p=1" in STEERERS["var"].no_op


def test_bad_input_names_the_argument(vlm):
    model, _ = vlm
    sinks = jnp.zeros((2, 2, 8), bool)
    with pytest.raises(ValueError, match="layers=.*out of range"):
        Var(layers=[2]).rules(model, sinks, SPAN)
    with pytest.raises(ValueError, match="image_span"):
        Var().rules(model, sinks, (2, 9))
    with pytest.raises(ValueError, match="sinks must be bool"):
        Var().rules(model, sinks[0], SPAN)
    with pytest.raises(ValueError, match="p=1.5"):
        Var(p=1.5)
    with pytest.raises(ValueError, match="model"):
        Var().rules(tiny_vlm(fusion="cross")[0], sinks, SPAN)
    with pytest.raises(ValueError, match="no attention probability matrix"):
        Var().rules(model.clone(attention="cca"), sinks, SPAN)
