"""Imports go one way: datasets ← models ← probes ← dynascope ← app (recipes beside dynascope).

Read from the source with ``ast`` (imports inside functions count too): a module may import only
its own layer or lower ones. ``dynascope.version`` is a leaf (it imports nothing) that every layer
may read.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder → (dotted package, layer)
PACKAGES = {
    "datasets": ("dynascope.datasets", 0),
    "models": ("dynascope.models", 1),
    "probes": ("dynascope.probes", 2),
    "recipes": ("dynascope.recipes", 3),
    "dynascope": ("dynascope", 3),
    "app": ("app", 4),
}
LEAVES = {"dynascope.version"}
#: Known violations, each to be removed with its fix (a stale entry fails ``test_known_violations_are_real``):
#: the report runs a recipe's detector and the CLI's ``recipe`` command runs a recipe; recipes sit beside
#: dynascope, so either they get what they need from their caller (or stored evidence), or recipes move
#: below dynascope (they import only probes, models and datasets today).
KNOWN = {"dynascope/report.py imports dynascope.recipes", "dynascope/commands.py imports dynascope.recipes"}


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    package = PACKAGES[folder][0]
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package, *parts])


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _dynamic_import(node: ast.Call) -> str | None:
    """The module of ``importlib.import_module("a.b")`` / ``import_module(...)`` / ``__import__(...)`` with
    an absolute name written out; ``None`` for any other call (relative or computed names are not judged)."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


def _imports(path: Path, text: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``text``, the source of ``path`` (relative ones resolved)."""
    tree = ast.parse(text, filename=str(path))
    here = _module_name(path).split(".")
    package = here if _is_package(path) else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dynamic_import(node) is not None:
            out.append((node.lineno, _dynamic_import(node)))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # a name may be a module (``from dynascope import recipes``): judged by its own owner; a
            # function or class (``from dynascope.runner import PROBES``) has its module's owner anyway
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return out


def _owner(module: str) -> tuple[str, int] | None:
    """``(owning package, layer)`` of a dynascope/app module; ``None`` for third-party modules."""
    if any(module == leaf or module.startswith(leaf + ".") for leaf in LEAVES):
        return None
    if module == "app" or module.startswith("app.") or module.split(".")[0] in ("lib", "views"):
        return "app", 4  # app/ puts its own folder on sys.path: `from lib import ...`
    best = None
    for package, layer in PACKAGES.values():
        if (module == package or module.startswith(package + ".")) and package != "app":
            if best is None or len(package) > len(best[0]):
                best = (package, layer)
    return best


def _sources() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def _violations(path: Path, text: str) -> list[str]:
    if _module_name(path) in LEAVES:
        return []
    mine = _owner(_module_name(path))
    assert mine is not None
    bad = []
    for line, module in _imports(path, text):
        theirs = _owner(module)
        if theirs is None or theirs[0] == mine[0]:
            continue
        if theirs[1] >= mine[1]:
            bad.append(f"{path.relative_to(ROOT)}:{line} ({mine[0]}) imports {module} ({theirs[0]})")
    return bad


def _all_violations() -> list[str]:
    return [v for path in _sources() for v in _violations(path, path.read_text())]


def _known(violation: str) -> str | None:
    path, _, rest = violation.partition(":")
    key = f"{path} imports {rest.split(' imports ', 1)[1].split(' (')[0]}"
    return key if key in KNOWN else None


def test_layers_import_one_way() -> None:
    bad = [v for v in _all_violations() if _known(v) is None]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_known_violations_are_real() -> None:
    """Each :data:`KNOWN` entry is still found (so the checker sees ``from dynascope import recipes``)."""
    assert {_known(v) for v in _all_violations()} - {None} == KNOWN


def test_version_is_a_leaf() -> None:
    tree = ast.parse((ROOT / "dynascope" / "version.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize(
    ("source", "imported", "allowed"),
    [
        ("probes", "from dynascope.export import write_html", False),
        ("probes", "import dynascope", False),
        ("probes", "from ..store import ResultStore", False),
        ("models", "from ..probes import results", False),
        ("models", "from ..datasets import load", True),
        ("recipes", "from dynascope.store import ResultStore", False),
        ("dynascope", "from dynascope.recipes import grokking", False),
        ("dynascope", "from dynascope import recipes", False),
        ("dynascope", "from . import recipes", False),
        ("dynascope", "from dynascope import runner, recipes", False),
        ("dynascope", "from dynascope import runner", True),
        ("dynascope", "importlib.import_module('dynascope.recipes')", False),
        ("models", "__import__('dynascope.probes')", False),
        ("dynascope", "importlib.import_module('dynascope.probes')", True),
        ("probes", "from dynascope.version import __version__", True),
        ("dynascope", "from dynascope.probes import figures", True),
        ("app", "from dynascope.runner import PROBES", True),
    ],
)
def test_the_checker_itself(source: str, imported: str, allowed: bool) -> None:
    """The rule catches an upward import, inside a function too (a check that cannot fail is a defect)."""
    path = ROOT / source / "some_module.py"
    bad = _violations(path, f"def f():\n    {imported}\n")
    assert (not bad) if allowed else bad
