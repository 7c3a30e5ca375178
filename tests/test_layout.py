"""
The house's layout: no import cycles between aibackend's modules, an import inside a
function only where a comment says why, and a README layout line for every module.
"""

from __future__ import annotations

import ast
import functools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "aibackend")
MODULES = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))


def _source(module: str) -> str:
    with open(os.path.join(PACKAGE, f"{module}.py")) as f:
        return f.read()


@functools.cache
def _module_imports() -> dict[str, set[str]]:
    """Each aibackend module -> the aibackend modules it imports when it is imported (module level)."""
    graph = {}
    for module in MODULES:
        name = "aibackend" if module == "__init__" else f"aibackend.{module}"
        found = set()
        for node in ast.parse(_source(module)).body:  # module level only: a function's import runs later
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = found
    return {name: {module for module in found if module in graph and module != name}
            for name, found in graph.items()}


@pytest.mark.parametrize("module", [f"aibackend.{m}" for m in MODULES if m != "__init__"])
def test_no_module_is_on_an_import_cycle(module):
    graph = _module_imports()
    paths = [[module, first] for first in sorted(graph[module])]
    seen = set()
    while paths:
        path = paths.pop()
        current = path[-1]
        if current == module:
            pytest.fail(f"import cycle: {' -> '.join(path)}")
        if current in seen:
            continue
        seen.add(current)
        paths.extend(path + [after] for after in sorted(graph[current]))


@pytest.mark.parametrize("module", MODULES)
def test_an_import_inside_a_function_says_why(module):
    source = _source(module)
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    around = "\n".join(lines[max(0, inner.lineno - 2):inner.lineno])
                    assert "#" in around, f"aibackend/{module}.py:{inner.lineno} imports inside a function " \
                                          "without a comment saying why"


def test_the_readme_layout_names_every_module_with_a_line_of_its_own():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\s+([a-z0-9_]+)\.py\s+\S", layout, re.M))
    missing = [m for m in MODULES if m != "__init__" and m not in listed]
    assert not missing, f"README's layout does not list aibackend/{', '.join(missing)}"
    gone = sorted(listed - set(MODULES))
    assert not gone, f"README's layout lists modules that do not exist: {gone}"
