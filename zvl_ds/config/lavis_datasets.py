"""LAVIS's ``datasets:`` block, mapped onto our keys: image processors onto ``transforms``, text processors onto
caption preparation, ``build_info`` storage onto where a dataset's shards are.

::

    datasets:
      coco_retrieval:
        vis_processor: {train: {name: blip_image_train, image_size: 384}, eval: {name: blip_image_eval}}
        text_processor: {train: {name: blip_caption, prompt: "a picture of ", max_words: 30}}
        build_info: {images: {storage: /data/shards/coco}}

* Each processor slot (``train`` / ``eval``) names one of ``IMAGE_PROCESSORS`` / ``TEXT_PROCESSORS``; its options
  fill the keys the processor's entry lists. An unknown name is refused with the accepted ones.
* A run has one training and one evaluation pipeline: the datasets of the block must map onto the same values, and
  a value also given as our own key in the same file must equal it (as for ``run:``). Each file's block is mapped
  before the ``_base_`` files are merged (``zvl_ds.config.layers``), so between files the child's value wins.
* ``build_info.images.storage`` names the dataset's shards (``python -m zvl_ds.make_shards`` writes them): a folder
  in the shard writer's layout -> ``data.datasets.<name>.folder`` (the run's splits pick ``<split>-*.tar``), a shard
  spec (tar, pattern, glob, list file, URL) -> ``data.datasets.<name>.shards``; the other of the two is emptied.
  LAVIS's annotation files are not read: the captions are in the shards.
* The block's datasets are the run's ``data.train_name`` and ``data.valid_name`` unless the config names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from zvl_ds.config.keys import get_path, same_layer, set_path, unknown_choice_message, unknown_key_message
from zvl_ds.config.schema import ConfigError

# LAVIS's image processors normalise with CLIP's statistics unless mean/std are given
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

SLOTS = ("train", "eval")
# our key per slot: the image transform list, and the caption preparation section
TRANSFORM_LIST_KEY = {"train": "transforms.train_transforms", "eval": "transforms.valid_transforms"}
CAPTION_SECTION = {"train": "transforms.caption_train", "eval": "transforms.caption_eval"}

Options = Dict[str, Any]
Targets = Dict[str, Any]  # our dotted key -> value


@dataclass(frozen=True)
class LavisProcessor:
    """One LAVIS processor: its options with LAVIS's defaults, what they set here, and how it differs from LAVIS."""

    defaults: Options
    targets: Callable[[Options, str], Targets]  # (options with defaults filled, slot) -> our keys
    maps_to: str  # for the generated table
    differs: str = ""  # what LAVIS's processor does that ours does not, for the generated table


def _normalize(options: Options) -> Targets:
    return {"transforms.normalize.mean": options["mean"], "transforms.normalize.std": options["std"]}


def _random_crop(transforms: List[str]) -> Callable[[Options, str], Targets]:
    def targets(options: Options, slot: str) -> Targets:
        size = options["image_size"]
        mapped = {TRANSFORM_LIST_KEY[slot]: list(transforms), "transforms.random_resize_crop.size": size,
                  "transforms.random_resize_crop.scale": [options["min_scale"], options["max_scale"]],
                  **_normalize(options)}
        if slot == "train":  # the size synthetic benchmark inputs take is the training one
            mapped["transforms.input_size"] = size
        return mapped
    return targets


def _square_resize(options: Options, slot: str) -> Targets:
    return {TRANSFORM_LIST_KEY[slot]: ["resize"], "transforms.resize.size": options["image_size"],
            **_normalize(options)}


def _resize_center_crop(options: Options, slot: str) -> Targets:
    size = options["image_size"]
    return {TRANSFORM_LIST_KEY[slot]: ["resize", "center_crop"], "transforms.resize.size": size,
            "transforms.center_crop.size": size, **_normalize(options)}


_NORM = {"mean": CLIP_MEAN, "std": CLIP_STD}

