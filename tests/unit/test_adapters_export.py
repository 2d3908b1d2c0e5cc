"""Exports of a model with LoRA adapters (``zvl_ds.export.formats.write_folder``, what ``python -m zvl_ds.export``
runs after consolidating a checkpoint): merged into every format, each loading in its own library with the unmerged
model's embeddings within 1e-5; ``--adapters-only`` in peft's layout, which ``PeftModel.from_pretrained(base, DIR)``
loads onto the source ``CLIPModel`` / ``SiglipModel`` (or zvl_ds's model without adapters) with the same embeddings.

"Trained" = every adapter and every trainable parameter moved by a seeded random step, so an export that dropped
the adapters, or kept a projection's starting value, would fail.
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import zvl_ds  # noqa: F401  (before transformers / open_clip)
from zvl_ds.config import load_config
from zvl_ds.data import load_tokenizer, tokenize
from zvl_ds.export.adapters_folder import ADAPTER_FILES, SIDE_FILE, without_adapters
from zvl_ds.export.formats import write_folder
from zvl_ds.model.build import build_model
from zvl_ds.model.inference import ExportError, load_model
from tools.tiny_checkpoints import IMAGE_SIZE, write_tiny_hf_folder, write_tiny_open_clip_folder

peft = pytest.importorskip("peft")
CAPTIONS = ["a red circle", "two blue squares", "a yellow triangle"]
SOURCE = {"run_dir": "test", "tag": "step_00000001"}
LORA = ["model.image_encoder.lora.r=4", "model.text_encoder.lora.r=2", "model.image_encoder.lora.dropout=0.1"]
EXACT_32 = ["transforms.resize.size=32", "transforms.center_crop.size=32", "transforms.input_size=32"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    folders = {kind: write_tiny_hf_folder(str(root / kind), kind) for kind in ("hf_clip", "hf_siglip")}
    folders["open_clip"] = write_tiny_open_clip_folder(str(root / "open_clip"))
    return folders


def overrides_of(kind, sources):
    if kind == "tiny":
        return ["model.arch=tiny", *EXACT_32]
    if kind == "open_clip":
        return ["model.arch=open_clip", f"model.open_clip.name=local-dir:{sources[kind]}"]
    return [f"model.arch={kind}", f"model.hf_folder={sources[kind]}"]


def trained(cfg):
    """The configured model, every trainable tensor (adapters included) moved by a seeded random step."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def embeddings(model, cfg, tokenizer):
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    input_ids, attention_mask = tokenize(tokenizer, CAPTIONS, cfg.model.max_length)
    with torch.no_grad():
        return pixels, input_ids, attention_mask, model.encode_image(pixels), model.encode_text(input_ids,
                                                                                               attention_mask)


