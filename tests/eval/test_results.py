"""eval.results: a report written by `write_report` reads back unchanged through `rerender_report`, which redraws its
PNG beside the JSON and prints its table without running anything."""

import json

from eval.results import rerender_report, write_report


def _plot(report, png_path):
    with open(png_path, "w", encoding="utf-8") as f:  # a stand-in PNG: the path and the rows it was drawn from
        f.write(f"{len(report['rows'])} rows")


def _table(report):
    return "\n".join(f"| {row['name']} | {row['value']} |" for row in report["rows"])


def test_write_then_rerender_round_trip(tmp_path, capsys):
    path = str(tmp_path / "sub" / "grid_cpu.json")
    report = {"rows": [{"name": "softmax", "value": 1.5}, {"name": "h2o", "value": 2.25}], "machine": {"cpus": 2}}
    written = write_report(dict(report), path, plot=_plot, table=_table)
    assert written["json_path"] == path and written["png_path"] == str(tmp_path / "sub" / "grid_cpu.png")
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == report  # the paths are added to the returned dict, not to the file
    out = capsys.readouterr().out
    assert "| h2o | 2.25 |" in out and f"wrote {path} and " in out

    (tmp_path / "sub" / "grid_cpu.png").unlink()
    again = rerender_report(path, plot=_plot, table=_table)
    assert again == report
    assert (tmp_path / "sub" / "grid_cpu.png").read_text() == "2 rows"
    out = capsys.readouterr().out
    assert "| softmax | 1.5 |" in out and "wrote" not in out  # nothing is rewritten


def test_rerender_without_plot_or_table_only_reads(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": []}))
    assert rerender_report(str(path)) == {"rows": []}
    assert not (tmp_path / "r.png").exists() and capsys.readouterr().out == ""
