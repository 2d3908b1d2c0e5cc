"""clip_benchmark's WebDataset layout: what ``make_shards --clip-benchmark`` writes (checked against the files and
images it was written from, and read with clip_benchmark's own reader), templates in both notations, and a
``data.zeroshot`` set that is such a folder scoring exactly as the image folder it was written from."""
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from zvl_ds.data.clip_benchmark_sets import (BenchmarkSetError, from_benchmark_template, read_classification_set,
                                             to_benchmark_template)
from zvl_ds.data.writing.clip_benchmark import tar_count
from zvl_ds.evaluation.zero_shot import DEFAULT_TEMPLATES
from zvl_ds.make_shards import main

SHAPES = {"circle": (220, 30, 30), "square": (30, 200, 40), "tall_star": (20, 40, 220)}


@pytest.fixture
def labelled(tmp_path):
    """A folder by class: RGB JPEGs and PNGs kept as they are, a palette PNG converted, one unreadable file."""
    root = tmp_path / "by_class"
    for index, (name, rgb) in enumerate(SHAPES.items()):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (40, 30), rgb).save(root / name / "a.jpg", quality=90)
        Image.new("RGB", (33, 47), tuple(c // 2 for c in rgb)).save(root / name / "b.png")
    Image.new("P", (20, 20), 3).save(root / "circle" / "c.png")
    (root / "square" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def read_tars(folder):
    """{key: {extension: bytes}} over every tar of ``folder/test``."""
    samples = {}
    count = int((folder / "test" / "nshards.txt").read_text())
    for shard in range(count):
        with tarfile.open(folder / "test" / f"{shard}.tar") as archive:
            for member in archive:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def test_templates_round_trip_in_clip_benchmark_notation():
    for template in ["a photo of a {}.", "{} and {}", "a {} in {braces}", "no marker"]:
        converted = to_benchmark_template(template)
        assert converted.format(c="X") == template.replace("{}", "X")
        assert from_benchmark_template(converted) == template


def test_classification_set_holds_the_images_labels_names_and_templates(labelled, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of a {}.\n{} shape\n")
    out = tmp_path / "cb"
    assert main(["--clip-benchmark", "--labelled", str(labelled), "--dataset", "shapes", "--out", str(out),
                 "--templates", str(templates), "--samples-per-shard", "4"]) == 0
    assert "skipped 1 [corrupt_image]" in capsys.readouterr().out
    folder = out / "shapes"
    assert (folder / "dataset_type.txt").read_text() == "classification\n"
    assert (folder / "classnames.txt").read_text() == "circle\nsquare\ntall star\n"
    assert (folder / "zeroshot_classification_templates.txt").read_text() == "a drawing of a {c}.\n{c} shape\n"
    samples = read_tars(folder)
    # 8 candidates at 4 per tar would fill 2 tars; clip_benchmark eval's 4 default workers need one each
    assert int((folder / "test" / "nshards.txt").read_text()) == 4 and len(samples) == 7
    originals = {(labelled / n / f).read_bytes(): i for i, n in enumerate(SHAPES) for f in ("a.jpg", "b.png")}
    by_bytes = {}
    for members in samples.values():
        (ext, data), = [(e, d) for e, d in members.items() if e != "cls"]
        by_bytes[data] = (ext, int(members["cls"]))
    for data, label in originals.items():  # RGB JPEG / PNG: the file's own bytes
        assert by_bytes.pop(data)[1] == label
    (data, (ext, label)), = by_bytes.items()  # the palette PNG: lossless RGB PNG of the same pixels
    assert (ext, label) == ("png", 0)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    assert Image.open(io.BytesIO(data)).tobytes() == Image.open(labelled / "circle" / "c.png").convert("RGB").tobytes()


def test_clip_benchmark_reads_both_sets_with_its_own_reader(labelled, tmp_path):
    pytest.importorskip("clip_benchmark")
    import zvl_ds  # noqa: F401  (the torchvision shim before clip_benchmark imports it)
    from clip_benchmark.datasets.builder import build_dataset

    data = tmp_path / "data" / "val"
    (data / "valid").mkdir(parents=True)
    rows = ["image,caption"]
    for index, rgb in enumerate([(200, 10, 10), (10, 200, 10)]):
        Image.new("RGB", (50, 40), rgb).save(data / "valid" / f"{index}.jpg")
        rows += [f"{index}.jpg,colour {index} first", f'{index}.jpg,"colour {index}\nsecond line"']
    (data / "valid_anno.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cb"
    assert main(["--clip-benchmark", "--labelled", str(labelled), "--dataset", "shapes", "--out", str(out)]) == 0
    assert main(["--clip-benchmark", "--data-root", str(tmp_path / "data"), "--dataset", "val", "--out",
                 str(out)]) == 0

    shapes = build_dataset("wds/shapes", root=str(out / "shapes"), transform=lambda image: image.size,
                           task="zeroshot_classification")
    assert shapes.classes == ["circle", "square", "tall star"] and shapes.templates == list(
        to_benchmark_template(t) for t in DEFAULT_TEMPLATES)
    assert sorted(label for _, label in shapes) == [0, 0, 0, 1, 1, 2, 2]
    retrieval = build_dataset("wds/val", root=str(out / "val"), transform=lambda image: image.size,
                              task="zeroshot_retrieval")
    assert [captions for _, captions in retrieval] == [["colour 0 first", "colour 0 second line"],
                                                       ["colour 1 first", "colour 1 second line"]]


def test_tar_count_gives_each_default_worker_a_tar_within_the_size_limit():
    cases = {(7, 4): 4, (3, 1000): 3, (1, 1000): 1, (40, 1000): 4, (4000, 1000): 4, (4001, 1000): 5, (9, 2): 5}
    assert {case: tar_count(*case) for case in cases} == cases


def test_clip_benchmark_default_workers_read_every_sample(tmp_path):
    """clip_benchmark eval's dataloader as its CLI builds it (batches from webdataset, its default 4 workers) reads
    each image of a 10-image retrieval set once, in tars of near-equal length in the CSV's order."""
    pytest.importorskip("clip_benchmark")
    import zvl_ds  # noqa: F401  (the torchvision shim before clip_benchmark imports it)
    from clip_benchmark.datasets.builder import build_dataset

    data = tmp_path / "data" / "val"
    (data / "valid").mkdir(parents=True)
    rows = ["image,caption"]
    for index in range(10):
        Image.new("RGB", (20, 20), (index * 20, 0, 0)).save(data / "valid" / f"{index}.jpg")
        rows.append(f"{index}.jpg,caption {index}")
    (data / "valid_anno.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cb"
    assert main(["--clip-benchmark", "--data-root", str(tmp_path / "data"), "--dataset", "val", "--out",
                 str(out)]) == 0
    assert (out / "val" / "test" / "nshards.txt").read_text() == "4\n"
    in_tars = [sorted(read_tars_of(out / "val", shard)) for shard in range(4)]
    assert [len(keys) for keys in in_tars] == [3, 2, 3, 2]  # candidate i in run i * 4 // 10
    dataset = build_dataset("wds/val", root=str(out / "val"), transform=lambda image: image.size,
                            task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, shuffle=False, num_workers=4)
    seen = sorted(captions[0] for _, texts in loader for captions in texts)
    assert seen == sorted(f"caption {index}" for index in range(10))


def test_a_run_of_unreadable_images_writes_no_tar_and_the_summary_says_what_to_pass(tmp_path, capsys):
    root = tmp_path / "by_class"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(root / "a" / f"{index}.png")
    for index in range(5):  # candidates 3..7: runs 1, 2 and 3 (of 4) hold only these
        (root / "b" / f"{index}.jpg").write_bytes(b"not an image")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "b" / "z.png")  # the last candidate: run 3
    assert main(["--clip-benchmark", "--labelled", str(root), "--dataset", "s", "--out", str(tmp_path / "cb")]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "cb" / "s"
    assert (folder / "test" / "nshards.txt").read_text() == "2\n"
    assert sorted(os.listdir(folder / "test")) == ["0.tar", "1.tar", "nshards.txt"]
    assert len(read_tars(folder)) == 4
    assert "4 images" in out and "in 2 tar(s)" in out and "add --num_workers 2" in out


def read_tars_of(folder, shard):
    with tarfile.open(folder / "test" / f"{shard}.tar") as archive:
        return {member.name.partition(".")[0] for member in archive}


def test_refusals_exit_2(labelled, tmp_path, capsys):
    out = tmp_path / "cb"
    cases = [
        (["--labelled", str(labelled), "--dataset", "s"], "add --clip-benchmark"),
        (["--clip-benchmark", "--labelled", str(labelled), "--dataset", "a", "--dataset", "b"], "exactly one"),
        (["--clip-benchmark", "--labelled", str(labelled), "--dataset", "s", "--resume"], "--resume does not apply"),
        (["--clip-benchmark", "--labelled", str(tmp_path / "none"), "--dataset", "s"], "image folder not found"),
    ]
    for extra, message in cases:
        assert main([*extra, "--out", str(out)]) == 2, extra
        assert message in capsys.readouterr().err
    assert main(["--clip-benchmark", "--labelled", str(labelled), "--dataset", "s", "--out", str(out)]) == 0
    assert main(["--clip-benchmark", "--labelled", str(labelled), "--dataset", "s", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--clip-benchmark", "--labelled", str(labelled), "--dataset", "s", "--out", str(out),
                 "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["s"]


def test_a_retrieval_folder_is_not_a_zero_shot_set(tmp_path):
    folder = tmp_path / "r"
    (folder / "test").mkdir(parents=True)
    (folder / "test" / "nshards.txt").write_text("0\n")
    (folder / "dataset_type.txt").write_text("retrieval\n")
    with pytest.raises(BenchmarkSetError, match="retrieval set"):
        read_classification_set(str(folder))


def test_zero_shot_set_from_a_clip_benchmark_folder_scores_as_its_image_folder(labelled, tmp_path):
    """``data.zeroshot`` on the clip_benchmark folder (its names and templates) equals the class folder with the
    same names and templates, image for image."""
    from zvl_ds.config import load_config
    from zvl_ds.data import load_tokenizer
    from zvl_ds.evaluation.zero_shot import evaluate_zero_shot
    from zvl_ds.model.build import build_model

    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of a {}.\n{} shape\n")
    out = tmp_path / "cb"
    assert main(["--clip-benchmark", "--labelled", str(labelled), "--dataset", "shapes", "--out", str(out),
                 "--templates", str(templates), "--samples-per-shard", "3"]) == 0
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\ntall star\n")
    sets = {"folder": {"path": str(labelled), "classes": str(names), "templates": str(templates)},
            "benchmark": {"path": str(out / "shapes")}}
    cfg = load_config(None, ["model.arch=tiny", "transforms.resize.size=32", "transforms.center_crop.size=32",
                             "transforms.input_size=32", f"data.zeroshot={json.dumps(sets)}"])
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.loss).eval()
    results = evaluate_zero_shot(cfg, model, load_tokenizer(cfg.model.text_encoder), torch.device("cpu"),
                                 torch.float32)
    same = ("top1", "top5", "num_images", "num_classes")
    assert [results["benchmark"][k] for k in same] == [results["folder"][k] for k in same]
    assert results["folder"]["num_images"] == 7.0 and results["folder"]["num_skipped"] == 1.0
    assert results["benchmark"]["num_skipped"] == 0.0  # the unreadable file was never written
