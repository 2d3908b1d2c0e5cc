"""What a model source sets in the config: ``model.arch: hf_clip`` / ``hf_siglip`` (a Hugging Face folder) and
``model.arch: open_clip`` (an OpenCLIP model) fill the tokenizer, the caption length, the image transforms and the
loss from the source, wherever the config leaves them out.

Applied to the raw mapping after the presets and before typing, so the resolved config (the run's config.yaml,
``python -m zvl_ds.config``) records every value the source set, and an explicit key always wins. Only the
source's JSON files are read here (OpenCLIP's built-in configs through ``open_clip``, imported only then); the
weights are read when the model is built (``zvl_ds.model.sources``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from zvl_ds.base.errors import ConfigError
from zvl_ds.base.folder_links import refuse_links_leaving
from zvl_ds.config.keys import code_loading_key, deep_merge

HF_MODEL_TYPES = {"hf_clip": "clip", "hf_siglip": "siglip"}
HF_CONFIG_FILE = "config.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# any of these makes a folder a tokenizer folder AutoTokenizer can read
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_LOCAL_DIR = "local-dir:"
OPEN_CLIP_TOKENIZER_PREFIX = "open_clip:"
# OpenCLIP's PreprocessCfg defaults (open_clip.transform), for sources that do not give their own
OPEN_CLIP_DEFAULT_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPEN_CLIP_DEFAULT_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------------


def _read_json(path: str, key: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{key}: {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} does not hold a JSON object")
    return data


def check_hf_config(config: Dict[str, Any], arch: str, where: str) -> None:
    """A CLIP config for hf_clip, a SigLIP config for hf_siglip, and no key that loads code from a folder."""
    wanted = HF_MODEL_TYPES[arch]
    found = config.get("model_type")
    if found != wanted:
        other = {v: k for k, v in HF_MODEL_TYPES.items()}.get(found)
        hint = f" (use model.arch={other})" if other else ""
        raise ConfigError(f"{where}: model_type {found!r} is not {wanted!r}, which model.arch={arch} needs{hint}")
    code_key = code_loading_key(config)
    if code_key:
        raise ConfigError(f"{where}: has {code_key!r}, which makes Hugging Face run Python code shipped with a "
                          "model (trust_remote_code); not accepted: use a model transformers implements")


def hf_folder_config(folder: str, arch: str) -> Dict[str, Any]:
    """The folder's config.json, checked against ``arch``."""
    if not os.path.isdir(folder):
        raise ConfigError(f"model.hf_folder={folder!r}: not a local folder (nothing is downloaded: give the folder "
                          "a hub download or save_pretrained left on disk)")
    path = os.path.join(folder, HF_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"model.hf_folder={folder!r}: missing {HF_CONFIG_FILE}")
    config = _read_json(path, "model.hf_folder")
    check_hf_config(config, arch, path)
    return config


