"""eval.bench suites `flashbias` and `lightning`: a --quick run writes valid JSON (and a PNG) with the whole grid;
the cases compared compute what they claim. Fields only: timings are never asserted."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from attn.core import positions as pos
from attn.softmax.flashbias import alibi_factors
from eval import bench, bench_flashbias, bench_lightning


def _quick(suite, tmp_path):
    report = bench.main(["--suite", suite, "--quick", "--warmup", "0", "--repeats", "1", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / f"{suite}_{report['platform']}.json").read_text())
    assert saved["suite"] == suite and saved["settings"]["quick"] and len(saved["load_average"]["before"]) == 3
    assert (tmp_path / f"{suite}_{report['platform']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return saved


def test_flashbias_quick_grid(tmp_path, capsys):
    saved = _quick("flashbias", tmp_path)
    grid = {(r["seq_len"], r["case"], r["passes"]): r for r in saved["records"]}
    lengths = bench_flashbias.QUICK_LENGTHS
    assert set(grid) == {(n, c, p) for n in lengths for c in bench_flashbias.CASES for p in bench_flashbias.PASSES}
    heads = bench_flashbias.HEADS
    for (n, case, passes), r in grid.items():
        assert r["status"] == "ok" and r["shapes"][0] == [1, n, heads, 64] and r["dtype"] == "float32"
        assert r["bias_bytes"] == {"no_bias": 0, "dense_bias": 4 * heads * n * n, "flashbias_rank2": 16 * n}[case]
        qk = 64 + (2 if case == "flashbias_rank2" else 0)
        assert r["flops"] == pytest.approx((3 if passes == "fwd+bwd" else 1) * 2 * heads * n * n * (qk + 64))
        assert r["peak_memory_bytes"] > 0 and r["time_vs_dense"] > 0
    assert all(grid[(n, "dense_bias", p)]["time_vs_dense"] == 1.0 for n in lengths for p in bench_flashbias.PASSES)
    # the dense bias is an input: its H T^2 floats are in the footprint, the factors' 4 T are not
    dense, factored = grid[(128, "dense_bias", "fwd")], grid[(128, "flashbias_rank2", "fwd")]
    assert dense["compiled_memory_bytes"] - factored["compiled_memory_bytes"] > 0.5 * dense["bias_bytes"]
    assert "| 128 | fwd+bwd | flashbias_rank2 |" in capsys.readouterr().out


def test_flashbias_cases_compute_the_same_attention():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 8, 64), dtype=np.float32)) for _ in range(3))
    idx = jnp.arange(32)
    dense = bench_flashbias._dense(q, k, v, pos.alibi_bias(8, idx, idx))
    factored = bench_flashbias._factored(q, k, v, *alibi_factors(8, idx, idx))
    np.testing.assert_allclose(np.asarray(factored), np.asarray(dense), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(dense), np.asarray(bench_flashbias._no_bias(q, k, v)), atol=1e-3)


def test_lightning_quick_grid(tmp_path, capsys):
    saved = _quick("lightning", tmp_path)
    names = ("lightning_chunk64", "softmax")
    grid = {(r["seq_len"], r["name"]): r for r in saved["records"]}
    assert set(grid) == {(n, name) for n in bench_lightning.QUICK_LENGTHS for name in names}
    for (n, name), r in grid.items():
        assert r["status"] == "ok" and r["passes"] == "fwd+bwd" and r["shapes"] == [[1, n, 8, 64]] * 3
        assert r["ms_per_1k_tokens"] == pytest.approx(r["median_ms"] * 1024 / n)
        expected = bench_lightning.linear_flops(n, 64) if name != "softmax" else bench_lightning.softmax_flops(n)
        assert r["flops"] == expected
        assert (r["softmax_time_over_this"] is None) == (name == "softmax")
    assert "lightning faster than softmax from T =" in capsys.readouterr().out


def test_lightning_crossover_is_the_start_of_the_last_faster_run():
    def rec(n, ratio):
        return {"seq_len": n, "name": "lightning_chunk64", "softmax_time_over_this": ratio}

    assert bench_lightning.crossover([rec(1, 0.5), rec(2, 1.5), rec(4, 0.9), rec(8, 2.0), rec(16, 3.0)]) == 8
    assert bench_lightning.crossover([rec(1, 1.2), rec(2, 1.5)]) == 1
    assert bench_lightning.crossover([rec(1, 0.5), rec(2, 0.7)]) is None
    assert bench_lightning.crossover([rec(1, 0.5), {"seq_len": 2, "softmax_time_over_this": None}]) is None
