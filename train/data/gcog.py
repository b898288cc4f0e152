"""gCOG ([47], Generic COG; Ito et al., ICLR 2024): multimodal question answering about objects on a grid, with splits
for distractor, systematic compositional and productive compositional generalisation.

A stimulus is a 10 x 10 grid; each cell is empty or holds one object with a colour and a shape (the first
`num_features` of the paper's 10 colours and 26 letter shapes; the official demos use 10 of each). It is given as an
"image" of categorical tokens, one per cell: float32 [B, 10, 10, C + S], the one-hot colour then the one-hot shape of
the cell's object (all zero when empty), so a ViT with patch_size=1 sees the paper's 100 stimulus tokens.

The instruction is a task tree. Operators on one object, named by its shape and colour (gCOG's 8 task operators):
    exist        does the (shape, colour) object exist?                            -> true / false
    go           where is the (shape, colour) object?                              -> a location token (row, column)
    getcolor     the colour of the object of this shape (the colour is not named)  -> a colour
    getshape     the shape of the object of this colour (the shape is not named)   -> a shape
    sumeven, sumodd, producteven, productodd   is row + column (row * column) of the object's location even (odd)?
A tree of depth 1 is one operator; depth d (odd) is "if <condition> then <tree of depth d-2> else <tree of depth d-2>"
with a boolean condition (exist, sum*, product*), built like the official TaskGraph: every condition of the tree is
drawn from the starting operators, every leaf from the ending operators, and every object of the tree is on the grid
whichever branch is taken (except those an "exist" answers false for).

Tokens (`WORDS[i]` is token i): 0 padding, 1 start, "any" (the attribute a get operator asks for), "switch",
the 8 operators, the colours, the shapes, "true", "false", the 100 locations "r,c". The tree is written in the
official topological order (a condition, then "switch", then the true branch, then the false branch); each operator
is 3 tokens: operator, shape (or "any"), colour (or "any"):

    inputs   BOS <tree tokens> pad ...                          int32 [B, L]   (L = 1 + tokens of the deepest tree)
    targets  <tree tokens> <answer> pad ...                     int32 [B, L]
    weights  1 at the answer position (the last tree token), 0 elsewhere   float32 [B, L]
    images   float32 [B, 10, 10, num_features (colours) + num_features (shapes)]

Generalisation tests (option `generalization`; the "train" split yields its training distribution; "valid" yields the
in-distribution test with ood=False and the out-of-distribution test with ood=True; `ood_test` picks which test in
"all"):
  distractor       (paper Fig. 3, official demo): depth-1 tasks, 1-5 distractors in training (the paper's text and the
                   demo's comment; the official sampler draws 0-5); OOD: exactly `test_distractors` (10/20/30/40).
  systematic       (Fig. 4a, official OperatorSystematicity): operator family 1 (exist, sumeven, producteven, getshape)
                   and family 2 (sumodd, productodd, go, getcolor); family 1 trains on objects of the first half of the
                   colours and is tested on the second half, family 2 trains on the second half of the shapes and is
                   tested on the first half. (Official subsets: all shapes x first-half colours vs second-half shapes x
                   all colours, which overlap; splitting each family along one attribute is the reconstruction that
                   keeps every held-out operator-object instruction out of training while training still sees every
                   answer.)
  systematic_tree  (Fig. 4d, official CompTreeDatasetSubset): depth-1 tasks plus depth-3 trees whose conditions and
                   leaves come from the same family (starting 1 = exist, sumeven, producteven with ending 1 = sumeven,
                   producteven, getcolor, getshape; starting 2 = sumodd, productodd with ending 2 = exist, sumodd,
                   productodd, go); OOD: depth-3 trees pairing starting 1 with ending 2 and starting 2 with ending 1.
  productive       (Fig. 5): depth 1 and 3 in training, OOD: depth `test_depth` (5 or 7), all operators.
  all              one training distribution for all four tests (so one run measures them all; reconstructed): the
                   systematic object split on depth 1, family-matched depth-3 trees; OOD tests: distractor (depth-1
                   training tasks with `test_distractors`), systematic (swapped depth 1), systematic_tree
                   (cross-family depth 3), productive (family-matched depth `test_depth`).
Every tree has one object per operator (the official trees draw one or two for sum*/product*; one here). Objects of a
tree have distinct (colour, shape) pairs; a getcolor's shape and a getshape's colour belong to no other object on the
grid; distractors take the colours and shapes left free that way and never the (colour, shape) of a tree object, as
the official generator's available-distractor lists ensure; exist and the parity operators are true half the time.
"""

from __future__ import annotations

