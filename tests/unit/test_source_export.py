"""Models trained from a Hugging Face or OpenCLIP source go back out in the same form: ``--format hf`` folders load in
``CLIPModel`` / ``SiglipModel.from_pretrained`` with no missing or unexpected keys, ``--format open_clip`` folders in
``open_clip.create_model_and_transforms('local-dir:DIR')``, and the zvl_ds folder in ``zvl_ds.load_model`` without
the source folder; each gives the trained model's embeddings within 1e-5 and its temperature (or scale and bias).

"Trained" = every parameter moved by a seeded random step, so an export that kept the source's weights would fail.
"""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import zvl_ds  # noqa: F401  (before transformers / open_clip)
from zvl_ds.config import load_config
from zvl_ds.data import load_tokenizer, tokenize
from zvl_ds.export.formats import FORMATS
from zvl_ds.export.open_clip_sourced import write_open_clip_sourced_folder
from zvl_ds.model.inference import ExportError, load_model
from zvl_ds.model.build import build_model
from tools.tiny_checkpoints import IMAGE_SIZE, write_tiny_hf_folder, write_tiny_open_clip_folder

CAPTIONS = ["a red circle", "two blue squares", "a yellow triangle"]
SOURCE = {"run_dir": "test", "tag": "step_00000001"}


def trained(cfg):
    model = build_model(cfg.model, cfg.loss)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return model.eval()


def inputs(cfg, tokenizer):
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    input_ids, attention_mask = tokenize(tokenizer, CAPTIONS, cfg.model.max_length)
    return pixels, input_ids, attention_mask


def pooled(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_hf_export_loads_in_transformers_with_the_trained_embeddings(kind, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

    source = write_tiny_hf_folder(str(tmp_path / "source"), kind)
    cfg = load_config(None, [f"model.arch={kind}", f"model.hf_folder={source}"])
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    out = FORMATS["hf"](str(tmp_path / "hf"), cfg, model, tokenizer, SOURCE)
    shutil.rmtree(source)  # the export stands alone
    library_class = CLIPModel if kind == "hf_clip" else SiglipModel
    library, info = library_class.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    library.eval()
    pixels, input_ids, attention_mask = inputs(cfg, AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(pixels), model.encode_text(input_ids, attention_mask)
        mask = attention_mask if kind == "hf_clip" else None
        image_diff = float((ours_image - F.normalize(pooled(library.get_image_features(pixel_values=pixels)),
                                                     dim=-1)).abs().max())
        text_diff = float((ours_text - F.normalize(pooled(library.get_text_features(
            input_ids=input_ids, attention_mask=mask)), dim=-1)).abs().max())
    print(f"--format hf {kind}: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    if kind == "hf_clip":
        assert math.exp(-float(library.logit_scale.detach())) == pytest.approx(float(model.temperature().detach()))
    else:
        assert float(library.logit_scale.detach()) == pytest.approx(float(model.logit_scale_log.detach()))
        assert float(library.logit_bias.detach()) == pytest.approx(float(model.logit_bias.detach()))
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == pytest.approx(cfg.transforms.normalize.mean)


def test_open_clip_export_loads_in_open_clip_with_the_trained_embeddings(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    source = write_tiny_open_clip_folder(str(tmp_path / "source"))
    cfg = load_config(None, ["model.arch=open_clip", f"model.open_clip.name=local-dir:{source}"])
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    out = FORMATS["open_clip"](str(tmp_path / "oc"), cfg, model, tokenizer, SOURCE)
    shutil.rmtree(source)
    library, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    library.eval()
    pixels, input_ids, attention_mask = inputs(cfg, tokenizer)
    with torch.no_grad():
        image_diff = float((model.encode_image(pixels) - library.encode_image(pixels, normalize=True)).abs().max())
        text_diff = float((model.encode_text(input_ids, attention_mask)
                           - library.encode_text(input_ids, normalize=True)).abs().max())
    print(f"--format open_clip: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    assert math.exp(-float(library.logit_scale.detach())) == pytest.approx(float(model.temperature().detach()))


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip", "open_clip"])
def test_zvl_ds_folder_of_a_sourced_model_loads_without_the_source(kind, tmp_path):
    if kind == "open_clip":
        pytest.importorskip("open_clip")
        source = write_tiny_open_clip_folder(str(tmp_path / "source"))
        overrides = ["model.arch=open_clip", f"model.open_clip.name=local-dir:{source}"]
    else:
        source = write_tiny_hf_folder(str(tmp_path / "source"), kind)
        overrides = [f"model.arch={kind}", f"model.hf_folder={source}"]
    cfg = load_config(None, overrides)
    model, tokenizer = trained(cfg), load_tokenizer(cfg.model.text_encoder)
    out = FORMATS["zvl_ds"](str(tmp_path / "zvl"), cfg, model, tokenizer, SOURCE)
    shutil.rmtree(source)  # the model config records the architecture: nothing is read from the source
    loaded = load_model(out)
    pixels, input_ids, attention_mask = inputs(cfg, tokenizer)
    with torch.no_grad():
        image_diff = float((loaded.encode_image(pixels) - model.encode_image(pixels)).abs().max())
        text_diff = float((loaded.encode_text(CAPTIONS) - model.encode_text(input_ids, attention_mask)).abs().max())
    print(f"zvl_ds folder {kind}: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    assert loaded.temperature() == pytest.approx(float(model.temperature().detach()))


def test_formats_refuse_models_of_another_source(tmp_path):
    cfg = load_config(None, ["model.arch=tiny"])
    model, tokenizer = build_model(cfg.model, cfg.loss), load_tokenizer(cfg.model.text_encoder)
    with pytest.raises(ExportError, match="model.arch hf_clip or hf_siglip; this run's model.arch is 'tiny'"):
        FORMATS["hf"](str(tmp_path / "hf"), cfg, model, tokenizer, SOURCE)
    # --format open_clip describes a tiny model with open_clip's timm + HF towers; the writer for OpenCLIP-sourced
    # models behind it refuses every other model
    with pytest.raises(ExportError, match="models trained from model.arch open_clip"):
        write_open_clip_sourced_folder(str(tmp_path / "oc"), cfg, model, tokenizer, SOURCE)
    source = write_tiny_hf_folder(str(tmp_path / "source"), "hf_clip")
    siglip_loss = load_config(None, ["model.arch=hf_clip", f"model.hf_folder={source}", "loss.name=SigLIP",
                                     "loss.temperature.name=constant"])
    with pytest.raises(ExportError, match="trained with loss.name=SigLIP"):
        FORMATS["hf"](str(tmp_path / "hf"), siglip_loss, build_model(siglip_loss.model, siglip_loss.loss),
                      load_tokenizer(siglip_loss.model.text_encoder), SOURCE)
    with pytest.raises(ExportError, match="--format hf"):  # a Hugging Face-sourced model goes back as one
        FORMATS["open_clip"](str(tmp_path / "oc"), siglip_loss, build_model(siglip_loss.model, siglip_loss.loss),
                             load_tokenizer(siglip_loss.model.text_encoder), SOURCE)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "oc").exists()
