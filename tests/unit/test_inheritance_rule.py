"""The inheritance rule, as a property generated from the mapping tables: a file's values win over the files it is
built on (``_base_``) whatever block or spelling either file uses; two spellings of one key disagree only inside one
file (or inside the command line, the top layer), and then the error names both.

The keys come from the tables that map LAVIS's spellings onto zvl_ds keys: ``LAVIS_RUN_MAP`` (``run:``), the image
and text processors and ``build_info`` storage (``datasets:``), the presets and their variants (``model.arch`` /
``model.model_type``) and LAVIS's other ``model:`` options. For every key, a base sets it one way and a child another
way; the reference is what each file resolves to on its own: the child's value must be the merged one, and it must
differ from the base's own (so the child really changed something) wherever the tables can spell two values.
Pure config loading: no model is built, nothing is read but the YAML files.
"""
import dataclasses
import os
import typing
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import pytest
import yaml

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import Config, ConfigError, config_from_dict, load_config
from zvl_ds.config.compat import LAVIS_MODEL_OPTIONS, LAVIS_RUN_MAP
from zvl_ds.config.data_section import DatasetSource
from zvl_ds.config.keys import deep_merge
from zvl_ds.config.lavis_datasets import IMAGE_PROCESSORS, PROCESSOR_KINDS, SLOTS, TEXT_PROCESSORS
from zvl_ds.config.presets import MODEL_PRESETS, MODEL_VARIANTS, SOURCE_ARCHS

DATASET = "coco"  # the LAVIS dataset name every datasets: spelling uses
Tree = Dict[str, Any]

# --------------------------------------------------------------------------------------------------
# Reading and writing keys
# --------------------------------------------------------------------------------------------------


def nested(dotted: str, value: Any) -> Tree:
    """``a.b.c`` -> {a: {b: {c: value}}}: the zvl_ds spelling of a key."""
    tree = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


MISSING = object()


def value_at(tree: Tree, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


DEFAULTS = config_from_dict({}).to_dict()


def default_of(dotted: str) -> Any:
    """A key's default (MISSING inside a mapping-valued field such as ``kwargs``)."""
    if dotted.startswith(f"data.datasets.{DATASET}."):  # a key of a mapping of sections: the section's default
        return getattr(DatasetSource(), dotted.rsplit(".", 1)[1])
    return value_at(DEFAULTS, dotted)


def schema_type(dotted: str) -> Any:
    """The declared type of a zvl_ds key, read from the Config dataclasses."""
    cls: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):  # inside a mapping-valued field: any value
            return Any
        cls = typing.get_type_hints(cls)[part]
    return cls


def values_of_type(tp: Any) -> List[Any]:
    """Two or more distinct valid values of a key's declared type ([] for a mapping-valued field)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return values_of_type(next(arg for arg in typing.get_args(tp) if arg is not type(None)))
    if origin is Literal:
        return list(typing.get_args(tp))
    if tp is bool:
        return [True, False]
    if tp is int:
        return [2, 4]
    if tp is float:
        return [0.25, 0.5]
    if tp is str:
        return ["base_text", "child_text"]
    if origin in (list, List):
        return [["base_split"], ["child_split"]]
    if origin in (dict, Dict) or tp is Any:
        return []
    raise AssertionError(f"no values generated for type {tp!r}")


def write(folder, name: str, tree: Tree, base: Optional[str] = None) -> str:
    path = folder / name
    path.write_text(yaml.safe_dump({**({"_base_": base} if base else {}), **tree}))
    return str(path)


def resolved(path: str, overrides: Optional[List[str]] = None) -> Tree:
    return load_config(path, overrides).to_dict()


def cli(dotted: str, value: Any) -> str:
    """``key=value`` as a shell user writes it: the value in YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{dotted}={text.removesuffix('...').strip()}"  # a plain scalar's document ends with "..."


# --------------------------------------------------------------------------------------------------
# The spellings of each key, generated from the tables
# --------------------------------------------------------------------------------------------------

