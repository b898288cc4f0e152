"""Analytical speedup model of Generalized Neighborhood Attention ("Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light", Hassani et al. 2025, catalog [125]): NATTEN Sim.

    python -m eval.gna_speedup --spatial 30,48,80 --kernel 18,24,24 --stride 1,1,1 16,8,8
        [--dilation 1,1,1] [--causal 0,0,0] [--q-tile 4,8,8] [--kv-tile 2,8,8] [--tiling multi|single]
        [--kv-tiling static|dynamic] [--output gna.json]

A fused attention kernel computes attention tile by tile: a Q tile of T_Q tokens against the KV tiles of T_KV
tokens it visits; a visited tile costs as much as a dense one (masking happens inside the tile). The paper's
simulator (Sec. 3.2 and App. B.1) "computes the coordinates of each KV tile visited by each Q tile" and, taking
"the worst case of all Q tiles (maximum number of KV tiles)", reports an upper bound on the speedup over self
attention that is more realistic than the FLOP-wise one. For a GNA pattern over N tokens this module reports

    FLOP-wise speedup   S_F = N^2 / sum_i |NB(i)| = 1 / (1 - sparsity)      (NA without causal: N / prod(kernel))
    simulated speedup   S_T = (KV tiles per Q tile in self attention) / max_q (KV tiles visited by Q tile q)
                              ("tile_speedup"; self attention visits ceil(n / T_KV) tiles per axis, product over
                              axes, or ceil(N / T_KV) with 1-D tiling)

plus, as extras, the mean-based ratio (dense tiles / visited tiles over all Q tiles, "mean_tile_speedup": what a
perfectly load-balanced schedule could reach) and the useful share of the computed FLOPs ("tile_utilization").
S_T <= S_F; the pattern is perfectly block-sparse when every visited tile is fully attended
("fully_block_sparse"), and then S_T = S_F when the tiles divide the extents.

Design choices the simulator considers (App. B.1, B.2):
  tiling     multi: multi-dimensional tiles (boxes of q_tile / kv_tile tokens per axis), realised by token
             permutation; with dilation each dilation group is made contiguous and tiled on its own. A Q tile
             visits, per axis, the range of KV tiles from the first one needed by its first query to the last
             one needed by its last query (B.2), so counts are exact products of per-axis counts.
             single: the flattened row-major sequence is cut into tiles of prod(q_tile) / prod(kv_tile) tokens
             (a plain 1-D FMHA kernel); a static tile is visited when any of its keys is attended.
  kv_tiling  static: fixed KV tiles, visited or skipped (the paper's Blackwell kernel; TMA needs it).
             dynamic: the KV region a Q tile needs is sliced out and tiled from its first key (FNA), so a
             Q tile visits ceil(extent / T_KV) tiles per axis (ceil(span / T_KV) with 1-D tiling). The paper:
             "under dynamic KV tiling, any setting in which T_KV evenly divides window size, and T_Q evenly
             divides stride" is perfectly block-sparse (non-causal).

Check against the paper (Fig. 3, HunyuanVideo): tokens 30 x 48 x 80, window 18 x 24 x 24, Q tile 4 x 8 x 8, KV
tile 2 x 8 x 8, static KV tiling: stride 1 (NA) is limited to 3.3x (here 900 / 275 = 3.27x) while larger strides
reach block sparsity at the FLOP-wise 11.1x (pinned in tests/eval/test_gna_speedup.py).

Default tiles are 128 tokens (Hopper-style FNA): (128,), (16, 8), (4, 4, 8) for 1-, 2- and 3-D layouts.
Writes JSON to stdout and, with --output, to that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from attn.core.neighborhood import neighborhood_key_indices, normalize_neighborhood_args, window_indices

DEFAULT_TILES = {1: (128,), 2: (16, 8), 3: (4, 4, 8)}
TILINGS = ("multi", "single")
KV_TILINGS = ("static", "dynamic")


def _axis_tiles(extent: int, tile: int, dilation: int) -> np.ndarray:
    """Tile id of each position along one axis when each dilation group is tiled on its own."""
    ids = np.empty(extent, np.int64)
    offset = 0
    for group in range(dilation):
        members = np.arange(group, extent, dilation)
        ids[members] = offset + np.arange(len(members)) // tile
        offset += -(-len(members) // tile)
    return ids


def _block_reduce(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(any, all) of a boolean [n, m] matrix over the blocks given by row and column tile ids."""
    num_rows, num_cols = rows.max() + 1, cols.max() + 1
    counts = np.zeros((num_rows, num_cols), np.int64)
    np.add.at(counts, (rows[:, None], cols[None, :]), mask.astype(np.int64))
    sizes = np.bincount(rows)[:, None] * np.bincount(cols)[None, :]
    return counts > 0, counts == sizes


