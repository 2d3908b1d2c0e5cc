"""The OpenCLIP model folder: ``python -m zvl_ds.export RUN --format open_clip --out DIR``.

open_clip (``create_model_and_transforms('local-dir:DIR')``, ``get_tokenizer('local-dir:DIR')``) and everything built
on it (clip_benchmark, DataComp's evaluation) load the folder as a ``CustomTextCLIP``: a timm image tower
(``vision_cfg.timm_model_name``) and a Hugging Face text tower (``text_cfg.hf_model_name``). The folder::

    DIR/open_clip_config.json          model_cfg (the towers, poolings, projections, logit scale/bias) and
                                       preprocess_cfg (size, mean, std, interpolation, resize mode)
    DIR/open_clip_model.safetensors    every tensor under open_clip's names (visual.trunk.*, visual.head.proj,
                                       text.transformer.*, text.proj, logit_scale[, logit_bias])
    DIR/tokenizer files                open_clip reads the tokenizer of a local-dir model from DIR itself
    DIR/image_tower/config.json        timm's local-dir config: the architecture and its arguments (patch size,
                                       depth, image size, ...), which a bare timm model name cannot carry
    DIR/text_tower/config.json         the text tower's Hugging Face config (built from it, no download)

open_clip hands ``timm_model_name`` to timm and ``hf_model_name`` to ``AutoConfig.from_pretrained`` unchanged, and
both resolve a relative path against the *working directory*, not against DIR; the two tower references are
therefore written as absolute paths of DIR at export time. A moved or copied folder is re-pointed at its new place
with ``rebase_open_clip_folder(DIR)`` (or exported again).

What open_clip cannot describe is refused before anything is written, naming the part and what open_clip offers.
The folder is written into a temporary folder and renamed: it appears complete or not at all.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from zvl_ds.base.atomic_write import atomic_folder, atomic_path
from zvl_ds.config import Config
from zvl_ds.config.presets import MODEL_PRESETS, SOURCE_ARCHS
from zvl_ds.model.dual_encoder import DualEncoder
from zvl_ds.model.inference import ExportError

logger = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
IMAGE_TOWER_DIR = "image_tower"
TEXT_TOWER_DIR = "text_tower"
FORMAT = "zvl_ds.open_clip_folder"
FORMAT_VERSION = 1

# open_clip 3.x's HFTextEncoder: the text models it knows (hf_configs.arch_dict) and its poolers that match ours
OPEN_CLIP_TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "mt5", "m2m_100")
TEXT_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}


def _refuse(part: str, problem: str, offers: str) -> ExportError:
    return ExportError(f"--format open_clip: {part}: {problem}; open_clip offers {offers}. Nothing was written.")


# --------------------------------------------------------------------------------------------------
# What open_clip can describe
# --------------------------------------------------------------------------------------------------


def check_describable(cfg: Config, model: DualEncoder, tokenizer) -> None:
    """Raise ``ExportError`` naming the first part of the model open_clip cannot describe."""
    arch = cfg.model.arch
    if arch in SOURCE_ARCHS:  # trained from a checkpoint users hold: it goes back in that checkpoint's own form
        raise _refuse(f"model.arch={arch}", "this writer describes zvl_ds's own timm + Hugging Face dual encoders; "
                      "a model trained from a Hugging Face CLIP/SigLIP folder is written by --format hf",
                      "--format hf (a CLIPModel / SiglipModel folder) or the zvl_ds format")
    if arch is not None and arch not in MODEL_PRESETS:
        raise _refuse(f"model.arch={arch}", "this writer describes zvl_ds's own timm + Hugging Face dual encoders "
                      "(the presets and explicit towers), not this architecture",
                      f"the presets {', '.join(sorted(MODEL_PRESETS))} or explicit model.image_encoder / "
                      "model.text_encoder towers")
    if not isinstance(model, DualEncoder):
        raise _refuse("model", f"a {type(model).__name__} is not a zvl_ds DualEncoder", "CustomTextCLIP")
    if cfg.model.projection.name != "simple":
        raise _refuse(f"model.projection.name={cfg.model.projection.name}",
                      "zvl_ds's mlp head is Linear(width, width) with bias - GELU - Linear(width, dim) without bias, "
                      "and open_clip's Hugging Face text head 'mlp' is Linear(width, (width + dim) // 2) - GELU - "
                      "Linear, both without bias",
                      "hf_proj_type 'linear' / timm_proj 'linear' (zvl_ds's model.projection.name=simple) and 'mlp' "
                      "(a different head)")
    text_type = getattr(model.text_tower.config, "model_type", None)
    if text_type not in OPEN_CLIP_TEXT_MODEL_TYPES:
        raise _refuse(f"model.text_encoder (a {text_type!r} Hugging Face model)",
                      "open_clip's HFTextEncoder knows the width and layers only of the model types in its hf_configs",
                      f"the model types {', '.join(OPEN_CLIP_TEXT_MODEL_TYPES)}")
    if model.text_pooling not in TEXT_POOLERS:
        raise _refuse(f"model.text_encoder.pooling={model.text_pooling}", "no open_clip pooler matches",
                      "cls_last_hidden_state_pooler (pooling cls) and mean_pooler (pooling mean)")
    if model.text_pooling == "cls" and model.target_token_idx != 0:
        raise _refuse(f"model.text_encoder.target_token_idx={model.target_token_idx}",
                      "open_clip's [CLS] pooler always takes token 0",
                      "cls_last_hidden_state_pooler (token 0) and mean_pooler")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise _refuse("the tokenizer", "it has no padding token, and open_clip's text tower derives the attention "
                      "mask from the padding id", "HF tokenizers with a pad token")
    _check_image_features(cfg, model)


def _check_image_features(cfg: Config, model: DualEncoder) -> None:
    """open_clip's timm head projects what the trunk returns: it must be pooled features [n, width], not tokens."""
    size = _image_size(cfg)
    was_training = model.image_tower.training
    model.image_tower.eval()
    try:
        with torch.no_grad():
            param = next(model.image_tower.parameters())
            features = model.image_tower(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
    finally:
        model.image_tower.train(was_training)
    if features.dim() != 2:
        raise _refuse("model.image_encoder", f"the timm tower returns tokens {tuple(features.shape)} that zvl_ds "
                      "pools itself (model.image_encoder.vit.only_cls_token), and open_clip's timm head would project "
                      "every token", "the timm tower's own pooling (timm_pool ''): leave "
                      "model.image_encoder.kwargs.global_pool at timm's default, or set it to 'token' or 'avg'")


def _image_size(cfg: Config) -> int:
    return int(cfg.transforms.input_size)


# --------------------------------------------------------------------------------------------------
# The folder's parts
# --------------------------------------------------------------------------------------------------


def timm_tower_config(cfg: Config, model: DualEncoder) -> Dict[str, Any]:
    """timm's local-dir ``config.json``: the architecture (the tag without its pretrained suffix) and the arguments
    the tower was built with, so timm builds the same tower from the folder."""
    image_cfg = cfg.model.image_encoder
    architecture = image_cfg.tag.split(".", 1)[0]
    model_args: Dict[str, Any] = {**dict(image_cfg.kwargs), "num_classes": 0}
    if image_cfg.img_size is not None:
        model_args["img_size"] = image_cfg.img_size
    pretrained_cfg = {k: v for k, v in dict(getattr(model.image_tower, "pretrained_cfg", None) or {}).items()
                      if k not in ("state_dict", "file", "source") and _is_json(v)}
    return {"architecture": architecture, "num_features": int(model.image_tower.num_features),
            "pretrained_cfg": pretrained_cfg, "model_args": model_args}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def check_timm_rebuild(tower_config: Dict[str, Any], model: DualEncoder) -> None:
    """Build the trunk as open_clip's TimmModel will (the architecture and its arguments, then
    ``reset_classifier(0)``) and require exactly the trained tower's tensors: no missing or unexpected key."""
    import timm

    trunk = timm.create_model(tower_config["architecture"], pretrained=False, **tower_config["model_args"])
    trunk.reset_classifier(0)
    want = {k: tuple(v.shape) for k, v in model.image_tower.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        shapes = [k for k in want if k in got and want[k] != got[k]][:5]
        raise _refuse("model.image_encoder", f"timm rebuilds {tower_config['architecture']!r} from its name and "
                      f"arguments {tower_config['model_args']} with other tensors (missing {missing}, unexpected "
                      f"{extra}, other shapes {shapes})", "timm towers that timm.create_model(name, **kwargs) "
                      "rebuilds exactly")


def text_tower_config(model: DualEncoder, tokenizer):
    """The text tower's Hugging Face config, its padding id the tokenizer's (open_clip masks by that id)."""
    config = copy.deepcopy(model.text_tower.config)
    config.pad_token_id = int(tokenizer.pad_token_id)
    return config


def logit_parameters(model: DualEncoder) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """open_clip's (logit_scale, logit_bias): logits = logit_scale.exp() * cos + logit_bias.

    Softmax losses divide by the clamped temperature: logit_scale = -log(tau). SigLIP's scale is learned as its log
    and its bias as it is."""
    with torch.no_grad():
        bias = None
        if model.sigmoid_loss:
            scale = model.logit_scale_log.detach().float().reshape(())
            bias = model.logit_bias.detach().float().reshape(())
        else:
            scale = -torch.log(model.temperature().detach().float()).reshape(())
    return scale.clone(), None if bias is None else bias.clone()


def open_clip_state_dict(model: DualEncoder) -> Dict[str, torch.Tensor]:
    """Every tensor under open_clip's CustomTextCLIP names, fp32 (integer buffers kept)."""
    def fp32(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to("cpu")
        return (tensor.float() if tensor.is_floating_point() else tensor).contiguous().clone()

    state = {f"visual.trunk.{k}": fp32(v) for k, v in model.image_tower.state_dict().items()}
    state["visual.head.proj.weight"] = fp32(model.image_projection.weight)
    state.update({f"text.transformer.{k}": fp32(v) for k, v in model.text_tower.state_dict().items()})
    state["text.proj.weight"] = fp32(model.text_projection.weight)
    scale, bias = logit_parameters(model)
    state["logit_scale"] = scale
    if bias is not None:
        state["logit_bias"] = bias
    return state


def preprocess_config(cfg: Config) -> Tuple[Dict[str, Any], Optional[str]]:
    """open_clip's preprocess_cfg for our validation transform, and a note when it cannot be reproduced exactly.

    zvl_ds's ``resize`` squashes the image to R x R (bilinear, Pillow) and ``center_crop`` then cuts C x C; open_clip's
    ``resize_mode: squash`` with ``interpolation: bilinear`` runs the same Pillow resize to the final size, so
    ``[resize, center_crop]`` with R == C (or ``[resize]`` alone) is reproduced exactly. With R > C open_clip has no
    crop after a squash: the folder squashes to C (the same content, slightly more of the border).
    """
    t = cfg.transforms
    names = [name for name in t.valid_transforms if name != "normalize"]
    size = _image_size(cfg)
    note = None
    if names == ["resize", "center_crop"] and t.resize.size != t.center_crop.size:
        note = (f"transforms.valid_transforms resizes to {t.resize.size} then crops {t.center_crop.size}; open_clip "
                f"has no crop after a squash resize, so its preprocessing squashes to {t.center_crop.size} (set "
                f"transforms.resize.size={t.center_crop.size} for identical pixels)")
    elif names not in (["resize", "center_crop"], ["resize"]):
        note = (f"transforms.valid_transforms={t.valid_transforms} has no open_clip equivalent; open_clip squashes "
                f"to {size}")
    return {"size": size, "mode": "RGB", "mean": list(t.normalize.mean), "std": list(t.normalize.std),
            "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}, note


def open_clip_model_config(cfg: Config, model: DualEncoder, image_tower_ref: str, text_tower_ref: str,
                           tokenizer_ref: str) -> Dict[str, Any]:
    _, bias = logit_parameters(model)
    model_cfg: Dict[str, Any] = {
        "embed_dim": int(cfg.model.projection.dim),
        "custom_text": True,
        "vision_cfg": {"image_size": _image_size(cfg), "timm_model_name": f"local-dir:{image_tower_ref}",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "timm_proj_bias": False, "timm_drop": 0.0},
        "text_cfg": {"hf_model_name": text_tower_ref, "hf_tokenizer_name": tokenizer_ref,
                     "hf_model_pretrained": False, "hf_proj_type": "linear",
                     "hf_pooler_type": TEXT_POOLERS[model.text_pooling],
                     "context_length": int(cfg.model.max_length),
                     "vocab_size": int(getattr(model.text_tower.config, "vocab_size", 0) or 0)},
    }
    if bias is not None:
        model_cfg["init_logit_bias"] = float(bias)
    return model_cfg


# --------------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------------


def _check_out_dir(out_dir: str) -> None:
    """Replace only an earlier OpenCLIP export: any other non-empty folder is refused, never removed."""
    if os.path.isfile(out_dir):
        raise ExportError(f"--out {out_dir} is a file; name a folder for the OpenCLIP model")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, CONFIG_FILE)):
        raise ExportError(f"--out {out_dir} is a non-empty folder that is not an OpenCLIP export ({CONFIG_FILE} "
                          f"missing); name a new or empty folder")


def write_open_clip_folder(out_dir: str, cfg: Config, model: DualEncoder, tokenizer, source: Dict[str, str]) -> str:
    """Write ``out_dir`` as an OpenCLIP local-dir model (see the module docstring); returns ``out_dir``."""
    check_describable(cfg, model, tokenizer)
    image_tower = timm_tower_config(cfg, model)
    check_timm_rebuild(image_tower, model)
    _check_out_dir(out_dir)
    final = os.path.abspath(out_dir)
    preprocess, note = preprocess_config(cfg)
    if note:
        logger.warning("--format open_clip: %s", note)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with atomic_folder(final) as folder:
        tokenizer.save_pretrained(folder)
        _write_json(os.path.join(folder, IMAGE_TOWER_DIR, "config.json"), image_tower)
        text_tower_config(model, tokenizer).save_pretrained(os.path.join(folder, TEXT_TOWER_DIR))
        save_file(open_clip_state_dict(model), os.path.join(folder, WEIGHTS_FILE),
                  metadata={"format": FORMAT, **{k: str(v) for k, v in source.items()}})
        config = {"model_cfg": open_clip_model_config(cfg, model, os.path.join(final, IMAGE_TOWER_DIR),
                                                      os.path.join(final, TEXT_TOWER_DIR), final),
                  "preprocess_cfg": preprocess,
                  "zvl_ds": {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
                             "max_length": int(cfg.model.max_length), "preprocess_note": note}}
        _write_json(os.path.join(folder, CONFIG_FILE), config)
    return out_dir


def rebase_open_clip_folder(folder: str) -> List[str]:
    """Point a moved or copied export's tower references at where it is now; returns the keys changed."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{folder} is not an OpenCLIP export ({CONFIG_FILE} missing)")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("zvl_ds", {}).get("format") != FORMAT:
        raise ExportError(f"{path} was not written by zvl_ds's --format open_clip; its references are its own")
    here = os.path.abspath(folder)
    model_cfg = config["model_cfg"]
    wanted = {("vision_cfg", "timm_model_name"): f"local-dir:{os.path.join(here, IMAGE_TOWER_DIR)}",
              ("text_cfg", "hf_model_name"): os.path.join(here, TEXT_TOWER_DIR),
              ("text_cfg", "hf_tokenizer_name"): here}
    changed = []
    for (section, key), value in wanted.items():
        if model_cfg[section].get(key) != value:
            model_cfg[section][key] = value
            changed.append(f"{section}.{key}")
    if changed:
        with atomic_path(path) as temp:
            _write_json(temp, config)
    return changed


def _write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")