import string
from typing import Any, ClassVar

import numpy as np

from .base import DataSource, ElementSpec, check_int

GRID = 10
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "pink", "cyan", "brown")
SHAPES = tuple(string.ascii_lowercase)
OPERATORS = ("exist", "go", "getcolor", "getshape", "sumeven", "sumodd", "producteven", "productodd")
STARTING = ("exist", "sumeven", "sumodd", "producteven", "productodd")  # boolean: conditions of a switch
PARITY = {
    "sumeven": (np.add, 0),
    "sumodd": (np.add, 1),
    "producteven": (np.multiply, 0),
    "productodd": (np.multiply, 1),
}
FAMILY_OPERATORS = (("exist", "sumeven", "producteven", "getshape"), ("sumodd", "productodd", "go", "getcolor"))
TREE_STARTING = (("exist", "sumeven", "producteven"), ("sumodd", "productodd"))
TREE_ENDING = (("sumeven", "producteven", "getcolor", "getshape"), ("exist", "sumodd", "productodd", "go"))
GENERALIZATIONS = ("distractor", "systematic", "systematic_tree", "productive", "all")
OOD_TESTS = ("distractor", "systematic", "systematic_tree", "productive")
# How each generalisation test was built, and what it was checked against (paper: arXiv 2401.15030; official code:
# github.com/IBM/gcog, gcog/task/{config,task_generator,task_operators,dataset_generator}.py and its demos).
REFERENCE = "Ito et al. 2024, arXiv 2401.15030 (sections 3-4, Figs. 3-5); github.com/IBM/gcog (task/, demos/)"
FIDELITY = {
    "distractor": "paper",  # depth 1 (official CompTreeDataset), 1-5 distractors in training, 10-40 at test
    "systematic": "reconstructed",  # OperatorSystematicity's families and attribute halves, overlap removed
    "systematic_tree": "official-code",  # CompTreeDatasetSubset's starting/ending operator families
    "productive": "paper",  # depths 1 and 3 in training, 5 or 7 at test
    "all": "reconstructed",  # one training distribution for the four tests
}
LOCATIONS = tuple(f"{r},{c}" for r in range(GRID) for c in range(GRID))
WORDS = ("<pad>", "<bos>", "any", "switch", *OPERATORS, *COLORS, *SHAPES, "true", "false", *LOCATIONS)
TOKEN = {word: index for index, word in enumerate(WORDS)}


