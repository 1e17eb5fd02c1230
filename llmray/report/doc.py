"""A report as a list of blocks (heading, paragraph, bullets, table, image), rendered to markdown and to
standalone HTML from the same blocks, so both say the same thing."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    """Text with `code` spans and **bold** (both renderers understand them)."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)
    """Per column "l" or "r" (numbers); left when missing."""


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str
    half: bool = False
    """In HTML, half the page's width (two curves side by side); markdown shows every image alike."""


Block = Heading | Para | Bullets | Table | Image


def cell(v) -> str:
    """A value as a table cell: one line, pipes escaped, None as an em dash."""
    if v is None:
        return "—"
    return str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|").strip() or "—"


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            rule = ["---:" if (b.align[i:i + 1] or ["l"])[0] == "r" else "---" for i in range(len(b.header))]
            out += ["| " + " | ".join(b.header) + " |", "|" + "|".join(rule) + "|"]
            out += ["| " + " | ".join(row) + " |" for row in b.rows] + [""]
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({b.path.name})", ""]
    return "\n".join(out)


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")
_MARKS = {"✓": "ok", "✗": "bad"}


def _inline(text: str) -> str:
    """Escape `text` for HTML, turning `code`, **bold** and ✓/✗ marks into tags."""
    parts, pos = [], 0
    text = text.replace("\\|", "|")
    for m in _INLINE.finditer(text):
        parts.append(html.escape(text[pos:m.start()]))
        parts.append(f"<code>{html.escape(m.group(1))}</code>" if m.group(1) is not None
                     else f"<b>{html.escape(m.group(2))}</b>")
        pos = m.end()
    parts.append(html.escape(text[pos:]))
    out = "".join(parts)
    for mark, cls in _MARKS.items():
        out = out.replace(mark, f'<span class="{cls}">{mark}</span>')
    return out


def _image(path: Path, alt: str, half: bool) -> str:
    """The PNG embedded as a data URI, so the HTML reads without a server or its directory."""
    data = base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else ""
    src = f"data:image/png;base64,{data}" if data else html.escape(path.name)
    caption = f"<figcaption>{html.escape(path.name)}</figcaption>"
    cls = ' class="half"' if half else ""
    return f'<figure{cls}><img src="{src}" alt="{html.escape(alt)}">{caption}</figure>'


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0 1.2em}th,td{border:1px solid #ccc;padding:4px 8px;"
         "vertical-align:top}th{background:#f3f3f3}td.r{text-align:right;font-variant-numeric:tabular-nums}"
         "img{max-width:100%}figure{margin:0.5em 0 1.5em}figure.half{display:inline-block;width:49%;margin:0 0 1em}"
         "figcaption{color:#888;font-size:0.8em}"
         ".ok{color:#1a7f37;font-weight:bold}.bad{color:#cf222e;font-weight:bold}code{background:#f6f6f6}")


def to_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            def cls(i: int) -> str:
                return ' class="r"' if (b.align[i:i + 1] or ["l"])[0] == "r" else ""

            head = "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b.header) + "</tr>"
            rows = "".join("<tr>" + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                           for row in b.rows)
            body.append(f"<table>{head}{rows}</table>")
        elif isinstance(b, Image):
            body.append(_image(b.path, b.alt, b.half))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
