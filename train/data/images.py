"""Image classification data for vision models: a procedural spatial-relation task and user `.npz` files.

Batch keys of both sources (B = per-process batch):
  images  float32 [B, H, W, C] in [0, 1]
  labels  int32 [B]
  weights float32 [B]   1, or 0 on the padding rows of the last valid batch of an npz source
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_fraction, check_int
from .text import eval_batch_count

RED = np.array([0.85, 0.1, 0.1], dtype=np.float32)
BLUE = np.array([0.1, 0.1, 0.85], dtype=np.float32)
# Distractor colours: each is far from pure red and pure blue, but several share a channel with them,
# so no single colour channel separates targets from distractors.
DISTRACTOR_COLORS = np.array(
    [[0.1, 0.8, 0.1], [0.9, 0.9, 0.1], [0.1, 0.8, 0.9], [0.8, 0.1, 0.8], [0.9, 0.9, 0.9]], dtype=np.float32
)
_COLOR_JITTER = 0.1


def relation_label(red_yx: np.ndarray, blue_yx: np.ndarray, num_classes: int) -> np.ndarray:
    """The class of each (red, blue) pair of positions int [B, 2] (row, column of the top-left corner).

    bit 0 = the blue square is right of the red one; bit 1 (only when num_classes == 4) = the blue square
    is below the red one. Returns int32 [B] in [0, num_classes).
    """
    right = blue_yx[:, 1] > red_yx[:, 1]
    below = blue_yx[:, 0] > red_yx[:, 0]
    label = right.astype(np.int32)
    if num_classes == 4:
        label = label + 2 * below.astype(np.int32)
    return label


def _separated_pair(rng: np.random.Generator, batch: int, positions: int, gap: int) -> np.ndarray:
    """Pairs of coordinates in [0, positions) at least `gap` apart, uniform over such pairs: [batch, 2]."""
    pair = rng.integers(0, positions, size=(batch, 2))
    while True:
        close = np.abs(pair[:, 0] - pair[:, 1]) < gap
        if not close.any():
            return pair
        pair[close] = rng.integers(0, positions, size=(int(close.sum()), 2))


def sample_relation_geometry(
    rng: np.random.Generator, batch: int, image_size: int, square_size: int, num_classes: int
) -> dict[str, np.ndarray]:
    """Draws labels uniformly, then red and blue square positions consistent with them.

    The two squares are at least `square_size` apart along each axis that decides the label, so they
    never overlap and the relation is never ambiguous. Returns {"labels" int32 [B], "red" int [B, 2],
    "blue" int [B, 2]} with positions as (row, column) of the top-left corner.
    """
    positions = image_size - square_size + 1
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    xs = np.sort(_separated_pair(rng, batch, positions, square_size), axis=1)
    right = (labels & 1).astype(bool)
    red_x = np.where(right, xs[:, 0], xs[:, 1])
    blue_x = np.where(right, xs[:, 1], xs[:, 0])
    if num_classes == 4:
        ys = np.sort(_separated_pair(rng, batch, positions, square_size), axis=1)
        below = (labels & 2).astype(bool)
        red_y = np.where(below, ys[:, 0], ys[:, 1])
        blue_y = np.where(below, ys[:, 1], ys[:, 0])
    else:
        red_y, blue_y = rng.integers(0, positions, size=(2, batch))
    return {"labels": labels, "red": np.stack([red_y, red_x], 1), "blue": np.stack([blue_y, blue_x], 1)}


def _paint(images: np.ndarray, corner: np.ndarray, size: int, color: np.ndarray) -> None:
    """Paints in place a size x size square at corner int [B, 2], color float [B, 3], into [B, H, W, 3]."""
    offsets = np.arange(size)
    rows = (corner[:, :1] + offsets)[:, :, None]  # [B, s, 1]
    cols = (corner[:, 1:] + offsets)[:, None, :]  # [B, 1, s]
    images[np.arange(len(images))[:, None, None], rows, cols] = color[:, None, None, :]


def render_relation_images(
    rng: np.random.Generator,
    geometry: dict[str, np.ndarray],
    image_size: int,
    square_size: int,
    num_distractors: int,
    noise_std: float,
    *,
    target_colors: tuple[np.ndarray, np.ndarray] | None = None,
    distractor_colors: np.ndarray = DISTRACTOR_COLORS,
) -> np.ndarray:
    """Renders float32 [B, image_size, image_size, 3] images in [0, 1] for `sample_relation_geometry` output.

    A grey background of random brightness in [0.05, 0.45], `num_distractors` squares of `distractor_colors`
    [N, 3] at random places, then the two target squares on top at geometry["red"] and geometry["blue"]
    (colours RED and BLUE, or `target_colors`, two float [B, 3] arrays; jittered by +-0.1 per channel), then
    Gaussian pixel noise of std `noise_std`, clipped to [0, 1].
    """
    batch = len(geometry["labels"])
    positions = image_size - square_size + 1
    background = rng.uniform(0.05, 0.45, size=(batch, 1, 1, 1)).astype(np.float32)
    images = np.broadcast_to(background, (batch, image_size, image_size, 3)).copy()
    for _ in range(num_distractors):
        corner = rng.integers(0, positions, size=(batch, 2))
        color = distractor_colors[rng.integers(0, len(distractor_colors), size=batch)]
        _paint(images, corner, square_size, color)
    bases = (RED, BLUE) if target_colors is None else target_colors
    for name, base in zip(("red", "blue"), bases, strict=True):
        color = base + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=(batch, 3)).astype(np.float32)
        _paint(images, geometry[name], square_size, color)
    if noise_std > 0:
        images += np.float32(noise_std) * rng.standard_normal(size=images.shape, dtype=np.float32)
    return np.clip(images, 0.0, 1.0, out=images)


class RelationImageSource(DataSource):
    """Where is the blue square relative to the red one? A task that needs attention between far patches.

    Each image holds a red and a blue square (side `square_size`, default image_size // 8, at least 2)
    plus `num_distractors` squares of other colours and pixel noise. The label depends only on the
    relative position of the two targets (see `relation_label`): num_classes=4 -> quadrant
    (bit 0 right-of, bit 1 below), num_classes=2 -> right-of only. Labels are drawn uniformly, so classes
    are balanced. Neither square alone fixes the label; a model must relate two distant patches.
    Endless stream; split="valid" uses a random stream disjoint from "train".
    """

    name: ClassVar[str] = "images"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "image_size": 32,
        "num_classes": 4,
        "square_size": None,
        "num_distractors": 4,
        "noise_std": 0.1,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        image_size, num_classes, square_size, num_distractors, noise_std = (
            options["image_size"],
            options["num_classes"],
            options["square_size"],
            options["num_distractors"],
            options["noise_std"],
        )
        self.image_size = check_int("image_size", image_size, 8)
        if num_classes not in (2, 4):
            raise ValueError(f"num_classes must be 2 (left/right) or 4 (quadrant), got {num_classes!r}")
        self.num_classes = num_classes
        default_size = max(2, self.image_size // 8)
        self.square_size = check_int("square_size", default_size if square_size is None else square_size, 1)
        if 4 * self.square_size > self.image_size:
            raise ValueError(
                f"square_size={self.square_size} is too large for image_size={self.image_size}: "
                f"need square_size <= image_size // 4 = {self.image_size // 4}"
            )
        self.num_distractors = check_int("num_distractors", num_distractors, 0)
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.channels = 3

    @property
    def element_spec(self) -> ElementSpec:
        b, s = self.batch_size, self.image_size
        return {
            "images": ((b, s, s, 3), np.dtype(np.float32)),
            "labels": ((b,), np.dtype(np.int32)),
            "weights": ((b,), np.dtype(np.float32)),
        }

    def sample(self, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(batch, geometry) from `rng`; the geometry (square positions) lets tests check the labels."""
        geometry = sample_relation_geometry(
            rng, self.global_batch_size, self.image_size, self.square_size, self.num_classes
        )
        images = render_relation_images(
            rng, geometry, self.image_size, self.square_size, self.num_distractors, self.noise_std
        )
        batch = {
            "images": images,
            "labels": geometry["labels"],
            "weights": np.ones(self.global_batch_size, np.float32),
        }
        return batch, geometry

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        return self.sample(rng)[0]


# The npz train/valid split must not move when the training seed changes, so it has its own fixed seed.
_NPZ_SPLIT_SEED = 20240531


@functools.lru_cache(maxsize=4)
def _load_npz(resolved: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(resolved):  # np.load would try it as a pickle and say "contains pickled data"
        with open(resolved, "rb") as f:
            head = f.read(16)
        raise ValueError(
            f"data.path {resolved!r} is not an .npz archive (it starts with {head!r}); write one with "
            "numpy.savez(path, images=[N, H, W, C], labels=[N])"
        )
    with np.load(resolved, allow_pickle=False) as archive:
        keys = sorted(archive.files)
        if not keys:
            raise ValueError(
                f"data.path {resolved!r} is an empty .npz (no arrays); expected 'images' [N, H, W, C] and 'labels' [N]"
            )
        for image_key, label_key in (("images", "labels"), ("x", "y")):
            if image_key in archive.files and label_key in archive.files:
                images, labels = archive[image_key], archive[label_key]
                break
        else:
            raise ValueError(
                f"data.path {resolved!r} must hold arrays 'images' and 'labels' (or 'x' and 'y'); found keys {keys}"
            )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images in {resolved!r} must be [N, H, W, C] or [N, H, W], got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels in {resolved!r} must be integer [N] with N={len(images)}, got {labels.dtype} {labels.shape}"
        )
    if not len(labels):
        raise ValueError(f"data.path {resolved!r} holds 0 examples; need at least 2 (one to train, one to validate)")
    if labels.min() < 0:
        raise ValueError(f"labels in {resolved!r} must be >= 0, got min {labels.min()}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Loads (cached per file version) images [N, H, W, C] (any dtype) and labels [N] from an `.npz`."""
    resolved = Path(os.path.expanduser(os.fspath(path))).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"data.path {os.fspath(path)!r} does not exist or is not a file")
    return _load_npz(str(resolved), resolved.stat().st_mtime_ns)


class NpzImageSource(DataSource):
    """Image classification from a user `.npz` file with `images` [N, H, W, C] and `labels` [N] (or x/y).

    uint8 images are scaled to [0, 1]; other dtypes are cast to float32 unchanged. A fixed permutation
    (independent of `seed`) puts round(valid_fraction * N) examples (at least one) in the valid split.
    split="train": endless shuffled epochs; the order of epoch e is `default_rng([seed, e])`'s
    permutation, and global batch i takes the next global_batch_size examples of the concatenated epochs
    (this process takes its slice of them). split="valid": a finite walk over the valid examples in
    order, the last batch padded with weight-0 rows. `num_classes` is max(label) + 1, or the `num_classes` option
    (every label must be below it). `image_size`, when set, must equal the images' height and width, so a config
    written for the procedural `images` source (which sets both) runs on a file with `--config.data.name=npz
    --config.data.path=<file>.npz` and refuses one of another size or class count in one line.
    """

    name: ClassVar[str] = "npz"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "path": None,
        "valid_fraction": 0.1,
        "num_batches": None,
        "image_size": None,
        "num_classes": None,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        split = self.split
        path, valid_fraction, num_batches, image_size, num_classes = (
            options["path"],
            options["valid_fraction"],
            options["num_batches"],
            options["image_size"],
            options["num_classes"],
        )
        if path is None:
            raise ValueError("the npz data source needs data.path, the .npz file with images and labels")
        valid_fraction = check_fraction("valid_fraction", valid_fraction)
        self._images, self._labels = load_npz(path)
        total = len(self._labels)
        num_valid = max(1, int(round(valid_fraction * total)))
        if total - num_valid < 1:
            raise ValueError(f"data.path {os.fspath(path)!r} has {total} examples; need at least 2 to split")
        order = np.random.default_rng(_NPZ_SPLIT_SEED).permutation(total)
        self.valid_indices = np.sort(order[:num_valid])
        self.train_indices = np.sort(order[num_valid:])
        self._indices = self.train_indices if split == "train" else self.valid_indices
        self._orders: dict[int, np.ndarray] = {}
        self.num_classes = int(self._labels.max()) + 1
        self.image_shape = tuple(int(n) for n in self._images.shape[1:])
        if num_classes is not None:
            num_classes = check_int("data.num_classes", num_classes, 1)
            if self.num_classes > num_classes:
                raise ValueError(
                    f"data.path {os.fspath(path)!r} has labels up to {self.num_classes - 1}, but data.num_classes="
                    f"{num_classes}; set --config.data.num_classes={self.num_classes} "
                    f"--config.model.num_classes={self.num_classes}"
                )
            self.num_classes = num_classes
        if image_size is not None:
            image_size = check_int("data.image_size", image_size, 1)
            height, width = self.image_shape[:2]
            if (height, width) != (image_size, image_size):
                raise ValueError(
                    f"data.path {os.fspath(path)!r} holds {height}x{width} images, but data.image_size={image_size}; "
                    + (f"set --config.data.image_size={height}" if height == width else "use square images")
                )
        if split == "valid":
            self.num_batches = eval_batch_count(len(self._indices), self.global_batch_size, num_batches)

    @property
    def element_spec(self) -> ElementSpec:
        b = self.batch_size
        return {
            "images": ((b, *self.image_shape), np.dtype(np.float32)),
            "labels": ((b,), np.dtype(np.int32)),
            "weights": ((b,), np.dtype(np.float32)),
        }

    def _epoch_order(self, epoch: int) -> np.ndarray:
        # Consecutive batches mostly share an epoch; keep the last two orders instead of redrawing.
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self._indices))
        return self._orders[epoch]

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        count = len(self._indices)
        position = step * self.global_batch_size + np.arange(self.global_batch_size)
        if self.split == "train":
            epochs, offsets = np.divmod(position, count)
            rows = np.empty(self.global_batch_size, dtype=np.int64)
            for epoch in np.unique(epochs):
                here = epochs == epoch
                rows[here] = self._epoch_order(int(epoch))[offsets[here]]
            real = np.ones(self.global_batch_size, dtype=bool)
        else:
            real = position < count
            rows = np.where(real, position, 0)
        examples = self._indices[rows]
        images = self._images[examples]
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        images = np.where(real[:, None, None, None], images, 0).astype(np.float32)
        labels = np.where(real, self._labels[examples], 0).astype(np.int32)
        return {"images": images, "labels": labels, "weights": real.astype(np.float32)}
