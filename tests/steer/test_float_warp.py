"""[186] float: the nearest-patch warp and the blend of self-attention maps against numpy loops, the paired sampler,
no-op and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import interventions as iv
from attn.models import dit
from attn.steer import STEERERS, FloAt
from attn.steer.float_warp import blend_maps, check_flow, source_indices, warp_image
from tests.steer.tiny_dit import CAPTIONS, NOISE, TIMES, init_params, tiny_dit


def test_warp_and_blend_match_loops():
    rng = np.random.default_rng(0)
    grid = (2, 3)
    flow = np.zeros((1, *grid, 2), np.int32)
    flow[..., 1] = 1  # everything moves one patch right
    index, valid = source_indices(check_flow(flow, 1, grid))
    np.testing.assert_array_equal(valid[0], [0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(index[0, valid[0] > 0], [0, 1, 3, 4])
    current = rng.dirichlet(np.ones(6), size=(1, 2, 6)).astype(np.float32)  # [B, H, N, N]
    reference = rng.dirichlet(np.ones(6), size=(1, 2, 6)).astype(np.float32)
    expected = current.copy()
    for h in range(2):
        for i in range(6):
            if not valid[0, i]:
                continue
            row = np.array([reference[0, h, index[0, i], index[0, j]] * valid[0, j] for j in range(6)])
            expected[0, h, i] = 0.3 * current[0, h, i] + 0.7 * row / row.sum()
    got = np.asarray(blend_maps(jnp.asarray(current), jnp.asarray(reference), index, valid, 0.3))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)  # rows stay distributions
    image = rng.random((1, 4, 6, 1)).astype(np.float32)  # patch 2: the image moves two pixels right
    moved = warp_image(image, flow, 2)
    np.testing.assert_array_equal(moved[:, :, 2:], image[:, :, :4])
    np.testing.assert_array_equal(moved[:, :, :2], 0)


def test_bad_input_and_no_op():
    with pytest.raises(ValueError, match="weight=1.5"):
        FloAt(weight=1.5)
    with pytest.raises(ValueError, match=r"flow has shape \(2, 2, 3\)"):
        check_flow(np.zeros((2, 2, 3)), 1, (2, 2))
    model = tiny_dit()
    maps = {"layers_0/attention": jnp.zeros((2, 2, 4, 4))}
    assert FloAt(weight=1.0).rules(model, maps, np.zeros((2, 2, 2))) == ()
    with pytest.raises(ValueError, match=r"flow has shape \(3, 3, 2\)"):
        FloAt().rules(model, maps, np.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="references lack"):
        FloAt().rules(model, {}, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="model: this DiT has cross_attention=None"):
        FloAt().rules(tiny_dit(cross_attention=None), maps, np.zeros((2, 2, 2)))
    assert STEERERS["float"].fidelity == "reconstructed"


@pytest.mark.slow  # compiles the paired sampler (about 10 s)
def test_weight_zero_gives_the_warped_reference_maps_and_weight_one_is_plain_sampling():
    model = tiny_dit()
    params = init_params(model)
    flow = np.zeros((2, 2, 2), np.int32)
    flow[..., 1] = 1
    other = jax.random.normal(jax.random.key(7), NOISE.shape)
    reference, plain = FloAt(weight=1.0).sample_pair(model, params, CAPTIONS, NOISE, other, flow, steps=2)
    velocity = jax.jit(dit.guided_velocity(model, {"params": params}, CAPTIONS))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(dit.euler_sample(velocity, other, 2)))
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(dit.euler_sample(velocity, NOISE, 2)))
    _, steered = FloAt(weight=0.0).sample_pair(model, params, CAPTIONS, NOISE, other, flow, steps=2)
    assert np.abs(np.asarray(steered) - np.asarray(plain)).max() > 1e-4

    @jax.jit
    def maps(params):  # the reference's maps, and the frame's under weight 0 (its valid rows: the warped reference)
        names, layers = ("attention_weights",), ["layers_0/attention"]
        _, ref = iv.run_with_cache(model, {"params": params}, NOISE, TIMES, CAPTIONS, names=names, layers=layers)
        refs = {path: entry["attention_weights"] for path, entry in ref.items()}
        with iv.intervene(*FloAt(weight=0.0).rules(model, refs, flow)):
            _, cache = iv.run_with_cache(model, {"params": params}, other, TIMES, CAPTIONS, names=names, layers=layers)
        return refs["layers_0/attention"], cache["layers_0/attention"]["attention_weights"]

    reference_map, frame_map = (np.asarray(a) for a in maps(params))
    index, valid = source_indices(check_flow(flow, 2, (2, 2)))
    for b in range(2):
        for i in np.flatnonzero(valid[b]):
            row = np.array([reference_map[b, :, index[b, i], index[b, j]] * valid[b, j] for j in range(4)]).T
            np.testing.assert_allclose(frame_map[b, :, i], row / row.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
