"""Executed notebooks rendered to the reports' HTML pages: no code, figures embedded, titled, linked to the index."""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from tongue_nb.fonts import CSS_CJK

PAGE_TITLES = {"01_data_review": "data review", "02_model_comparison": "model comparison (cost and speed screen)",
               "03_train": "training", "04_error_analysis": "error analysis", "05_report": "final report",
               "06_predict": "predictions", "07_tune": "tuning study"}
# JupyterLab's font lists with CJK fonts before the generic family, for Chinese, Japanese and Korean names
_FONT_CSS = ("<style>:root{--jp-ui-font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial," + CSS_CJK
             + ",sans-serif;--jp-content-font-family:var(--jp-ui-font-family)}</style>\n")


def page_title(html_path: str | Path) -> str:
    """'resnet18 - training' for reports/03_train-resnet18.html, 'final report' for 05_report.html."""
    stem = Path(html_path).stem
    for prefix, what in PAGE_TITLES.items():
        if stem == prefix:
            return what
        if stem.startswith(prefix + "-"):
            return f"{stem[len(prefix) + 1:]} - {what}"
    return stem


def render_html(notebook: str | Path, html_path: str | Path, title: str | None = None,
                index_href: str | None = "index.html") -> Path:
    """Render an executed notebook to a self-contained HTML page without code cells (nbconvert --no-input).

    The page's <title> and first heading say what it is (`page_title`), it links back to the index,
    and log lines (stderr streams) are left out of the page; the executed notebook keeps them.
    """
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    title = title or page_title(html_path)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if not (o.get("output_type") == "stream"
                                                                        and o.get("name") == "stderr")]
    back = f"\n\n[&larr; all reports]({index_href})" if index_href else ""
    first = nb.cells[0] if nb.cells and nb.cells[0].cell_type == "markdown" else None
    if first is not None and first.source.startswith("# "):
        lines = first.source.split("\n", 1)
        first.source = f"# {title}{back}" + (f"\n\n{lines[0][2:]}" if lines[0][2:].strip() else "") \
            + (f"\n{lines[1]}" if len(lines) > 1 else "")
    else:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {title}{back}"))
    _describe_figures(nb, title)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True, embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    body = body.replace("</head>", _FONT_CSS + "</head>", 1)
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(html_path)
    return html_path


_IMAGES = ("image/png", "image/jpeg")


def _heading(source: str) -> str | None:
    """The text of a markdown cell's last heading (link targets and emphasis marks dropped), or None."""
    heads = [line.lstrip("#").strip() for line in source.splitlines() if re.match(r"#{1,6} ", line)]
    return re.sub(r"\]\([^)]*\)|[\[*_`]", "", heads[-1]).strip() if heads else None


def _describe_figures(nb: Any, title: str) -> None:
    """Give every figure an alternative text: its number in its section, the section's heading and the page.

    The page template takes no alternative text from a notebook, so each figure becomes an HTML image that
    carries its own (otherwise a screen reader hears a placeholder, and every page logs a warning)."""
    section, seen = title, {}
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            section = _heading(cell.source) or section
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            kind = next((k for k in _IMAGES if k in data), None)
            if kind is None or "text/html" in data:
                continue
            seen[section] = seen.get(section, 0) + 1
            alt = f"Figure {seen[section]} of section {section!r} ({title})"
            size = "".join(f' {k}="{v}"' for k, v in (out.get("metadata", {}).get(kind) or {}).items()
                           if k in ("width", "height") and isinstance(v, (int, float)))
            b64 = "".join(str(data[kind]).split())
            out["data"] = {"text/html": f'<img src="data:{kind};base64,{b64}" alt="{html.escape(alt)}"{size}>'}
            out.get("metadata", {}).pop(kind, None)
