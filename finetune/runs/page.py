"""The HTML building blocks of report.html (finetune.runs.report): a page that is safe to build from untrusted files.

Why a module of its own: every string that reaches the page passes through here, escaped (`esc`), so the rule
"a run's files are data, never markup" is kept in one place. Tables escape every cell; images are PNG bytes inlined
as data: URIs (nothing else is inlined); the Markdown of a model card is a small subset rendered by escaping each
line first and adding only our own tags. The page shell carries the generator mark (report.html without it is not
ours), a viewport for phones, inline CSS and a Content-Security-Policy that lets no request leave the page.
"""

from __future__ import annotations

import base64
import html
import re
import time
from pathlib import Path

GENERATOR = '<meta name="generator" content="neo-finetune">'
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # no script, no request leaves the page
MAX_IMAGE_BYTES = 32 * 2**20  # a bigger PNG (a huge attention grid) is named, not inlined
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CSS = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:0 1rem 3rem;color:#1b1b1b}
main{max-width:60rem;margin:0 auto}h1{font-size:1.5rem;overflow-wrap:anywhere}h2{margin-top:2rem;font-size:1.25rem}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}.scroll{overflow-x:auto}
nav a{margin-right:.75rem;display:inline-block}table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3}td:last-child{overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:.5rem;border-radius:4px;font-size:.85rem}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(16rem,1fr));gap:.5rem}.meta{color:#555}
.pass{color:#060}.fail{color:#b00;font-weight:bold}blockquote{border-left:3px solid #ccc;margin:0;padding-left:1rem}
"""


def document(title: str, lead: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: `lead` (our HTML) under the title, then each (id, heading, HTML) section that has a body,
    with a table of contents of anchors."""
    shown = [(key, heading, body) for key, heading, body in sections if body]
    nav = "".join(f'<a href="#{key}">{esc(heading)}</a>' for key, heading, _ in shown)
    body = "".join(f'<section id="{key}"><h2>{esc(heading)}</h2>{content}</section>' for key, heading, content in shown)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'{GENERATOR}\n<meta http-equiv="Content-Security-Policy" content="{POLICY}">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n"
        f"<body><main><h1>{esc(title)}</h1>{lead}<nav>{nav}</nav>\n{body}\n<p class=meta>written by neo-finetune "
        f"(finetune report) at {esc(time.strftime('%Y-%m-%d %H:%M:%S %z'))}</p></main></body></html>\n"
    )


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def cell(value) -> str:
    """A value as text: floats to 5 significant digits, ints with thousands separators, lists and dicts spelled out."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return str(value)


def table(head: list, rows: list[list], marked: bool = False) -> str:
    """A table, every cell escaped (marked=True: cells are Markdown, escaped by `inline`); a wide one scrolls
    sideways inside its box, so the page itself keeps the phone's width."""
    show = inline if marked else lambda value: esc(cell(value))
    header = "<tr>" + "".join(f"<th>{show(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{show(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<div class=scroll><table>{header}{body}</table></div>"


def pairs(rows) -> str:
    """A two-column table of (name, value), leaving out the values that are absent."""
    shown = [[name, value] for name, value in rows if value not in (None, "", [], "None / None")]
    return table([], shown) if shown else ""


def verdict(passed: bool) -> str:
    return "<span class=pass>passed</span>" if passed else "<span class=fail>FAILED</span>"


def image(path: Path, alt: str) -> str:
    """The PNG at `path` inline ('' when there is none)."""
    if not path.is_file():
        return ""
    if path.stat().st_size > MAX_IMAGE_BYTES:
        return f"<p class=meta>{esc(path.name)}: {path.stat().st_size / 2**20:.0f} MiB, too large to inline</p>"
    return png(path.read_bytes(), alt)


def png(data: bytes | None, alt: str) -> str:
    """PNG bytes as an <img> with a data: URI; anything that does not start as a PNG does is left out."""
    if not data or not data.startswith(PNG_MAGIC):
        return ""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def markdown(text: str) -> str:
    """A safe Markdown subset (front matter, headings, fenced code, tables, lists, quotes, paragraphs; `code` and
    **bold** inline): every character of `text` escaped first, then only our own tags added."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = "---" if i == 0 and line.strip() == "---" else "```" if line.startswith("```") else None
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence)), len(lines))
            out.append(f"<pre>{esc(chr(10).join(lines[i + 1 : end]))}</pre>")
            i = end + 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # the card's # is below the page's own h2
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif not line.strip():
            i += 1
        else:
            mark, block = _mark(line), []
            while i < len(lines) and lines[i].strip() and _mark(lines[i]) == mark:
                block.append(lines[i])
                i += 1
            out.append(_block(mark, block))
    return "\n".join(out)


def _mark(line: str) -> str:
    """The kind of block a line belongs to: "#" (a heading or a fence, which ends any block), a table, list or quote
    mark, or "" (a paragraph)."""
    if line.startswith(("#", "```")):
        return "#"
    return next((mark for mark in ("|", "- ", ">") if line.startswith(mark)), "")


def _block(mark: str, block: list[str]) -> str:
    if mark == "|":
        rows = [re.split(r"(?<!\\)\|", row.strip().removeprefix("|").removesuffix("|")) for row in block]
        rows = [[part.strip().replace("\\|", "|") for part in row] for row in rows]
        body = [row for row in rows[1:] if not all(set(part) <= set(":- ") for part in row)]  # not the |---| line
        return table(rows[0], body, marked=True)
    if mark == "- ":
        return "<ul>" + "".join(f"<li>{inline(item[2:])}</li>" for item in block) + "</ul>"
    tag = "blockquote" if mark == ">" else "p"
    return f"<{tag}>{inline(' '.join(line.removeprefix('>').strip() for line in block))}</{tag}>"


def inline(text: str) -> str:
    """One line of Markdown: escaped, then `code` and **bold** (their markers survive escaping unchanged)."""
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