def pooled(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def worst(pairs):
    return max(float((a - b).abs().max()) for a, b in pairs)


def library_embeddings(model, kind, pixels, input_ids, mask):
    """A transformers CLIP / SigLIP model's own unit image and text embeddings (SigLIP's text tower takes no mask)."""
    with torch.no_grad():
        image = F.normalize(pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
        text = F.normalize(pooled(model.get_text_features(
            input_ids=input_ids, attention_mask=mask if kind == "hf_clip" else None)), dim=-1)
    return image, text


@pytest.mark.parametrize("kind", ["tiny", "hf_clip", "hf_siglip", "open_clip"])
def test_merged_zvl_ds_folder_gives_the_unmerged_embeddings(kind, sources, tmp_path):
    cfg = load_config(None, overrides_of(kind, sources) + LORA)
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    pixels, input_ids, mask, image, text = embeddings(model, cfg, tokenizer)
    out = write_folder(str(tmp_path / "zvl"), cfg, model, tokenizer, SOURCE, "zvl_ds")
    meta = json.loads(open(os.path.join(out, "model_config.json")).read())
    assert meta["model"]["image_encoder"]["lora"]["r"] == 0 and meta["model"]["text_encoder"]["lora"]["r"] == 0
    loaded = load_model(out)  # a model without adapters, the merged weights loaded strictly
    with torch.no_grad():
        diff = worst([(loaded.encode_image(pixels), image), (loaded.encode_text(input_ids, mask), text)])
    print(f"merged zvl_ds folder, {kind}: max |diff| {diff:.1e}")
    assert diff <= 1e-5
    # the adapters moved the embeddings: a folder of the base alone would not pass
    base = trained(without_adapters(cfg))
    assert worst([(embeddings(base, cfg, tokenizer)[3], image)]) > 1e-3


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_merged_hf_folder_loads_in_transformers_with_the_unmerged_embeddings(kind, sources, tmp_path):
    from transformers import CLIPModel, SiglipModel

    cfg = load_config(None, overrides_of(kind, sources) + LORA)
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    pixels, input_ids, mask, image, text = embeddings(model, cfg, tokenizer)
    out = write_folder(str(tmp_path / "hf"), cfg, model, tokenizer, SOURCE, "hf")
    library_class = CLIPModel if kind == "hf_clip" else SiglipModel
    library, info = library_class.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    library.eval()
    theirs_image, theirs_text = library_embeddings(library, kind, pixels, input_ids, mask)
    diff = worst([(theirs_image, image), (theirs_text, text)])
    print(f"merged --format hf, {kind}: max |diff| {diff:.1e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("kind", ["tiny", "open_clip"])
def test_merged_open_clip_folder_loads_in_open_clip_with_the_unmerged_embeddings(kind, sources, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = load_config(None, overrides_of(kind, sources) + LORA + (
        ["model.projection.image_projector_trainable=false", "model.projection.text_projector_trainable=false"]
        if kind == "open_clip" else []))
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    pixels, input_ids, mask, image, text = embeddings(model, cfg, tokenizer)
    out = write_folder(str(tmp_path / "oc"), cfg, model, tokenizer, SOURCE, "open_clip")
    library, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    library.eval()
    oc_ids = input_ids if kind == "open_clip" else open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS)
    with torch.no_grad():
        diff = worst([(library.encode_image(pixels, normalize=True), image),
                      (library.encode_text(oc_ids, normalize=True), text)])
    print(f"merged --format open_clip, {kind}: max |diff| {diff:.1e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_adapters_alone_load_in_peft_onto_the_source_checkpoint(kind, sources, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import CLIPModel, SiglipModel

    cfg = load_config(None, overrides_of(kind, sources) + LORA + ["model.text_encoder.lora.alpha=3"])
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    pixels, input_ids, mask, image, text = embeddings(model, cfg, tokenizer)
    out = write_folder(str(tmp_path / "adapters"), cfg, model, tokenizer, SOURCE, adapters_only=True)
    assert set(ADAPTER_FILES) | {SIDE_FILE} <= set(os.listdir(out))
    written = load_file(os.path.join(out, "adapter_model.safetensors"))
    adapters = [key for key in written if ".lora_" in key]
    assert len(adapters) == 2 * sum(len(names) for names in model.adapted_modules.values())
    library_class = CLIPModel if kind == "hf_clip" else SiglipModel
    base = library_class.from_pretrained(sources[kind], dtype=torch.float32)  # the checkpoint the run started from
    loaded = PeftModel.from_pretrained(base, out).eval()
    theirs_image, theirs_text = library_embeddings(loaded, kind, pixels, input_ids, mask)
    diff = worst([(theirs_image, image), (theirs_text, text)])
    print(f"--adapters-only, {kind}, PeftModel.from_pretrained: max |diff| {diff:.1e}")
    assert diff <= 1e-5
    side = json.loads(open(os.path.join(out, SIDE_FILE)).read())
    scalar = "tau" if kind == "hf_clip" else "logit_bias"
    assert side["scalars"][scalar] == pytest.approx(float(model.get_parameter(scalar).detach()))
    assert side["lora"]["text_encoder"]["alpha"] == 3.0


def test_adapters_alone_of_a_tower_model_load_onto_zvl_ds_without_adapters(tmp_path):
    from peft import PeftModel

    cfg = load_config(None, ["model.arch=tiny", *EXACT_32] + LORA)
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    pixels, input_ids, mask, image, text = embeddings(model, cfg, tokenizer)
    out = write_folder(str(tmp_path / "adapters"), cfg, model, tokenizer, SOURCE, adapters_only=True)
    plain = without_adapters(cfg)
    torch.manual_seed(0)  # the same frozen base: the tiny towers are seeded random weights
    base = build_model(plain.model, plain.loss)
    PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        diff = worst([(base.encode_image(pixels), image), (base.encode_text(input_ids, mask), text)])
    assert diff <= 1e-5


def test_adapters_alone_refuse_what_peft_cannot_carry(sources, tmp_path):
    cfg = load_config(None, ["model.arch=tiny", *EXACT_32])
    with pytest.raises(ExportError, match="this run has no LoRA adapters"):
        write_folder(str(tmp_path / "a"), cfg, trained(cfg), load_tokenizer(cfg.model.text_encoder), SOURCE,
                     adapters_only=True)
    unlocked = load_config(None, ["model.arch=tiny", *EXACT_32, *LORA, "model.text_encoder.unlocked_layers=1"])
    with pytest.raises(ExportError, match="belongs to an adapted module"):
        write_folder(str(tmp_path / "b"), unlocked, trained(unlocked), load_tokenizer(unlocked.model.text_encoder),
                     SOURCE, adapters_only=True)
    open_clip = load_config(None, overrides_of("open_clip", sources) + LORA)
    with pytest.raises(ExportError, match="parameter of the whole image_tower"):
        write_folder(str(tmp_path / "c"), open_clip, trained(open_clip),
                     load_tokenizer(open_clip.model.text_encoder), SOURCE, adapters_only=True)
    assert not any((tmp_path / name).exists() for name in "abc")
    shutil.rmtree(tmp_path, ignore_errors=True)
