"""The import floors: a module imports only from its own floor or lower ones, lazy imports too.

A floor is what a module may take for granted.  The pure protocol core (floor 1) does no I/O
and must load without the stores, S3 or either driver; the stores (2) work under any driver;
the drivers (4) are where WSGI and ASGI differ; the integrations (5) sit on top.  An arrow up
is how a "shared" core ends up dragging the WSGI driver into every ASGI process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "uploadguard"

FLOORS: dict[str, int] = {
    "uploadguard.config": 0,
    "uploadguard.errors": 0,
    "uploadguard.tempdir": 0,
    "uploadguard.stats": 1,
    "uploadguard.guard": 1,
    "uploadguard.operations": 1,
    "uploadguard.images": 1,
    "uploadguard.resumable.protocol": 1,
    "uploadguard.resumable.core": 1,
    "uploadguard.resumable.locking": 2,
    "uploadguard.resumable.store": 2,
    "uploadguard.resumable.s3": 2,
    "uploadguard.resumable.expiry": 2,
    "uploadguard.resumable.engine": 2,
    "uploadguard.metrics": 3,
    "uploadguard.wsgi": 4,
    "uploadguard.asgi": 4,
    "uploadguard.resumable.wsgi": 4,
    "uploadguard.resumable.asgi": 4,
    "uploadguard.django": 5,
    "uploadguard.flask": 5,
    "uploadguard.gunicorn": 5,
    "uploadguard.cli": 5,
    "uploadguard.__main__": 5,
}
#: Packages: every import of a module runs its packages' ``__init__`` first, so what those
#: load eagerly must sit on the lowest floor; the rest of their names load on first use.
FACADES = ("uploadguard", "uploadguard.resumable")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, eager) for every runtime import in the file, lazy ones included.

    ``if TYPE_CHECKING:`` blocks are left out (they never run); an import inside a function is lazy.
    ``from . import guard`` names the submodule ``uploadguard.guard`` when there is one.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other, eager)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, eager) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((child.lineno, target, eager))
                for alias in child.names:  # ``from . import guard``: the submodule
                    if f"{target}.{alias.name}" in FLOORS or f"{target}.{alias.name}" in FACADES:
                        found.append((child.lineno, f"{target}.{alias.name}", eager))
            inner = eager and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return [(line, target, eager) for line, target, eager in found
            if target == "uploadguard" or target.startswith("uploadguard.")]


def test_every_module_has_a_floor() -> None:
    """A new module must be given its floor here, or the check below would not cover it."""
    names = {module_name(path) for path in PACKAGE.rglob("*.py")}
    assert names - set(FLOORS) - set(FACADES) == set()
    assert set(FLOORS) - names == set(), "a module named here no longer exists"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_import_points_up(path: Path) -> None:
    """Each import, lazy ones too, names a module on the importer's floor or below."""
    name = module_name(path)
    arrows = []
    for line, target, eager in imports(path):
        if name in FACADES:
            if eager and FLOORS.get(target, 99) > 0:
                arrows.append(f"line {line}: {target} is loaded by every import of the package; load it on use")
            continue
        floor = 0 if target in FACADES else FLOORS.get(target)
        assert floor is not None, f"{name} line {line}: {target} has no floor"
        if floor > FLOORS[name]:
            arrows.append(f"line {line}: {target} (floor {floor}) from floor {FLOORS[name]}")
    assert arrows == [], f"{name} imports up:\n" + "\n".join(arrows)


def test_importing_a_module_loads_nothing_above_its_floor() -> None:
    """What really loads, packages' ``__init__`` included: one fresh interpreter per floor's modules."""
    script = ("import importlib, json, sys\n"
              "name = sys.argv[1]\n"
              "importlib.import_module(name)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('uploadguard'))))\n")
    found = {}
    for name, floor in FLOORS.items():
        if name == "uploadguard.__main__":
            continue  # runs the CLI
        proc = subprocess.run([sys.executable, "-c", script, name], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        import json

        above = [m for m in json.loads(proc.stdout) if m not in FACADES and FLOORS.get(m, 99) > floor]
        if above:
            found[name] = above
    assert found == {}


def test_the_facades_name_what_they_load() -> None:
    """``__all__`` of the lazy packages lists exactly the names they load on use, and each loads."""
    import uploadguard
    import uploadguard.resumable

    assert sorted(uploadguard.resumable.__all__) == sorted(uploadguard.resumable._PUBLIC)
    for package in (uploadguard, uploadguard.resumable):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
