"""eval.gna_speedup: tile counts equal a brute-force count over the dense mask, perfectly block-sparse GNA reaches
the FLOP speedup, sliding windows do not, and the CLI writes JSON."""

import itertools
import json

import numpy as np
import pytest

from attn.core.neighborhood import neighborhood_mask
from eval.gna_speedup import gna_speedup, main


def brute_force(spatial, kernel, stride, dilation, causal, q_tile, kv_tile, tiling):
    """(attended pairs, visited tiles, fully attended tiles) by looping over every tile pair of the dense mask."""
    mask = neighborhood_mask(spatial, kernel, dilation, stride, causal)
    coords = list(itertools.product(*[range(n) for n in spatial]))
    if tiling == "single":
        q_ids = [i // int(np.prod(q_tile)) for i in range(len(coords))]
        kv_ids = [i // int(np.prod(kv_tile)) for i in range(len(coords))]
    else:  # a box per axis, inside one dilation group
        q_ids = [tuple((c[a] % dilation[a], c[a] // dilation[a] // q_tile[a]) for a in range(len(c))) for c in coords]
        kv_ids = [tuple((c[a] % dilation[a], c[a] // dilation[a] // kv_tile[a]) for a in range(len(c))) for c in coords]
    visited = full = 0
    for qt in set(q_ids):
        rows = [i for i, t in enumerate(q_ids) if t == qt]
        for kt in set(kv_ids):
            cols = [j for j, t in enumerate(kv_ids) if t == kt]
            block = mask[np.ix_(rows, cols)]
            visited += bool(block.any())
            full += bool(block.all())
    return int(mask.sum()), visited, full


@pytest.mark.parametrize("tiling", ["multi", "single"])
@pytest.mark.parametrize(
    "spatial, kernel, stride, dilation, causal, q_tile, kv_tile",
    [
        ((12, 10), (4, 3), (2, 1), (2, 1), (False, True), (2, 4), (3, 2)),
        ((9, 8), (5, 4), (5, 4), (1, 2), (True, False), (4, 2), (2, 3)),
        ((20,), 6, 3, 3, False, (4,), (5,)),
    ],
)
def test_counts_equal_brute_force(spatial, kernel, stride, dilation, causal, q_tile, kv_tile, tiling):
    dil = dilation if isinstance(dilation, tuple) else (dilation,)
    report = gna_speedup(spatial, kernel, stride, dil, causal, q_tile=q_tile, kv_tile=kv_tile, tiling=tiling)
    pairs, visited, full = brute_force(spatial, kernel, stride, dil, causal, q_tile, kv_tile, tiling)
    assert (report["attended_pairs"], report["visited_tiles"], report["fully_attended_tiles"]) == (pairs, visited, full)
    tokens = int(np.prod(spatial))
    assert report["flop_density"] == pytest.approx(pairs / tokens**2)


def test_block_sparse_gna_reaches_the_flop_speedup_and_sliding_windows_do_not():
    blocked = gna_speedup((32, 32), (8, 8), (8, 8), q_tile=(8, 8), kv_tile=(8, 8))
    assert blocked["fully_block_sparse"] and blocked["tile_utilization"] == 1.0
    assert blocked["tile_speedup"] == pytest.approx(blocked["flop_speedup"]) == pytest.approx(16.0)
    sliding = gna_speedup((32, 32), (8, 8), (1, 1), q_tile=(8, 8), kv_tile=(8, 8))
    assert sliding["flop_speedup"] == pytest.approx(16.0)
    assert not sliding["fully_block_sparse"] and sliding["tile_speedup"] < sliding["flop_speedup"]
    full = gna_speedup((8, 8), (8, 8))
    assert full["flop_speedup"] == 1.0 and full["tile_speedup"] == 1.0


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "gna.json"
    main(
        [
            "--spatial",
            "16,16",
            "--kernel",
            "4,4",
            "--stride",
            "1,1",
            "4,4",
            "--q-tile",
            "4,4",
            "--kv-tile",
            "4,4",
            "--output",
            str(path),
        ]
    )
    report = json.loads(path.read_text())
    assert [r["stride"] for r in report["results"]] == [[1, 1], [4, 4]]
    assert report["results"][1]["fully_block_sparse"] and json.loads(capsys.readouterr().out) == report


def test_bad_tile_is_rejected():
    with pytest.raises(ValueError, match=r"q_tile=\(4,\) must have 2 positive entries"):
        gna_speedup((8, 8), 3, q_tile=(4,))
