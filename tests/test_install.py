"""The install instructions (README.md, docs/getting-started.md) against ``setup.cfg``: every extra it names exists, every extra is listed.

``pip install "uploadguard[django]"`` alone brings no gunicorn, so the README's
``gunicorn -c python:uploadguard.gunicorn`` would fail: every install line for
a framework must name the ``gunicorn`` extra too.
"""

from __future__ import annotations

import configparser
import re

import pytest

from tests.support import ROOT

README = (ROOT / "README.md").read_text()
#: The getting-started page, whose Install section holds the table of extras.
GETTING_STARTED = (ROOT / "docs" / "getting-started.md").read_text()
#: ``pip install "uploadguard[a,b]"``, ``'uploadguard[a]'`` or ``".[a,b]"`` anywhere in the README.
PIP_INSTALL = re.compile(r"""pip install (?:-e )?["'](?:uploadguard|\.)\[([^\]]*)\]["']""")


def extras() -> dict[str, set[str]]:
    """setup.cfg's extras, each with the distribution names it requires (lower case)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return {name: {re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0].lower()
                   for line in value.splitlines() if line.strip()}
            for name, value in config["options.extras_require"].items()}


def install_section(text: str = README, name: str = "README.md") -> str:
    match = re.search(r"^## Install\n(.*?)^## ", text, re.S | re.M)
    assert match, f"{name} has no '## Install' section"
    return match.group(1)


def named(text: str) -> list[list[str]]:
    """The extras of each ``pip install`` line with extras in ``text``; every such line must be understood."""
    lines = [[extra.strip() for extra in group.split(",")] for group in PIP_INSTALL.findall(text)]
    with_extras = re.findall(r"pip install [^\n`]*\[", text)
    assert len(lines) == len(with_extras), f"PIP_INSTALL no longer reads every install line: {with_extras}"
    assert lines, "no pip install line with extras"
    return lines


class TestReadmeInstall:
    def test_install_section_has_pip_lines(self) -> None:
        """The Install section shows pip install lines with extras, for Django and for Flask."""
        lines = named(install_section())
        assert any("django" in line for line in lines) and any("flask" in line for line in lines)

    def test_every_named_extra_exists(self) -> None:
        """Every extra a pip install line anywhere in the README names is an extra of setup.cfg."""
        known = extras()
        for line in named(README) + named(GETTING_STARTED):
            assert set(line) <= set(known), f"{line} names an extra setup.cfg does not have: {sorted(known)}"

    @pytest.mark.parametrize("framework", ["django", "flask"])
    def test_framework_install_lines_bring_gunicorn(self, framework: str) -> None:
        """A line installing a framework extra also installs gunicorn, which the README's serving command needs."""
        known = extras()
        lines = [line for line in named(README) + named(GETTING_STARTED) if framework in line]
        assert lines, f"no install line for {framework}"
        for line in lines:
            assert "gunicorn" in set().union(*(known[extra] for extra in line)), line

    def test_table_lists_every_extra_with_what_it_brings(self) -> None:
        """The getting-started page's extras table has one row per setup.cfg extra, naming the distributions it
        brings; test brings every other extra but bench (the benchmarks' plotting)."""
        section = install_section(GETTING_STARTED, "docs/getting-started.md")
        rows = dict(re.findall(r"^\| `([a-z0-9]+)` \| ([^|]+) \|", section, re.M))
        known = extras()
        assert rows and sorted(rows) == sorted(known)
        for name, brings in rows.items():
            if name != "test":
                assert {word.lower() for word in re.split(r",\s*", brings.strip())} == known[name], name
        # bench only draws the benchmarks' plots: no test needs it.
        covered = set().union(*(known[name] for name in known if name not in ("test", "bench")))
        assert covered <= known["test"], "the test extra no longer brings every other extra"
        assert not known["bench"] & known["test"], "the test extra installs what only the benchmarks need"
