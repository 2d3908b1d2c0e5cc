"""Faults in the inputs, planted from outside with real files: shards that vanish mid-run, a damaged checkpoint,
crafted model folders. Each runs the real entry point and checks what users see: exit code, message, files left.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers.data_fixtures import make_demo_shards, write_dataset
from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env, run_side_by_side
from tests.helpers.training_runs import TRAIN
from zvl_ds.runtime.checkpoint import CheckpointError, find_resume_point

TINY_RUN = ["--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.train_type=shuffle",
            "data.enable_valid=false", "log.tensorboard=false", "data.batch_size=8", "data.batch_size_train=8",
            "data.num_workers=1", "data.shuffle_buffer=20"]


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return os.path.exists(path)


# ------------------------------------------------------------------------------------------------ vanishing data

def test_shards_deleted_mid_run_stop_every_rank_after_a_last_checkpoint(tmp_path):
    shards = tmp_path / "shards"
    write_dataset(str(shards), "big", "train", [100] * 12)
    run_dir = tmp_path / "run"
    # the default budget: 1% of a 100000-sample window, so 1000 skips of one reason before the window is full
    args = [*TINY_RUN, f"data.data_path={shards}", "data.train_name=[big]", "log.interval_train=2",
            "ckpt.step_interval=4", "runner.train_steps=500", f"ckpt.dir={tmp_path}", "data.exp_name=run",
            "ckpt.keep_last=5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), TRAIN, *args]
    process = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path)
    try:
        assert _wait_for(str(run_dir / "latest"), process), "no first checkpoint"
        deleted = sorted(glob.glob(str(shards / "big" / "train-*.tar")))[3:]  # a dropped mount: 9 of 12 gone
        for shard in deleted:
            os.remove(shard)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, output[-3000:]  # torchrun exits 1 whatever its workers' codes were
    for rank in (0, 1):  # every rank stops, at the same step, with the same verdict
        assert f"error: [rank {rank}] data: too many samples skipped" in output, output[-4000:]
    assert "[unreadable_shard]" in output and "dataset 'big'" in output
    assert any(os.path.basename(shard) in output.split("too many samples skipped", 1)[1] for shard in deleted)
    assert "step 500/500" not in output
    # the good state up to the stop is saved and complete; the run did not go on for the remaining steps
    latest = (run_dir / "latest").read_text().strip()
    point = find_resume_point(str(run_dir), None, True)
    assert point.tag == latest and f"saved checkpoint {run_dir / latest}" in output
    assert 4 < int(latest[len("step_"):]) < 500


# ------------------------------------------------------------------------------------------------ checkpoint bytes

def _flip_bytes_inside_a_tensor(path, count=16):
    """Change ``count`` bytes in the middle of the largest tensor record of a torch zip file; returns its name."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        start = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        handle.seek(start)
        original = handle.read(count)
        handle.seek(start)
        handle.write(bytes(b ^ 0xFF for b in original))
    return record.filename


