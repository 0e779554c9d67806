"""The package's floors (``cai.LAYERS``) checked against every import in its code: a module imports only modules on
lower floors, wherever the import stands (top of the file or inside a function, where a circle hides from Python), and
every module under cai/ stands on exactly one floor, so a new module has to be placed."""

from __future__ import annotations

import ast
from pathlib import Path

import cai

PACKAGE = Path(cai.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, modules: set[str]) -> set[str]:
    """The cai modules that ``source`` imports anywhere: ``import cai.x``, ``from cai.x import y`` (and ``y`` when it is a
    module itself), ``from cai import x``, and ``importlib.import_module("cai.x")`` with a constant name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return {name for name in found if name in modules} - {"cai"}


def all_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")} - {"cai"}


def floors() -> dict[str, int]:
    """Every module's floor; ``cai.stages.*`` stands for each stage module, so a new stage needs no entry."""
    floor_of = {}
    for floor, names in enumerate(cai.LAYERS):
        for name in names:
            matched = ({m for m in all_modules() if m.startswith(name[:-1]) and m.count(".") == name.count(".")}
                       if name.endswith(".*") else {name})
            floor_of.update(dict.fromkeys(matched, floor))
    return floor_of


def violations(module: str, imported: set[str], floor_of: dict[str, int]) -> list[str]:
    return [f"{module} (floor {floor_of[module]}) imports {other} (floor {floor_of[other]})"
            for other in sorted(imported) if floor_of[other] >= floor_of[module]]


def test_every_module_stands_on_one_floor():
    declared = [module for names in cai.LAYERS for module in names]
    assert len(declared) == len(set(declared)), "a module is on two floors"
    found, placed = all_modules(), set(floors())
    assert placed == found, f"not on a floor: {sorted(found - placed)}; no such module: {sorted(placed - found)}"
    assert "cai.stages.ppo" in placed and "cai.stages" in placed


def test_imports_run_down_the_floors():
    floor_of = floors()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module != "cai":
            problems += violations(module, imports(path.read_text(), set(floor_of) | {"cai"}), floor_of)
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_import_inside_a_function():
    """The check itself: an upward import hidden in a function body, and one through ``from cai import``, are found."""
    source = "def f():\n    from cai.engines import is_engine\n    from cai import stages\n"
    floor_of = floors()
    found = violations("cai.generation", imports(source, set(floor_of)), floor_of)
    g, e, s = floor_of["cai.generation"], floor_of["cai.engines"], floor_of["cai.stages"]
    assert found == [f"cai.generation (floor {g}) imports cai.engines (floor {e})",
                     f"cai.generation (floor {g}) imports cai.stages (floor {s})"]
