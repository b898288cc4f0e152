"""Writing a benchmark report as the evaluators of eval/ do: the JSON, its PNG beside it, the table on stdout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def write_report(
    report: dict[str, Any],
    path: str,
    *,
    plot: Callable[[dict[str, Any], str], None] | None = None,
    table: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Writes `report` as indented JSON to `path` (creating its folder), then, when given, `plot(report, png)` to the
    PNG of the same stem and the Markdown `table(report)` to stdout; returns `report` with "json_path" (and
    "png_path") added."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    report["json_path"] = path
    if plot is not None:
        report["png_path"] = os.path.splitext(path)[0] + ".png"
        plot(report, report["png_path"])
    if table is not None:
        print(table(report))
    print(f"\nwrote {path}" + (f" and {report['png_path']}" if "png_path" in report else ""))
    return report


def rerender_report(
    path: str,
    *,
    plot: Callable[[dict[str, Any], str], None] | None = None,
    table: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Reads a report `write_report` wrote, redraws its PNG with `plot` (when given) and prints `table(report)`;
    returns the report (nothing is run)."""
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if plot is not None:
        plot(report, os.path.splitext(path)[0] + ".png")
    if table is not None:
        print(table(report))
    return report
