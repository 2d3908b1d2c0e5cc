"""The documentation's reference tables (docs/configuration.md, docs/lavis-zerovl.md), generated from the code so they
cannot drift (tests/unit/test_config_docs.py compares): every key of the schema, the ZeroVL keys accepted without
effect, the LAVIS ``run:`` mapping, the LAVIS ``model:`` options, the model presets with their variants and the LAVIS
``datasets:`` options (``TABLE_PAGES`` says which page carries which). ``python -m
zvl_ds.config --reference | --accepted | --lavis-mapping | --lavis-model | --presets | --lavis-datasets`` prints them.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any, Dict, List, Tuple

import yaml

from zvl_ds.config.compat import ACCEPTED_WITHOUT_EFFECT, LAVIS_MODEL_OPTIONS, LAVIS_NOTES, LAVIS_RUN_MAP
from zvl_ds.config.lavis_datasets import DATASET_KEY_NOTES, PROCESSOR_KINDS
from zvl_ds.config.presets import DEFAULT_VARIANT, MODEL_PRESETS, MODEL_VARIANTS, PRESET_HELP, VARIANT_HELP
from zvl_ds.config.schema import Config, to_plain

MAPPING_ENTRY = "<name>"  # stands for the user's own keys of a mapping of sections: data.datasets.<name>.size


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """The docstring under each field of a dataclass (``name: type = default`` then ``\"\"\"meaning\"\"\"``), read from
    its source (the module that defines the section, e.g. ``zvl_ds.config.data_section``): the one place a key's
    meaning is written."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: Dict[str, str] = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def key_help(cls: type = Config, prefix: str = "") -> Dict[str, str]:
    """Dotted key -> meaning, for every key of ``cls`` (sections depth-first, mappings under ``<name>``)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: Dict[str, str] = {}
    for item in dataclasses.fields(cls):
        key, tp = prefix + item.name, hints[item.name]
        if dataclasses.is_dataclass(tp):
            out.update(key_help(tp, key + "."))
            continue
        if item.name in docs:
            out[key] = docs[item.name]
        if typing.get_origin(tp) in (dict, Dict) and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            out.update(key_help(typing.get_args(tp)[1], f"{key}.{MAPPING_ENTRY}."))
    return out


def config_keys(cls: type = Config, prefix: str = "") -> List[Tuple[str, Any]]:
    """(dotted key, default) of every key of ``cls``, in declaration order, sections depth-first. A mapping of
    sections (``data.datasets``) is listed itself, then its sections' keys under ``<name>``."""
    hints = typing.get_type_hints(cls)
    rows: List[Tuple[str, Any]] = []
    for item in dataclasses.fields(cls):
        key, tp = prefix + item.name, hints[item.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_keys(tp, key + "."))
            continue
        has_factory = item.default_factory is not dataclasses.MISSING  # type: ignore[misc]
        rows.append((key, item.default_factory() if has_factory else item.default))  # type: ignore[misc]
        if typing.get_origin(tp) in (dict, Dict) and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            rows.extend(config_keys(typing.get_args(tp)[1], f"{key}.{MAPPING_ENTRY}."))
    return rows


def _flow_yaml(value: Any) -> str:
    """A default as one YAML flow value: ``[0.9, 0.98]``, ``null``, ``{}``, ``''``."""
    text = yaml.safe_dump(to_plain(value), default_flow_style=True, width=10 ** 9).strip()
    return text[:-len("\n...")] if text.endswith("\n...") else text  # a lone scalar ends the document with ...


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """``| key | default | meaning |`` for every key of the schema; meanings from the fields' docstrings."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    meanings = key_help()
    for key, default in config_keys():
        lines.append(f"| `{key}` | `{_cell(_flow_yaml(default))}` | {_cell(meanings.get(key, '**undocumented**'))} |")
    return "\n".join(lines) + "\n"


def lavis_mapping_markdown() -> str:
    """``| run.<key> | zvl_ds key |`` for every LAVIS ``run:`` option that ``LAVIS_RUN_MAP`` accepts."""
    lines = ["| `run.<key>` | zvl_ds key |", "| --- | --- |"]
    for key, (target, convert) in LAVIS_RUN_MAP.items():
        note = LAVIS_NOTES.get(key, "converted" if convert is not None else "")
        lines.append(f"| `run.{key}` | `{target}`{_cell(f' ({note})' if note else '')} |")
    return "\n".join(lines) + "\n"


def lavis_datasets_markdown() -> str:
    """``| datasets.<name>.<key> | zvl_ds |`` for the keys of a LAVIS dataset entry, then every accepted processor
    with its options (LAVIS's defaults), what it sets here and how it differs from LAVIS's."""
    lines = ["| LAVIS `datasets:` option | zvl_ds |", "| --- | --- |"]
    for key, note in DATASET_KEY_NOTES.items():
        lines.append(f"| `datasets.<name>.{key}` | {_cell(note)} |")
    for kind, processors in PROCESSOR_KINDS.items():
        for name, processor in processors.items():
            options = ", ".join(f"`{key}: {_flow_yaml(value)}`" for key, value in processor.defaults.items())
            differs = f"; differs from LAVIS: {processor.differs}" if processor.differs else ""
            lines.append(f"| `{kind}: {{name: {name}}}` ({options}) | {_cell(processor.maps_to + differs)} |")
    return "\n".join(lines) + "\n"


def presets_markdown() -> str:
    """``| model.arch | model | model.model_type |`` for every preset in ``MODEL_PRESETS``, with its variants."""
    lines = ["| `model.arch` | model | `model.model_type` |", "| --- | --- | --- |"]
    for name in MODEL_PRESETS:
        variants = "; ".join(
            f"`{variant}`{' (default)' if variant == DEFAULT_VARIANT[name] else ''}: "
            f"{VARIANT_HELP.get(name, {}).get(variant, '**undocumented**')}" for variant in MODEL_VARIANTS[name])
        lines.append(f"| `{name}` | {_cell(PRESET_HELP.get(name, '**undocumented**'))} | {_cell(variants)} |")
    return "\n".join(lines) + "\n"


def lavis_model_markdown() -> str:
    """``| model.<key> | zvl_ds |`` for every LAVIS ``model:`` option of ``LAVIS_MODEL_OPTIONS``."""
    lines = ["| LAVIS `model.<key>` | in zvl_ds |", "| --- | --- |"]
    for key, meaning in LAVIS_MODEL_OPTIONS.items():
        lines.append(f"| `model.{key}` | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def accepted_keys_markdown() -> str:
    """``| key | default | why it has no effect |`` for every key of ``ACCEPTED_WITHOUT_EFFECT``."""
    lines = ["| key | default | why it has no effect |", "| --- | --- | --- |"]
    for key, accepted in ACCEPTED_WITHOUT_EFFECT.items():
        lines.append(f"| `{key}` | `{_cell(_flow_yaml(accepted.default))}` | {_cell(accepted.why)} |")
    return "\n".join(lines) + "\n"


# Marker name (<!-- NAME:start --> / <!-- NAME:end -->) -> generator, and the CLI flag of each. The name README_TABLES
# stays from when the tables lived in README.md; code imports it, so it is kept rather than renamed.
README_TABLES = {"config-reference": reference_markdown, "accepted-keys": accepted_keys_markdown,
                 "lavis-mapping": lavis_mapping_markdown, "lavis-model": lavis_model_markdown,
                 "presets": presets_markdown, "lavis-datasets": lavis_datasets_markdown}
# The documentation page (relative to the repository root) that carries each table between its markers: the
# config keys with the config page, LAVIS's options with the LAVIS page. tests/unit/test_config_docs.py checks it.
TABLE_PAGES = {"config-reference": "docs/configuration.md", "accepted-keys": "docs/configuration.md",
               "presets": "docs/configuration.md", "lavis-mapping": "docs/lavis-zerovl.md",
               "lavis-model": "docs/lavis-zerovl.md", "lavis-datasets": "docs/lavis-zerovl.md"}
README_TABLE_FLAGS = {"--reference": "config-reference", "--accepted": "accepted-keys",
                      "--lavis-mapping": "lavis-mapping", "--lavis-model": "lavis-model", "--presets": "presets",
                      "--lavis-datasets": "lavis-datasets"}


def write_docs_tables(repo_root: str) -> List[str]:
    """Regenerate every table between its ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers on its page of
    ``TABLE_PAGES``; returns the pages that changed. Run after adding or documenting a key."""
    import re

    changed = []
    for page in sorted(set(TABLE_PAGES.values())):
        path = f"{repo_root}/{page}"
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        new = text
        for name in (name for name, where in TABLE_PAGES.items() if where == page):
            pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
            new, count = pattern.subn(lambda m: m.group(1) + README_TABLES[name]() + m.group(2), new)
            if count != 1:
                raise ValueError(f"{page} must hold the markers of table {name!r} exactly once, found {count}")
        if new != text:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(new)
            changed.append(page)
    return changed
