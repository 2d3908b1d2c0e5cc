"""``python tools/make_shards.py``, the workflow's first command as written, from the root of a fresh clone: it
converts an annotation CSV and its images into the very shards ``python -m zvl_ds.make_shards`` writes, and says
how to install zvl_ds when the Python running it does not have it.

The clone is of this checkout's committed state (``git clone``), as a new user gets it."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from tests.helpers.data_fixtures import image_bytes
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env, run_side_by_side

CAPTIONS = {"red.jpg": ["a red thing", "something red"], "blue.jpg": ["a blue thing"], "green.jpg": ["green"]}


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """One clone for the module's tests, which only run its script (their outputs go to their own folders)."""
    clone = tmp_path_factory.mktemp("fresh") / "clone"
    done = subprocess.run(["git", "clone", "-q", REPO_ROOT, str(clone)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"git clone of {REPO_ROOT} failed: {done.stderr}"
    assert (clone / "tools" / "make_shards.py").is_file(), "tools/make_shards.py is not committed"
    return clone


def write_annotations(root):
    """``root/tiny/train_anno.csv`` (ZeroVL's layout: one row per caption) and the images under ``root/tiny/train``."""
    images = root / "tiny" / "train"
    images.mkdir(parents=True)
    with open(root / "tiny" / "train_anno.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for seed, (name, captions) in enumerate(CAPTIONS.items()):
            (images / name).write_bytes(image_bytes(seed, size=(40, 32)))
            writer.writerows([name, caption] for caption in captions)


def shard_samples(path):
    """[(captions, image size)] of every sample of one tar, read back with tarfile and Pillow."""
    with tarfile.open(path) as archive:
        members = {member.name: archive.extractfile(member).read() for member in archive.getmembers()}
    return [(json.loads(data)["captions"], Image.open(io.BytesIO(members[name[:-len(".json")] + ".jpg"])).size)
            for name, data in members.items() if name.endswith(".json")]


def test_tools_make_shards_runs_from_a_fresh_clone_and_writes_the_modules_shards(fresh_clone, tmp_path):
    clone = fresh_clone
    data = tmp_path / "data"
    write_annotations(data)
    # the clone stands in for an installed zvl_ds (bash tools/install.sh installs the checkout it is run from)
    env = dict(child_env(), PYTHONPATH=str(clone))
    args = ["--data-root", str(data), "--dataset", "tiny", "--split", "train", "--workers", "1", "--quiet"]
    done = run_side_by_side({
        "script": [sys.executable, "tools/make_shards.py", *args, "--out", str(tmp_path / "by_script")],
        "module": [sys.executable, "-m", "zvl_ds.make_shards", *args, "--out", str(tmp_path / "by_module")],
    }, timeout=300, cwd=clone, env=env)
    script, module = done["script"], done["module"]
    assert script.returncode == 0, script.stdout[-2000:] + script.stderr[-2000:]
    tars = sorted((tmp_path / "by_script" / "tiny").glob("train-*.tar"))
    assert [t.name for t in tars] == ["train-000000.tar"]
    samples = shard_samples(tars[0])
    assert sorted(captions for captions, _ in samples) == sorted(CAPTIONS.values())  # one sample per image
    assert all(size == (40, 32) for _, size in samples)  # below --max-size: kept as they were
    assert json.loads((tmp_path / "by_script" / "tiny" / "sizes.json").read_text()) == {"train-000000.tar": 3}

    assert module.returncode == 0, module.stderr[-2000:]
    assert (tmp_path / "by_module" / "tiny" / "train-000000.tar").read_bytes() == tars[0].read_bytes()


def test_tools_make_shards_without_zvl_ds_says_how_to_install_and_exits_2(fresh_clone):
    clone = fresh_clone
    env = child_env()
    env.pop("PYTHONPATH")
    # -S: no site-packages, so this Python has no zvl_ds (nor anything else installed)
    done = subprocess.run([sys.executable, "-S", "tools/make_shards.py", "--help"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "zvl_ds is not installed" in done.stderr and "bash tools/install.sh" in done.stderr
    assert "Traceback" not in done.stderr