def test_a_checkpoint_with_16_bytes_changed_in_a_tensor_is_refused_by_file_name(tmp_path):
    _, shards = make_demo_shards(tmp_path / "demo", train_size=32, valid_size=8, captions_per_image=1,
                                 samples_per_shard=16, in_process=True)
    args = [sys.executable, TRAIN, *TINY_RUN, f"data.data_path={shards}", f"ckpt.dir={tmp_path}",
            "data.exp_name=run", "ckpt.step_interval=2"]
    first = subprocess.run([*args, "runner.train_steps=2"], env=child_env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    folder = tmp_path / "run" / "step_00000002"
    intact = tmp_path / "intact"
    shutil.copytree(folder, intact)
    damaged_file = folder / "mp_rank_00_model_states.pt"
    _flip_bytes_inside_a_tensor(str(damaged_file))
    assert damaged_file.stat().st_size == (intact / damaged_file.name).stat().st_size  # the size check passes

    refused = subprocess.run([*args, "runner.train_steps=4"], env=child_env(), capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "error: checkpoint" in refused.stderr and "damaged, refused" in refused.stderr
    assert "mp_rank_00_model_states.pt does not match its SHA-256" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "run" / "step_00000004").exists()

    # a checkpoint from before checksums: its torch files' own zip CRC-32 shows the damage
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({key: value for key, value in manifest.items() if key != "sha256"}))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: member .* fails its CRC-32"):
        find_resume_point(str(tmp_path / "run"), None, True)

    # the intact files resume
    shutil.rmtree(folder)
    shutil.copytree(intact, folder)
    resumed = subprocess.run([*args, "runner.train_steps=4"], env=child_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "at step 2" in resumed.stdout and (tmp_path / "run" / "latest").read_text().strip() == "step_00000004"
    assert set(json.loads((tmp_path / "run" / "step_00000004" / "manifest.json").read_text())["sha256"]) == {
        "config.yaml", "mp_rank_00_model_states.pt", "zvl_rank_00000.pt"}


# ------------------------------------------------------------------------------------------------ bounded inputs

def test_a_yaml_alias_bomb_in_the_text_config_ends_train_py_at_once(tmp_path):
    from tests.unit.test_input_bounds import alias_bomb

    _, shards = make_demo_shards(tmp_path / "demo", train_size=16, valid_size=8, captions_per_image=1,
                                 samples_per_shard=16, in_process=True)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"_base_: {os.path.join(REPO_ROOT, 'configs', 'demo.yaml')}\n" + alias_bomb())
    started = time.time()
    try:
        done = subprocess.run([sys.executable, TRAIN, "--cfg", str(bomb), f"ckpt.dir={tmp_path}",
                               f"data.data_path={shards}"], env=child_env(), capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("train.py still reading the config after 120 s")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bomb.yaml: YAML aliases" in done.stderr and "Traceback" not in done.stderr
    assert time.time() - started < 120


def _limited_memory():
    """A make_shards that reads a device whole must fail here, not take the test machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _make_shards(args, timeout=120):
    try:
        return subprocess.run([sys.executable, "-m", "zvl_ds.make_shards", *args, "--quiet", "--workers", "1"],
                              env=child_env(), capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limited_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"make_shards still running after {timeout} s (blocked on a file?)")


def test_make_shards_reads_only_bounded_regular_files_inside_the_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from tests.helpers.data_fixtures import image_bytes

    folder = tmp_path / "data" / "ds"
    images = folder / "train"
    images.mkdir(parents=True)
    (images / "ok.jpg").write_bytes(image_bytes(1))
    os.mkfifo(images / "fifo.jpg")  # opening it for reading blocks until a writer comes: none will
    with open(images / "sparse.jpg", "wb") as handle:  # 3 GB that take no disk space
        handle.truncate(3 << 30)
    os.symlink("/dev/zero", images / "zero.jpg")
    (tmp_path / "data" / "secret.jpg").write_bytes(image_bytes(2))
    os.symlink("../../secret.jpg", images / "linked_out.jpg")  # the path has no '..'; the link has
    os.symlink("ok.jpg", images / "linked_in.jpg")  # a link that stays inside is an ordinary image
    Image.fromarray(np.linspace(0.0, 1.0, 32 * 40, dtype=np.float32).reshape(32, 40), mode="F").save(
        images / "float.tif")
    names = ["ok.jpg", "fifo.jpg", "sparse.jpg", "zero.jpg", "linked_out.jpg", "linked_in.jpg", "float.tif"]
    (folder / "train_anno.csv").write_text("image,caption\n" + "".join(f"{n},caption of {n}\n" for n in names))

    done = _make_shards(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "ds" / "train_stats.json").read_text())
    failures = {reason: item["count"] for reason, item in stats["failures"]["images"].items()}
    assert failures == {"not_a_regular_file": 1, "file_too_large": 1, "path_outside_images": 2, "float_image": 1}
    assert stats["images_written"] == 2
    examples = json.dumps(stats["failures"]["images"])
    assert "fifo.jpg" in examples and "a FIFO" in examples and "/dev/zero" in examples and "secret.jpg" in examples

    # opting in reads the image the link leads to; a device stays refused
    done = _make_shards(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out2"),
                         "--allow-outside-images"])
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "out2" / "ds" / "train_stats.json").read_text())
    failures = {reason: item["count"] for reason, item in stats["failures"]["images"].items()}
    assert failures == {"not_a_regular_file": 2, "file_too_large": 1, "float_image": 1}
    assert stats["images_written"] == 3


def test_a_stray_quote_that_swallows_rows_is_counted_not_dropped(tmp_path):
    from tests.helpers.data_fixtures import image_bytes

    folder = tmp_path / "data" / "ds"
    (folder / "train").mkdir(parents=True)
    for index in range(8):
        (folder / "train" / f"{index}.jpg").write_bytes(image_bytes(index))
    # row 2's caption opens a quote that closes only at the end of row 4: rows 3 and 4 vanish into its caption.
    # Row 6 is a real two-line caption with a comma (not a row: its second line names no file) and is kept.
    (folder / "train_anno.csv").write_bytes(
        b'image,caption\n'
        b'0.jpg,a red circle\n'
        b'1.jpg,"a blue square\n'
        b'2.jpg,a green triangle\n'
        b'3.jpg,a yellow star"\n'
        b'4.jpg,a black dot\n'
        b'5.jpg,"a cat, sitting\non a mat, asleep"\n'
        b'6.jpg,a dog\n')
    done = _make_shards(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "ds" / "train_stats.json").read_text())
    rows = stats["failures"]["caption_rows"]
    assert rows["malformed_row"]["count"] == 3, rows  # the swallowing row and the two it swallowed
    assert "1.jpg (data row 2)" in rows["malformed_row"]["examples"][0]
    assert "2 following line(s)" in rows["malformed_row"]["examples"][0]
    assert stats["rows_read"] == 7 and stats["images_written"] == 4  # 0, 4, 5, 6
    assert stats["skipped_caption_rows"] == 3
    assert "3 skipped" in done.stdout  # the summary says so

    # with --strict a swallowed row is an error, as every other bad row
    strict = _make_shards(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "o2"),
                           "--strict"])
    assert strict.returncode == 1, strict.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ model folders

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random model written as a model folder (what zvl_ds.export writes)."""
    import torch

    from zvl_ds.config import load_config
    from zvl_ds.data import load_tokenizer
    from zvl_ds.export.model_folder import write_model_folder
    from zvl_ds.model.build import build_model

    cfg = load_config(None, ["model.arch=tiny", "transforms.resize.size=32", "transforms.center_crop.size=32",
                             "transforms.input_size=32"])
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "tiny"
    write_model_folder(str(out), cfg, build_model(cfg.model, cfg.loss).eval(), load_tokenizer(cfg.model.text_encoder),
                       {"test": "faults"})
    return out


def _no_tokenizer_json(folder):
    os.remove(folder / "tokenizer" / "tokenizer.json")
    return "tokenizer", "has only 5 tokens, all of them special"


def _huge_safetensors_header(folder):
    import struct

    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return "model.safetensors", "not a readable safetensors file"


def _truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "model.safetensors", "not a readable safetensors file"


def _deep_json(folder):
    (folder / "model_config.json").write_text("[" * 100_000 + "]" * 100_000)
    return "model_config.json", "nested too deeply"


def _unknown_preprocess_key(folder):
    path = folder / "preprocess.json"
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, "resize_mode": "nearest"}))
    return "preprocess.json", "unknown key(s) resize_mode"


