"""Interleaved A/B of F.block_sparse_attention's XLA forward: the attn/core/block_sparse.py of a git commit against
the working tree, at the benchmark-1 shape (batch 1, 4 heads, head_dim 64, block 128, random distinct key blocks per
(head, query block), float32), wall ms per call and the fraction of the 1/density bound of each (time with every
block kept / time x density; the slot list must include all blocks). Calls alternate between the two versions, so a
shared machine's load hits both alike.

    PYTHONPATH=. python benchmarks/block_sparse_ab.py fdcf622 8192 3,6,64 4 benchmarks/results/block_sparse_ab_cpu.json
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import attn.core.block_sparse as current
from eval.machine import load_average, machine_record


def baseline_module(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:attn/core/block_sparse.py"], check=True, capture_output=True, text=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="block_sparse_ab_"), "block_sparse_baseline.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("block_sparse_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def forward(module, indices, block):
    return lambda q, k, v: module.block_sparse_attention(q, k, v, block_indices=indices, block_size=block)


def measure(baseline, length: int, slots: list[int], reps: int) -> list[dict]:
    batch, heads, dim, block = 1, 4, 64, 128
    blocks = length // block
    if blocks not in slots:
        raise ValueError(f"slots={slots} must include {blocks} (every block: the 100% reference)")
    rng = np.random.default_rng(0)
    q, k, v = (jax.device_put(rng.standard_normal((batch, length, heads, dim), dtype=np.float32)) for _ in range(3))
    rows = []
    for s in slots:
        picks = [rng.permutation(blocks)[:s] for _ in range(heads * blocks)]
        idx = jnp.asarray(np.asarray(picks, np.int32).reshape(1, heads, blocks, s))
        fns = {name: jax.jit(forward(m, idx, block)) for name, m in (("baseline", baseline), ("current", current))}
        outs = {name: fn(q, k, v) for name, fn in fns.items()}
        assert float(jnp.max(jnp.abs(outs["baseline"] - outs["current"]))) < 1e-5
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[name].append(1e3 * (time.perf_counter() - start))
        rows.append({"slots": s, "density": s / blocks, **{f"{n}_ms": t for n, t in times.items()}})
    full = next(r for r in rows if r["slots"] == blocks)
    for r in rows:
        for name in ("baseline", "current"):
            for stat, fn in (("min", min), ("median", statistics.median)):
                r[f"{name}_fraction_{stat}"] = fn(full[f"{name}_ms"]) / fn(r[f"{name}_ms"]) * r["density"]
    return rows


if __name__ == "__main__":
    commit, length, reps, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[4]), sys.argv[5]
    slots = [int(s) for s in sys.argv[3].split(",")]
    load = load_average()
    rows = measure(baseline_module(commit), length, slots, reps)
    report = {"machine": machine_record(), "load_before": load, "load_after": load_average(), "seq_len": length,
              "baseline_commit": commit, "command": "PYTHONPATH=. python benchmarks/block_sparse_ab.py "
              + " ".join(sys.argv[1:]), "records": rows}  # fmt: skip
    old = json.load(open(path)) if os.path.exists(path) else {"runs": []}
    old["runs"].append(report)
    json.dump(old, open(path, "w"), indent=1)
    for r in rows:
        print(length, r["slots"], {k: round(v, 2) for k, v in r.items() if "fraction" in k})
