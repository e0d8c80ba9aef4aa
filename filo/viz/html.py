"""A self-contained ``index.html`` (no server, no network): inline CSS, relative links only."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import quote

_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$")

CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table.results { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
table.results th, table.results td { border: 1px solid #bbb; padding: 3px 8px; }
table.results th { background: #eee; }
.note { color: #555; font-size: 0.9em; }
.grid { display: flex; flex-direction: column; gap: 14px; }
figure { margin: 0; padding: 4px; background: #fff; border: 4px solid #999; }
figure.normal { border-color: #2e8b57; } figure.anomalous { border-color: #d62728; }
figure.error { outline: 3px dashed #ff8c00; outline-offset: 2px; }
figure img { display: block; width: 100%; height: auto; cursor: zoom-in; }
figcaption { font-size: 0.85em; word-break: break-all; }
table.boxes { border-collapse: collapse; font-size: 0.85em; margin-top: 3px; }
table.boxes td { border: 1px solid #ddd; padding: 1px 6px; word-break: normal; }
.tag { font-weight: bold; } .normal .tag { color: #2e8b57; } .anomalous .tag { color: #d62728; }
.err { color: #ff8c00; font-weight: bold; }
"""


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def _alignments(separator: str, n: int) -> list[str]:
    out = []
    for cell in _split_row(separator):
        left, right = cell.startswith(":"), cell.endswith(":")
        out.append("center" if left and right else "right" if right else "left")
    return (out + ["left"] * n)[:n]


def _table_html(lines: list[str]) -> str:
    header = _split_row(lines[0])
    has_sep = len(lines) > 1 and _SEPARATOR.match(lines[1]) is not None
    body_lines = lines[2:] if has_sep else lines[1:]
    aligns = _alignments(lines[1], len(header)) if has_sep else ["left"] * len(header)
    out = ['<table class="results">', "<thead><tr>"]
    out += [f'<th style="text-align:{a}">{html.escape(c)}</th>' for c, a in zip(header, aligns, strict=True)]
    out.append("</tr></thead><tbody>")
    for line in body_lines:
        cells = _split_row(line)
        cells = (cells + [""] * len(header))[:len(header)]
        out.append("<tr>" + "".join(f'<td style="text-align:{a}">{html.escape(c)}</td>'
                                    for c, a in zip(cells, aligns, strict=True)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def markdown_table_to_html(markdown: str) -> str:
    """Render markdown text: pipe tables become ``<table>``, other non-empty lines ``<p>``."""
    out: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if block:
            out.append(_table_html(block))
            block.clear()

    for raw in markdown.splitlines():
        if raw.strip().startswith("|") or (block and "|" in raw and raw.strip()):
            block.append(raw)
            continue
        flush()
        text = raw.strip()
        if text:
            out.append(f"<p>{html.escape(text.lstrip('#').strip())}</p>")
    flush()
    return "\n".join(out)


def href(path: str | PurePosixPath) -> str:
    """A relative URL for a relative POSIX path (each component percent-quoted)."""
    return "/".join(quote(part) for part in PurePosixPath(path).parts)


@dataclass
class IndexEntry:
    """One thumbnail on the index page (paths relative to the index file)."""

    panel: str
    thumb: str
    name: str
    label: int
    score: float
    error: bool | None
    boxes: list = field(default_factory=list)  # (phrase, score or None, counted) per box


@dataclass
class IndexSection:
    cls_name: str
    entries: list[IndexEntry]
    threshold: float | None
    threshold_kind: str
    total: int
    scale: str | None = None  # the class's colour scale, in words


def index_html(title: str, results_markdown: str | None, sections: Sequence[IndexSection],
               notes: Sequence[str] = ()) -> str:
    """The whole page as text."""
    t = html.escape(title)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{t}</title>", f"<style>{CSS}</style>", "</head><body>", f"<h1>{t}</h1>"]
    for note in notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if results_markdown and results_markdown.strip():
        parts.append("<h2>Results</h2>")
        parts.append(markdown_table_to_html(results_markdown))
    if sections:
        parts.append('<p class="note">Classes: ' + ", ".join(
            f'<a href="#{quote(s.cls_name)}">{html.escape(s.cls_name)}</a>' for s in sections)
            + "</p>")
    for sec in sections:
        name = html.escape(sec.cls_name)
        parts.append(f'<h2 id="{html.escape(quote(sec.cls_name))}">{name}</h2>')
        thr = ("none" if sec.threshold is None
               else f"{sec.threshold:.4g} ({sec.threshold_kind})")
        scale = f"; colour scale {html.escape(sec.scale)}" if sec.scale else ""
        parts.append(f'<p class="note">{len(sec.entries)} of {sec.total} images shown, '
                     f"ordered by image score (highest first); error threshold: "
                     f"{html.escape(thr)}{scale}</p>")
        parts.append('<div class="grid">')
        for e in sec.entries:
            kind = "anomalous" if e.label else "normal"
            cls = kind + (" error" if e.error else "")
            err = ' <span class="err">error</span>' if e.error else ""
            hover = "; ".join(f"{p} {'' if sc is None else f'{sc:.2f}'}".strip()
                              for p, sc, _ in e.boxes)
            rows = "".join(
                f"<tr><td>{html.escape(p)}</td><td>{'' if sc is None else f'{sc:.2f}'}</td>"
                f"<td>{'counted' if m else 'not counted'}</td></tr>" for p, sc, m in e.boxes)
            boxes = f'<table class="boxes">{rows}</table>' if rows else ""
            parts.append(
                f'<figure class="{cls}"><a href="{href(e.panel)}" target="_blank">'
                f'<img src="{href(e.thumb)}" alt="{html.escape(e.name)}" '
                f'title="{html.escape(hover or e.name)}" loading="lazy"></a>'
                f'<figcaption><span class="tag">{kind}</span> score {e.score:.4f}{err}<br>'
                f"{html.escape(e.name)}{boxes}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
