"""eval.bench suite `kernels`: the --quick grid on CPU writes valid JSON (every case recorded, the ones that cannot
run skipped with their reason), failures become skipped records, the wrappers compute the same attention, and the
table and targets render from a GPU-like record set. Fields only: timings are never asserted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import bench, bench_kernels

SOFTMAX = ("flash", "cudnn", "xla", "jax_pallas")


def test_quick_grid_writes_json_with_every_case(tmp_path, capsys):
    argv = ["--suite", "kernels", "--quick", "--warmup", "0", "--repeats", "1", "--output-dir", str(tmp_path)]
    report = bench.main(argv)
    assert report["platform"] == "cpu"
    saved = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert saved["suite"] == "kernels" and saved["settings"]["quick"] and saved["jaxlib_version"]
    assert (tmp_path / "kernels_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = {(r["name"], r["direction"], r["causal"], r["seq_len"]): r for r in saved["records"]}
    lengths = bench_kernels.QUICK_LENGTHS
    expected = {(n, d, c, t) for n in SOFTMAX for d in bench_kernels.DIRECTIONS for c in (False, True) for t in lengths}
    expected |= {("lightning", "fwd+bwd", True, t) for t in lengths}
    assert set(grid) == expected and len(saved["records"]) == len(expected)
    for (name, direction, causal, length), r in grid.items():
        if name in ("cudnn", "jax_pallas"):
            assert r["status"] == "skipped" and "platform is cpu" in r["reason"] and r["median_ms"] is None
            assert ("cuDNN" if name == "cudnn" else "Pallas") in r["reason"]
            continue
        assert r["status"] == "ok", r.get("reason")
        assert r["dtype"] == "float32" and r["interpret"] == (name != "xla")
        assert r["shapes"] == [[1, length, 2, 64]] * (3 if direction == "fwd" else 4)
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["memory_bytes"] > 0 and r["peak_memory_exact"]
        assert r["ms_per_1k_tokens"] == pytest.approx(r["median_ms"] * 1024 / length)
        assert r["time_vs_cudnn"] is None  # no cuDNN on CPU
        if name == "lightning":
            assert r["chunk_size"] == 64 and r["flops"] == 3 * 4 * 2 * length * (64 * 64 + 64 * 64)
        else:
            assert r["flops"] == 4 * 2 * length**2 * 64 / (2 if causal else 1) * (3.5 if direction == "fwd+bwd" else 1)
    printed = capsys.readouterr().out
    assert "| 256 | yes |" in printed and "[1] cuDNN attention needs an NVIDIA GPU; platform is cpu" in printed
    assert "flash forward >= 0.9x cuDNN's speed from 4K: not measured" in printed


def test_failing_and_oversized_cases_are_skipped_with_the_reason():
    x = jnp.ones((1, 16, 2, 8), jnp.float32)

    def broken(q, k, v):
        raise ValueError("no kernel for this shape\nsecond line")

    record = bench_kernels.measure_record(
        bench.Bench(warmup=0, repeats=1), "flash", broken, (x, x, x), flops=1.0, seq_len=16
    )
    assert record["status"] == "skipped" and record["reason"] == "ValueError: no kernel for this shape"
    assert record["seq_len"] == 16 and record["median_ms"] is None
    tiny = bench.Bench(warmup=0, repeats=1, memory_limit_bytes=1)
    record = bench_kernels.measure_record(tiny, "xla", bench_kernels._dot_product(False, "xla"), (x, x, x), flops=1.0)
    assert record["status"] == "skipped" and "exceeds the memory limit" in record["reason"]


def test_unavailable_reasons_by_platform():
    assert "cuDNN" in bench_kernels.unavailable("cudnn", platform="tpu", quick=False)
    assert bench_kernels.unavailable("cudnn", platform="gpu", quick=False) is None
    assert bench_kernels.unavailable("jax_pallas", platform="tpu", quick=False) is None
    assert "interpret" in bench_kernels.unavailable("lightning", platform="cpu", quick=False)
    assert bench_kernels.unavailable("flash", platform="cpu", quick=True) is None


def test_wrappers_compute_the_same_attention_and_gradients():
    # the JAX Pallas GPU op runs interpreted here: checks its scale (its default is 1.0) and layout for the GPU run
    q, k, v, d_out = bench_kernels._inputs(jax.random.key(0), (1, 64, 2, 32), jnp.float32)
    reference = jax.jit(bench_kernels.fwd_bwd(bench_kernels._dot_product(True, "xla")))(q, k, v, d_out)
    wrong_scale = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    for attend in (bench_kernels._flash(True, True), bench_kernels._jax_pallas(True, "cpu", interpret=True)):
        out, grads = jax.jit(bench_kernels.fwd_bwd(attend))(q, k, v, d_out)
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference[0]), atol=2e-5, rtol=2e-5)
        for got, want in zip(grads, reference[1], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=4e-5, rtol=4e-5)
        assert not np.allclose(np.asarray(out), np.asarray(wrong_scale), atol=1e-3)


def test_flop_counts_and_bad_direction():
    assert bench_kernels.attention_flops(4, 16, 1024, 128, causal=False, direction="fwd") == 4 * 4 * 16 * 1024**2 * 128
    full = bench_kernels.attention_flops(4, 16, 1024, 128, causal=False, direction="fwd+bwd")
    assert bench_kernels.attention_flops(4, 16, 1024, 128, causal=True, direction="fwd+bwd") == full / 2
    assert bench_kernels.lightning_flops(1, 1, 128, 64, 64, direction="fwd") == 4 * 128 * (64 * 64 + 64 * 64)
    with pytest.raises(ValueError, match=r"direction='bwd'; expected one of \('fwd', 'fwd\+bwd'\)"):
        bench_kernels.attention_flops(1, 1, 8, 8, causal=False, direction="bwd")


def _record(name, direction, causal, length, ms):
    if ms is None:
        return {"name": name, "direction": direction, "causal": causal, "seq_len": length, "status": "skipped",
                "reason": "RESOURCE_EXHAUSTED: out of memory", "median_ms": None, "tflops": None}  # fmt: skip
    return {"name": name, "direction": direction, "causal": causal, "seq_len": length, "status": "ok",
            "median_ms": ms, "tflops": 100.0, "memory_bytes": 3 * 2**30, "ms_per_1k_tokens": ms * 1024 / length}  # fmt: skip


def test_targets_and_table_from_a_gpu_like_report():
    records = []
    for n in (2048, 4096, 8192):
        scale = (n / 2048) ** 2
        for d in bench_kernels.DIRECTIONS:
            for c in (False, True):
                cudnn = scale * (1.0 if d == "fwd" else 3.0)
                flash = cudnn / 0.95 if d == "fwd" else cudnn * (1.4 if n < 8192 else 1.6)
                records += [_record("cudnn", d, c, n, cudnn), _record("flash", d, c, n, flash)]
                records.append(_record("xla", d, c, n, None if n == 8192 else 4 * cudnn))
        records.append(_record("lightning", "fwd+bwd", True, n, n / 2048 * (5.0 if n == 2048 else 1.0)))
    result = bench_kernels.targets(records)
    by_length = {row["seq_len"]: row for row in result["rows"]}
    assert by_length[4096]["flash_fwd_speed_vs_cudnn"] == pytest.approx(0.95)
    assert by_length[8192]["flash_causal_fwd_bwd_time_vs_cudnn"] == pytest.approx(1.6)
    assert by_length[2048]["lightning_time_vs_flash"] == pytest.approx(5.0 / (3.0 * 1.4))
    assert result["flash_fwd_at_least_0.9_of_cudnn_from_4k"] is True
    assert result["flash_causal_fwd_bwd_within_1.5x_cudnn"] is False  # 1.6x at 8K
    assert result["lightning_faster_than_flash_from_4k"] is True  # slower at 2K only, which the target excludes
    assert result["lightning_per_token_spread_from_4k"] == pytest.approx(1.0)
    text = bench_kernels.table(records)
    assert "| 8192 | yes | " in text and "skipped [1]" in text and "[1] RESOURCE_EXHAUSTED: out of memory" in text
    assert "| 4096 | 0.95 | 0.95 | 1.40 |" in text and "3 GiB" in text
    assert "flash causal fwd+bwd <= 1.5x cuDNN's time: NOT met" in text
    assert "lightning time per token from 4K, largest / smallest: 1.00x (flat)" in text
