"""clip_benchmark end to end, offline: a short demo run exported with ``--format open_clip``, the demo sets written by
``make_shards --clip-benchmark``, and ``clip_benchmark eval`` (its CLI, in a child process) must report the
zero-shot top-1 of ``python -m zvl_ds.classify`` and the recalls of ``python -m zvl_ds.eval_retrieval`` on the same
images, class names and templates, within 0.5 points.

The model sees 48 px: the demo's 64 px JPEGs are then decoded in full by both tools (zvl_ds's loader decodes a JPEG
at least twice the resize target at reduced scale, which open_clip does not; docs/use-elsewhere.md)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.data_fixtures import make_demo_shards
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env

pytest.importorskip("open_clip")
pytest.importorskip("clip_benchmark")

from zvl_ds.classify import main as classify_main  # noqa: E402
from zvl_ds.eval_retrieval import main as eval_retrieval_main  # noqa: E402
from zvl_ds.export.__main__ import main as export_main  # noqa: E402
from zvl_ds.make_shards import main as make_shards_main  # noqa: E402

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
DEMO = os.path.join(REPO_ROOT, "configs", "demo.yaml")
# resize = crop: the validation transform open_clip reproduces pixel for pixel (squash, bilinear)
RUN = ["data.batch_size=16", "data.batch_size_train=8", "data.batch_size_val=16", "data.num_workers=0",
       "data.shuffle_buffer=16", "log.num_image_samples=0", "log.tensorboard=false", "runner.val_interval_steps=1000",
       "runner.train_steps=20", "optim.lr.warmup_steps=0", "model.image_encoder.img_size=48",
       "transforms.input_size=48", "transforms.resize.size=48", "transforms.center_crop.size=48",
       "transforms.random_resize_crop.size=48"]
TOLERANCE = 0.5  # points

# clip_benchmark's CLI in a process that imports zvl_ds first: on a CPU machine zvl_ds's shim makes PyPI's CUDA
# torchvision importable (on a GPU machine the plain `clip_benchmark` command is the same). clip_benchmark 1.6.2's
# accuracy() calls float() on a one-element array, an error from numpy 2.4 on (LAION-AI/CLIP_benchmark#147); there
# the same top-k count is taken with a 0-d sum. Everything else (loading, transforms, prompts, logits) is its own.
CHILD = """
import sys
import zvl_ds
import numpy
from clip_benchmark.cli import main
from clip_benchmark.metrics import zeroshot_classification as zc
if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]
    zc.accuracy = accuracy
sys.exit(main())
"""


def run(command, cwd):
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, " ".join(map(str, command)) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(work folder, demo data, zvl_ds shards, zvl_ds model folder, OpenCLIP folder, clip_benchmark sets)."""
    root = tmp_path_factory.mktemp("clip_benchmark")
    data, shards = make_demo_shards(root, train_size=96, valid_size=40, captions_per_image=3, classify_size=60,
                                    in_process=True)
    run([sys.executable, TRAIN, "--cfg", DEMO, *RUN, f"data.data_path={shards}", f"ckpt.dir={root}",
         "data.exp_name=run"], root)
    # the user's commands, called in this process (a child process each would only add start-up time)
    assert export_main([str(root / "run"), "--out", str(root / "zvl")]) == 0
    assert export_main([str(root / "run"), "--format", "open_clip", "--out", str(root / "oc")]) == 0
    sets = root / "clip_benchmark"
    assert make_shards_main(["--clip-benchmark", "--data-root", str(data), "--dataset", "demo_val", "--out",
                             str(sets), "--quiet"]) == 0
    assert make_shards_main(["--clip-benchmark", "--labelled", str(data / "demo_classify"), "--dataset",
                             "demo_classify", "--out", str(sets)]) == 0
    (root / "elsewhere").mkdir()
    return root, data, shards, root / "zvl", root / "oc", sets


def clip_benchmark_eval(root, model, dataset, dataset_root, *extra):
    out = root / f"{dataset}.json"
    run([sys.executable, "-c", CHILD, "eval", "--model_type", "open_clip", "--model", f"local-dir:{model}",
         "--pretrained", "", "--dataset", f"wds/{dataset}", "--dataset_root", str(dataset_root), "--output", str(out),
         "--batch_size", "32", "--num_workers", "0", "--no_amp", *extra], root / "elsewhere")
    return json.loads(out.read_text())["metrics"]


def test_zero_shot_top1_equals_classify(setup):
    root, data, _, zvl, oc, sets = setup
    theirs = clip_benchmark_eval(root, oc, "demo_classify", sets / "demo_classify")
    assert classify_main(["--model", str(zvl), "--images", str(data / "demo_classify"), "--out",
                          str(root / "classify.json")]) == 0
    ours = json.loads((root / "classify.json").read_text())
    print(f"demo_classify top-1: clip_benchmark {100 * theirs['acc1']:.2f}, zvl_ds.classify {ours['top1']:.2f}")
    assert abs(100 * theirs["acc1"] - ours["top1"]) <= TOLERANCE
    assert abs(100 * theirs["acc5"] - ours["top5"]) <= TOLERANCE


def test_retrieval_recalls_equal_eval_retrieval(setup):
    root, _, shards, zvl, oc, sets = setup
    theirs = clip_benchmark_eval(root, oc, "demo_val", sets / "demo_val", "--task", "zeroshot_retrieval",
                                 "--recall_k", "1", "5", "10")
    assert eval_retrieval_main(["--model", str(zvl), "--cfg", DEMO, "--out", str(root / "metrics.json"),
                                "--no-progress", f"data.data_path={shards}", "data.num_workers=0"]) == 0
    ours = json.loads((root / "metrics.json").read_text())["demo_val"]
    for k in (1, 5, 10):
        i2t, t2i = 100 * theirs[f"text_retrieval_recall@{k}"], 100 * theirs[f"image_retrieval_recall@{k}"]
        print(f"demo_val R@{k}: clip_benchmark i2t {i2t:.2f} t2i {t2i:.2f}; zvl_ds.eval_retrieval "
              f"i2t {ours[f'i2t_r{k}']:.2f} t2i {ours[f't2i_r{k}']:.2f}")
        assert abs(i2t - ours[f"i2t_r{k}"]) <= TOLERANCE and abs(t2i - ours[f"t2i_r{k}"]) <= TOLERANCE