# run: -- LAVIS_RUN_MAP: LAVIS key -> zvl_ds key. Values are the zvl_ds ones (a string precision is taken as it is,
# the only task is retrieval), so both spellings of a value are the same YAML value.
RUN_KEY_OF = {target: key for key, (target, _) in LAVIS_RUN_MAP.items()}


def run_values(target: str) -> List[Any]:
    return values_of_type(schema_type(target))


def another(value: Any) -> Any:
    """Another valid value of a LAVIS processor option, of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 16
    if isinstance(value, float):
        return round(value * 0.95, 6)  # a scale in (0, 1]: stays above min_scale's defaults when it is max_scale
    if isinstance(value, list):
        return [round(v * 0.5, 6) for v in value]
    if isinstance(value, str):
        return value + "a photo of "
    raise AssertionError(f"no other value generated for {value!r}")


def processor_spellings() -> List[Tuple[str, str, str, Dict[str, Any]]]:
    """Every processor in every slot, with LAVIS's defaults and with each option changed in turn:
    (kind, slot, name, options with defaults filled)."""
    found = []
    for kind, processors in PROCESSOR_KINDS.items():
        for name, processor in processors.items():
            for slot in SLOTS:
                found.append((kind, slot, name, dict(processor.defaults)))
                for option, value in processor.defaults.items():
                    found.append((kind, slot, name, {**processor.defaults, option: another(value)}))
    return found


PROCESSOR_SPELLINGS = processor_spellings()


def processor_tree(kind: str, slot: str, name: str, options: Dict[str, Any]) -> Tree:
    return {"datasets": {DATASET: {kind: {slot: {"name": name, **options}}}}}


def processor_targets(kind: str, slot: str, name: str, options: Dict[str, Any]) -> Dict[str, Any]:
    return PROCESSOR_KINDS[kind][name].targets(options, slot)


PROCESSOR_KEYS = sorted({key for spelling in PROCESSOR_SPELLINGS for key in processor_targets(*spelling)})


def datasets_options(key: str) -> List[Tuple[Tree, Any]]:
    return [(processor_tree(*spelling), processor_targets(*spelling)[key]) for spelling in PROCESSOR_SPELLINGS
            if key in processor_targets(*spelling)]


# build_info.images.storage: a shard writer's folder or a shard spec, naming where the dataset's shards are
STORAGE_KEYS = [f"data.datasets.{DATASET}.folder", f"data.datasets.{DATASET}.shards"]
STORAGE_VALUES = {STORAGE_KEYS[0]: ["/data/base_folder", "/data/child_folder"],
                  STORAGE_KEYS[1]: ["/data/base/*.tar", "/data/child/*.tar"]}


def storage_tree(value: str) -> Tree:
    return {"datasets": {DATASET: {"build_info": {"images": {"storage": value}}}}}


# model.arch / model.model_type: every preset (those with their keys in the table; the source presets' keys come
# from a model folder, tested in test_model_sources) and every variant of it
TABLE_ARCHS = [arch for arch in MODEL_PRESETS if arch not in SOURCE_ARCHS]
PRESET_SPELLINGS = [(arch, variant) for arch in TABLE_ARCHS for variant in MODEL_VARIANTS[arch]]


def leaf_keys(tree: Tree, prefix: str) -> List[str]:
    """Dotted keys of a preset mapping, a mapping-valued field (``kwargs``, ``config``) counting as one key."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(schema_type(dotted)):
            keys += leaf_keys(value, dotted)
        else:
            keys.append(dotted)
    return keys


def preset_model(arch: str, variant: str) -> Tree:
    return deep_merge(MODEL_PRESETS[arch], MODEL_VARIANTS[arch][variant])


PRESET_KEYS = sorted({key for arch, variant in PRESET_SPELLINGS for key in leaf_keys(preset_model(arch, variant),
                                                                                        "model")})


def preset_value(arch: str, variant: str, key: str) -> Any:
    found = value_at({"model": preset_model(arch, variant)}, key)
    return default_of(key) if found is MISSING else found


