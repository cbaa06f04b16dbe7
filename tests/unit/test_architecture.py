"""The import rules of docs/architecture.md, checked on the source so nobody has to remember them.

Each module of ``pipeline/`` is parsed (not imported) and every ``import`` and ``from``
statement, top level or inside a function, is resolved to an absolute module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipeline"

#: What each room may import from inside ``pipeline`` (besides itself).
ALLOWED = {
    "pipeline.patchcore": ("pipeline.config", "pipeline.hashing", "pipeline"),
    "pipeline.data": ("pipeline.config", "pipeline.hashing", "pipeline"),
    "pipeline.evaluation": ("pipeline.config", "pipeline.hashing", "pipeline", "pipeline.data", "pipeline.patchcore"),
}
FORBIDDEN_EVERYWHERE = ("prefect", "dvc", "bentoml", "flows", "serving", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for every import in ``source`` of ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from pipeline import data`` imports the module pipeline.data
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if is_module(f"{target}.{alias.name}")]
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    problems = []
    for line, target in imported_modules(source, module, is_package):
        where = f"{module}:{line} imports {target}"
        if any(within(target, banned) for banned in FORBIDDEN_EVERYWHERE):
            problems.append(where)
            continue
        room = next((r for r in ALLOWED if within(module, r)), None)
        if room is None or not within(target, "pipeline") or within(target, room):
            continue
        if target not in ALLOWED[room] and not any(
            within(target, allowed) for allowed in ALLOWED[room] if allowed != "pipeline"
        ):
            problems.append(where + f" (the {room} room may import only {', '.join(ALLOWED[room])})")
    return problems


MODULES = sorted(PIPELINE.rglob("*.py"))


def test_the_rooms_exist_and_hold_the_algorithm():
    names = {module_name(p) for p in MODULES}
    assert {"pipeline.patchcore.coreset", "pipeline.patchcore.model", "pipeline.data.datasets",
            "pipeline.lifecycle.registry", "pipeline.evaluation.metrics", "pipeline.cli"} <= names
    assert not list(PIPELINE.glob("bench*.py")), "benchmarks live in benchmarks/, outside the wheel"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_rules(path):
    assert violations(module_name(path), path.read_text(), path.name == "__init__.py") == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_the_checker_sees_relative_nested_and_late_imports():
    """The rules above would pass vacuously if the walker missed import forms."""
    source = (
        "from ..lifecycle import registry\n"
        "def f():\n"
        "    import prefect\n"
        "    from .coreset import greedy_coreset\n"
        "    from pipeline import lifecycle\n"
    )
    found = [name for _, name in imported_modules(source, "pipeline.patchcore.model")]
    assert found[:2] == ["pipeline.lifecycle", "pipeline.lifecycle.registry"]
    assert "prefect" in found and "pipeline.patchcore.coreset" in found and "pipeline.lifecycle" in found
    problems = violations("pipeline.patchcore.model", source)
    assert any("imports prefect" in p for p in problems)
    assert sum("pipeline.lifecycle" in p for p in problems) >= 2