IMAGE_PROCESSORS: Dict[str, LavisProcessor] = {
    "blip_image_train": LavisProcessor(
        {"image_size": 384, "min_scale": 0.5, "max_scale": 1.0, **_NORM},
        _random_crop(["random_resize_crop", "autoaug"]),
        "`[random_resize_crop, autoaug]`, `random_resize_crop.size` and `input_size` = `image_size`, "
        "`random_resize_crop.scale` = `[min_scale, max_scale]`, `normalize` = `mean`/`std`",
        "no horizontal flip; AutoAugment's ImageNet policy instead of RandomAugment; bilinear, not bicubic"),
    "blip_image_eval": LavisProcessor(
        {"image_size": 384, **_NORM}, _square_resize,
        "`[resize]`, `resize.size` = `image_size`, `normalize` = `mean`/`std`", "bilinear, not bicubic"),
    "clip_image_train": LavisProcessor(
        {"image_size": 224, "min_scale": 0.9, "max_scale": 1.0, **_NORM},
        _random_crop(["random_resize_crop"]),
        "`[random_resize_crop]`, `random_resize_crop.size` and `input_size` = `image_size`, "
        "`random_resize_crop.scale` = `[min_scale, max_scale]`, `normalize` = `mean`/`std`",
        "bilinear, not bicubic"),
    "clip_image_eval": LavisProcessor(
        {"image_size": 224, **_NORM}, _resize_center_crop,
        "`[resize, center_crop]`, `resize.size` and `center_crop.size` = `image_size`, `normalize` = `mean`/`std`",
        "`resize` is square: the aspect ratio is not kept (LAVIS resizes the shorter side, then crops); "
        "bilinear, not bicubic"),
}


def _caption_targets(options: Options, slot: str) -> Targets:
    section = CAPTION_SECTION[slot]
    return {f"{section}.clean": True, f"{section}.max_words": options["max_words"],
            f"{section}.prompt": options["prompt"]}


TEXT_PROCESSORS: Dict[str, LavisProcessor] = {
    "blip_caption": LavisProcessor(
        {"prompt": "", "max_words": 50}, _caption_targets,
        "`transforms.caption_train` (slot `train`) / `caption_eval` (slot `eval`): `clean: true`, `max_words`, "
        "`prompt`",
        "whitespace runs of any kind become one space (LAVIS collapses runs of two or more)"),
}

PROCESSOR_KINDS = {"vis_processor": IMAGE_PROCESSORS, "text_processor": TEXT_PROCESSORS}
DATASET_KEYS = ("vis_processor", "text_processor", "build_info", "data_type")
BUILD_INFO_KEYS = ("images", "annotations")
IMAGES_KEYS = ("storage",)

# What storage may name. These few rules mirror zvl_ds.data.sources (which the config cannot import): a shard spec
# names shards itself; anything else is a folder in the shard writer's layout, read by split.
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_LIST_SUFFIXES = (".txt", ".lst", ".list")
_SPEC_CHARS = set("*?[{")
# files LAVIS's storage names that hold annotations (or are no shards at all)
_ANNOTATION_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".pkl", ".pt", ".npy", ".zip")

MAKE_SHARDS_HINT = ("zvl_ds reads image-caption shards, not LAVIS's annotation files: write them with python -m "
                    "zvl_ds.make_shards (from each split's annotations and images) and name the output folder "
                    "OUT/<name> in {path}.images.storage")


def storage_target(name: str, storage: Any, where: str) -> Dict[str, str]:
    """Our keys for a dataset's ``build_info.images.storage``: the one it names (``folder`` or ``shards``), and the
    other one emptied, since storage says where the dataset's shards are as a whole."""
    if not isinstance(storage, str) or not storage.strip():
        raise ConfigError(f"{where}: expected a shard folder or shard spec (a non-empty string), got {storage!r}")
    lowered = storage.lower()
    if lowered.endswith(_ANNOTATION_SUFFIXES):
        raise ConfigError(f"{where}={storage!r} names an annotation file. "
                          + MAKE_SHARDS_HINT.format(path=f"datasets.{name}.build_info"))
    is_spec = ("://" in storage or storage.startswith("pipe:") or "::" in storage or _SPEC_CHARS & set(storage)
               or lowered.endswith(_SHARD_SUFFIXES + _LIST_SUFFIXES))
    return {f"data.datasets.{name}.shards": storage if is_spec else "",
            f"data.datasets.{name}.folder": "" if is_spec else storage}


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _check_keys(node: Dict[str, Any], where: str, valid: List[str]) -> None:
    for key in node:
        if key not in valid:
            raise ConfigError(unknown_key_message(f"{where}.{key}", str(key), list(valid)))


