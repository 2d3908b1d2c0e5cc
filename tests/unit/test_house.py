"""The package's rooms stand on floors (docs/architecture.md): a module imports only from its own room or from rooms
on lower floors, and no modules import each other in a circle. Both rules cover every import of zvl_ds, at the top
of a module or inside a function, read from the source with ``ast``."""
import ast
import os
import re
from typing import Dict, List, Set, Tuple

from tests.helpers.paths import REPO_ROOT

PACKAGE_DIR = os.path.join(REPO_ROOT, "zvl_ds")
# From the ground up; the entry points (train.py, trainer.py, the python -m zvl_ds.<tool> modules, a room's __main__.py
# among them) stand on top.
FLOORS = ["base", "config", "observe", "runtime", "data", "model", "objective", "evaluation", "export", "bench"]
ENTRY_FLOOR = len(FLOORS)
# The package's face (zvl_ds/__init__.py) stands below every room, so that any module may import it for the
# torchvision shim it applies. Its own arrows: that shim, and the one that runs up on purpose: ``zvl_ds.load_model``,
# resolved on first use.
ALLOWED_UPWARD = {("zvl_ds", "zvl_ds.base.torchvision_shim"), ("zvl_ds", "zvl_ds.model"),
                  ("zvl_ds", "zvl_ds.model.inference")}


def module_files() -> Dict[str, str]:
    """module name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for root, folders, files in os.walk(PACKAGE_DIR):
        folders[:] = [f for f in folders if f != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                modules[re.sub(r"\.__init__$", "", dotted)] = path
    return modules


def imports_of(module: str, path: str, known: Set[str]) -> List[Tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of zvl_ds in one file. ``from P import name``
    imports P, and P.name too where that is a module."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    local = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
        for target in targets:
            if target == "zvl_ds" or target.startswith("zvl_ds."):
                found.append((target, node.lineno, id(node) in local))
    return found


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package's face: it applies the torchvision shim, and anything may import it
    if parts[-1] == "__main__":
        return ENTRY_FLOOR  # a room's `python -m zvl_ds.<room>` command is an entry point, whatever its room
    if parts[1] in FLOORS and len(parts) > 2 or (parts[1] in FLOORS and module == f"zvl_ds.{parts[1]}"):
        return FLOORS.index(parts[1])
    return ENTRY_FLOOR


def import_graph():
    files = module_files()
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def test_every_room_has_a_floor_and_every_module_a_room():
    rooms = {name for name in os.listdir(PACKAGE_DIR) if os.path.isfile(os.path.join(PACKAGE_DIR, name, "__init__.py"))}
    assert rooms == set(FLOORS), f"rooms without a floor in this test and docs/architecture.md: {rooms ^ set(FLOORS)}"


def upward_arrows(graph) -> List[str]:
    return [f"{module}:{line} -> {target}{' (inside a function)' if inside else ''}"
            for module, imports in graph.items() for target, line, inside in imports
            if floor(target) > floor(module) and (module, target) not in ALLOWED_UPWARD]


def circles(graph) -> List[str]:
    edges = {module: sorted({target for target, _, _ in imports
                             if target != module and (module, target) not in ALLOWED_UPWARD})
             for module, imports in graph.items()}
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in edges.get(module, []):
            if state.get(target) == "open":
                found.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_runs_up_to_a_higher_floor():
    upward = upward_arrows(import_graph())
    assert upward == [], "imports from a lower room to a higher one:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    found = circles(import_graph())
    assert found == [], "modules that import each other in a circle:\n" + "\n".join(found)


def test_the_checks_see_an_upward_arrow_and_a_circle(tmp_path):
    assert floor("zvl_ds.base.errors") < floor("zvl_ds.config.load") < floor("zvl_ds.model.build") < floor("zvl_ds.train")
    assert floor("zvl_ds.model") == floor("zvl_ds.model.build") and floor("zvl_ds") < floor("zvl_ds.base")
    assert floor("zvl_ds.config.__main__") == floor("zvl_ds.train") > floor("zvl_ds.bench.data")
    source = tmp_path / "towers.py"
    source.write_text("from zvl_ds.data import failures\n\ndef f():\n    from zvl_ds.objective import step\n")
    found = imports_of("zvl_ds.model.towers", str(source), {"zvl_ds.data.failures", "zvl_ds.objective.step"})
    assert found == [("zvl_ds.data", 1, False), ("zvl_ds.data.failures", 1, False), ("zvl_ds.objective", 4, True),
                     ("zvl_ds.objective.step", 4, True)]
    graph = {"zvl_ds.model.towers": found, "zvl_ds.objective.step": [("zvl_ds.model.towers", 3, False)],
             "zvl_ds.data": [], "zvl_ds.data.failures": [], "zvl_ds.objective": []}
    assert upward_arrows(graph) == ["zvl_ds.model.towers:4 -> zvl_ds.objective (inside a function)",
                                    "zvl_ds.model.towers:4 -> zvl_ds.objective.step (inside a function)"]
    assert circles(graph) == ["zvl_ds.model.towers -> zvl_ds.objective.step -> zvl_ds.model.towers"]