def preset_tree(arch: str, variant: str) -> Tree:
    return {"model": {"arch": arch, "model_type": variant}}


def preset_options(key: str) -> List[Tuple[Tree, Any]]:
    return [(preset_tree(arch, variant), preset_value(arch, variant, key)) for arch, variant in PRESET_SPELLINGS]


def finest_keys(tree: Tree, prefix: str) -> List[str]:
    """Dotted keys of a variant's overlay, down to the values it sets inside a mapping-valued field."""
    keys = []
    for key, value in tree.items():
        keys += finest_keys(value, f"{prefix}.{key}") if isinstance(value, dict) and value else [f"{prefix}.{key}"]
    return keys


# the keys some variant sets, per preset with more than one variant (a model_type names one of them)
VARIANT_ARCHS = [arch for arch in TABLE_ARCHS if len(MODEL_VARIANTS[arch]) > 1]
VARIANT_KEYS = sorted({key for arch in VARIANT_ARCHS for overlay in MODEL_VARIANTS[arch].values()
                       for key in finest_keys(overlay, "model")})


def variant_options(key: str) -> List[Tuple[Any, Any]]:
    """A child naming only ``model_type`` (its base names the preset): ((preset, variant), value) for every variant
    of a preset whose variants set ``key``."""
    return [((arch, variant), preset_value(arch, variant, key)) for arch in VARIANT_ARCHS
            for variant in MODEL_VARIANTS[arch]
            if any(key in finest_keys(overlay, "model") for overlay in MODEL_VARIANTS[arch].values())]


# LAVIS's other model: options (load_pretrained, pretrained, ...): zvl_ds keys of the same name
OPTION_KEYS = [f"model.{key}" for key in LAVIS_MODEL_OPTIONS if key not in ("arch", "model_type")]


def zvl_options(key: str, spelt_values: List[Any]) -> List[Tuple[Tree, Any]]:
    """The zvl_ds spelling: the default, every value the other spellings give the key, and values of its type."""
    values: List[Any] = []
    for value in [default_of(key), *spelt_values, *values_of_type(schema_type(key))]:
        if value is not MISSING and value not in values:
            values.append(value)
    return [(nested(key, value), value) for value in values]


# --------------------------------------------------------------------------------------------------
# Cases: (group, key, base spelling, child spelling)
# --------------------------------------------------------------------------------------------------

# group -> (the spellings a base uses, the spellings a child uses)
SPELLINGS = {
    "run": (["zvl_ds", "run"], ["zvl_ds", "run"]),
    "datasets": (["zvl_ds", "datasets"], ["zvl_ds", "datasets"]),
    "storage": (["zvl_ds", "datasets"], ["zvl_ds", "datasets"]),
    "preset": (["zvl_ds", "preset"], ["zvl_ds", "preset"]),
    # a child naming only model.model_type: its base names the preset, and the key one way or the other
    "variant": (["zvl_ds", "preset"], ["variant"]),
    "option": (["zvl_ds"], ["zvl_ds"]),
}
GROUP_KEYS = {"run": sorted(RUN_KEY_OF), "datasets": PROCESSOR_KEYS, "storage": STORAGE_KEYS, "preset": PRESET_KEYS,
              "variant": VARIANT_KEYS, "option": OPTION_KEYS}


def cases():
    for group, keys in GROUP_KEYS.items():
        base_spellings, child_spellings = SPELLINGS[group]
        for key in keys:
            for base in base_spellings:
                for child in child_spellings:
                    yield pytest.param(group, key, base, child, id=f"{group}-{key}-{base}-to-{child}")


