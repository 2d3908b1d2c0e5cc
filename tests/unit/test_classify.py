"""Zero-shot classification: the prompt-ensemble classifier, and top-1/top-5 on a labelled image folder whose
answers are known by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zvl_ds.evaluation.zero_shot import build_zero_shot_classifier, classify_folder, list_class_folders

# Colours as cube corners centred at the origin: the "image tower" below maps a solid image to exactly this.
COLOURS = {"black": (0, 0, 0), "blue": (0, 0, 1), "cyan": (0, 1, 1), "green": (0, 1, 0),
           "magenta": (1, 0, 1), "red": (1, 0, 0), "white": (1, 1, 1), "yellow": (1, 1, 0)}
CLASSES = sorted(COLOURS)  # class index order = sorted folder names
TEMPLATES = ["a photo of a {}.", "{}", "a {} photo of a {}"]


def centred(rgb):
    return torch.tensor(rgb, dtype=torch.float32) * 2 - 1


class ColourModel(torch.nn.Module):
    """Image embedding = normalised centred mean colour; text embedding = the centred colour named in the
    prompt (whatever the template), so the classifier built from it is known exactly."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.colour_of_token = {tokenizer.convert_tokens_to_ids(name): centred(rgb) for name, rgb in COLOURS.items()}

    def encode_image(self, images):
        return F.normalize(images.mean(dim=(2, 3)) * 2 - 1, dim=1)

    def encode_text(self, input_ids, attention_mask):
        rows = []
        for ids in input_ids.tolist():
            found = [self.colour_of_token[i] for i in ids if i in self.colour_of_token]
            assert len(set(map(tuple, (f.tolist() for f in found)))) == 1, "one colour word per prompt"
            rows.append(found[0])
        return F.normalize(torch.stack(rows), dim=1)


def to_unit_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _solid(path, rgb, size=(12, 10)):
    Image.new("RGB", size, tuple(255 * c for c in rgb)).save(path)


@pytest.fixture
def colour_folder(tmp_path):
    """One correct image per class, plus three misfiled images whose ranks are known by hand (below), a
    corrupt file (skipped, counted) and a non-image file (ignored)."""
    root = tmp_path / "colours"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        _solid(root / name / "ok.png", COLOURS[name])
    # centred dot products of a red image (1,-1,-1): red 3; yellow, magenta, black 1; green, blue, white -1; cyan -3
    _solid(root / "yellow" / "red_in_yellow.png", COLOURS["red"])  # yellow ranks 2-4: top-5 hit, top-1 miss
    _solid(root / "cyan" / "red_in_cyan.png", COLOURS["red"])  # cyan ranks 8: miss
    # a blue image (-1,-1,1): yellow (1,1,-1) scores -3, the lowest: miss
    _solid(root / "yellow" / "blue_in_yellow.jpg", COLOURS["blue"])
    (root / "white" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "white" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def tokenizer():
    from zvl_ds.config import load_config
    from zvl_ds.data import load_tokenizer

    return load_tokenizer(load_config(None, ["model.arch=tiny"]).model.text_encoder)


def test_classifier_from_known_text_embeddings(tokenizer):
    model = ColourModel(tokenizer)
    classifier = build_zero_shot_classifier(model, tokenizer, CLASSES, TEMPLATES, max_length=16, batch_size=5)
    want = torch.stack([F.normalize(centred(COLOURS[name]), dim=0) for name in CLASSES], dim=1)
    assert classifier.shape == (3, len(CLASSES))
    assert torch.allclose(classifier, want, atol=1e-6)


def test_classify_folder_against_hand_computed_accuracy(tokenizer, colour_folder, capsys):
    model = ColourModel(tokenizer)
    classifier = build_zero_shot_classifier(model, tokenizer, list_class_folders(colour_folder), TEMPLATES,
                                            max_length=16)
    result = classify_folder(model, classifier, colour_folder, to_unit_tensor, batch_size=3)
    # 11 readable images: the 8 correct ones hit top-1; red-in-yellow is a top-5 hit only; the other two miss
    assert result == {"top1": 100.0 * 8 / 11, "top5": 100.0 * 9 / 11, "topk": 5.0, "num_images": 11.0,
                      "num_skipped": 1.0, "num_classes": 8.0}
    assert "skipping unreadable image" in capsys.readouterr().out


@pytest.mark.slow
def test_prompt_ensemble_of_the_real_text_tower(tokenizer):
    """Batched ensemble = per-prompt embeddings averaged over templates, renormalised (one prompt at a time)."""
    from zvl_ds.config import load_config
    from zvl_ds.data import tokenize
    from zvl_ds.model.build import build_model

    cfg = load_config(None, ["model.arch=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss).eval()
    names = ["red", "cyan", "magenta"]
    got = build_zero_shot_classifier(model, tokenizer, names, TEMPLATES, max_length=16, batch_size=4)
    columns = []
    with torch.no_grad():
        for name in names:
            per_template = [model.encode_text(*tokenize(tokenizer, [t.replace("{}", name)], 16)) for t in TEMPLATES]
            columns.append(F.normalize(torch.cat(per_template).mean(dim=0), dim=0))
    assert torch.allclose(got, torch.stack(columns, dim=1), atol=1e-6)
    assert torch.allclose(got.norm(dim=0), torch.ones(3))


def test_fewer_than_five_classes_reports_top_k(tokenizer, tmp_path):
    root = tmp_path / "two"
    for name in ("blue", "red"):
        (root / name).mkdir(parents=True)
        _solid(root / name / "a.png", COLOURS[name])
    _solid(root / "blue" / "wrong.png", COLOURS["red"])
    model = ColourModel(tokenizer)
    classifier = build_zero_shot_classifier(model, tokenizer, ["blue", "red"], ["{}"], max_length=16)
    result = classify_folder(model, classifier, str(root), to_unit_tensor)
    assert (result["top1"], result["top5"], result["topk"]) == (200 / 3, 100.0, 2.0)


def test_bad_inputs(tokenizer, tmp_path, colour_folder):
    model = ColourModel(tokenizer)
    with pytest.raises(ValueError, match=r"needs a '\{\}'.*\['a photo'\]"):
        build_zero_shot_classifier(model, tokenizer, ["red"], ["a photo"], max_length=16)
    with pytest.raises(ValueError, match="at least one class name"):
        build_zero_shot_classifier(model, tokenizer, [], ["{}"], max_length=16)
    with pytest.raises(ValueError, match="classifier has 3 classes but .* has 8 class folders"):
        classify_folder(model, torch.zeros(3, 3), colour_folder, to_unit_tensor)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        classify_folder(model, torch.zeros(3, 3), str(tmp_path / "missing"), to_unit_tensor)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        classify_folder(model, torch.zeros(3, 3), str(tmp_path / "flat"), to_unit_tensor)
    (tmp_path / "flat" / "red").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        classify_folder(model, torch.zeros(3, 1), str(tmp_path / "flat"), to_unit_tensor)
