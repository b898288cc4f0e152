"""eval.gna_speedup (NATTEN Sim of [125]): per-Q-tile KV tile counts equal a brute-force count over the dense mask,
the paper's HunyuanVideo numbers (Fig. 3) are reproduced, perfectly block-sparse GNA reaches the FLOP-wise speedup
and sliding windows do not, the paper's dynamic-tiling rule holds, and the CLI writes JSON."""

import itertools
import json

import numpy as np
import pytest

from attn.core.neighborhood import neighborhood_mask
from eval.gna_speedup import gna_speedup, main


def brute_force(spatial, kernel, stride, dilation, causal, q_tile, kv_tile, tiling, kv_tiling):
    """(attended pairs, visited KV tiles per Q tile) by looping over the Q tiles of the dense mask."""
    mask = neighborhood_mask(spatial, kernel, dilation, stride, causal)
    coords = list(itertools.product(*[range(n) for n in spatial]))
    if tiling == "single":
        tq, tkv = int(np.prod(q_tile)), int(np.prod(kv_tile))
        q_ids = [i // tq for i in range(len(coords))]
        kv_ids = [i // tkv for i in range(len(coords))]
    else:  # a box per axis, inside one dilation group
        q_ids = [tuple((c[a] % dilation[a], c[a] // dilation[a] // q_tile[a]) for a in range(len(c))) for c in coords]
        kv_ids = [tuple((c[a] % dilation[a], c[a] // dilation[a] // kv_tile[a]) for a in range(len(c))) for c in coords]
    visited = []
    for qt in sorted(set(q_ids)):
        rows = [i for i, t in enumerate(q_ids) if t == qt]
        keys = np.nonzero(mask[rows].any(0))[0]
        if kv_tiling == "static":  # static tiles holding at least one attended key
            visited.append(len({kv_ids[j] for j in keys}))
        elif tiling == "single":  # the 1-D region [first key, last key] tiled from its start
            visited.append(-(-(keys.max() - keys.min() + 1) // int(np.prod(kv_tile))))
        else:  # the bounding box of the keys, in dilation-group coordinates, tiled from its corner
            local = np.array([[coords[j][a] // dilation[a] for a in range(len(spatial))] for j in keys])
            spans = local.max(0) - local.min(0) + 1
            visited.append(int(np.prod(-(-spans // np.array(kv_tile)))))
    return int(mask.sum()), np.array(visited)


@pytest.mark.parametrize("kv_tiling", ["static", "dynamic"])
@pytest.mark.parametrize("tiling", ["multi", "single"])
@pytest.mark.parametrize(
    "spatial, kernel, stride, dilation, causal, q_tile, kv_tile",
    [
        ((12, 10), (4, 3), (2, 1), (2, 1), (False, True), (2, 4), (3, 2)),
        ((9, 8), (5, 4), (5, 4), (1, 2), (True, False), (4, 2), (2, 3)),
        ((20,), 6, 3, 3, False, (4,), (5,)),
    ],
)
def test_counts_equal_brute_force(spatial, kernel, stride, dilation, causal, q_tile, kv_tile, tiling, kv_tiling):
    dil = dilation if isinstance(dilation, tuple) else (dilation,)
    report = gna_speedup(
        spatial, kernel, stride, dil, causal, q_tile=q_tile, kv_tile=kv_tile, tiling=tiling, kv_tiling=kv_tiling
    )
    pairs, visited = brute_force(spatial, kernel, stride, dil, causal, q_tile, kv_tile, tiling, kv_tiling)
    assert report["attended_pairs"] == pairs and report["q_tiles"] == len(visited)
    assert report["max_kv_tiles_per_q_tile"] == visited.max() and report["visited_tiles"] == visited.sum()
    tokens = int(np.prod(spatial))
    assert report["flop_speedup"] == pytest.approx(tokens**2 / pairs)
    assert report["tile_speedup"] == pytest.approx(report["dense_kv_tiles_per_q_tile"] / visited.max())
    assert report["tile_speedup"] <= report["flop_speedup"] + 1e-9


def test_reproduces_the_papers_hunyuanvideo_simulation():
    """Fig. 3 of [125]: 30x48x80 tokens, window 18x24x24, Q tile 4x8x8, KV tile 2x8x8: NA (stride 1) "is limited by
    a 3.3x speedup", larger strides reach block sparsity at 11.1x, "equivalent to FLOP-wise speedup"."""
    setting = dict(spatial_shape=(30, 48, 80), kernel_size=(18, 24, 24), q_tile=(4, 8, 8), kv_tile=(2, 8, 8))
    na = gna_speedup(stride=1, **setting)
    assert na["flop_speedup"] == pytest.approx(11.11, abs=0.01)
    assert round(na["tile_speedup"], 1) == 3.3 and not na["fully_block_sparse"]
    # the mean over Q tiles would overstate it: the bound is set by the worst Q tile
    assert na["mean_tile_speedup"] > 5.0
    blocked = gna_speedup(stride=(16, 8, 8), **setting)
    assert blocked["fully_block_sparse"] and blocked["tile_utilization"] == 1.0
    assert blocked["tile_speedup"] == pytest.approx(blocked["flop_speedup"]) == pytest.approx(11.11, abs=0.01)


def test_dynamic_kv_tiling_rule_of_the_paper():
    """ "Under dynamic KV tiling, any setting in which T_KV evenly divides window size, and T_Q evenly divides stride"
    is perfectly block-sparse; static tiling needs the windows aligned to the KV tiles as well."""
    setting = dict(spatial_shape=(30, 48, 80), kernel_size=(18, 24, 24), q_tile=(4, 8, 8), kv_tile=(2, 8, 8))
    dynamic = gna_speedup(stride=(4, 8, 8), kv_tiling="dynamic", **setting)
    assert dynamic["fully_block_sparse"] and dynamic["tile_speedup"] == pytest.approx(dynamic["flop_speedup"])
    static = gna_speedup(stride=(4, 8, 8), **setting)
    assert not static["fully_block_sparse"] and static["tile_speedup"] < dynamic["tile_speedup"]
    sliding = gna_speedup(stride=1, kv_tiling="dynamic", **setting)
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
            "--kv-tiling",
            "dynamic",
            "--output",
            str(path),
        ]
    )
    report = json.loads(path.read_text())
    assert [r["stride"] for r in report["results"]] == [[1, 1], [4, 4]]
    assert report["results"][1]["fully_block_sparse"] and report["results"][1]["kv_tiling"] == "dynamic"
    assert json.loads(capsys.readouterr().out) == report


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"q_tile=\(4,\) must have 2 positive entries"):
        gna_speedup((8, 8), 3, q_tile=(4,))
    with pytest.raises(ValueError, match=r"kv_tiling='lazy' must be one of \('static', 'dynamic'\)"):
        gna_speedup((8, 8), 3, kv_tiling="lazy")