def hf_model_config(folder: Optional[str], fields: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """The Hugging Face config the towers are built from: the folder's config.json with ``model.hf_config``'s
    fields over it (nested sections merged), or ``model.hf_config`` alone without a folder (exported models)."""
    if not folder:
        if not fields:
            raise ConfigError(f"model.arch={arch} needs model.hf_folder: a local Hugging Face "
                              f"{'CLIPModel' if arch == 'hf_clip' else 'SiglipModel'} folder")
        check_hf_config(fields, arch, "model.hf_config")
        return dict(fields)
    config = deep_merge(hf_folder_config(folder, arch), dict(fields or {}))
    check_hf_config(config, arch, f"model.hf_config over {folder}/{HF_CONFIG_FILE}")
    return config


def hf_weights_file(folder: Optional[str]) -> Optional[str]:
    """The folder's weights file, or None (the model is then built with random weights)."""
    for name in HF_WEIGHTS_FILES:
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _hf_size(value: Any) -> Optional[int]:
    """``224``, ``{"shortest_edge": 224}`` or ``{"height": 224, "width": 224}`` -> 224."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height"):
            if isinstance(value.get(key), int):
                return value[key]
    return None


def hf_preprocessing(folder: str) -> Dict[str, Any]:
    """The transforms keys of the folder's preprocessor_config.json (dotted key -> value)."""
    path = os.path.join(folder, HF_PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"model.hf_folder={folder!r}: missing {HF_PREPROCESSOR_FILE} (the image size, mean and "
                          "std come from it)")
    processor = _read_json(path, "model.hf_folder")
    size = _hf_size(processor.get("size"))
    crop = _hf_size(processor.get("crop_size")) if processor.get("do_center_crop", False) else None
    if size is None or not isinstance(processor.get("image_mean"), list) or not isinstance(
            processor.get("image_std"), list):
        raise ConfigError(f"{path}: needs size, image_mean and image_std")
    side = crop or size
    keys: Dict[str, Any] = {
        "transforms.valid_transforms": ["resize", "center_crop"] if crop else ["resize"],
        "transforms.resize.size": size, "transforms.center_crop.size": side,
        "transforms.random_resize_crop.size": side, "transforms.input_size": side,
        "transforms.normalize.mean": [float(x) for x in processor["image_mean"]],
        "transforms.normalize.std": [float(x) for x in processor["image_std"]],
    }
    return keys


def _hf_source_keys(model: Dict[str, Any], arch: str) -> Dict[str, Any]:
    folder = model.get("hf_folder")
    config = hf_model_config(str(folder) if folder else None, model.get("hf_config") or {}, arch)
    if not folder:
        return {}  # an exported model: everything is already in its config
    text_config = config.get("text_config") or {}
    keys: Dict[str, Any] = {"model.max_length": int(text_config.get("max_position_embeddings",
                                                                    64 if arch == "hf_siglip" else 77))}
    keys.update(hf_preprocessing(str(folder)))
    if any(os.path.isfile(os.path.join(folder, name)) for name in HF_TOKENIZER_FILES):
        keys["model.text_encoder.tokenizer"] = str(folder)
    elif not _has_path(model, "text_encoder.tokenizer"):
        raise ConfigError(f"model.hf_folder={folder!r}: missing the tokenizer files (one of "
                          f"{', '.join(HF_TOKENIZER_FILES)}); add them or set model.text_encoder.tokenizer")
    keys.update({"loss.name": "SigLIP"} if arch == "hf_siglip" else {"loss.temperature.name": "parameter"})
    return keys


# --------------------------------------------------------------------------------------------------
# OpenCLIP models
# --------------------------------------------------------------------------------------------------


@dataclass
class OpenClipSource:
    """An OpenCLIP model as the config names it: its model config, preprocessing and weights file."""

    model_cfg: Dict[str, Any]
    preprocess_cfg: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None


def import_open_clip():
    """``open_clip``, or a ConfigError saying how to install the optional extra."""
    try:
        import open_clip
    except ImportError as error:
        raise ConfigError("model.arch=open_clip needs the optional open_clip extra: pip install -e .[open_clip] "
                          f"({error})") from None
    return open_clip


def open_clip_source(name: str, pretrained: Optional[str], recorded: Optional[Dict[str, Any]] = None
                     ) -> OpenClipSource:
    """Resolve ``model.open_clip``: ``local-dir:FOLDER`` (its config and weights) or a built-in architecture name
    (with ``pretrained`` a local weights file). ``recorded`` (an exported model's config) wins over the name."""
    if recorded:
        return OpenClipSource(model_cfg=dict(recorded))
    if not name:
        raise ConfigError("model.arch=open_clip needs model.open_clip.name: an OpenCLIP architecture name or "
                          "local-dir:FOLDER")
    if name.startswith("hf-hub:"):
        raise ConfigError(f"model.open_clip.name={name!r}: hub names are refused (nothing is downloaded); give "
                          "local-dir:FOLDER of a downloaded model")
    if name.startswith(OPEN_CLIP_LOCAL_DIR):
        folder = name[len(OPEN_CLIP_LOCAL_DIR):]
        if pretrained:
            raise ConfigError(f"model.open_clip.pretrained={pretrained!r} with a local-dir: name: the folder holds "
                              "the weights; give one of the two")
        path = os.path.join(folder, OPEN_CLIP_CONFIG_FILE)
        if not os.path.isdir(folder):
            raise ConfigError(f"model.open_clip.name={name!r}: {folder!r} is not a local folder")
        if not os.path.isfile(path):
            raise ConfigError(f"model.open_clip.name={name!r}: missing {OPEN_CLIP_CONFIG_FILE}")
        data = _read_json(path, "model.open_clip.name")
        if not isinstance(data.get("model_cfg"), dict):
            raise ConfigError(f"{path}: no model_cfg")
        weights = next((os.path.join(folder, f) for f in OPEN_CLIP_WEIGHTS_FILES
                        if os.path.isfile(os.path.join(folder, f))), None)
        return OpenClipSource(data["model_cfg"], dict(data.get("preprocess_cfg") or {}), weights)
    open_clip = import_open_clip()
    model_cfg = open_clip.get_model_config(name.replace("/", "-"))
    if model_cfg is None:
        raise ConfigError(f"model.open_clip.name={name!r}: not an OpenCLIP architecture (open_clip.list_models() "
                          "names them) nor local-dir:FOLDER")
    if pretrained and not os.path.isfile(pretrained):
        raise ConfigError(f"model.open_clip.pretrained={pretrained!r}: not a local file (pretrained tags are "
                          "refused: nothing is downloaded)")
    return OpenClipSource(dict(model_cfg), {}, pretrained or None)


def open_clip_preprocessing(source: OpenClipSource) -> Dict[str, Any]:
    """The transforms keys of an OpenCLIP model's preprocessing (its preprocess_cfg, else OpenCLIP's defaults)."""
    image_size = source.model_cfg.get("vision_cfg", {}).get("image_size", 224)
    size = source.preprocess_cfg.get("size", image_size)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    squash = source.preprocess_cfg.get("resize_mode", "shortest") == "squash"
    return {
        "transforms.valid_transforms": ["resize"] if squash else ["resize", "center_crop"],
        "transforms.resize.size": size, "transforms.center_crop.size": size,
        "transforms.random_resize_crop.size": size, "transforms.input_size": size,
        "transforms.normalize.mean": [float(x) for x in source.preprocess_cfg.get("mean", OPEN_CLIP_DEFAULT_MEAN)],
        "transforms.normalize.std": [float(x) for x in source.preprocess_cfg.get("std", OPEN_CLIP_DEFAULT_STD)],
    }


def _open_clip_source_keys(model: Dict[str, Any]) -> Dict[str, Any]:
    options = model.get("open_clip") or {}
    if not isinstance(options, dict):
        raise ConfigError("model.open_clip: expected a mapping (section)")
    source = open_clip_source(str(options.get("name") or ""), options.get("pretrained"), options.get("config"))
    if options.get("config"):
        return {}  # an exported model: everything is already in its config
    text_cfg = source.model_cfg.get("text_cfg", {})
    keys: Dict[str, Any] = {"model.max_length": int(text_cfg.get("context_length", 77)),
                            "model.text_encoder.tokenizer": OPEN_CLIP_TOKENIZER_PREFIX + options["name"]}
    keys.update(open_clip_preprocessing(source))
    sigmoid = source.model_cfg.get("init_logit_bias") is not None
    keys.update({"loss.name": "SigLIP"} if sigmoid else {"loss.temperature.name": "parameter"})
    return keys


# --------------------------------------------------------------------------------------------------
# Filling the raw config
# --------------------------------------------------------------------------------------------------


def _has_path(mapping: Dict[str, Any], dotted: str) -> bool:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_default(raw: Dict[str, Any], dotted: str, value: Any) -> bool:
    """Set ``dotted`` unless the config already has it; True when set."""
    if _has_path(raw, dotted):
        return False
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return False
    node[parts[-1]] = value
    return True


SOURCE_ONLY_KEYS = ("hf_folder", "hf_config", "open_clip")


# the key that accepts links leading out of a model source folder, in the message that refuses one
ALLOW_OUTSIDE_KEY = "model.allow_outside_files"


def check_source_folder(model: Dict[str, Any], arch: Any) -> None:
    """A source folder's links may not lead out of it (``zvl_ds.base.folder_links``) unless the config allows it;
    checked before any of its files is read."""
    if model.get("allow_outside_files") is True:
        return
    if arch in HF_MODEL_TYPES:
        key, folder = "model.hf_folder", model.get("hf_folder")
    else:
        options = model.get("open_clip")
        name = str(options.get("name") or "") if isinstance(options, dict) else ""
        key, folder = "model.open_clip.name", name[len(OPEN_CLIP_LOCAL_DIR):] if name.startswith(
            OPEN_CLIP_LOCAL_DIR) else None
    if folder and os.path.isdir(str(folder)):
        refuse_links_leaving(str(folder), f"{ALLOW_OUTSIDE_KEY}: true", ConfigError, where=f"{key}: ")


def model_source_keys(raw: Dict[str, Any]) -> Dict[str, Any]:
    """{dotted key: value} of every key the config's model source sets (none for other arches, or an exported
    model's section, which holds them all already); its folder's links are checked before any file is read."""
    model = raw.get("model")
    arch = model.get("arch") if isinstance(model, dict) else None
    if arch not in HF_MODEL_TYPES and arch != "open_clip":
        return {}
    check_source_folder(model, arch)
    return _hf_source_keys(model, arch) if arch in HF_MODEL_TYPES else _open_clip_source_keys(model)


def apply_model_source(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Fill the keys the model source sets where the config leaves them out; returns (raw, the keys set)."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw, []
    arch = model.get("arch")
    if arch not in HF_MODEL_TYPES and arch != "open_clip":
        # an exported model's section holds every key, empty ones included
        used = [key for key in SOURCE_ONLY_KEYS if model.get(key) and not (
            isinstance(model[key], dict) and key == "open_clip" and not any(model[key].values()))]
        if used:
            raise ConfigError(f"model.{used[0]} is set but model.arch={arch!r}: it belongs to model.arch "
                              f"{'open_clip' if used[0] == 'open_clip' else 'hf_clip or hf_siglip'}")
        return raw, []
    keys = model_source_keys(raw)
    if arch == "open_clip" and _has_path(raw, "transforms.caption_aug.enable") and \
            raw["transforms"]["caption_aug"]["enable"]:
        raise ConfigError("transforms.caption_aug.enable=true with model.arch=open_clip: the word-piece "
                          "augmentation needs a Hugging Face word-piece tokenizer, and OpenCLIP's is BPE")
    return raw, [key for key, value in keys.items() if _set_default(raw, key, value)]


def check_open_clip_config(model_cfg: Dict[str, Any]) -> None:
    """The OpenCLIP architectures this source takes: its own and timm image towers, its own text transformer."""
    if "multimodal_cfg" in model_cfg:
        raise ConfigError("model.open_clip: CoCa models (multimodal_cfg) are not dual encoders; not supported")
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            raise ConfigError(f"model.open_clip: text_cfg.{key}={text_cfg[key]!r}: OpenCLIP models with a Hugging "
                              "Face text tower or tokenizer are not supported as a source (they would load them from "
                              "the hub); use OpenCLIP's own text transformer")