def _tile_shape(name: str, tile: Sequence[int] | None, rank: int) -> tuple[int, ...]:
    tile = DEFAULT_TILES[rank] if tile is None else tuple(int(t) for t in tile)
    if len(tile) != rank or any(t < 1 for t in tile):
        raise ValueError(f"{name}={tile} must have {rank} positive entries (one per spatial axis)")
    return tile


def _axis_model(
    n: int, kernel: int, dilation: int, stride: int, causal: bool, t_q: int, t_kv: int, kv_tiling: str
) -> dict[str, Any]:
    """One axis under multi-dimensional tiling: per-Q-tile visited KV tiles and query counts, attended pairs,
    fully attended static tile pairs, and whether every visited tile is fully attended."""
    idx, ok = window_indices(n, kernel, dilation, stride, causal)
    mask = np.zeros((n, n), bool)
    np.put_along_axis(mask, idx, ok, axis=1)
    rows, cols = _axis_tiles(n, t_q, dilation), _axis_tiles(n, t_kv, dilation)
    visited, sizes = [], []
    perfect = True
    for tile in range(rows.max() + 1):
        block = mask[rows == tile]
        keys = np.nonzero(block.any(0))[0]  # one dilation group: contiguous in group-local coordinates
        if kv_tiling == "static":
            visited.append(int(cols[keys].max() - cols[keys].min() + 1))
        else:
            span = int((keys.max() - keys.min()) // dilation + 1)
            visited.append(-(-span // t_kv))
            perfect &= bool(block[:, keys].all()) and span % t_kv == 0
        sizes.append(block.shape[0])
    any_, all_ = _block_reduce(mask, rows, cols)
    if kv_tiling == "static":
        perfect = int(all_.sum()) == int(any_.sum())
    return {
        "visited": np.asarray(visited, np.int64),
        "sizes": np.asarray(sizes, np.int64),
        "pairs": int(mask.sum()),
        "full": int(all_.sum()),
        "perfect": perfect,
        "dense_kv": -(-n // t_kv),
        "dense_q": -(-n // t_q),
    }


def _single_model(
    spatial: tuple[int, ...], kernel, dil, strd, caus, t_q: int, t_kv: int, kv_tiling: str
) -> dict[str, Any]:
    """Single-dimensional tiling of the flattened layout: the same quantities, counted per Q tile."""
    tokens = math.prod(spatial)
    keys, valid = neighborhood_key_indices(spatial, kernel, dil, strd, caus)
    num_q, num_kv = -(-tokens // t_q), -(-tokens // t_kv)
    counts = np.zeros(num_q * num_kv, np.int64)
    chunk = max(t_q, (1 << 22) // keys.shape[1] // t_q * t_q)  # bounds the temporary pair arrays
    for start in range(0, tokens, chunk):
        k_chunk, v_chunk = keys[start : start + chunk], valid[start : start + chunk]
        q_ids = (np.arange(start, start + len(k_chunk)) // t_q)[:, None]
        counts += np.bincount((q_ids * num_kv + k_chunk // t_kv)[v_chunk], minlength=counts.size)
    counts = counts.reshape(num_q, num_kv)
    q_sizes = np.bincount(np.arange(tokens) // t_q)
    full_size = q_sizes[:, None] * np.bincount(np.arange(tokens) // t_kv)[None, :]
    bounds = np.arange(0, tokens, t_q)
    lo = np.minimum.reduceat(np.where(valid, keys, tokens).min(1), bounds)
    hi = np.maximum.reduceat(np.where(valid, keys, -1).max(1), bounds)
    pairs_per_tile = counts.sum(1)
    if kv_tiling == "static":
        visited = (counts > 0).sum(1)
        perfect = bool(((counts == 0) | (counts == full_size)).all())
    else:
        span = hi - lo + 1
        visited = -(-span // t_kv)
        perfect = bool(((pairs_per_tile == q_sizes * span) & (span % t_kv == 0)).all())
    return {
        "visited": visited.astype(np.int64),
        "sizes": q_sizes,
        "pairs": int(counts.sum()),
        "full": int((counts == full_size).sum()),
        "perfect": perfect,
        "dense_kv": num_kv,
        "dense_q": num_q,
    }


def gna_speedup(
    spatial_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    *,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    tiling: str = "multi",
    kv_tiling: str = "static",
) -> dict[str, Any]:
    """NATTEN Sim (module docstring) for one GNA configuration; returns a JSON-ready dict.

    Key results: "flop_speedup" (FLOP-wise bound), "tile_speedup" (the simulator's bound: dense KV tiles per Q tile
    over the worst Q tile's visited KV tiles), "mean_tile_speedup", "tile_utilization", "fully_block_sparse".
    """
    spatial = tuple(int(n) for n in spatial_shape)
    kernel, dil, strd, caus = normalize_neighborhood_args(spatial, kernel_size, dilation, stride, causal)
    rank = len(spatial)
    q_tile = _tile_shape("q_tile", q_tile, rank)
    kv_tile = _tile_shape("kv_tile", kv_tile, rank)
    if tiling not in TILINGS:
        raise ValueError(f"tiling={tiling!r} must be one of {TILINGS}")
    if kv_tiling not in KV_TILINGS:
        raise ValueError(f"kv_tiling={kv_tiling!r} must be one of {KV_TILINGS}")
    tokens = math.prod(spatial)

    if tiling == "multi":
        axes = [
            _axis_model(n, kernel[a], dil[a], strd[a], caus[a], q_tile[a], kv_tile[a], kv_tiling)
            for a, n in enumerate(spatial)
        ]
    else:
        axes = [_single_model(spatial, kernel, dil, strd, caus, math.prod(q_tile), math.prod(kv_tile), kv_tiling)]
    t_kv = [math.prod(kv_tile)] if tiling == "single" else list(kv_tile)
    # Patterns are products over axes, so per-Q-tile counts multiply: the worst Q tile is the product of the
    # per-axis worst tiles and totals are products of per-axis sums.
    pairs = math.prod(a["pairs"] for a in axes)
    worst = math.prod(int(a["visited"].max()) for a in axes)
    visited = math.prod(int(a["visited"].sum()) for a in axes)
    q_tiles = math.prod(len(a["visited"]) for a in axes)
    dense_kv = math.prod(a["dense_kv"] for a in axes)
    dense = dense_kv * math.prod(a["dense_q"] for a in axes)
    computed = math.prod(int((a["sizes"] * a["visited"]).sum()) * t for a, t in zip(axes, t_kv, strict=True))
    flop_density = pairs / tokens**2
    return {
        "spatial_shape": list(spatial),
        "kernel_size": list(kernel),
        "stride": list(strd),
        "dilation": list(dil),
        "causal": list(caus),
        "tiling": tiling,
        "kv_tiling": kv_tiling,
        "q_tile": list(q_tile),
        "kv_tile": list(kv_tile),
        "tokens": tokens,
        "attended_pairs": pairs,
        "flop_density": flop_density,
        "flop_speedup": 1.0 / flop_density,
        "q_tiles": q_tiles,
        "dense_kv_tiles_per_q_tile": dense_kv,
        "max_kv_tiles_per_q_tile": worst,
        "tile_speedup": dense_kv / worst,
        "dense_tiles": dense,
        "visited_tiles": visited,
        "mean_tile_speedup": dense / visited,
        "fully_attended_tiles": math.prod(a["full"] for a in axes) if kv_tiling == "static" else None,
        "tile_utilization": pairs / computed,
        "fully_block_sparse": all(a["perfect"] for a in axes),
    }


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers, e.g. 7,7") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `python -m eval.gna_speedup`; returns the report it prints (and writes)."""
    parser = argparse.ArgumentParser(prog="python -m eval.gna_speedup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spatial", type=_ints, required=True, help="token layout, e.g. 32,32")
    parser.add_argument("--kernel", type=_ints, required=True, help="window size per axis, e.g. 7,7")
    parser.add_argument("--stride", type=_ints, nargs="+", default=None, help="one or more strides, e.g. 1,1 7,7")
    parser.add_argument("--dilation", type=_ints, default=None, help="dilation per axis (default 1)")
    parser.add_argument("--causal", type=_ints, default=None, help="0/1 per axis (default 0)")
    parser.add_argument("--q-tile", type=_ints, default=None, help="Q tile shape per axis")
    parser.add_argument("--kv-tile", type=_ints, default=None, help="KV tile shape per axis")
    parser.add_argument("--tiling", choices=TILINGS, default="multi")
    parser.add_argument("--kv-tiling", choices=KV_TILINGS, default="static")
    parser.add_argument("--output", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)

    rank = len(args.spatial)
    strides = args.stride or [(1,) * rank]
    results = [
        gna_speedup(
            args.spatial,
            args.kernel,
            stride,
            args.dilation or 1,
            tuple(bool(c) for c in args.causal) if args.causal else False,
            q_tile=args.q_tile,
            kv_tile=args.kv_tile,
            tiling=args.tiling,
            kv_tiling=args.kv_tiling,
        )
        for stride in strides
    ]
    report = {
        "model": "NATTEN Sim: tile speedup = dense KV tiles per Q tile / max over Q tiles of visited KV tiles; "
        "FLOP speedup = N^2 / attended pairs",
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
