"""Analytical speedup model of Generalized Neighborhood Attention ("Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light", catalog [125]; NATTEN Sim).

    python -m eval.gna_speedup --spatial 32,32 --kernel 7,7 --stride 1,1 4,4 7,7 [--dilation 1,1]
        [--causal 0,0] [--q-tile 16,8] [--kv-tile 16,8] [--tiling multi|single] [--output gna.json]

A fused attention kernel computes attention tile by tile: a Q tile of T_Q tokens against a KV tile of T_KV
tokens. A sparse pattern saves time only through the tiles it skips, and every tile it visits costs as much as
a dense one (masking happens inside the tile). For a GNA pattern over N tokens the model reports

    FLOP density       rho_F = (sum_i |NB(i)|) / N^2                   fraction of the attention matrix used
    FLOP speedup       S_F   = 1 / rho_F                               (the FLOP reduction; for NA without
                                                                        causal masking S_F = N / prod(kernel))
    tile density       rho_T = visited tiles / dense tiles             dense tiles = (#Q tiles) (#KV tiles)
    tile speedup       S_T   = 1 / rho_T                               the realistic upper bound on speedup
    tile utilisation   U     = rho_F N^2 / (visited tiles T_Q T_KV)    useful share of the FLOPs computed

where a (Q tile, KV tile) pair is visited when at least one of its (query, key) pairs is attended, and every
visited tile costs a full T_Q x T_KV tile (partial border tiles included). S_T <= S_F
always; they are equal exactly when the pattern is perfectly block-sparse (every visited tile is fully
attended, `fully_block_sparse`), which is what GNA's stride buys: e.g. stride = kernel = the Q tile shape.

Tilings ([125], "the curse of multi-dimensionality"):
  multi   multi-dimensional tiles: tokens are permuted so that each tile is a box of q_tile (kv_tile) tokens per
          axis; with dilation, each dilation group is permuted to be contiguous and tiled on its own (NATTEN's
          token permutation), so tiles never mix groups. The pattern is a product over axes, so tile counts are
          exact products of per-axis counts.
  single  the flattened row-major sequence is cut into tiles of prod(q_tile) and prod(kv_tile) tokens (what a
          plain 1-D FMHA kernel with a mask does); counted exactly per query tile.

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
) -> dict[str, Any]:
    """The analytical model of the module docstring for one GNA configuration; returns a JSON-ready dict."""
    spatial = tuple(int(n) for n in spatial_shape)
    kernel, dil, strd, caus = normalize_neighborhood_args(spatial, kernel_size, dilation, stride, causal)
    rank = len(spatial)
    q_tile = _tile_shape("q_tile", q_tile, rank)
    kv_tile = _tile_shape("kv_tile", kv_tile, rank)
    if tiling not in TILINGS:
        raise ValueError(f"tiling={tiling!r} must be one of {TILINGS}")
    tokens = math.prod(spatial)

    if tiling == "multi":
        pairs, visited, full, dense = 1, 1, 1, 1
        for axis, n in enumerate(spatial):
            idx, ok = window_indices(n, kernel[axis], dil[axis], strd[axis], caus[axis])
            mask = np.zeros((n, n), bool)
            np.put_along_axis(mask, idx, ok, axis=1)
            rows = _axis_tiles(n, q_tile[axis], dil[axis])
            cols = _axis_tiles(n, kv_tile[axis], dil[axis])
            any_, all_ = _block_reduce(mask, rows, cols)
            pairs *= int(mask.sum())
            visited *= int(any_.sum())
            full *= int(all_.sum())
            # Dense attention tiles the axis without the dilation permutation.
            dense *= -(-n // q_tile[axis]) * -(-n // kv_tile[axis])
    else:
        tq, tkv = math.prod(q_tile), math.prod(kv_tile)
        keys, valid = neighborhood_key_indices(spatial, kernel, dil, strd, caus)
        num_q, num_kv = -(-tokens // tq), -(-tokens // tkv)
        counts = np.zeros(num_q * num_kv, np.int64)
        chunk = max(tq, (1 << 22) // keys.shape[1] // tq * tq)  # bounds the temporary pair arrays
        for start in range(0, tokens, chunk):
            k_chunk, v_chunk = keys[start : start + chunk], valid[start : start + chunk]
            q_ids = (np.arange(start, start + len(k_chunk)) // tq)[:, None]
            ids = q_ids * num_kv + k_chunk // tkv
            counts += np.bincount(ids[v_chunk], minlength=counts.size)
        sizes = np.bincount(np.arange(tokens) // tq)[:, None] * np.bincount(np.arange(tokens) // tkv)[None, :]
        pairs = int(counts.sum())
        visited = int((counts > 0).sum())
        full = int((counts == sizes.reshape(-1)).sum())
        dense = num_q * num_kv

    flop_density = pairs / tokens**2
    tile_density = visited / dense
    computed = visited * math.prod(q_tile) * math.prod(kv_tile)
    return {
        "spatial_shape": list(spatial),
        "kernel_size": list(kernel),
        "stride": list(strd),
        "dilation": list(dil),
        "causal": list(caus),
        "tiling": tiling,
        "q_tile": list(q_tile),
        "kv_tile": list(kv_tile),
        "tokens": tokens,
        "attended_pairs": pairs,
        "flop_density": flop_density,
        "flop_speedup": 1.0 / flop_density,
        "dense_tiles": dense,
        "visited_tiles": visited,
        "fully_attended_tiles": full,
        "tile_density": tile_density,
        "tile_speedup": 1.0 / tile_density,
        "tile_utilization": pairs / computed,
        "fully_block_sparse": full == visited,
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
        )
        for stride in strides
    ]
    report = {
        "model": "tile speedup = dense tiles / visited tiles; FLOP speedup = N^2 / attended pairs",
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
