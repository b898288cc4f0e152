"""[66] a_star: the segregation and retention losses from their definitions, the latent step, no-op and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.models import dit
from attn.steer import STEERERS, AStar
from attn.steer.a_star import concept_maps, retention_loss, segregation_loss
from tests.steer.tiny_dit import CAPTIONS, CONCEPTS, NOISE, init_params, tiny_dit


def test_losses_match_their_definitions():
    rng = np.random.default_rng(0)
    a, b = rng.random(6), rng.random(6)
    maps = jnp.asarray(np.stack([a, b])[None])  # [1, K=2, N=6]
    expected = sum(min(x, y) for x, y in zip(a, b, strict=True)) / sum(a + b)
    np.testing.assert_allclose(segregation_loss(maps), [expected], rtol=1e-6)
    disjoint = jnp.asarray([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    np.testing.assert_allclose(segregation_loss(disjoint), [0.0])
    np.testing.assert_allclose(segregation_loss(jnp.stack([disjoint[:, 0]] * 2, 1)), [0.5])  # identical maps
    np.testing.assert_allclose(retention_loss(disjoint, disjoint), [0.0])
    np.testing.assert_allclose(retention_loss(disjoint, disjoint[:, ::-1]), [2.0])  # each concept lost its region
    weights = jnp.asarray(rng.random((1, 4, 5)))  # [B, N, L]
    got = np.asarray(concept_maps(weights, [(0, 1), (3,)]))
    first = np.asarray(weights[0, :, :2]).mean(-1)
    np.testing.assert_allclose(got[0, 0], first / first.max(), rtol=1e-6)
    np.testing.assert_allclose(got[0, 1], np.asarray(weights[0, :, 3]) / float(weights[0, :, 3].max()), rtol=1e-6)


def test_step_size_zero_or_no_steps_give_no_update():
    model = tiny_dit()
    for off in (AStar(step_size=0.0), AStar(max_steps=0)):
        assert not off.active and off.latent_update(model, None, CAPTIONS, CONCEPTS) is None


@pytest.mark.slow  # three compiles of the DiT (about 10 s on idle cores)
def test_a_latent_step_lowers_the_overlap_and_step_size_zero_is_bit_identical():
    model = tiny_dit()
    params = init_params(model)
    steerer = AStar(step_size=0.05, max_steps=1)
    loss_and_grad = jax.jit(
        jax.value_and_grad(
            lambda x: steerer.losses(model, params, x, jnp.float32(0.9), CAPTIONS, CONCEPTS, None), has_aux=True
        )
    )
    (loss, _), grad = loss_and_grad(NOISE)
    assert float(jnp.abs(grad).max()) > 0
    update = steerer.latent_update(model, params, CAPTIONS, CONCEPTS)
    moved = update(NOISE, jnp.float32(0.9), 0)
    np.testing.assert_allclose(moved, NOISE - 0.05 * grad, rtol=1e-5, atol=1e-6)
    (after, _), _ = loss_and_grad(moved)
    assert float(after) < float(loss)
    np.testing.assert_array_equal(update(NOISE, jnp.float32(0.5), 1), NOISE)  # past max_steps: untouched

    velocity = jax.jit(dit.guided_velocity(model, {"params": params}, CAPTIONS))
    plain = np.asarray(dit.euler_sample(velocity, NOISE, 2))
    for off in (AStar(step_size=0.0), AStar(max_steps=0)):
        assert off.latent_update(model, params, CAPTIONS, CONCEPTS) is None
        update = off.latent_update(model, params, CAPTIONS, CONCEPTS)
        np.testing.assert_array_equal(np.asarray(dit.euler_sample(velocity, NOISE, 2, latent_update=update)), plain)


def test_bad_input_names_the_argument():
    model = tiny_dit()
    with pytest.raises(ValueError, match="model: this DiT has cross_attention=None"):
        AStar().latent_update(tiny_dit(cross_attention=None), None, CAPTIONS, CONCEPTS)
    with pytest.raises(ValueError, match=r"concepts=\[\(0, 1\), \(3, 9\)\] holds positions \[9\]"):
        AStar().latent_update(model, None, CAPTIONS, [(0, 1), (3, 9)])
    with pytest.raises(ValueError, match="at least two"):
        AStar().latent_update(model, None, CAPTIONS, [(0, 1)])
    with pytest.raises(ValueError, match="step_size=-1"):
        AStar(step_size=-1)
    assert STEERERS["a_star"].fidelity == "reconstructed"