def options_for(group: str, key: str, spelling: str) -> List[Tuple[Any, Any]]:
    """(the file's tree, or what to build it from, and the value it is predicted to give ``key``)."""
    if group == "run":
        values = run_values(key)
        return [(nested(key, v) if spelling == "zvl_ds" else {"run": {RUN_KEY_OF[key]: v}}, v) for v in values]
    if group == "datasets":
        spelt = datasets_options(key)
        return spelt if spelling == "datasets" else zvl_options(key, [value for _, value in spelt])
    if group == "storage":
        values = STORAGE_VALUES[key]
        return [(storage_tree(v) if spelling == "datasets" else nested(key, v), v) for v in values]
    if spelling == "variant":
        return variant_options(key)
    if group in ("preset", "variant"):
        spelt = preset_options(key)
        return spelt if spelling == "preset" else zvl_options(key, [value for _, value in spelt])
    return [(option_tree(key, v), v) for v in values_of_type(schema_type(key))]


def option_tree(key: str, value: Any) -> Tree:
    """``model.load_<x>: true`` needs ``model.<x>`` (where the weights are): a file sets it beside the flag."""
    tree = nested(key, value)
    flag = key.rsplit(".", 1)[1]
    if flag.startswith("load_") and value is True:
        tree["model"][flag[len("load_"):]] = "weights_folder"
    return tree


def base_and_child(group: str, key: str, base_spelling: str, child_spelling: str) -> Tuple[Tree, Tree, bool]:
    """A base's and a child's tree, and whether their spellings give the key different values (the tables cannot
    always: every preset's projection is `simple`, LAVIS's caption processor always cleans)."""
    base_options = options_for(group, key, base_spelling)
    child_options = options_for(group, key, child_spelling)
    if child_spelling != "variant":
        for base in base_options:
            for child in child_options:
                if child[1] != base[1]:
                    return base[0], child[0], True
        return base_options[0][0], child_options[-1][0], False
    # the child names a variant; its base names the same preset, one way or the other, with another value
    for (arch, variant), value in child_options:
        for base_tree, base_value in base_options:
            if base_value == value:
                continue
            if base_spelling == "preset" and base_tree["model"]["arch"] != arch:
                continue
            if base_spelling == "zvl_ds":
                base_tree = deep_merge(base_tree, {"model": {"arch": arch}})
            return base_tree, {"model": {"model_type": variant}}, True
    raise AssertionError(f"no variant of a preset gives {key} two values")


def alone(tree: Tree, base_tree: Tree) -> Tree:
    """What a file's own spelling is on its own: a variant-only child needs the preset its base names."""
    model = tree.get("model")
    if isinstance(model, dict) and "model_type" in model and "arch" not in model:
        return {"model": {"arch": base_tree["model"]["arch"], **model}}
    return tree


@pytest.mark.parametrize("group,key,base_spelling,child_spelling", list(cases()))
def test_the_child_wins_whatever_spelling_each_file_uses(tmp_path, group, key, base_spelling, child_spelling):
    base_tree, child_tree, different = base_and_child(group, key, base_spelling, child_spelling)
    base_path = write(tmp_path, "base.yaml", base_tree)
    child_alone = resolved(write(tmp_path, "child_alone.yaml", alone(child_tree, base_tree)))
    expected = value_at(child_alone, key)
    merged = resolved(write(tmp_path, "child.yaml", child_tree, base="base.yaml"))
    assert value_at(merged, key) == expected, (base_tree, child_tree)
    if different:  # the child really changed the value (else the case checks only that the two files load)
        assert value_at(resolved(base_path), key) != expected, "the base already gives the child's value"
    if group == "storage":  # the child names where the shards are: its pair of keys, not a mix with the base's
        for other in STORAGE_KEYS:
            assert value_at(merged, other) == value_at(child_alone, other)


# --------------------------------------------------------------------------------------------------
# Inside one file, or inside the command line: two spellings that disagree are an error naming both
# --------------------------------------------------------------------------------------------------


def conflict_cases():
    for key in sorted(RUN_KEY_OF):
        if len(run_values(key)) > 1:  # LAVIS's run.task has one value here (retrieval): it cannot disagree
            yield pytest.param("run", key, id=f"run-{key}")
    for key in PROCESSOR_KEYS:
        yield pytest.param("datasets", key, id=f"datasets-{key}")
    for key in STORAGE_KEYS:
        yield pytest.param("storage", key, id=f"storage-{key}")


