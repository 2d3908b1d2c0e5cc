"""``python -m zvl_ds.classify``: folder and CSV inputs against a one-image-at-a-time computation with the same
model, the JSON it writes, and bad input (exit code 2, the file and line named)."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from zvl_ds.classify import main
from zvl_ds.evaluation.zero_shot import DEFAULT_TEMPLATES

CLASSES = ["blue", "green", "red"]
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (230, 30, 20)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model exported as a model folder (what zvl_ds.export writes)."""
    from zvl_ds.config import load_config
    from zvl_ds.data import load_tokenizer
    from zvl_ds.export.model_folder import write_model_folder
    from zvl_ds.model.build import build_model

    cfg = load_config(None, ["model.arch=tiny", "transforms.resize.size=32", "transforms.center_crop.size=32",
                             "transforms.input_size=32"])
    torch.manual_seed(4)
    model = build_model(cfg.model, cfg.loss).eval()
    out = tmp_path_factory.mktemp("model") / "tiny"
    write_model_folder(str(out), cfg, model, load_tokenizer(cfg.model.text_encoder), {"test": "classify"})
    return str(out)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "by_class"
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for shade in range(3):
            rgb = tuple(min(255, c + 10 * shade + index) for c in COLOURS[name])
            Image.new("RGB", (40, 36), rgb).save(root / name / f"{shade}.png")
    return root


def one_at_a_time(model_dir, samples, names, templates):
    """Top-1 / top-k hits computed image by image: mean prompt embedding per class, argmax of dot products."""
    from zvl_ds.model.inference import load_model

    zvl = load_model(model_dir)
    columns = [torch.nn.functional.normalize(zvl.encode_text([t.replace("{}", n) for t in templates]).mean(0),
                                             dim=0) for n in names]
    k = min(5, len(names))
    top1 = topk = 0
    for path, label in samples:
        scores = [float(zvl.encode_image([path])[0] @ column) for column in columns]
        order = sorted(range(len(names)), key=lambda c: -scores[c])
        top1 += order[0] == label
        topk += label in order[:k]
    return 100.0 * top1 / len(samples), 100.0 * topk / len(samples)


def test_folder_matches_one_image_at_a_time(model_dir, image_folder, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("# comment\na photo of {}.\n\n{} colour\n")
    out = tmp_path / "res" / "top.json"
    assert main(["--model", model_dir, "--images", str(image_folder), "--templates", str(templates),
                 "--out", str(out), "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    samples = [(str(image_folder / name / f"{s}.png"), i) for i, name in enumerate(CLASSES) for s in range(3)]
    want_top1, want_topk = one_at_a_time(model_dir, samples, CLASSES, ["a photo of {}.", "{} colour"])
    assert result["top1"] == pytest.approx(want_top1) and result["top5"] == pytest.approx(want_topk)
    assert (result["num_images"], result["num_classes"], result["topk"]) == (9.0, 3.0, 3.0)
    assert result["chance_top1"] == pytest.approx(100 / 3) and result["chance_top5"] == 100.0
    assert result["classes"] == CLASSES and result["templates"] == ["a photo of {}.", "{} colour"]
    printed = capsys.readouterr().out
    assert "chance 33.33% / 100.00%" in printed and f"top-1 {want_top1:6.2f}%" in printed
    assert not list(out.parent.glob("*.tmp"))


def test_csv_with_default_templates_names_and_a_missing_image(model_dir, image_folder, tmp_path):
    csv = tmp_path / "labels.csv"
    rows = ["image,label"] + [f"{image_folder}/{name}/{s}.png,{name}_x" for name in CLASSES for s in range(3)]
    rows.append("no/such/image.png,red_x")  # unreadable: skipped and counted
    csv.write_text("\n".join(rows) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("navy blue\nleaf green\nfire red\n")
    out = tmp_path / "csv.json"
    assert main(["--model", model_dir, "--csv", str(csv), "--classes", str(names), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    samples = [(str(image_folder / name / f"{s}.png"), i) for i, name in enumerate(CLASSES) for s in range(3)]
    want_top1, _ = one_at_a_time(model_dir, samples, ["navy blue", "leaf green", "fire red"], DEFAULT_TEMPLATES)
    assert result["top1"] == pytest.approx(want_top1)
    assert (result["num_images"], result["num_skipped"]) == (9.0, 1.0)
    assert result["classes"] == ["blue_x", "green_x", "red_x"]


def test_bad_inputs_exit_2_with_the_place(model_dir, image_folder, tmp_path, capsys):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("image,label\na.png,red\njust_one_field\n")
    no_brace = tmp_path / "t.txt"
    no_brace.write_text("a photo\n")
    names = tmp_path / "two.txt"
    names.write_text("a\nb\n")
    cases = [
        (["--csv", str(bad_csv)], f"{bad_csv}:3: expected 'image,label'"),
        (["--images", str(image_folder), "--templates", str(no_brace)], "needs a '{}'"),
        (["--images", str(image_folder), "--classes", str(names)], "has 2 class names but the images have 3"),
        (["--images", str(tmp_path / "missing")], "image folder not found"),
        (["--images", str(image_folder), "--classes", str(tmp_path / "nope.txt")], "class name file not found"),
    ]
    out = tmp_path / "never.json"
    for extra, message in cases:
        assert main(["--model", model_dir, "--out", str(out), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(["--model", str(tmp_path), "--images", str(image_folder), "--out", str(out)]) == 2
    assert not out.exists()


def test_module_entry_point_runs(model_dir, image_folder, tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "zvl_ds.classify", "--model", model_dir, "--images",
                           str(image_folder), "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and json.loads(out.read_text())["num_images"] == 9.0
