"""Where the time of F.block_sparse_attention's XLA forward goes at few kept slots: per-op wall time from a
jax.profiler (perfetto) trace of the compiled program, split into ops run once per call (outside the slot scan) and
ops run once per slot (inside it), at the benchmark-1 shape (batch 1, 4 heads, head_dim 64, block 128, random
distinct key blocks per (head, query block), float32).

    PYTHONPATH=. python benchmarks/block_sparse_profile.py 8192 3,6,64 3 \
        benchmarks/results/block_sparse_profile_cpu.json
"""

import collections
import glob
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from attn import functional as F
from eval.machine import load_average, machine_record

HOST_EVENTS = ("ThunkExecutor", "$", "while")  # executor/python frames and the loop itself (its ops are counted)


def profile(length: int, slots: list[int], reps: int) -> list[dict]:
    batch, heads, dim, block = 1, 4, 64, 128
    blocks = length // block
    rng = np.random.default_rng(0)
    q, k, v = (jax.device_put(rng.standard_normal((batch, length, heads, dim), dtype=np.float32)) for _ in range(3))
    rows = []
    for s in slots:
        picks = [rng.permutation(blocks)[:s] for _ in range(heads * blocks)]
        indices = jnp.asarray(np.asarray(picks, np.int32).reshape(1, heads, blocks, s))
        fn = jax.jit(lambda q, k, v, i=indices: F.block_sparse_attention(q, k, v, block_indices=i, block_size=block))
        jax.block_until_ready(fn(q, k, v))
        cpu = []
        for _ in range(reps):
            start = time.process_time()
            jax.block_until_ready(fn(q, k, v))
            cpu.append(1e3 * (time.process_time() - start))
        folder = tempfile.mkdtemp(prefix="h2_trace_")
        start = time.perf_counter()
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(q, k, v))
        wall = 1e3 * (time.perf_counter() - start) / reps
        events = json.load(gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
        shutil.rmtree(folder)
        total, count = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("ph") == "X" and not e["name"].startswith(HOST_EVENTS):
                total[e["name"]] += e.get("dur", 0) / 1e3 / reps
                count[e["name"]] += 1
        ops = {n: {"ms_per_call": round(t, 3), "runs_per_call": count[n] / reps} for n, t in total.most_common()}
        once = sum(o["ms_per_call"] for o in ops.values() if o["runs_per_call"] == 1)
        per_slot = sum(o["ms_per_call"] for o in ops.values() if o["runs_per_call"] == s) if s > 1 else None
        rows.append(
            dict(seq_len=length, slots=s, density=s / blocks, traced_wall_ms_per_call=wall,
                 cpu_ms_median=statistics.median(cpu), ops_once_ms=once,
                 ops_per_slot_ms=None if per_slot is None else per_slot / s, ops=ops)
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    length, reps, path = int(sys.argv[1]), int(sys.argv[3]), sys.argv[4]
    slots = [int(s) for s in sys.argv[2].split(",")]
    load = load_average()
    rows = profile(length, slots, reps)
    report = {"machine": machine_record(), "load_before": load, "load_after": load_average(),
              "command": "PYTHONPATH=. python benchmarks/block_sparse_profile.py " + " ".join(sys.argv[1:]),
              "records": rows}  # fmt: skip
    old = json.load(open(path)) if os.path.exists(path) else {"runs": []}
    old["runs"].append(report)
    json.dump(old, open(path, "w"), indent=1)
    for r in rows:
        print(r["seq_len"], r["slots"], round(r["cpu_ms_median"], 1), round(r["traced_wall_ms_per_call"], 1),
              round(r["ops_once_ms"], 1), r["ops_per_slot_ms"] and round(r["ops_per_slot_ms"], 1))  # fmt: skip
        for n, o in list(r["ops"].items())[:12]:
            print("   ", n, o)
