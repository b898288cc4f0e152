"""The decode suites' tables and plots (eval.bench_decode, eval.bench_decode_policy) redrawn from their committed
JSON: every ok record gets a row whose last column is the dense case's best time over its own."""

import json
import os

import pytest

from eval import bench_decode, bench_decode_policy

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


@pytest.mark.parametrize(
    "module,name,columns",
    [
        (bench_decode, "decode_cpu.json", ("length", "allocation")),
        (bench_decode_policy, "decode_policy_cpu.json", ("policy", "budget")),
    ],
)
def test_table_and_plot_from_the_committed_report(tmp_path, module, name, columns):
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        report = json.load(f)
    records = report["records"]
    lines = module.table(records).splitlines()
    assert lines[0].startswith("| " + " | ".join(columns) + " | case |")
    assert len(lines) == 2 + len(records)
    for record, line in zip(records, lines[2:], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[: len(columns)] == [str(record[c]) for c in columns]
        if record["status"] != "ok":
            continue
        dense = next(r for r in records if r["case"] == "dense" and all(r[c] == record[c] for c in columns))
        assert cells[-1] == f"{dense['min_ms'] / dense['steps'] / (record['min_ms'] / record['steps']):.2f}x"
    module.plot(report, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0
