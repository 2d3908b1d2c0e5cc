"""docs/architecture.md's code map is the package tree: every module and package is on it, and everything on it exists.

The map is the ```text block under the "## Code map" heading: one entry per line, a name then its role, nested by
indentation; a name ending in "/" is a folder. Adding a module means adding one line at its place in the tree; the
failure message names each missing or extra path."""
import os
import re

from tests.helpers.paths import REPO_ROOT

PACKAGE = "zvl_ds"
CODE_MAP_PAGE = os.path.join("docs", "architecture.md")


def code_map_block():
    with open(os.path.join(REPO_ROOT, CODE_MAP_PAGE), encoding="utf-8") as handle:
        text = handle.read()
    section = re.search(r"^## Code map\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, f"{CODE_MAP_PAGE} has no '## Code map' section"
    block = re.search(r"```text\n(.*?)```", section.group(1), flags=re.S)
    assert block, f"{CODE_MAP_PAGE}'s Code map section has no ```text block"
    return block.group(1)


def mapped_paths(block):
    """The repository path of every entry of the map (folders end in '/'), from its name and indentation."""
    paths, stack = [], []  # stack: (indent, folder path) of the folders enclosing the current line
    for number, line in enumerate(block.splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        assert not stack or indent > stack[-1][0], f"code map line {number} is not nested under a folder: {line!r}"
        path = (stack[-1][1] if stack else "") + name
        paths.append(path)
        if name.endswith("/"):
            stack.append((indent, path))
    return paths


def package_paths():
    """What the map must show: every entry at the top of zvl_ds/ (modules, packages, data folders) and every
    module inside its subpackages. A subpackage's __init__.py is left out: the package's own line describes it."""
    required = []
    top = os.path.join(REPO_ROOT, PACKAGE)
    for root, folders, files in os.walk(top):
        folders[:] = [f for f in folders if f != "__pycache__" and not f.startswith(".")]
        relative = os.path.relpath(root, REPO_ROOT).replace(os.sep, "/") + "/"
        is_package = os.path.isfile(os.path.join(root, "__init__.py"))
        if root == top:
            required += [relative + f + "/" for f in folders] + [relative + f for f in files if not f.startswith(".")]
            continue
        if not is_package:
            folders[:] = []  # a data folder (assets/) is one entry; its contents are not modules
            continue
        required += [relative + f + "/" for f in folders if os.path.isfile(os.path.join(root, f, "__init__.py"))]
        required += [relative + f for f in files if f.endswith(".py") and f != "__init__.py"]
    return required


def test_code_map_parses_into_the_package_and_the_other_folders():
    paths = mapped_paths(code_map_block())
    twice = sorted({p for p in paths if paths.count(p) > 1})
    assert not twice, f"the code map lists these twice: {twice}"
    for folder in ("zvl_ds/", "tools/", "configs/", "ds_configs/", "docs/", "tests/"):
        assert folder in paths, f"the code map has no line for {folder}"


def test_every_module_of_the_package_is_on_the_code_map():
    mapped = set(mapped_paths(code_map_block()))
    missing = sorted(set(package_paths()) - mapped)
    assert not missing, (f"{CODE_MAP_PAGE}'s code map lacks these (add one line each, with its role, under its folder in the "
                         f"```text block of '## Code map'): {missing}")


def test_everything_on_the_code_map_exists():
    extra = sorted(p for p in mapped_paths(code_map_block()) if not os.path.exists(os.path.join(REPO_ROOT, p)))
    assert not extra, f"{CODE_MAP_PAGE}'s code map names paths that do not exist (moved or removed?): {extra}"


def test_the_parser_reads_nesting_and_folders():
    block = "zvl_ds/\n  a.py   role\n  sub/   role\n    b.py role\n  c.py role\ntools/  role\n"
    assert mapped_paths(block) == ["zvl_ds/", "zvl_ds/a.py", "zvl_ds/sub/", "zvl_ds/sub/b.py", "zvl_ds/c.py", "tools/"]