def tree_tokens(depth: int) -> int:
    """Instruction tokens of a tree of odd `depth`: 3 per operator (2^((d+1)/2) - 1 of them) plus one per switch."""
    operators = 2 ** ((depth + 1) // 2) - 1
    return 3 * operators + operators // 2


def operators_in(tree: Any) -> list[dict[str, Any]]:
    """The operator nodes of `tree` (a node dict, or ("switch", condition, if_true, if_false)) in token order."""
    if isinstance(tree, tuple):
        return [tree[1], *operators_in(tree[2]), *operators_in(tree[3])]
    return [tree]


def evaluate(tree: Any, grid: np.ndarray) -> str:
    """The answer word of `tree` on `grid` int [10, 10, 2] ((colour, shape) indices, -1 where the cell is empty)."""
    if isinstance(tree, tuple):
        return evaluate(tree[2] if evaluate(tree[1], grid) == "true" else tree[3], grid)
    op, colour, shape = tree["op"], tree["color"], tree["shape"]
    match = np.ones(grid.shape[:2], bool) if colour is None else grid[..., 0] == colour
    match &= np.ones(grid.shape[:2], bool) if shape is None else grid[..., 1] == shape
    cells = np.argwhere(match)
    if op == "exist":
        return "true" if len(cells) else "false"
    if len(cells) != 1:
        raise ValueError(f"operator {op!r} selects {len(cells)} objects; the generator must place exactly one")
    (r, c), (colour_found, shape_found) = cells[0], grid[tuple(cells[0])]
    if op == "go":
        return f"{r},{c}"
    if op == "getcolor":
        return COLORS[colour_found]
    if op == "getshape":
        return SHAPES[shape_found]
    combine, parity = PARITY[op]
    return "true" if combine(r, c) % 2 == parity else "false"


def tree_words(tree: Any) -> list[str]:
    """The instruction words of `tree` in token order (condition, "switch", true branch, false branch)."""
    if isinstance(tree, tuple):
        return [*tree_words(tree[1]), "switch", *tree_words(tree[2]), *tree_words(tree[3])]
    shape = "any" if tree["shape"] is None else SHAPES[tree["shape"]]
    colour = "any" if tree["color"] is None else COLORS[tree["color"]]
    return [tree["op"], shape, colour]


class GCOGSource(DataSource):
    """gCOG question answering (see the module docstring)."""

    name: ClassVar[str] = "gcog"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "generalization": "all",
        "ood": False,
        "ood_test": "distractor",
        "num_features": 10,
        "max_distractors": 5,
        "test_distractors": 40,
        "test_depth": 5,
    }

    def _configure(self, seq_len: int | None, options: dict[str, Any]) -> None:
        if options["generalization"] not in GENERALIZATIONS:
            raise ValueError(f"generalization must be one of {GENERALIZATIONS}, got {options['generalization']!r}")
        if options["ood_test"] not in OOD_TESTS:
            raise ValueError(f"ood_test must be one of {OOD_TESTS}, got {options['ood_test']!r}")
        if not isinstance(options["ood"], bool):
            raise ValueError(f"ood must be a bool, got {options['ood']!r}")
        if options["ood"] and self.split == "train":
            raise ValueError("ood=True is a test distribution: use it with split='valid', got split='train'")
        self.generalization = options["generalization"]
        self.ood = options["ood"]
        self.ood_test = self.generalization if self.generalization != "all" else options["ood_test"]
        self.num_features = check_int("num_features", options["num_features"], 4)
        if self.num_features > len(COLORS):
            raise ValueError(f"num_features must be <= {len(COLORS)} (the colours), got {self.num_features}")
        self.max_distractors = check_int("max_distractors", options["max_distractors"], 1)
        self.test_distractors = check_int("test_distractors", options["test_distractors"], 0)
        self.test_depth = check_int("test_depth", options["test_depth"], 5)
        if self.test_depth not in (5, 7):
            raise ValueError(f"test_depth must be 5 or 7 (odd depths beyond training's 3), got {self.test_depth}")
        if self.test_distractors + 2 ** ((self.test_depth + 1) // 2) - 1 > GRID * GRID:
            raise ValueError(f"test_distractors={self.test_distractors} leave no room on the {GRID}x{GRID} grid")
        # Every split of one configuration has the same shapes: room for the deepest tree any of its tests uses.
        deepest = self.test_depth if self.generalization in ("productive", "all") else 3
        if self.generalization in ("distractor", "systematic"):
            deepest = 1
        self.question_length = 1 + tree_tokens(deepest)
        self.vocab_size = len(WORDS)

    @property
    def element_spec(self) -> ElementSpec:
        b, t, f = self.batch_size, self.question_length, self.num_features
        return {
            "images": ((b, GRID, GRID, 2 * f), np.dtype(np.float32)),
            "inputs": ((b, t), np.dtype(np.int32)),
            "targets": ((b, t), np.dtype(np.int32)),
            "weights": ((b, t), np.dtype(np.float32)),
        }

    # --- what a row is drawn from -----------------------------------------------------------------
    def row_plan(self, rng: np.random.Generator) -> dict[str, Any]:
        """The distribution of one row: {"depth", "starting", "ending" (operator tuples), "object_split" (None or
        "train"/"test": the systematic colour/shape halves), "distractors" (a count)}."""
        test = self.ood_test if self.ood else None
        gen = self.generalization
        few = int(rng.integers(1, self.max_distractors + 1))
        plan = {"depth": 1, "starting": STARTING, "ending": OPERATORS, "object_split": None, "distractors": few}
        split_objects = gen == "systematic" or (gen == "all" and test in (None, "distractor", "systematic"))
        if split_objects:
            plan["object_split"] = "test" if test == "systematic" else "train"
        if test == "distractor":
            plan["distractors"] = self.test_distractors
        deep = gen in ("systematic_tree", "productive", "all") and test not in ("distractor", "systematic")
        if deep and (test is not None or rng.random() < 0.5):
            plan["depth"] = self.test_depth if test == "productive" else 3
            family = int(rng.integers(0, 2))
            if gen != "productive":  # family-matched trees; the systematic_tree test crosses the families
                ending = 1 - family if test == "systematic_tree" else family
                plan["starting"], plan["ending"] = TREE_STARTING[family], TREE_ENDING[ending]
            plan["object_split"] = None
        return plan

    def sample_tree(self, rng: np.random.Generator, plan: dict[str, Any]) -> Any:
        """A task tree of plan["depth"] with its operators drawn from the plan's families (attributes unset)."""

        def build(depth: int) -> Any:
            if depth == 1:
                return {"op": str(rng.choice(plan["ending"]))}
            condition = {"op": str(rng.choice(plan["starting"]))}
            return ("switch", condition, build(depth - 2), build(depth - 2))

        return build(plan["depth"])

    def _allowed(self, op: str, object_split: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Colours and shapes an object of `op` may take under the systematic split (all of them without it)."""
        colours, shapes = np.arange(self.num_features), np.arange(self.num_features)
        if object_split is None:
            return colours, shapes
        half = self.num_features // 2
        first_half = (object_split == "train") == (op in FAMILY_OPERATORS[0])  # family 1 trains on first colours
        if op in FAMILY_OPERATORS[0]:
            return (colours[:half] if first_half else colours[half:]), shapes
        return colours, (shapes[half:] if not first_half else shapes[:half])

    def sample_row(self, rng: np.random.Generator) -> tuple[Any, np.ndarray, str]:
        """(tree, grid int [10, 10, 2] of (colour, shape) indices or -1, answer word) of one row."""
        for _ in range(100):  # attribute constraints can dead-end on deep trees; resample the row
            row = self._try_row(rng)
            if row is not None:
                return row
        raise RuntimeError("could not place a gCOG row in 100 tries; lower test_distractors or test_depth")

    def _try_row(self, rng: np.random.Generator) -> tuple[Any, np.ndarray, str] | None:
        plan = self.row_plan(rng)
        tree = self.sample_tree(rng, plan)
        nodes = operators_in(tree)
        grid = np.full((GRID, GRID, 2), -1, np.int64)
        pairs: set[tuple[int, int]] = set()
        own_colours: set[int] = set()  # colours a getshape asks about: no other object may carry them
        own_shapes: set[int] = set()
        for node in nodes:
            colours, shapes = self._allowed(node["op"], plan["object_split"])
            used_colours = {c for c, _ in pairs}
            used_shapes = {s for _, s in pairs}
            colours = [
                c for c in colours if c not in own_colours and (node["op"] != "getshape" or c not in used_colours)
            ]
            shapes = [s for s in shapes if s not in own_shapes and (node["op"] != "getcolor" or s not in used_shapes)]
            options = [(c, s) for c in colours for s in shapes if (c, s) not in pairs]
            if not options:
                return None
            colour, shape = options[int(rng.integers(len(options)))]
            pairs.add((colour, shape))
            if node["op"] == "getshape":
                own_colours.add(colour)
            if node["op"] == "getcolor":
                own_shapes.add(shape)
            node["color"] = None if node["op"] == "getcolor" else colour
            node["shape"] = None if node["op"] == "getshape" else shape
            free = np.argwhere(grid[..., 0] < 0)
            if node["op"] == "exist" and rng.random() < 0.5:
                continue  # this object is absent: "exist" answers false
            if node["op"] in PARITY:  # true or false with probability 1/2, as the official generator forces
                combine, parity = PARITY[node["op"]]
                want = parity if rng.random() < 0.5 else 1 - parity
                free = free[combine(free[:, 0], free[:, 1]) % 2 == want]
            if not len(free):
                return None
            grid[tuple(free[int(rng.integers(len(free)))])] = (colour, shape)
        colours = [c for c in range(self.num_features) if c not in own_colours]
        shapes = [s for s in range(self.num_features) if s not in own_shapes]
        options = [(c, s) for c in colours for s in shapes if (c, s) not in pairs]
        free = np.argwhere(grid[..., 0] < 0)
        if plan["distractors"] > len(free) or (plan["distractors"] and not options):
            return None
        cells = free[rng.permutation(len(free))[: plan["distractors"]]]
        for cell in cells:
            grid[tuple(cell)] = options[int(rng.integers(len(options)))]
        return tree, grid, evaluate(tree, grid)

    def _make_batch(self, rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
        b, t, f = self.global_batch_size, self.question_length, self.num_features
        images = np.zeros((b, GRID, GRID, 2 * f), np.float32)
        inputs = np.zeros((b, t), np.int32)
        targets = np.zeros((b, t), np.int32)
        weights = np.zeros((b, t), np.float32)
        for i in range(b):
            tree, grid, answer = self.sample_row(rng)
            rows, cols = np.nonzero(grid[..., 0] >= 0)
            images[i, rows, cols, grid[rows, cols, 0]] = 1.0
            images[i, rows, cols, f + grid[rows, cols, 1]] = 1.0
            words = tree_words(tree)
            tokens = [TOKEN["<bos>"], *(TOKEN[w] for w in words)]
            inputs[i, : len(tokens)] = tokens
            targets[i, : len(words)] = tokens[1:]
            targets[i, len(words)] = TOKEN[answer]
            weights[i, len(words)] = 1.0
        return {"images": images, "inputs": inputs, "targets": targets, "weights": weights}
