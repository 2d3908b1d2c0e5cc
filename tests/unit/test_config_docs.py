"""The generated config reference: complete, true to the dataclass defaults, and identical to the copy on its docs page
(docs/configuration.md, docs/lavis-zerovl.md; ``reference.TABLE_PAGES`` says which)."""
import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
import yaml

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import reference as config_module
from zvl_ds.config.compat import LAVIS_MODEL_OPTIONS, LAVIS_NOTES, LAVIS_RUN_MAP
from zvl_ds.config.reference import (README_TABLES, TABLE_PAGES, lavis_mapping_markdown, lavis_model_markdown,
                                     presets_markdown, reference_markdown)
from zvl_ds.config.schema import Config
from zvl_ds.config.reference import key_help

KEY_HELP = key_help()  # each key's meaning: the docstring under its field, in its section's module of zvl_ds/config/
from zvl_ds.config.presets import DEFAULT_VARIANT, MODEL_PRESETS, MODEL_VARIANTS, PRESET_HELP, VARIANT_HELP

REGENERATE = {"config-reference": "--reference", "accepted-keys": "--accepted", "lavis-mapping": "--lavis-mapping",
              "lavis-model": "--lavis-model", "presets": "--presets", "lavis-datasets": "--lavis-datasets"}


def expected_keys(cls=Config, prefix=""):
    """(dotted key, default, type) of every leaf key, walked here independently of reference.config_keys."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += expected_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append((prefix + f.name, default, tp))
        args = typing.get_args(tp)
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(args[1]):
            out += expected_keys(args[1], f"{prefix}{f.name}.<name>.")
    return out


def literal_choices(tp):
    """The accepted values of a Literal (also inside Optional[...] or List[...]); [] for other types."""
    if typing.get_origin(tp) is typing.Literal:
        choices = list(typing.get_args(tp))
        return list(choices[0]) if len(choices) == 1 and isinstance(choices[0], tuple) else choices
    return [c for arg in typing.get_args(tp) for c in literal_choices(arg)]


def table_rows(markdown):
    """Cells of each body row, split on unescaped pipes (so a stray | in a cell shows up as an extra cell)."""
    lines = [line for line in markdown.strip().splitlines()]
    header = [c.strip() for c in re.split(r"(?<!\\)\|", lines[0])[1:-1]]
    assert re.fullmatch(r"\|( --- \|)+", lines[1]), f"not a Markdown table separator: {lines[1]!r}"
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    bad = [line for line, row in zip(lines[2:], rows) if len(row) != len(header)]
    assert not bad, f"rows with {len(header)} cells expected: {bad}"
    return header, rows


def unquote(cell):
    assert cell.startswith("`") and cell.endswith("`"), f"cell not in backticks: {cell!r}"
    return cell[1:-1].replace("\\|", "|")


# --------------------------------------------------------------------------------------------------


def test_every_config_key_has_help_and_no_help_is_stale():
    keys = [key for key, _, _ in expected_keys()]
    assert len(keys) == len(set(keys))
    missing = [key for key in keys if key not in KEY_HELP]
    empty = [key for key in keys if key in KEY_HELP and not KEY_HELP[key].strip()]
    stale = sorted(set(KEY_HELP) - set(keys))
    assert not missing, ("config keys without a docstring under their field (zvl_ds/config/schema.py or a section "
                         f"module): {missing}")
    assert not empty, f"empty KEY_HELP entries: {empty}"
    assert not stale, f"KEY_HELP entries for keys that Config no longer has: {stale}"


def test_help_names_every_choice_of_a_choice_key():
    unnamed = [(key, choice) for key, _, tp in expected_keys() for choice in literal_choices(tp)
               if f"`{choice}`" not in KEY_HELP.get(key, "")]
    assert not unnamed, f"KEY_HELP does not explain these (key, choice) pairs: {unnamed}"


def test_reference_table_lists_every_key_in_order_with_its_true_default_and_help():
    header, rows = table_rows(reference_markdown())
    assert header == ["key", "default", "meaning"]
    expected = expected_keys()
    assert [unquote(row[0]) for row in rows] == [key for key, _, _ in expected]
    for row, (key, default, _) in zip(rows, expected):
        rendered = unquote(row[1])
        assert "\n" not in rendered and yaml.safe_load(rendered) == default, (key, rendered, default)
        assert row[2] == KEY_HELP[key].replace("|", "\\|")
    # spot checks of the compact flow style docs/configuration.md shows
    cells = {unquote(row[0]): unquote(row[1]) for row in rows}
    assert cells["optim.param.betas"] == "[0.9, 0.98]"
    assert cells["precision"] == "null" and cells["data.datasets"] == "{}" and cells["data.batch_size"] == "1024"
    assert cells["data.datasets.<name>.shards"] == "''" and cells["model.image_encoder.kwargs"] == "{}"


def test_lavis_table_lists_every_run_key_and_explains_every_conversion():
    header, rows = table_rows(lavis_mapping_markdown())
    assert header == ["`run.<key>`", "zvl_ds key"]
    assert [unquote(row[0]) for row in rows] == [f"run.{key}" for key in LAVIS_RUN_MAP]
    for row, (key, (target, convert)) in zip(rows, LAVIS_RUN_MAP.items()):
        assert row[1].startswith(f"`{target}`"), (key, row[1])
        if convert is not None:
            assert key in LAVIS_NOTES, f"run.{key} converts its value: say how in compat.LAVIS_NOTES"
        if key in LAVIS_NOTES:
            assert row[1] == f"`{target}` ({LAVIS_NOTES[key]})"
    stale = sorted(set(LAVIS_NOTES) - set(LAVIS_RUN_MAP))
    assert not stale, f"LAVIS_NOTES entries for run keys LAVIS_RUN_MAP no longer has: {stale}"
    # a target is a real config key (or a whole top-level key)
    keys = {key for key, _, _ in expected_keys()}
    assert not [t for t, _ in LAVIS_RUN_MAP.values() if t not in keys]


def test_presets_table_describes_every_preset_and_its_variants():
    assert set(PRESET_HELP) == set(MODEL_PRESETS), "presets.PRESET_HELP must describe exactly MODEL_PRESETS"
    assert set(MODEL_VARIANTS) == set(DEFAULT_VARIANT) == set(VARIANT_HELP) == set(MODEL_PRESETS), (
        "every preset needs variants (presets.MODEL_VARIANTS), a default variant and the variants' help")
    header, rows = table_rows(presets_markdown())
    assert header == ["`model.arch`", "model", "`model.model_type`"]
    assert [unquote(row[0]) for row in rows] == list(MODEL_PRESETS)
    assert all(row[1] == PRESET_HELP[unquote(row[0])] for row in rows)
    for row in rows:
        arch = unquote(row[0])
        assert set(VARIANT_HELP[arch]) == set(MODEL_VARIANTS[arch]) and DEFAULT_VARIANT[arch] in MODEL_VARIANTS[arch]
        cells = row[2].split("; `")
        assert len(cells) == len(MODEL_VARIANTS[arch])
        for cell, variant in zip(cells, MODEL_VARIANTS[arch]):
            default = " (default)" if variant == DEFAULT_VARIANT[arch] else ""
            assert cell.lstrip("`") == f"{variant}`{default}: {VARIANT_HELP[arch][variant]}", (arch, variant)


def test_lavis_model_table_lists_every_model_option_as_a_real_key():
    header, rows = table_rows(lavis_model_markdown())
    assert header == ["LAVIS `model.<key>`", "in zvl_ds"]
    assert [unquote(row[0]) for row in rows] == [f"model.{key}" for key in LAVIS_MODEL_OPTIONS]
    assert all(row[1] == LAVIS_MODEL_OPTIONS[unquote(row[0])[len("model."):]].replace("|", "\\|") for row in rows)
    keys = {key for key, _, _ in expected_keys()}
    assert not [key for key in LAVIS_MODEL_OPTIONS if f"model.{key}" not in keys]
    for key in ("arch", "model_type", "load_pretrained", "pretrained", "load_finetuned", "finetuned"):
        assert key in LAVIS_MODEL_OPTIONS, f"LAVIS's model.{key} must be in the table"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(README_TABLES))
def test_cli_prints_each_table(name):
    flag = REGENERATE[name]
    assert config_module.README_TABLE_FLAGS[flag] == name
    done = subprocess.run([sys.executable, "-m", "zvl_ds.config", flag], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == README_TABLES[name]()


def documentation_pages():
    """README.md and every docs/*.md page, relative to the repository root."""
    docs = os.path.join(REPO_ROOT, "docs")
    return ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(docs) if name.endswith(".md"))


def test_every_table_has_a_page():
    assert set(TABLE_PAGES) == set(README_TABLES), "reference.TABLE_PAGES must name the page of every table"


@pytest.mark.parametrize("name", sorted(README_TABLES))
def test_docs_page_carries_the_current_table(name):
    page = TABLE_PAGES[name]
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    command = f"python -m zvl_ds.config {REGENERATE[name]}"
    # exactly one page holds the table, so a copy left behind on another page cannot go stale unnoticed
    holders = []
    for other in documentation_pages():
        with open(os.path.join(REPO_ROOT, other), encoding="utf-8") as handle:
            if start in handle.read():
                holders.append(other)
    assert holders == [page], f"the {name} table must be on {page} only (reference.TABLE_PAGES), found on {holders}"
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as handle:
        text = handle.read()
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), (
        f"{page} must hold the generated table once between {start} and {end}; paste the output of `{command}`")
    between = text[text.index(start) + len(start):text.index(end)]
    assert between.strip() == README_TABLES[name]().strip(), (
        f"{page}'s table between {start} and {end} is out of date; regenerate it with `{command}`")


def test_accepted_keys_table_lists_every_key_without_effect_and_none_of_the_schema():
    from zvl_ds.config.compat import ACCEPTED_WITHOUT_EFFECT
    from zvl_ds.config.reference import accepted_keys_markdown

    header, rows = table_rows(accepted_keys_markdown())
    assert header == ["key", "default", "why it has no effect"]
    assert [unquote(row[0]) for row in rows] == list(ACCEPTED_WITHOUT_EFFECT)
    for row, (key, accepted) in zip(rows, ACCEPTED_WITHOUT_EFFECT.items()):
        assert yaml.safe_load(unquote(row[1])) == accepted.default, key
        assert row[2] == accepted.why.replace("|", "\\|") and accepted.why.strip(), key
    schema_keys = {key for key, _, _ in expected_keys()}
    assert not schema_keys & set(ACCEPTED_WITHOUT_EFFECT), "a key either acts (schema) or is accepted without effect"
