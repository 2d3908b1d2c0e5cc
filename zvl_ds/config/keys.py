"""Dotted key paths in a raw (not yet typed) config mapping, the messages that name a wrong key or choice, the keys
that would make a library run code shipped with a model, and the check every timeout key shares."""
from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Dict, List, Optional, Tuple

from zvl_ds.base.errors import ConfigError


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# The name of the command line's layer of a config (its overrides), in messages; the other layers are YAML files
COMMAND_LINE = "command line"


def same_layer(where: str) -> str:
    """Where two spellings of one value met: ``in the same file`` or ``on the same command line``."""
    return "on the same command line" if where == COMMAND_LINE else "in the same file"


def set_path(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    """``tree[a][b][c] = value`` for path [a, b, c], creating missing sections."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def get_path(tree: Dict[str, Any], path: List[str]) -> Tuple[bool, Any]:
    """(True, value) when ``path`` is present in ``tree``, else (False, None)."""
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def unknown_key_message(path: str, key: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    hint = f"; did you mean {', '.join((parent + '.' if parent else '') + c for c in close)}?" if close else ""
    return f"unknown config key {path}{hint} (valid keys here: {', '.join(sorted(valid))})"


def unknown_choice_message(path: str, value: Any, choices: List[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{path}: invalid choice {value!r}{hint} (valid choices: {', '.join(map(str, choices))})"


# Hugging Face config keys that make transformers import Python files shipped with a model (remote code)
CODE_LOADING_KEYS = frozenset({"trust_remote_code", "auto_map", "code_revision"})


def code_loading_key(fields: Any, prefix: str = "") -> Optional[str]:
    """The dotted path of the first code-loading key in a (nested) Hugging Face config mapping, else None."""
    if not isinstance(fields, dict):
        return None
    for key, value in fields.items():
        if key in CODE_LOADING_KEYS:
            return f"{prefix}{key}"
        found = code_loading_key(value, f"{prefix}{key}.")
        if found:
            return found
    return None


def check_seconds(key: str, seconds: float) -> None:
    """Every wait is bounded: a timeout key holds a finite number of seconds > 0 (NaN and infinity are refused)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{key}: must be a finite number of seconds > 0, got {seconds}")
