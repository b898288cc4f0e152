"""eval.bench: the suite registry, the measuring harness (records, skips) and the neighborhood suite's JSON and
PNG on a tiny grid. Fields only: timings are never asserted."""

import json

import jax.numpy as jnp
import pytest

from eval import bench


def test_neighborhood_suite_writes_json_and_png(tmp_path, capsys):
    report = bench.main(
        ["--suite", "neighborhood", "--quick", "--warmup", "0", "--repeats", "2", "--output-dir", str(tmp_path)]
    )
    path = tmp_path / f"neighborhood_{report['platform']}.json"
    assert report["json_path"] == str(path)
    saved = json.loads(path.read_text())
    for key in ("suite", "platform", "device", "jax_version", "memory_source", "settings", "records", "created"):
        assert saved[key] not in (None, ""), key
    assert saved["suite"] == "neighborhood" and saved["settings"]["repeats"] == 2 and saved["settings"]["quick"]
    assert ("memory_analysis" in saved["memory_source"]) == (saved["platform"] == "cpu")
    by_case = {(r["image_size"], r["name"]): r for r in saved["records"]}
    assert set(by_case) == {(s, n) for s in (8, 16) for n in ("full", "neighborhood_7x7", "neighborhood_13x13")}
    skipped = by_case[(8, "neighborhood_13x13")]
    assert skipped["status"] == "skipped" and "kernel_size 13 > image side 8" in skipped["reason"]
    for (side, name), r in by_case.items():
        if r["status"] != "ok":
            continue
        tokens = side * side
        keys = tokens if name == "full" else r["kernel_size"] ** 2
        assert r["shapes"] == [[1, side, side, 4, 32]] * 3 and r["dtype"] == "float32"
        assert r["flops"] == 4 * 4 * tokens * keys * 32
        assert r["flop_reduction_bound"] == pytest.approx(tokens / keys)
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["tflops"] > 0
        assert r["peak_memory_bytes"] > 0 and r["speedup_vs_full"] > 0
    png = tmp_path / f"neighborhood_{report['platform']}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| 16x16 | 256 | neighborhood_13x13 |" in printed and "FLOP-reduction bound" in printed
    assert len(saved["load_average"]["before"]) == 3 and saved["cpu_count"] >= 1
    # a saved report re-renders (table and PNG) without running anything
    png.unlink()
    assert bench.main(["--from-json", str(path)])["records"] == saved["records"]
    assert png.exists() and "| 8x8 | 64 | full |" in capsys.readouterr().out


def test_measure_skips_cases_over_the_memory_limit():
    record = bench.Bench(memory_limit_bytes=1000).measure("double", lambda a: a * 2, jnp.ones(4096), flops=4096.0)
    assert record["status"] == "skipped" and record["median_ms"] is None
    assert "exceeds the memory limit" in record["reason"] and record["compiled_memory_bytes"] > 1000
    ok = bench.Bench(warmup=0, repeats=3).measure("double", lambda a: a * 2, jnp.ones(16), flops=16.0, size=16)
    assert ok["status"] == "ok" and ok["size"] == 16 and ok["shapes"] == [[16]] and ok["tflops"] > 0


def test_suite_registry_and_bad_settings():
    assert "neighborhood" in bench.available_suites()
    with pytest.raises(ValueError, match=r"unknown suite 'nope'; available suites: .*neighborhood"):
        bench.get_suite("nope")
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        bench.Bench(repeats=0)
    with pytest.raises(ValueError, match="warmup=-1 must be >= 0"):
        bench.Bench(warmup=-1)


def test_list_describes_suites_without_tracker_references(capsys):
    assert bench.main(["--list"]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(bench.available_suites())
    assert not [line for line in lines if "issue" in line.lower()], lines
