"""Report files: every command writes NAME.json (all metrics), NAME.md and NAME.html (tables + PNG plots).

A report is a list of blocks — headings, paragraphs, tables and images — that
renders the same content to Markdown and to a self-contained HTML page (the
PNGs sit beside it and are also embedded, so the page survives being mailed).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> Report:
        self.blocks.append(("h2", text))
        return self

    def text(self, text: str) -> Report:
        self.blocks.append(("p", text))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Report:
        self.blocks.append(("table", (list(headers), [[cell(v) for v in row] for row in rows])))
        return self

    def image(self, path: Path | None, caption: str) -> Report:
        if path is not None:
            self.blocks.append(("img", (Path(path), caption)))
        return self


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    for kind, content in report.blocks:
        if kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "table":
            headers, rows = content
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join(" --- " for _ in headers) + "|")
            lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            path, caption = content
            lines += [f"![{caption}]({path.name})", ""]
    return "\n".join(lines)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
         "figcaption{color:#666;font-size:90%}")


def html_page(report: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(report.title)}</h1>"]
    for kind, content in report.blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(content)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "table":
            headers, rows = content
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            path, caption = content
            data = base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}' "
                         f"title='{html.escape(path.name)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, name: str, data: dict[str, Any], report: Report) -> dict[str, Path]:
    """NAME.json, NAME.md and NAME.html in `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md", "html": out_dir / f"{name}.html"}
    data = {**data, "report_files": {k: str(v) for k, v in paths.items()},
            "plots": [str(c[0]) for k, c in report.blocks if k == "img"]}
    paths["json"].write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True))
    paths["markdown"].write_text(markdown(report))
    paths["html"].write_text(html_page(report))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
