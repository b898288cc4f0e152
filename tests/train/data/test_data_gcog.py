"""The gCOG source: answers checked by an independent reader of the batch (the grid from the one-hot image, the tree
from the tokens), and the out-of-distribution splits disjoint from training as the paper defines them."""

from __future__ import annotations

import numpy as np
import pytest

from train.data import make_source
from train.data.gcog import WORDS

F = 10  # num_features
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "pink", "cyan", "brown"]
SHAPES = [chr(ord("a") + i) for i in range(F)]
BOOLEAN = {"exist", "sumeven", "sumodd", "producteven", "productodd"}
FAMILY_1 = {"exist", "sumeven", "producteven", "getshape"}
TREE_START = ({"exist", "sumeven", "producteven"}, {"sumodd", "productodd"})
TREE_END = ({"sumeven", "producteven", "getcolor", "getshape"}, {"exist", "sumodd", "productodd", "go"})


def read_grid(image: np.ndarray) -> dict[tuple[int, int], tuple[str, str]]:
    """{(row, col): (colour, shape)} of the cells that hold an object, from the one-hot image [10, 10, 2F]."""
    grid = {}
    for r in range(10):
        for c in range(10):
            colour, shape = image[r, c, :F], image[r, c, F:]
            if colour.sum() == 0:
                assert shape.sum() == 0
                continue
            assert colour.sum() == 1 and shape.sum() == 1
            grid[(r, c)] = (COLOURS[int(np.argmax(colour))], SHAPES[int(np.argmax(shape))])
    return grid


def read_tree(words: list[str]):
    """Parses the instruction words: an operator is (op, shape, colour); a condition is followed by "switch"."""

    def parse(pos: int):
        node = tuple(words[pos : pos + 3])
        pos += 3
        if pos < len(words) and words[pos] == "switch":
            if_true, pos = parse(pos + 1)
            if_false, pos = parse(pos)
            return ("if", node, if_true, if_false), pos
        return node, pos

    tree, end = parse(0)
    assert end == len(words)
    return tree


def answer(tree, grid) -> str:
    """The answer from the paper's operator definitions, by explicit search over the cells."""
    if tree[0] == "if":
        return answer(tree[2] if answer(tree[1], grid) == "true" else tree[3], grid)
    op, shape, colour = tree
    found = [
        (cell, obj)
        for cell, obj in grid.items()
        if (colour == "any" or obj[0] == colour) and (shape == "any" or obj[1] == shape)
    ]
    if op == "exist":
        return "true" if found else "false"
    assert len(found) == 1, f"{tree} must select exactly one object, found {found}"
    (r, c), (obj_colour, obj_shape) = found[0]
    if op == "go":
        return f"{r},{c}"
    if op == "getcolor":
        return obj_colour
    if op == "getshape":
        return obj_shape
    value = r + c if op.startswith("sum") else r * c
    return "true" if (value % 2 == 0) == op.endswith("even") else "false"


def rows(source, batches: int = 2):
    """(tree, grid, answer word, distractor-free object count, words) of the source's first rows."""
    out = []
    for step in range(batches):
        batch = source.batch_at(step)
        for i in range(len(batch["inputs"])):
            position = int(np.argmax(batch["weights"][i]))
            assert batch["weights"][i].sum() == 1
            words = [WORDS[t] for t in batch["inputs"][i, 1 : position + 1]]
            assert WORDS[batch["inputs"][i, 0]] == "<bos>" and not batch["inputs"][i, position + 1 :].any()
            np.testing.assert_array_equal(batch["targets"][i, :position], batch["inputs"][i, 1 : position + 1])
            out.append((read_tree(words), read_grid(batch["images"][i]), WORDS[batch["targets"][i, position]], words))
    return out


def operators(tree) -> list[tuple[str, str, str]]:
    if tree[0] == "if":
        return [tree[1], *operators(tree[2]), *operators(tree[3])]
    return [tree]


def depth(tree) -> int:
    return 1 if tree[0] != "if" else 2 + depth(tree[2])


def source(split="train", **options):
    return make_source("gcog", split=split, batch_size=32, seed=3, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"generalization": "all"},
        {"generalization": "all", "ood": True, "ood_test": "productive"},
        {"generalization": "all", "ood": True, "ood_test": "distractor", "test_distractors": 40},
        {"generalization": "productive", "ood": True, "test_depth": 7},
    ],
)
def test_answers_match_an_independent_reading_of_the_batch(options):
    split = "valid" if options.get("ood") else "train"
    found = rows(source(split, **options))
    for tree, grid, target, _ in found:
        assert answer(tree, grid) == target
    answers = [target for _, _, target, _ in found]
    assert 0.3 < answers.count("true") / max(1, answers.count("true") + answers.count("false")) < 0.7


def test_distractor_split_counts():
    def distractors(tree, grid, target):
        placed = 0 if tree[0] == "exist" and target == "false" else 1  # an exist answered false has no object
        return len(grid) - placed

    train = rows(source("train", generalization="distractor"), batches=3)
    test = rows(source("valid", generalization="distractor", ood=True, test_distractors=40))
    assert {depth(tree) for tree, *_ in train + test} == {1}
    assert {distractors(tree, grid, target) for tree, grid, target, _ in train} == {1, 2, 3, 4, 5}
    assert {distractors(tree, grid, target) for tree, grid, target, _ in test} == {40}


def test_systematic_split_holds_out_operator_object_instructions():
    def instructions(found):
        return {tuple(words) for _, _, _, words in found}

    train = rows(source("train", generalization="systematic"), batches=4)
    test = rows(source("valid", generalization="systematic", ood=True), batches=2)
    assert not instructions(train) & instructions(test)
    for found, held_out in ((train, False), (test, True)):
        for tree, _, _, _ in found:
            op, shape, colour = tree
            if op in FAMILY_1:  # family 1 trains on the first five colours
                assert (COLOURS.index(colour) < 5) != held_out
            else:  # family 2 trains on the last five shapes
                assert (SHAPES.index(shape) >= 5) != held_out


def test_systematic_tree_split_crosses_operator_families():
    def families(tree):
        conditions, leaves = {tree[1][0]}, {tree[2][0], tree[3][0]}
        start = [i for i in (0, 1) if conditions <= TREE_START[i]]
        end = [i for i in (0, 1) if leaves <= TREE_END[i]]
        return start, end

    train = rows(source("train", generalization="systematic_tree"), batches=3)
    test = rows(source("valid", generalization="systematic_tree", ood=True))
    deep = [tree for tree, *_ in train if depth(tree) == 3]
    assert deep and any(depth(tree) == 1 for tree, *_ in train)
    for tree in deep:
        start, end = families(tree)
        assert set(start) & set(end), f"training tree {tree} pairs families {start} and {end}"
    for tree, *_ in test:
        start, end = families(tree)
        assert depth(tree) == 3 and start and end and not set(start) & set(end)


def test_productive_split_is_deeper_than_training():
    train = rows(source("train", generalization="productive"), batches=3)
    test = rows(source("valid", generalization="productive", ood=True, test_depth=5))
    assert {depth(tree) for tree, *_ in train} == {1, 3}
    assert {depth(tree) for tree, *_ in test} == {5}


def test_options_are_checked():
    with pytest.raises(ValueError, match="generalization"):
        source(generalization="lengthwise")
    with pytest.raises(ValueError, match="test_depth"):
        source(test_depth=4)
    with pytest.raises(ValueError, match="ood=True"):
        source("train", ood=True)
    with pytest.raises(ValueError, match="ood_test"):
        source("valid", ood=True, ood_test="iid")