def _check_option(key: str, value: Any, where: str) -> None:
    """LAVIS's option types, checked here so that a wrong value is named by its LAVIS path."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "image_size" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{where}: expected a whole number of pixels >= 1, got {value!r}")
    if key in ("min_scale", "max_scale") and not (number and 0 < value <= 1):
        raise ConfigError(f"{where}: expected a fraction of the image area in (0, 1], got {value!r}")
    if key in ("mean", "std") and not (isinstance(value, list) and len(value) == 3
                                       and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in value)):
        raise ConfigError(f"{where}: expected three numbers (red, green, blue), got {value!r}")
    if key == "max_words" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{where}: expected a whole number of words >= 1, got {value!r}")
    if key == "prompt" and not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {value!r}")


def processor_targets(kind: str, slot_options: Any, where: str, slot: str) -> Targets:
    """Our keys for one processor slot, e.g. ``datasets.coco.vis_processor.train: {name: ..., image_size: ...}``."""
    processors = PROCESSOR_KINDS[kind]
    options = dict(_mapping(slot_options, where))
    name = options.pop("name", None)
    if name is None:
        raise ConfigError(f"{where}.name: missing; accepted {kind} names: {', '.join(processors)}")
    if name not in processors:
        raise ConfigError(unknown_choice_message(f"{where}.name", name, list(processors)))
    processor = processors[name]
    _check_keys(options, where, ["name", *processor.defaults])
    for key, value in options.items():
        _check_option(key, value, f"{where}.{key}")
    if "min_scale" in processor.defaults:
        low = options.get("min_scale", processor.defaults["min_scale"])
        high = options.get("max_scale", processor.defaults["max_scale"])
        if low > high:
            raise ConfigError(f"{where}: min_scale={low} is above max_scale={high}")
    return processor.targets({**processor.defaults, **options}, slot)


def dataset_targets(name: str, options: Any) -> Dict[str, Tuple[Any, str]]:
    """Our keys for one dataset of the block: dotted key -> (value, the LAVIS path it comes from)."""
    where = f"datasets.{name}"
    options = _mapping(options, where)
    _check_keys(options, where, list(DATASET_KEYS))
    found: Dict[str, Tuple[Any, str]] = {}
    data_type = options.get("data_type", "images")
    if data_type != "images":
        raise ConfigError(unknown_choice_message(f"{where}.data_type", data_type, ["images"])
                          + "; zvl_ds trains on images with captions")
    for kind in PROCESSOR_KINDS:
        slots = _mapping(options.get(kind), f"{where}.{kind}")
        _check_keys(slots, f"{where}.{kind}", list(SLOTS))
        for slot, slot_options in slots.items():
            path = f"{where}.{kind}.{slot}"
            for key, value in processor_targets(kind, slot_options, path, slot).items():
                _agree(found, key, value, path, "")
    build_info = _mapping(options.get("build_info"), f"{where}.build_info")
    _check_keys(build_info, f"{where}.build_info", list(BUILD_INFO_KEYS))
    if "annotations" in build_info:
        raise ConfigError(f"{where}.build_info.annotations: " + MAKE_SHARDS_HINT.format(path=f"{where}.build_info")
                          + ", without annotations")
    images = _mapping(build_info.get("images"), f"{where}.build_info.images")
    _check_keys(images, f"{where}.build_info.images", list(IMAGES_KEYS))
    if "storage" in images:
        path = f"{where}.build_info.images.storage"
        for key, value in storage_target(name, images["storage"], path).items():
            found[key] = (value, path)
    return found


def _agree(found: Dict[str, Tuple[Any, str]], key: str, value: Any, path: str, prefix: str) -> None:
    """Record ``key = value`` from ``path``; a different value from another path is an error naming both."""
    if key in found and found[key][0] != value:
        other_value, other_path = found[key]
        raise ConfigError(f"{prefix}{path} sets {key}={value!r} but {other_path} sets {other_value!r}: a run has one "
                          "training and one evaluation pipeline, so the datasets' processors must agree")
    found.setdefault(key, (value, path))


def map_lavis_datasets_block(raw: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Move the ``datasets:`` block's options onto our keys. ``raw`` keeps only the names of the block's datasets
    (``datasets: {name: {}}``), which ``apply_lavis_datasets_block`` makes the run's datasets once the whole config
    is merged.

    ``raw`` is one layer of a config (one YAML file, named by ``where``, or the command line), mapped before the
    layers are merged: the block and our own keys must agree inside it; between layers the upper one wins."""
    block = raw.pop("datasets", None)
    if block is None:
        return raw
    prefix = f"{where}: " if where else ""
    if not isinstance(block, dict):
        raise ConfigError(f"{prefix}datasets: must be a mapping of LAVIS dataset names to their options")
    found: Dict[str, Tuple[Any, str]] = {}
    for name, options in block.items():
        if not isinstance(name, str) or not name or "/" in name or "." in name:
            raise ConfigError(f"{prefix}datasets.{name}: a dataset name must be a non-empty folder name without '/' "
                              "or '.'")
        for key, (value, path) in dataset_targets(name, options).items():
            _agree(found, key, value, path, prefix)
    for key, (value, path) in found.items():
        present, existing = get_path(raw, key.split("."))
        if present and existing != value:
            raise ConfigError(f"{prefix}{path} sets {key}={value!r}, which conflicts with {key}={existing!r} "
                              f"{same_layer(where)}; give the value one way")
        set_path(raw, key.split("."), value)
    raw["datasets"] = {name: {} for name in block}
    return raw


