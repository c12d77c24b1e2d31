"""MkDocs hooks: render the reference tables from the code, so the docs cannot drift from it.

``<!-- uploadguard:settings-table -->`` becomes :func:`uploadguard.config.settings_reference`;
``<!-- uploadguard:cli -->`` becomes the ``--help`` of the ``uploadguard`` command and of each of its
subcommands, from the argument parser itself (:func:`uploadguard.cli._parser`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

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


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace the marks with the tables rendered from the code."""
    if SETTINGS_MARK in markdown:
        from uploadguard.config import settings_reference

        markdown = markdown.replace(SETTINGS_MARK, settings_reference())
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    return markdown
