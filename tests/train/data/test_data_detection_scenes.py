"""The detection_scenes source draws what its targets say; the detector task's per-token targets and hit counts
match explicit loops; the detect_tiny smoke preset trains (its loss falls)."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn.models.detector import detection_loss_sums, token_targets
from train import tasks
from train.data import make_source
from train.data.detection_scenes import CLASS_COLORS


def scenes(**options):
    return make_source("detection_scenes", batch_size=16, seed=3, num_distractors=0, noise_std=0.0, **options)


def test_a_lone_square_is_centred_where_the_target_says():
    batch = scenes(min_objects=1, max_objects=1, object_size=3, max_object_size=9).next_batch()
    for row in range(16):
        color = CLASS_COLORS[batch["classes"][row, 0]]
        pixels = np.argwhere(np.abs(batch["images"][row] - color).max(-1) <= 0.08 + 1e-6)
        side = int(round(np.sqrt(len(pixels))))
        assert side * side == len(pixels) and 3 <= side <= 9
        np.testing.assert_allclose(pixels.min(0) + side / 2, batch["centres"][row, 0])


def test_objects_counts_and_classes():
    source = scenes(min_objects=0, max_objects=3, num_classes=2)
    batch = source.next_batch()
    counts = batch["valid"].sum(1)
    assert set(np.unique(counts)) <= {0, 1, 2, 3} and len(np.unique(counts)) > 1
    for row in range(16):
        n = int(counts[row])
        np.testing.assert_array_equal(batch["valid"][row], np.arange(3) < n)
        assert (batch["centres"][row, n:] == 0).all() and (batch["classes"][row, n:] == 0).all()
        for slot in range(n):  # the centre pixel has the object's colour (objects never touch)
            y, x = np.floor(batch["centres"][row, slot]).astype(int)
            color = CLASS_COLORS[batch["classes"][row, slot]]
            assert np.abs(batch["images"][row, y, x] - color).max() <= 0.08 + 1e-6
    assert batch["classes"].max() <= 1
    again = scenes(min_objects=0, max_objects=3, num_classes=2).next_batch()
    np.testing.assert_array_equal(again["images"], batch["images"])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"min_objects": 3, "max_objects": 2}, "min_objects=3"),
        ({"max_objects": 20, "max_object_size": 10}, "max_objects=20"),
        ({"object_size": 5, "max_object_size": 4}, "max_object_size"),
        ({"num_classes": 9}, "num_classes"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_source("detection_scenes", batch_size=2, **options)


CENTRES = np.array([[[1.5, 6.0], [7.0, 2.5], [0.0, 0.0]], [[4.0, 4.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)
CLASSES = np.array([[2, 0, 0], [1, 0, 0]], np.int32)
VALID = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
PATCH, GRID = 4, (2, 2)


def loop_targets():
    label, offset = np.zeros((2, 4), int), np.zeros((2, 4, 2))
    for b in range(2):
        for m in range(3):
            if VALID[b, m]:
                r, c = int(CENTRES[b, m, 0] // PATCH), int(CENTRES[b, m, 1] // PATCH)
                label[b, r * 2 + c] = CLASSES[b, m] + 1
                offset[b, r * 2 + c] = (CENTRES[b, m] - (np.array([r, c]) + 0.5) * PATCH) / PATCH
    return label, offset


def test_token_targets_match_loops():
    label, offset = token_targets(jnp.asarray(CENTRES), jnp.asarray(CLASSES), jnp.asarray(VALID), GRID, PATCH)
    want_label, want_offset = loop_targets()
    np.testing.assert_array_equal(label, want_label)
    np.testing.assert_allclose(offset, want_offset, atol=1e-6)


def test_hits_and_detections_count_like_loops():
    want_label, want_offset = loop_targets()
    outputs = np.zeros((2, 4, 1 + 3 + 2), np.float32)
    outputs[np.arange(2)[:, None], np.arange(4)[None], want_label] = 5.0  # perfect classes
    outputs[..., 4:] = want_offset
    batch = {"images": jnp.zeros((2, 8, 8, 3)), "centres": CENTRES, "classes": CLASSES, "valid": VALID}
    sums = detection_loss_sums(jnp.asarray(outputs), batch, PATCH, 1.0)
    assert (float(sums["hits"]), float(sums["objects"]), float(sums["detections"])) == (3, 3, 3)
    assert float(sums["true_detections"]) == 3 and float(sums["correct"]) == 2
    # Image 0: token 1's centre moves 2 px along both axes, token 2's 1.2 px down; both beyond radius 1 -> two misses
    # and two false detections.
    outputs[0, 1, 4:] += 0.5
    outputs[0, 2, 4] += 0.3
    sums = detection_loss_sums(jnp.asarray(outputs), batch, PATCH, 1.0)
    assert float(sums["hits"]) == 1 and float(sums["true_detections"]) == 1
    np.testing.assert_allclose(float(sums["correct"]), 0.0 + 1.0)  # image 0: 0 of 2 hit; image 1: 1 of 1
    assert float(sums["detections"]) == 3


@pytest.mark.slow  # compiles eight train steps of the detector (~75 s on 2 loaded CPU cores)
def test_smoke_preset_trains_and_the_loss_falls():
    config = importlib.import_module("configs.detect_tiny").get_config("smoke")
    options = {key: value for key, value in config.data.to_dict().items() if key != "name" and value is not None}
    source = make_source(config.data.name, batch_size=config.batch_size, **options)
    batch = {key: jnp.asarray(value) for key, value in source.next_batch().items()}
    task = tasks.build_task(config.model, config.precision.compute_dtype)
    assert task.kind == "detector" and task.tokens_per_example({"images": (batch["images"].shape, None)}) == 16
    optimizer = optax.adam(3e-3)

    def loss_fn(params):
        sums = task.loss_sums(task.apply({"params": params}, batch), batch)
        return sums["loss_sum"] / sums["weight"]

    @jax.jit
    def train(rng):
        params = nn.unbox(task.init(rng, batch)["params"])

        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=8)
        return losses, loss_fn(params)

    losses, final = train(jax.random.key(0))
    assert np.isfinite(np.asarray(losses)).all()
    assert float(final) < 0.9 * float(losses[0]), (losses, final)
