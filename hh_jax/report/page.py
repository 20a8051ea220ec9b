"""The report page: HTML and Markdown built side by side (so both carry the same numbers),
figures saved as PNGs beside it and embedded in the HTML, and the number format every
report and sweep table uses."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
       "padding:3px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
       "img{max-width:100%;border:1px solid #ddd;margin:.3em 0}figure{margin:.5em 0}"
       "pre{background:#f6f6f6;padding:.5em;overflow-x:auto;white-space:pre-wrap}"
       ".sample{border-left:3px solid #999;padding-left:.6em;margin:.8em 0}")


class Page:
    """Builds the HTML and the Markdown side by side, so both carry the same numbers."""

    def __init__(self, out_dir: str, title: str):
        self.out_dir, self.title = out_dir, title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}", ""]
        self.n_figures = 0

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += ["#" * level + " " + text, ""]

    def para(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, header: list[str], rows: list[list]) -> None:
        cells = [[fmt(c) for c in r] for r in rows]
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                         + "</tr>" + "".join("<tr>" + "".join(
                             f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells)
                         + "</table>")
        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
        self.md.append("")

    def pre(self, summary: str, text: str) -> None:
        self.html.append(f"<details><summary>{html.escape(summary)}</summary>"
                         f"<pre>{html.escape(text)}</pre></details>")
        self.md += [f"<details><summary>{summary}</summary>", "", "```", text, "```", "",
                    "</details>", ""]

    def links(self, items: list[tuple[str, str]]) -> None:
        """Relative links (e.g. to each sweep member's own report)."""
        self.html.append("<ul>" + "".join(f'<li><a href="{html.escape(href)}">'
                                          f"{html.escape(text)}</a></li>" for text, href in items)
                         + "</ul>")
        self.md += [f"- [{text}]({href})" for text, href in items] + [""]

    def sample(self, parts: list[tuple[str, str]]) -> None:
        self.html.append('<div class="sample">' + "".join(
            f"<b>{html.escape(k)}</b><pre>{html.escape(v)}</pre>" for k, v in parts) + "</div>")
        for k, v in parts:
            self.md += [f"**{k}**", "", "```", v, "```", ""]

    def figure(self, fig, name: str, caption: str) -> None:
        """Saves the PNG beside the report and embeds the same bytes in the HTML."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self._embed(buf.getvalue(), name, caption)

    def image(self, path: str, caption: str) -> None:
        """An existing PNG (e.g. an evaluator's plot): copied beside the report, embedded."""
        with open(path, "rb") as f:
            png = f.read()
        self._embed(png, os.path.splitext(os.path.basename(path))[0], caption)

    def _embed(self, png: bytes, name: str, caption: str) -> None:
        self.n_figures += 1
        fname = f"{self.n_figures:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        files = os.path.join(self.out_dir, "report_files")
        os.makedirs(files, exist_ok=True)
        with open(os.path.join(files, fname), "wb") as f:
            f.write(png)
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img alt="{html.escape(caption)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>'
                         f"{html.escape(caption)}</figcaption></figure>")
        self.md += [f"![{caption}](report_files/{fname})", "", f"*{caption}*", ""]

    def write(self) -> tuple[str, str]:
        os.makedirs(self.out_dir, exist_ok=True)
        html_path = os.path.join(self.out_dir, "report.html")
        md_path = os.path.join(self.out_dir, "report.md")
        with open(html_path, "w") as f:
            f.write(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
                    f"{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
                    f"<h1>{html.escape(self.title)}</h1>\n" + "\n".join(self.html)
                    + "</body></html>\n")
        with open(md_path, "w") as f:
            f.write("\n".join(self.md) + "\n")
        return html_path, md_path


def fmt(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)
