"""The layout's rules, read from the source with ast (nothing is imported or run).

Every arrow points down: the import graph of the project's modules has no cycle, neither between
modules nor between the units README's "Where things live" names (a top-level package, or a
sub-package of ``billing``). Only the testing package and the tests import ``tests``. What the workflow
sandbox passes through (the pure domain modules and the models) imports nothing else of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

from billing.cli.wiring import SANDBOX_PASSED_THROUGH

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("billing", "workflows", "activities", "api", "bench", "tests")
SINGLE_MODULES = ("worker",)


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages (and worker.py)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    for name in SINGLE_MODULES:
        found[name] = ROOT / f"{name}.py"
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name lands in (its longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (function-level imports included)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    is_package = MODULES[module].name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one, else a name of pkg.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                targets.add(target)
    return targets


GRAPH = {module: _imports(module) for module in MODULES}
# The shipped code: the layering rules are about it (test modules may share fixtures freely).
CODE = {module: targets for module, targets in GRAPH.items() if not module.startswith("tests")}


def _unit(module: str) -> str:
    """``billing.db.sql`` -> ``billing.db``; ``api.usage`` -> ``api``; ``billing`` -> ``billing``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "billing" and len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_reader_sees_the_imports_it_must() -> None:
    """The checks below are only as good as the parser: spot-check arrows that exist today."""
    assert "billing.cli.wiring" in GRAPH["worker"]
    assert "billing.domain.payment_state" in GRAPH["workflows.org_billing"]
    assert "billing.testing.stripe_server" in GRAPH["bench.stripe"]
    assert "billing.db.sql" in GRAPH["billing.read.status"]


def test_no_import_cycles_between_modules() -> None:
    assert _cycles(CODE) == []


def test_no_import_cycles_between_packages() -> None:
    units: dict[str, set[str]] = {}
    for module, targets in CODE.items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    # The bare `billing` package (its empty __init__) is the parent of every unit, not a layer.
    units.pop("billing", None)
    assert _cycles(units) == []


def test_only_the_testing_package_and_the_tests_import_tests() -> None:
    offenders = {
        module: sorted(t for t in targets if _unit(t) == "tests")
        for module, targets in GRAPH.items()
        if _unit(module) not in ("tests", "billing.testing")
    }
    assert {m: t for m, t in offenders.items() if t} == {}
    assert not any(_unit(t) == "tests" for m, ts in GRAPH.items() if _unit(m) == "billing.testing" for t in ts)


def test_the_sandbox_passes_through_only_the_domain_and_the_models() -> None:
    project = {p for p in SANDBOX_PASSED_THROUGH if _resolve(p) is not None}
    assert project == {"billing.domain", "billing.models"}
    passed = [m for m in MODULES if any(m == p or m.startswith(p + ".") for p in project)]
    leaks = {
        module: sorted(t for t in GRAPH[module] if _unit(t) not in project and t != "billing")
        for module in passed
    }
    assert {m: t for m, t in leaks.items() if t} == {}


def test_workflows_import_only_workflows_the_domain_and_the_models() -> None:
    allowed = {"workflows", "billing.domain", "billing.models", "billing"}
    strays = {
        module: sorted(t for t in GRAPH[module] if _unit(t) not in allowed)
        for module in MODULES
        if _unit(module) == "workflows"
    }
    assert {m: t for m, t in strays.items() if t} == {}
