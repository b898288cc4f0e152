"""softmax_regression_icl: the gradient of the paper's loss against jax.grad, the planted two-head layer that takes
one GD step (eta = n), and (slow) training to the GD step's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.analysis import TOOLS
from eval.analysis.icl_layer import context_layer
from eval.analysis.softmax_regression_icl import SoftmaxRegressionICL, gd_logits, softmax_prompts

DIM, CONTEXT, QUERIES, OMEGA = 3, 8, 3, 0.02


def _planted():
    """Two heads: logits +-omega a_i . a' over the a block, values carry n b_i, outputs +-1/(2 omega) into the last
    entry (icl_regression's debiased-GD construction)."""
    e = DIM + 1
    wq, wk, wv = (np.zeros((e, 2, e)) for _ in range(3))
    wo = np.zeros((2, e, e))
    for head, sign in enumerate((1.0, -1.0)):
        wq[np.arange(DIM), head, np.arange(DIM)] = sign * OMEGA
        wk[np.arange(DIM), head, np.arange(DIM)] = 1.0
        wv[DIM, head, DIM] = 1.0
        wo[head, DIM, DIM] = sign / (2 * OMEGA)
    params = {"query": {"kernel": wq}, "key": {"kernel": wk}, "value": {"kernel": wv}, "out": {"kernel": wo}}
    return context_layer(num_heads=2, head_dim=e), params


def _paper_loss(x, a, b):
    """L(x) = 1/2 |<exp(Ax), 1>^-1 exp(Ax) - b|^2, the paper's objective."""
    e = jnp.exp(a @ x)
    return 0.5 * jnp.sum((e / e.sum() - b) ** 2)


def test_gd_logits_are_one_step_of_the_papers_loss():
    batch = softmax_prompts(jax.random.key(0), 3, DIM, CONTEXT, QUERIES, radius=2.0)
    z = np.asarray(batch["inputs"], np.float64)
    gradient = jax.jit(jax.grad(_paper_loss))
    for prompt, logits in zip(z, gd_logits(z, CONTEXT), strict=True):
        a, b = prompt[:CONTEXT, :-1], prompt[:CONTEXT, -1] / CONTEXT
        step = -np.asarray(gradient(jnp.zeros(DIM), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        np.testing.assert_allclose(logits, prompt[CONTEXT:, :-1] @ step, rtol=1e-4, atol=1e-7)  # x_1 with eta = 1
    np.testing.assert_allclose(np.asarray(batch["targets"]).sum(axis=-1), 1.0, rtol=1e-6)


def test_planted_layer_takes_one_gd_step_with_eta_n(tmp_path):
    model, params = _planted()
    batch = softmax_prompts(jax.random.key(1), 128, DIM, CONTEXT, QUERIES, radius=2.0)
    tool = SoftmaxRegressionICL(dim=DIM, context=CONTEXT, queries=QUERIES, radius=2.0)
    result = tool.evaluate(model, params, [batch])
    assert result["agreement"]["explained"] > 0.999
    assert result["agreement"]["step_size"] == pytest.approx(CONTEXT, rel=0.01)
    assert (
        result["loss"]["model"] < result["loss"]["uniform"] and result["loss"]["gd"] <= result["loss"]["model"] + 1e-4
    )
    assert result["ov_zero_sum"] == pytest.approx(0.0) and result["fidelity"] == "reconstructed"
    paths = TOOLS["softmax_regression_icl"]().write(result, str(tmp_path / "s.json"))
    assert open(paths[1], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="radius=0.0 must be a positive float"):
        SoftmaxRegressionICL(radius=0.0)
    model, params = _planted()
    wrong = softmax_prompts(jax.random.key(0), 2, DIM, CONTEXT, QUERIES + 1, radius=1.0)
    with pytest.raises(ValueError, match=r"expected \[B, 11, 4\] \(context=8, queries=3, dim=3\)"):
        SoftmaxRegressionICL(dim=DIM, context=CONTEXT, queries=QUERIES).evaluate(model, params, [wrong])


@pytest.mark.slow
def test_training_reaches_the_gd_steps_loss():
    tool = SoftmaxRegressionICL(dim=3, context=12, queries=3, steps=500, batch=128, eval_rows=1024)
    result = tool.standalone_run()
    assert result["loss"]["model"] < 0.6 * result["loss"]["uniform"]
    assert result["loss"]["model"] < 1.2 * result["loss"]["gd"]
    assert result["agreement"]["explained"] > 0.7
