"""Evaluation captions prepared (transforms.caption_eval) beyond the loaders: zero-shot prompts and exported models."""
import json
import os

import torch

from zvl_ds.config import load_config
from zvl_ds.data import load_tokenizer
from zvl_ds.data import tokenize
from zvl_ds.data.transforms import caption_preparer
from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.model.inference import load_model, PREPROCESS_FILE
from zvl_ds.model.build import build_model
from zvl_ds.evaluation.zero_shot import build_zero_shot_classifier

CLEAN_EVAL = ["model.arch=tiny", "model.max_length=12", "transforms.caption_eval.clean=true",
              "transforms.caption_eval.max_words=5"]


def tiny_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.loss).eval()


def test_exported_model_tokenises_text_as_evaluation_did(tmp_path):
    cfg = load_config(None, CLEAN_EVAL + ["transforms.caption_eval.prompt='a picture of '"])
    model, tokenizer = tiny_model(cfg), load_tokenizer(cfg.model.text_encoder)
    folder = write_model_folder(str(tmp_path / "model"), cfg, model, tokenizer, {"run": "test"})
    with open(os.path.join(folder, PREPROCESS_FILE)) as handle:
        recorded = json.load(handle)
    assert (recorded["caption_clean"], recorded["caption_max_words"], recorded["caption_prompt"]) == (
        True, 5, "a picture of ")
    loaded = load_model(folder)
    raw, prepared = "A RED (shiny) Car: parked here!", "a picture of a red shiny car parked"
    tokens = loaded.tokenize(raw)
    assert tokens["input_ids"].tolist() == tokenize(tokenizer, [prepared], 12)[0].tolist()
    assert tokens["input_ids"].tolist() != tokenize(tokenizer, [raw], 12)[0].tolist()
    ids, mask = tokenize(tokenizer, [prepared], 12)
    assert torch.allclose(loaded.encode_text(raw), loaded.encode_text(ids, mask))
    assert loaded.config.transforms.caption_eval.max_words == 5  # what eval_retrieval --model FOLDER evaluates with


def test_folder_written_without_caption_fields_reads_text_as_written(tmp_path):
    cfg = load_config(None, ["model.arch=tiny", "model.max_length=12"])
    model, tokenizer = tiny_model(cfg), load_tokenizer(cfg.model.text_encoder)
    folder = write_model_folder(str(tmp_path / "model"), cfg, model, tokenizer, {"run": "test"})
    path = os.path.join(folder, PREPROCESS_FILE)
    with open(path) as handle:
        recorded = json.load(handle)
    old = {key: value for key, value in recorded.items() if not key.startswith("caption_")}
    assert len(old) < len(recorded)
    with open(path, "w") as handle:
        json.dump(old, handle)
    loaded = load_model(folder)
    raw = "A RED (shiny) Car: parked here!"
    assert loaded.prepare_text is None
    assert loaded.tokenize(raw)["input_ids"].tolist() == tokenize(tokenizer, [raw], 12)[0].tolist()


def test_zero_shot_prompts_are_prepared_like_evaluation_captions():
    cfg = load_config(None, CLEAN_EVAL)
    model, tokenizer = tiny_model(cfg), load_tokenizer(cfg.model.text_encoder)
    prepare = caption_preparer(cfg.transforms.caption_eval)
    prepared = build_zero_shot_classifier(model, tokenizer, ["Dog!", "Cat (tabby)"], ["A photo of a {}."], 12,
                                          prepare_text=prepare)
    by_hand = build_zero_shot_classifier(model, tokenizer, ["dog", "cat"], ["a photo of a {}"], 12)
    as_written = build_zero_shot_classifier(model, tokenizer, ["Dog!", "Cat (tabby)"], ["A photo of a {}."], 12)
    assert torch.allclose(prepared, by_hand, atol=1e-6)
    assert not torch.allclose(prepared, as_written, atol=1e-4)