def apply_lavis_datasets_block(raw: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Move the ``datasets:`` block's options onto our keys and make its datasets the run's (unless the config names
    them); ``raw`` loses its ``datasets`` block."""
    raw = map_lavis_datasets_block(raw, where)
    names = raw.pop("datasets", None)
    if names:
        _default_dataset_names(raw, list(names))
    return raw


def _default_dataset_names(raw: Dict[str, Any], names: List[str]) -> None:
    """The block's datasets are the ones the run trains on and evaluates (LAVIS's meaning), unless the config
    names its own; none are evaluated when the run has no validation splits."""
    if not names:
        return
    if not get_path(raw, ["data", "train_name"])[0]:
        set_path(raw, ["data", "train_name"], list(names))
    present, valid_splits = get_path(raw, ["data", "valid_splits"])
    if not get_path(raw, ["data", "valid_name"])[0]:
        set_path(raw, ["data", "valid_name"], list(names) if not present or valid_splits else [])


# The LAVIS keys of a dataset entry, for the generated table: key -> what it maps to
DATASET_KEY_NOTES: Dict[str, str] = {
    "vis_processor.train": "one of the image processors below, as the training transforms",
    "vis_processor.eval": "one of the image processors below, as the validation (and exported model's) transforms",
    "text_processor.train": "`blip_caption`, as `transforms.caption_train`",
    "text_processor.eval": "`blip_caption`, as `transforms.caption_eval` (validation captions, zero-shot prompts, "
                           "the exported model's `encode_text`)",
    "build_info.images.storage": "a shard writer's folder (`OUT/<name>` of python -m zvl_ds.make_shards) -> "
                                 "`data.datasets.<name>.folder`, read by `data.train_splits` / `valid_splits`; a "
                                 "shard spec (`.tar`, pattern, glob, list file, URL) -> `data.datasets.<name>.shards`, "
                                 "every split (the other of the two is emptied); an annotation file (`.json`, `.csv`, "
                                 "...) is refused",
    "build_info.annotations": "refused: the captions are in the shards (shard the annotations with python -m "
                              "zvl_ds.make_shards)",
    "data_type": "`images` only",
}
