"""The DiT denoiser: adaLN-zero start, flow-matching equations, Euler sampling, conditioning, the task and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models import DiT, dit
from train import tasks

B, S, L = 2, 8, 5
IMAGES = jax.random.normal(jax.random.key(0), (B, S, S, 3))
TIMES = jnp.array([0.25, 0.8])
CAPTIONS = jnp.array([[1, 5, 8, 2, 6], [3, 4, 0, 0, 0]], jnp.int32)


def tiny(**fields):
    base = dict(vocab_size=9, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, patch_size=4, max_caption_len=L)
    return DiT(**{**base, "caption_layers": 0, **fields})


@jax.jit
def _perturb(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = [leaf + 0.2 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, moved)


def init_perturbed(model):
    """Parameters moved off their (partly zero) initialisation, so every path carries signal (one jit each)."""
    variables = jax.jit(model.init)(jax.random.key(1), IMAGES, TIMES, CAPTIONS)
    return {"params": _perturb(variables["params"])}


@pytest.fixture(scope="module")
def model_and_params():
    model = tiny()
    return model, init_perturbed(model)


def test_adaln_zero_starts_at_zero_velocity_and_conditioning_reaches_the_output(model_and_params):
    model, variables = model_and_params
    apply = jax.jit(model.apply)
    fresh = jax.jit(model.init)(jax.random.key(1), IMAGES, TIMES, CAPTIONS)
    velocity = apply(fresh, IMAGES, TIMES, CAPTIONS)
    assert velocity.shape == IMAGES.shape and velocity.dtype == jnp.float32
    assert np.all(np.asarray(velocity) == 0.0)  # zero-initialised output layer
    out = apply(variables, IMAGES, TIMES, CAPTIONS)
    other_caption = apply(variables, IMAGES, TIMES, CAPTIONS.at[0, 1].set(6))
    other_time = apply(variables, IMAGES, TIMES.at[0].set(0.5), CAPTIONS)
    for changed in (other_caption, other_time):
        assert np.abs(np.asarray(changed[0] - out[0])).max() > 1e-4  # row 0 changed
        np.testing.assert_array_equal(np.asarray(changed[1]), np.asarray(out[1]))  # row 1 did not


def test_flow_equations_and_timestep_embedding_match_their_definitions():
    x0, noise, t = np.ones((2, 3)), np.full((2, 3), 5.0), np.array([0.0, 0.25])
    np.testing.assert_allclose(dit.flow_interpolate(x0, noise, t), [[1.0] * 3, [2.0] * 3])
    np.testing.assert_allclose(dit.flow_velocity(x0, noise), 4.0)
    emb = np.asarray(dit.timestep_embedding(jnp.array([0.3]), 6))
    expected = [math.cos(300 * 10000 ** (-k / 3)) for k in range(3)] + [
        math.sin(300 * 10000 ** (-k / 3)) for k in range(3)
    ]
    np.testing.assert_allclose(emb[0], expected, rtol=1e-5, atol=1e-5)


def test_euler_inverts_and_reconstructs_the_straight_flow_exactly():
    x0, noise = np.array([[1.0, -2.0]]), np.array([[0.5, 3.0]])

    def velocity(x, t):  # the true velocity of the straight path between x0 and noise
        return jnp.asarray(noise - x0)

    inverted = dit.euler_sample(velocity, jnp.asarray(x0), 4, start=0.0, stop=1.0)
    np.testing.assert_allclose(inverted, noise, atol=1e-6)
    np.testing.assert_allclose(dit.euler_sample(velocity, inverted, 3), x0, atol=1e-6)
    # v(x, t) = x: Euler from t=1 to 0 in n steps multiplies by (1 - 1/n)^n.
    out = dit.euler_sample(lambda x, t: x, jnp.ones((1,)), 5)
    np.testing.assert_allclose(out, [(1 - 1 / 5) ** 5], rtol=1e-6)
    calls = []
    dit.euler_sample(lambda x, t: x, jnp.ones((1,)), 3, latent_update=lambda x, t, step: calls.append(step) or x)
    assert calls == [0, 1, 2]
    with pytest.raises(ValueError, match="num_steps=0"):
        dit.euler_sample(velocity, jnp.asarray(x0), 0)


def test_check_cross_attention_refuses_a_model_without_it():
    with pytest.raises(ValueError, match="model: this DiT has cross_attention=None"):
        dit.check_cross_attention(tiny(cross_attention=None))
    with pytest.raises(ValueError, match="expected an attn.models.DiT"):
        dit.check_cross_attention(object())
    dit.check_cross_attention(tiny())


@pytest.mark.slow  # a second model to compile (about 8 s on idle cores)
def test_model_without_cross_attention_conditions_through_adaln():
    model = tiny(cross_attention=None)
    variables = init_perturbed(model)
    assert "cross_attention" not in variables["params"]["layers_0"]
    apply = jax.jit(model.apply)
    out = apply(variables, IMAGES, TIMES, CAPTIONS)
    assert np.abs(np.asarray(apply(variables, IMAGES, TIMES, CAPTIONS.at[0, 1].set(6)) - out)).max() > 1e-4


def test_bad_inputs_name_the_argument(model_and_params):
    model, variables = model_and_params
    with pytest.raises(ValueError, match="times must be float"):
        model.apply(variables, IMAGES, TIMES[:1], CAPTIONS)
    with pytest.raises(ValueError, match="captions must be int"):
        model.apply(variables, IMAGES, TIMES, CAPTIONS[:1])
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        model.apply(variables, IMAGES[:, :6, :6], TIMES, CAPTIONS)


def test_flow_matching_task_loss_is_the_mean_squared_velocity_error(model_and_params):
    model, variables = model_and_params
    task = tasks.Task(kind="dit", model=model)
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.random((B, S, S, 3), dtype=np.float32),
        "captions": np.asarray(CAPTIONS),
        "noise": rng.standard_normal((B, S, S, 3), dtype=np.float32),
        "times": np.array([0.1, 0.9], np.float32),
    }
    prediction = task.apply(variables, {k: jnp.asarray(v) for k, v in batch.items()})
    x0 = 2 * batch["images"] - 1
    t = batch["times"][:, None, None, None]
    expected_input = (1 - t) * x0 + t * batch["noise"]
    np.testing.assert_allclose(
        prediction,
        model.apply(variables, jnp.asarray(expected_input), TIMES.at[:].set(batch["times"]), CAPTIONS),
        rtol=1e-5,
        atol=1e-6,
    )
    sums = task.loss_sums(prediction, batch)
    error = np.mean((np.asarray(prediction) - (batch["noise"] - x0)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(sums["loss_sum"]), error.sum(), rtol=1e-5)
    assert float(sums["weight"]) == B and set(task.metrics(sums)) == {"loss"}
