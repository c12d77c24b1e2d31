"""MkDocs hooks: render the reference tables from the code, so the docs cannot drift from it.

``<!-- uploadguard:settings-table -->`` becomes :func:`uploadguard.config.settings_reference`;
``<!-- uploadguard:cli -->`` becomes the ``--help`` of the ``uploadguard`` command and of each of its
subcommands, from the argument parser itself (:func:`uploadguard.cli._parser`).  The benchmark plots
(``images/bench-*.svg``) are drawn from the measured tables in ``bench/README.md`` when the site is built,
so a plot always shows the table beside it.
"""

from __future__ import annotations

import argparse
import html
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from mkdocs.structure.files import File, Files

SETTINGS_MARK = "<!-- uploadguard:settings-table -->"
CLI_MARK = "<!-- uploadguard:cli -->"


def cli_reference() -> str:
    """The CLI's help texts as Markdown: the command, then one section per subcommand."""
    from uploadguard.cli import _parser

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: make the page the same everywhere
    parser = _parser()
    parts = ["```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts += [f"## `uploadguard {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


BENCH = Path(__file__).resolve().parent.parent / "bench" / "README.md"


class Plot(NamedTuple):
    """A bar chart of one column of the first table under ``heading`` in bench/README.md."""

    slug: str
    heading: str  # the line of bench/README.md that the table follows (its start is enough)
    column: str  # header of the plotted column; a cell's first number is the bar
    labels: tuple[str, ...]  # headers of the columns that name a bar
    unit: str


PLOTS = (
    Plot("images-cpu", "### Re-run: 2026-11-29", "CPU time", ("image", "variant"), "CPU time in ms (median of 9 runs), lower is better"),
    Plot("images-memory", "### Re-run: 2026-11-29", "peak RSS", ("image", "variant"), "peak RSS in MiB, lower is better"),
    Plot("s3-throughput", "## `bench_resumable_s3.py`", "MiB/s", ("server",), "a 200 MiB PATCH, MiB/s (run 1), higher is better"),
    Plot("slow-patches", "## Slow resumable PATCHes", "GETs answered in 15 s", ("pool, clients", "max_streams"),
         "GETs answered in 15 s while slow PATCHes stream (max_streams 0 = no cap), higher is better"),
)


def bench_table(heading: str, text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after the line starting with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    header, rows = table[0], table[2:]
    return [dict(zip(header, row)) for row in rows]


def bar_chart(plot: Plot, rows: list[dict[str, str]]) -> str:
    """A horizontal bar chart as a standalone SVG (no fonts or scripts fetched)."""
    bars = []
    for row in rows:
        label = " · ".join(re.sub(r"\s*\(.*?\)", "", row[name]).strip("` ") for name in plot.labels)
        number = re.search(r"\d+(?:\.\d+)?", row[plot.column])
        if number is None:
            raise ValueError(f"bench/README.md: {row[plot.column]!r} in {plot.column!r} is not a number")
        bars.append((label, float(number.group()), row[plot.column]))
    top = max(value for _, value, _ in bars) or 1.0
    label_width, bar_width, height = 330, 360, 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 120}" '
             f'height="{height * len(bars) + 40}" font-family="sans-serif" font-size="13">',
             f'<text x="4" y="16" font-weight="bold">{html.escape(plot.unit)}</text>']
    for i, (label, value, cell) in enumerate(bars):
        y = 30 + i * height
        width = max(1.0, bar_width * value / top)
        parts += [f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>',
                  f'<rect x="{label_width}" y="{y + 3}" width="{width:.1f}" height="{height - 7}" fill="#3f6ec6"/>',
                  f'<text x="{label_width + width + 6:.1f}" y="{y + 15}">{html.escape(cell)}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """Add the benchmark plots, drawn from bench/README.md's tables, to the site."""
    text = BENCH.read_text()
    for plot in PLOTS:
        svg = bar_chart(plot, bench_table(plot.heading, text))
        files.append(File.generated(config, f"images/bench-{plot.slug}.svg", content=svg))
    return files


#: Sphinx roles left in the docstrings (``:class:`X```), rendered by mkdocstrings as a role name before the code.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Drop the Sphinx role names mkdocstrings leaves in the rendered docstrings; the code they mark stays."""
    return SPHINX_ROLE.sub("", html)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace the marks with the tables rendered from the code."""
    if SETTINGS_MARK in markdown:
        from uploadguard.config import settings_reference

        markdown = markdown.replace(SETTINGS_MARK, settings_reference())
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    return markdown