PLANTS = [_no_tokenizer_json, _huge_safetensors_header, _truncated_weights, _deep_json, _unknown_preprocess_key]


@pytest.fixture(scope="module")
def classify_on_damaged_folders(model_folder, tmp_path_factory):
    """{plant: (folder, file named, message, --out path, finished process)}: each fault planted in its own copy of
    the model folder (which loads while intact), then ``python -m zvl_ds.classify`` on each copy, side by side."""
    from PIL import Image

    from zvl_ds.model.inference import load_model

    root = tmp_path_factory.mktemp("damaged")
    images = root / "images"
    for label in ("red", "blue"):
        (images / label).mkdir(parents=True)
        Image.new("RGB", (40, 36), (200, 20, 20) if label == "red" else (20, 20, 200)).save(images / label / "0.png")
    planted, commands = {}, {}
    for plant in PLANTS:
        folder, out = root / plant.__name__ / "model", root / plant.__name__ / "out.json"
        shutil.copytree(model_folder, folder)
        load_model(str(folder))  # intact, it loads
        planted[plant] = (folder, *plant(folder), out)
        commands[plant] = [sys.executable, "-m", "zvl_ds.classify", "--model", str(folder), "--images", str(images),
                           "--out", str(out)]
    done = run_side_by_side(commands, timeout=300, env=child_env())
    return {plant: (*planted[plant], done[plant]) for plant in PLANTS}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_damaged_model_folder_gives_one_error_line_naming_the_file(classify_on_damaged_folders, plant):
    from zvl_ds.model.inference import load_model
    from zvl_ds.base.errors import UserError

    folder, name, message, out, done = classify_on_damaged_folders[plant]
    with pytest.raises(UserError, match=re.escape(message)):
        load_model(str(folder))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert str(folder / name) in done.stderr and message in done.stderr
    assert not out.exists()


def test_eval_retrieval_refuses_a_model_folder_whose_tokenizer_lost_its_vocabulary(model_folder, tmp_path):
    _, shards = make_demo_shards(tmp_path / "demo", train_size=8, valid_size=8, captions_per_image=1,
                                 samples_per_shard=8, in_process=True)
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    _no_tokenizer_json(folder)
    done = subprocess.run([sys.executable, "-m", "zvl_ds.eval_retrieval", "--model", str(folder), "--cfg",
                           os.path.join(REPO_ROOT, "configs", "demo.yaml"), "--out", str(tmp_path / "m.json"),
                           f"data.data_path={shards}"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: " in done.stderr and "Traceback" not in done.stderr
    assert str(folder / "tokenizer") in done.stderr and "only 5 tokens" in done.stderr
    assert not (tmp_path / "m.json").exists()
