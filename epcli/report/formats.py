"""render(data, fmt): from a format name (FORMATS) to the report as text, one module per format."""

from __future__ import annotations

import json

from epcli.errors import UsageError
from epcli.report.datamodel import ReportData
from epcli.report.html_page import html_report
from epcli.report.robustbench import robustbench_json
from epcli.report.tables import _csv, _json_text, _md, _rich_text, leaderboard_table, to_dict

FORMATS = ("table", "csv", "json", "md", "html", "robustbench")


def render(data: ReportData, fmt: str = "table", columns: str | None = None) -> str:
    """The leaderboard as text. columns: "headline" (default for table/md) or "all" (default for csv/json)."""
    if fmt == "table":
        return _rich_text(leaderboard_table(data, columns or "headline"))
    if fmt == "csv":
        return _csv(data)
    if fmt == "json":
        return _json_text(to_dict(data))
    if fmt == "md":
        return _md(data, columns or "headline")
    if fmt == "html":
        return html_report(data, [])
    if fmt == "robustbench":
        return json.dumps(robustbench_json(data), indent=2, ensure_ascii=False) + "\n"
    raise UsageError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
