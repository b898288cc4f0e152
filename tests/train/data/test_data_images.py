"""Images: relation labels follow the square geometry, classes balance, npz loading and epochs."""

import numpy as np
import pytest

from train.data import make_source


def _centroid(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


@pytest.mark.parametrize("num_classes", [2, 4])
def test_labels_follow_the_geometry_of_the_squares(num_classes):
    source = make_source("images", batch_size=64, seed=0, num_classes=num_classes)
    batch, geometry = source.sample(source.rng_for(0))
    red, blue = geometry["red"], geometry["blue"]
    expected = (blue[:, 1] > red[:, 1]).astype(int)
    if num_classes == 4:
        expected += 2 * (blue[:, 0] > red[:, 0])
    assert np.array_equal(batch["labels"], expected)
    # The squares are where the geometry says (the pixel at each centre has the target's dominant colour).
    s = source.square_size
    rows = np.arange(64)
    at_red = batch["images"][rows, red[:, 0] + s // 2, red[:, 1] + s // 2]
    at_blue = batch["images"][rows, blue[:, 0] + s // 2, blue[:, 1] + s // 2]
    assert np.all(at_red[:, 0] > at_red[:, 2]) and np.all(at_blue[:, 2] > at_blue[:, 0])


def test_labels_recoverable_from_pixels_alone():
    batch = make_source("images", batch_size=64, seed=1, noise_std=0.0, num_distractors=6).next_batch()
    images = batch["images"]
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    for image, label in zip(images, batch["labels"], strict=True):
        r, g, b = image[..., 0], image[..., 1], image[..., 2]
        red_y, red_x = _centroid((r > 0.6) & (g < 0.3) & (b < 0.3))
        blue_y, blue_x = _centroid((b > 0.6) & (r < 0.3) & (g < 0.3))
        assert label == int(blue_x > red_x) + 2 * int(blue_y > red_y)


def test_classes_are_balanced_and_squares_are_far_apart():
    source = make_source("images", batch_size=2000, seed=2)
    batch, geometry = source.sample(source.rng_for(0))
    counts = np.bincount(batch["labels"], minlength=4)
    assert np.all(np.abs(counts - 500) < 100)
    gap = np.abs(geometry["red"] - geometry["blue"])
    assert np.all(gap >= source.square_size)


def test_image_argument_errors():
    with pytest.raises(ValueError, match=r"num_classes must be 2 \(left/right\) or 4 \(quadrant\), got 3"):
        make_source("images", batch_size=2, seed=0, num_classes=3)
    with pytest.raises(
        ValueError,
        match=r"square_size=10 is too large for image_size=32: need square_size <= image_size // 4 = 8",
    ):
        make_source("images", batch_size=2, seed=0, square_size=10)


@pytest.fixture()
def npz_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(30)  # each image carries its own index
    labels = np.arange(30) % 3
    path = tmp_path / "data.npz"
    np.savez(path, x=images, y=labels)
    return path, images, labels


def test_npz_round_trip_and_epochs_are_permutations(npz_file):
    path, images, labels = npz_file
    source = make_source("npz", batch_size=9, seed=0, path=str(path), valid_fraction=0.1)
    assert len(source.valid_indices) == 3 and len(source.train_indices) == 27
    assert not set(source.valid_indices) & set(source.train_indices)
    assert source.num_classes == 3
    seen = []
    for _ in range(6):  # two epochs of 27 examples
        batch = source.next_batch()
        ids = np.round(batch["images"][:, 0, 0, 0] * 255).astype(int)
        for i, image, label in zip(ids, batch["images"], batch["labels"], strict=True):
            assert np.allclose(image, images[i] / 255.0) and label == labels[i]
        seen.append(ids)
    first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
    assert sorted(first) == sorted(second) == sorted(source.train_indices)
    assert not np.array_equal(first, second)  # reshuffled per epoch


def test_npz_valid_walk_visits_each_example_once(npz_file):
    path, images, _ = npz_file
    source = make_source("npz", split="valid", batch_size=4, seed=0, path=str(path), valid_fraction=0.2)
    batches = list(source)
    assert len(batches) == source.num_batches == 2
    weights = np.concatenate([b["weights"] for b in batches])
    got = np.concatenate([b["images"] for b in batches])[weights == 1]
    assert np.allclose(got, images[source.valid_indices] / 255.0)
    assert weights.sum() == 6


def test_npz_missing_keys_and_path(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pixels=np.zeros((4, 2, 2, 1)), targets=np.zeros(4, int))
    with pytest.raises(
        ValueError,
        match=r"must hold arrays 'images' and 'labels' \(or 'x' and 'y'\); "
        r"found keys \['pixels', 'targets'\]",
    ):
        make_source("npz", batch_size=2, seed=0, path=str(path))
    with pytest.raises(FileNotFoundError, match=r"data\.path '.*missing\.npz' does not exist"):
        make_source("npz", batch_size=2, seed=0, path=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match=r"needs data\.path"):
        make_source("npz", batch_size=2, seed=0)
