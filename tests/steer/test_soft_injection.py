"""attn.steer.soft_injection: task embeddings are mean last-token head outputs, the injection mixes only the last
token, mixing 0 is bit-identical and 1 reproduces the embedding, the head-selection fit lowers its loss, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attn
from attn.interventions import run_with_cache
from attn.steer import STEERERS, SoftInjection
from attn.steer import soft_injection as si
from tests.steer.helpers import TOKENS, B, H, T, V, tiny_lm

PROMPTS = jax.random.randint(jax.random.key(5), (6, T), 0, V)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def head_outputs(model, variables, tokens, layer):
    _, cache = run_with_cache(model, variables, tokens, names=("head_outputs",), layers=[layer])
    return np.asarray(cache[f"layers_{layer}/attention"]["head_outputs"], np.float64)


@pytest.mark.slow  # 12-24 s: eager forwards under interventions recompile per op
def test_task_embeddings_are_mean_last_token_head_outputs(lm):
    model, variables = lm
    e = np.asarray(si.task_embeddings(model, variables["params"], PROMPTS))
    for layer in range(2):
        outputs = head_outputs(model, variables, PROMPTS, layer)
        want = sum(outputs[m, -1] for m in range(len(PROMPTS))) / len(PROMPTS)
        np.testing.assert_allclose(e[layer], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 12-24 s: eager forwards under interventions recompile per op
def test_injection_mixes_only_the_last_token(lm):
    model, variables = lm
    e = si.task_embeddings(model, variables["params"], PROMPTS)
    mixing = np.array([[0.0, 0.25, 0.6, 1.0], [0.5, 0.5, 0.5, 0.5]])
    base = head_outputs(model, variables, TOKENS, 0)
    with attn.intervene(*SoftInjection(e, mixing, layers=[0]).rules(model)):
        injected = head_outputs(model, variables, TOKENS, 0)
    want = base.copy()
    for b in range(B):
        for h in range(H):
            want[b, -1, h] = (1 - mixing[0, h]) * base[b, -1, h] + mixing[0, h] * np.asarray(e[0, h])
    np.testing.assert_allclose(injected, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(injected[:, :-1], base[:, :-1])
    np.testing.assert_allclose(injected[:, -1, -1], np.broadcast_to(e[0, -1], (B, e.shape[-1])), rtol=1e-6)  # a=1


def test_zero_mixing_and_no_layers_are_bit_identical(lm):
    model, variables = lm
    e = si.task_embeddings(model, variables["params"], PROMPTS)
    clean = model.apply(variables, TOKENS)
    with attn.intervene(*SoftInjection(e, np.zeros((2, H))).rules(model)):
        np.testing.assert_array_equal(model.apply(variables, TOKENS), clean)
    assert SoftInjection(e, np.ones((2, H)), layers=()).rules(model) == ()
    assert STEERERS["soft_injection"].no_op.startswith("mixing all 0")


@pytest.mark.slow  # 12-24 s: eager forwards under interventions recompile per op
def test_fit_lowers_the_answer_loss(lm):
    model, variables = lm
    e = si.task_embeddings(model, variables["params"], PROMPTS)
    answers = jnp.full((B,), 3)
    mixing, history = si.fit_mixing(
        model,
        variables["params"],
        e,
        (TOKENS, answers),
        (TOKENS, answers),
        steps=20,
        learning_rate=0.2,
        validate_every=5,
    )
    assert mixing.shape == (2, H) and ((mixing >= 0) & (mixing <= 1)).all() and len(history) == 4
    with attn.intervene(*SoftInjection(e, np.full((2, H), 0.5)).rules(model)):
        start = optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, TOKENS)[:, -1], answers).mean()
    assert min(history) < float(start)


def test_bad_input_names_the_argument(lm):
    model, variables = lm
    e = si.task_embeddings(model, variables["params"], PROMPTS)
    with pytest.raises(ValueError, match="embeddings has shape \\(2, 3, 4\\)"):
        SoftInjection(e[:, :3], np.zeros((2, H))).rules(model)
    with pytest.raises(ValueError, match="mixing must lie in \\[0, 1\\]"):
        SoftInjection(e, np.full((2, H), 1.5)).rules(model)
    with pytest.raises(ValueError, match="layers holds 2, out of range"):
        SoftInjection(e, np.zeros((2, H)), layers=[2]).rules(model)