def one_layer_conflict(group: str, key: str) -> Tuple[Tree, Tree, str]:
    """(LAVIS spelling, zvl_ds spelling with another value, the LAVIS path the message must name)."""
    lavis = options_for(group, key, "run" if group == "run" else "datasets")
    zvl = options_for(group, key, "zvl_ds")
    for lavis_tree, lavis_value in lavis:
        for zvl_tree, zvl_value in zvl:
            if zvl_value != lavis_value:
                if group == "run":
                    path = f"run.{RUN_KEY_OF[key]}"
                else:
                    entry = lavis_tree["datasets"][DATASET]
                    kind = next(iter(entry))
                    path = f"datasets.{DATASET}.{kind}.{next(iter(entry[kind]))}" if group == "datasets" else \
                        f"datasets.{DATASET}.build_info.images.storage"
                return lavis_tree, zvl_tree, path
    raise AssertionError(f"no two values for {key}")


@pytest.mark.parametrize("group,key", list(conflict_cases()))
def test_two_spellings_disagreeing_inside_one_file_are_an_error_naming_both(tmp_path, group, key):
    lavis_tree, zvl_tree, lavis_path = one_layer_conflict(group, key)
    write(tmp_path, "base.yaml", {})
    path = write(tmp_path, "child.yaml", deep_merge(lavis_tree, zvl_tree), base="base.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "child.yaml" in message and lavis_path in message and key in message, message


def flat_overrides(tree: Tree, prefix: str = "") -> List[str]:
    """A tree as command-line overrides: one ``key=value`` per leaf, a processor slot given whole."""
    found = []
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        whole = dotted.count(".") == 3 and dotted.startswith("datasets.")  # datasets.<name>.<kind>.<slot>
        if isinstance(value, dict) and value and not whole:
            found += flat_overrides(value, dotted + ".")
        else:
            found.append(cli(dotted, value))
    return found


@pytest.mark.parametrize("group,key", list(conflict_cases()))
def test_two_spellings_disagreeing_on_the_command_line_are_an_error_naming_both(tmp_path, group, key):
    lavis_tree, zvl_tree, lavis_path = one_layer_conflict(group, key)
    path = write(tmp_path, "plain.yaml", {})
    with pytest.raises(ConfigError) as error:
        load_config(path, flat_overrides(zvl_tree) + flat_overrides(lavis_tree))
    message = str(error.value)
    assert "command line" in message and lavis_path in message and key in message, message


def command_line_cases():
    for group in ("run", "datasets", "storage", "preset", "variant"):
        for key in GROUP_KEYS[group]:
            for spelling in SPELLINGS[group][0]:
                for override in SPELLINGS[group][1]:
                    yield pytest.param(group, key, spelling, override, id=f"{group}-{key}-{spelling}-to-{override}")


@pytest.mark.parametrize("group,key,file_spelling,override_spelling", list(command_line_cases()))
def test_the_command_line_wins_over_the_file_whatever_spelling_each_uses(tmp_path, group, key, file_spelling,
                                                                        override_spelling):
    file_tree, override_tree, _ = base_and_child(group, key, file_spelling, override_spelling)
    file_path = write(tmp_path, "config.yaml", file_tree)
    expected = value_at(resolved(write(tmp_path, "alone.yaml", alone(override_tree, file_tree))), key)
    assert value_at(resolved(file_path, flat_overrides(override_tree)), key) == expected, (file_tree, override_tree)


# --------------------------------------------------------------------------------------------------
# Presets inside one file, and the cases the issue reported
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", PRESET_KEYS)
def test_inside_one_file_the_explicit_model_keys_override_its_preset(tmp_path, key):
    """A preset is the defaults of the file that names it (documented): its own model: keys override it."""
    preset, preset_value_ = preset_options(key)[0]
    explicit_value = next(value for _, value in zvl_options(key, [v for _, v in preset_options(key)])
                          if value != preset_value_)
    path = write(tmp_path, "one.yaml", deep_merge(preset, nested(key, explicit_value)))
    assert value_at(resolved(path), key) == explicit_value


def test_a_child_naming_another_preset_keeps_nothing_of_its_bases_preset(tmp_path):
    """Switching presets in a child: every key a preset sets comes from the child's preset (or the default)."""
    for base_arch in TABLE_ARCHS:
        for child_arch in TABLE_ARCHS:
            write(tmp_path, "base.yaml", {"model": {"arch": base_arch}})
            child = write(tmp_path, "child.yaml", {"model": {"arch": child_arch}}, base="base.yaml")
            alone_path = write(tmp_path, "alone.yaml", {"model": {"arch": child_arch}})
            assert resolved(child)["model"] == resolved(alone_path)["model"], (base_arch, child_arch)


def test_the_lavis_processors_of_the_issue_on_the_demo_config(tmp_path):
    """The report: a child of configs/demo.yaml giving datasets.demo_flat.vis_processor exited 2 with a conflict."""
    demo = os.path.join(REPO_ROOT, "configs", "demo.yaml")
    child = tmp_path / "lavis_on_demo.yaml"
    child.write_text(f"_base_: {demo}\ndatasets:\n  demo_flat:\n    vis_processor:\n"
                     "      train: {name: blip_image_train, image_size: 32}\n"
                     "      eval: {name: clip_image_eval, image_size: 32}\n")
    base, cfg = load_config(demo), load_config(str(child))
    assert base.transforms.train_transforms == ["random_resize_crop"]
    assert cfg.transforms.train_transforms == ["random_resize_crop", "autoaug"]
    assert cfg.transforms.valid_transforms == ["resize", "center_crop"]
    assert (cfg.transforms.resize.size, cfg.transforms.center_crop.size) == (32, 32)  # demo.yaml: 36 and 32
    assert cfg.transforms.random_resize_crop.scale == [0.5, 1.0]  # LAVIS's blip_image_train defaults
    assert cfg.transforms.normalize.mean == [0.48145466, 0.4578275, 0.40821073]  # CLIP's statistics
    assert cfg.data.train_name == base.data.train_name  # demo.yaml names its datasets: they stay
    assert cfg.model == base.model and cfg.optim == base.optim


def test_a_variant_in_a_child_wins_over_its_bases_explicit_key(tmp_path):
    """configs/demo.yaml spells patch 4 as an explicit key; a child naming the preset's base variant (patch 8) wins."""
    write(tmp_path, "base.yaml", {"model": {"arch": "tiny", "image_encoder": {"kwargs": {"patch_size": 4}},
                                            "text_encoder": {"pooling": "mean"}}})
    child = write(tmp_path, "child.yaml", {"model": {"model_type": "base"}}, base="base.yaml")
    model = load_config(child).model
    assert model.image_encoder.kwargs["patch_size"] == 8  # the tiny preset's own patch (presets table)
    assert model.text_encoder.pooling == "mean"  # no variant sets it: the base's explicit key stays


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_a_child_naming_a_model_source_wins_over_its_bases_explicit_keys(tmp_path, kind):
    """The source's folder spells the transforms, caption length, tokenizer and loss: a child naming it wins over
    the base's explicit values of those keys; the child's own explicit key still overrides its source."""
    from tools.tiny_checkpoints import MEAN, STD, write_tiny_hf_folder

    folder = write_tiny_hf_folder(str(tmp_path / "source"), kind)
    write(tmp_path, "base.yaml", {"model": {"arch": "tiny", "max_length": 24},
                                  "transforms": {"normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}},
                                  "loss": {"name": "NCE"}})
    child = write(tmp_path, "child.yaml", {"model": {"arch": kind, "hf_folder": folder},
                                           "transforms": {"input_size": 32}}, base="base.yaml")
    cfg = load_config(child)
    alone = config_from_dict({"model": {"arch": kind, "hf_folder": folder}})  # the source on its own
    assert (cfg.transforms.normalize.mean, cfg.transforms.normalize.std) == (MEAN, STD)
    assert cfg.model.max_length == alone.model.max_length != 24
    assert cfg.model.text_encoder.tokenizer == folder
    assert cfg.loss.name == ("SigLIP" if kind == "hf_siglip" else "NCE")
    explicit = write(tmp_path, "explicit.yaml", {"model": {"arch": kind, "hf_folder": folder, "max_length": 12}},
                     base="base.yaml")
    assert load_config(explicit).model.max_length == 12
    # a base naming the source keeps its own explicit keys when the child does not name the source again
    write(tmp_path, "source_base.yaml", {"model": {"arch": kind, "hf_folder": folder, "max_length": 12}})
    child_of_source = write(tmp_path, "child_of_source.yaml", {"seed": 3}, base="source_base.yaml")
    assert load_config(child_of_source).model.max_length == 12


@pytest.mark.parametrize("base_key,child_key", [("folder", "shards"), ("shards", "folder"), ("folder", "parquet"),
                                                 ("parquet", "shards")])
def test_a_child_naming_a_datasets_files_another_way_replaces_the_bases_way(tmp_path, base_key, child_key):
    write(tmp_path, "base.yaml", {"data": {"train_name": ["mine"], "datasets": {"mine": {base_key: "/data/base",
                                                                                          "weight": 2}}}})
    child = write(tmp_path, "child.yaml", {"data": {"datasets": {"mine": {child_key: "/data/child"}}}},
                  base="base.yaml")
    source = load_config(child).data.datasets["mine"]
    assert getattr(source, child_key) == "/data/child" and getattr(source, base_key) == ""
    assert source.weight == 2  # the base's other keys of the source stay
    both = write(tmp_path, "both.yaml", {"data": {"datasets": {"mine": {base_key: "/a", child_key: "/b"}}}})
    with pytest.raises(ConfigError, match="data.datasets.mine"):
        load_config(both)  # inside one file, two spellings are still an error


@pytest.mark.parametrize("group", list(GROUP_KEYS))
def test_every_key_of_the_tables_gets_two_values_in_some_pair_of_spellings(group):
    """No key is covered only by cases where base and child give the same value."""
    base_spellings, child_spellings = SPELLINGS[group]
    for key in GROUP_KEYS[group]:
        if group == "run" and len(run_values(key)) == 1:
            continue  # LAVIS's run.task: retrieval is its only value
        assert any(base_and_child(group, key, base, child)[2]
                   for base in base_spellings for child in child_spellings), key


def test_every_group_of_the_tables_has_cases():
    counted = {group: sum(1 for case in cases() if case.values[0] == group) for group in GROUP_KEYS}
    assert all(counted.values()), counted
    assert len(GROUP_KEYS["run"]) == len(LAVIS_RUN_MAP)
    assert set(PROCESSOR_KEYS) >= {"transforms.train_transforms", "transforms.valid_transforms",
                                   "transforms.caption_train.prompt", "transforms.caption_eval.max_words"}
    assert TEXT_PROCESSORS and IMAGE_PROCESSORS


def test_a_file_naming_a_source_whose_folder_comes_from_the_command_line(tmp_path):
    """configs/clip/finetune_hf_clip.yaml names model.arch: hf_clip and leaves model.hf_folder to the command line:
    the source is whole only in the top layer, which then wins over the file's explicit keys of the source."""
    from tools.tiny_checkpoints import MEAN, write_tiny_hf_folder

    folder = write_tiny_hf_folder(str(tmp_path / "source"), "hf_clip")
    path = write(tmp_path, "recipe.yaml", {"model": {"arch": "hf_clip"},
                                           "transforms": {"normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}})
    assert load_config(path, [f"model.hf_folder={folder}"]).transforms.normalize.mean == MEAN
    with pytest.raises(ConfigError, match="model.arch=hf_clip needs model.hf_folder"):
        load_config(path)
