"""Every model folder zvl_ds reads refuses what it cannot use with exit 2 and a message naming the file: a source
(``model.hf_folder``, an OpenCLIP ``local-dir:``) and an exported zvl_ds folder (``load_model``, ``python -m
zvl_ds.classify``, ``python -m zvl_ds.eval_retrieval``). Each folder is crafted from a good one: pickled weights
with a payload (which must never run), a tokenizer or weights file that is a link to a file of another kind outside
the folder, a link to valid weights elsewhere (refused unless the user opts in, as for images), and a tokenizer with
more ids than the text tower has rows.

The entry points run in-process (their ``main()`` returns the exit code; ``zvl_ds.base.cli.run`` is the one exit
path of the readers underneath), except one training run in a child process, the way a user starts it."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import zvl_ds  # noqa: F401  (before transformers / open_clip)
from tests.helpers.data_fixtures import write_dataset
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tools.tiny_checkpoints import DEMO_VOCAB, write_tiny_hf_folder, write_tiny_open_clip_folder
from zvl_ds import classify, eval_retrieval
from zvl_ds.base.cli import run
from zvl_ds.config import load_config
from zvl_ds.config.__main__ import main as config_main
from zvl_ds.data import load_tokenizer
from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.model.build import build_model
from zvl_ds.model.inference import ExportError, load_model

OPT_IN_KEY = "model.allow_outside_files"
OPT_IN_FLAG = "--allow-outside-model-files"
NOT_JSON = "these are notes, not JSON\n"


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The good folders every case copies and breaks: a Hugging Face CLIP folder, an exported zvl_ds folder (the
    configs/demo.yaml's tiny model), a file of notes outside them, and a class folder of images for classify."""
    root = tmp_path_factory.mktemp("good")
    hf = write_tiny_hf_folder(str(root / "hf_clip"), "hf_clip")
    cfg = load_config(os.path.join(REPO_ROOT, "configs", "demo.yaml"))  # the tiny model, 32 px transforms
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss).eval()
    exported = write_model_folder(str(root / "exported"), cfg, model, load_tokenizer(cfg.model.text_encoder),
                                  {"run": "test"})
    outside = root / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text(NOT_JSON)
    images = root / "images"
    for index, colour in enumerate(["red", "blue"]):
        (images / colour).mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (12, 10), (255 * (1 - index), 0, 255 * index)).save(images / colour / "a.png")
    return {"hf": hf, "exported": exported, "notes": str(outside / "notes.txt"), "outside": str(outside),
            "images": str(images)}


def copy_of(folder, tmp_path, name="model"):
    return shutil.copytree(folder, str(tmp_path / name))


def link(path, target):
    """Replace ``path`` with a symbolic link to ``target``."""
    if os.path.lexists(path):
        os.remove(path)
    os.symlink(target, path)


def write_config(tmp_path, *lines):
    path = tmp_path / "source.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def hf_source(folder, *extra):
    return ["model.arch=hf_clip", f"model.hf_folder={folder}", *extra]


def config_exit(tmp_path, overrides, capsys):
    """``python -m zvl_ds.config`` on a config naming the source: (exit code, stderr)."""
    code = config_main([write_config(tmp_path, "seed: 0"), *overrides])
    return code, capsys.readouterr().err


def exit_of(call, capsys):
    """A reader called through the entry points' one exit path: (exit code, stderr)."""
    def main():
        call()
        return 0

    code = run(main)
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Sources: model.hf_folder and OpenCLIP local-dir:
# --------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the folder appears only if the pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickled_hf_folder(good, tmp_path):
    """An HF folder whose only weights are a torch pickle of the real tensors plus a payload; (folder, marker)."""
    folder = copy_of(good["hf"], tmp_path)
    state = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    marker = str(tmp_path / "payload_ran")
    torch.save({**state, "extra": Payload(marker)}, os.path.join(folder, "pytorch_model.bin"))
    return folder, marker


def test_pickled_hf_weights_with_a_payload_are_refused_and_the_payload_never_runs(good, tmp_path, capsys):
    folder, marker = pickled_hf_folder(good, tmp_path)
    cfg = load_config(None, hf_source(folder))
    code, err = exit_of(lambda: build_model(cfg.model, cfg.loss), capsys)
    assert code == 2
    assert f"{folder}/pytorch_model.bin is a pickle holding more than weights" in err and "Traceback" not in err
    assert not os.path.exists(marker)
    # the same tensors saved as a plain pickle load: the refusal is about the payload, not about .bin files
    torch.save(load_file(os.path.join(good["hf"], "model.safetensors")), os.path.join(folder, "pytorch_model.bin"))
    assert exit_of(lambda: build_model(cfg.model, cfg.loss), capsys)[0] == 0


@pytest.mark.slow
def test_training_from_pickled_hf_weights_exits_2_naming_the_file(good, tmp_path):
    """The whole command, in a child process: python -m zvl_ds.train exits 2 before training, the payload unrun."""
    folder, marker = pickled_hf_folder(good, tmp_path)
    data = tmp_path / "shards"
    for split in ("train", "valid"):
        write_dataset(str(data), "tiny", split, [4])
    command = [sys.executable, "-m", "zvl_ds.train", "--cfg", write_config(tmp_path, "device: cpu"),
               *hf_source(folder), f"data.data_path={data}", "data.train_name=[tiny]", "data.valid_name=[tiny]",
               "data.batch_size=4", "data.batch_size_val=4", "data.num_workers=0", "runner.train_steps=1",
               f"ckpt.dir={tmp_path / 'out'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{folder}/pytorch_model.bin is a pickle holding more than weights" in done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(marker)


def test_a_source_tokenizer_linked_to_a_file_outside_that_is_not_json(good, tmp_path, capsys):
    folder = copy_of(good["hf"], tmp_path)
    link(os.path.join(folder, "tokenizer.json"), good["notes"])
    code, err = config_exit(tmp_path, hf_source(folder), capsys)
    assert code == 2
    assert f"{folder}/tokenizer.json is a link to {good['notes']}, outside the model folder" in err
    assert f"{OPT_IN_KEY}: true accepts it" in err
    # accepted, the link leads to a file that is no tokenizer: refused by name, not with a traceback
    cfg = load_config(None, hf_source(folder, f"{OPT_IN_KEY}=true"))
    code, err = exit_of(lambda: load_tokenizer(cfg.model.text_encoder), capsys)
    assert code == 2 and f"{folder}/tokenizer.json is not valid JSON" in err


def test_open_clip_weights_linked_to_a_file_outside_that_is_not_safetensors(good, tmp_path, capsys):
    pytest.importorskip("open_clip")
    folder = write_tiny_open_clip_folder(str(tmp_path / "oc"))
    weights = os.path.join(folder, "open_clip_model.safetensors")
    link(weights, good["notes"])
    source = ["model.arch=open_clip", f"model.open_clip.name=local-dir:{folder}"]
    code, err = config_exit(tmp_path, source, capsys)
    assert code == 2 and f"{weights} is a link to {good['notes']}, outside the model folder" in err
    cfg = load_config(None, source + [f"{OPT_IN_KEY}=true"])
    code, err = exit_of(lambda: build_model(cfg.model, cfg.loss), capsys)
    assert code == 2 and f"cannot read {weights} as a safetensors file" in err and "Traceback" not in err


def test_a_link_to_valid_weights_elsewhere_is_refused_unless_the_user_opts_in(good, tmp_path, capsys):
    folder = copy_of(good["hf"], tmp_path)
    elsewhere = str(tmp_path / "elsewhere.safetensors")
    shutil.move(os.path.join(folder, "model.safetensors"), elsewhere)
    link(os.path.join(folder, "model.safetensors"), elsewhere)
    code, err = config_exit(tmp_path, hf_source(folder), capsys)
    assert code == 2 and f"{folder}/model.safetensors is a link to {elsewhere}" in err
    cfg = load_config(None, hf_source(folder, f"{OPT_IN_KEY}=true"))
    model = build_model(cfg.model, cfg.loss)
    expected = load_file(elsewhere)["text_model.embeddings.token_embedding.weight"]
    assert torch.equal(model.text_tower.embeddings.token_embedding.weight.detach(), expected)  # the linked file
    # a link that stays inside the folder is no link out
    inside = os.path.join(folder, "weights", "model.safetensors")
    os.makedirs(os.path.dirname(inside))
    shutil.move(elsewhere, inside)
    link(os.path.join(folder, "model.safetensors"), os.path.join("weights", "model.safetensors"))
    assert config_exit(tmp_path, hf_source(folder), capsys)[0] == 0


def test_a_hugging_face_cache_snapshot_links_into_its_own_blobs(good, tmp_path, capsys):
    """The hub cache's layout: snapshots/<revision>/<file> -> ../../blobs/<id>. Those links stay in the download."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, name in enumerate(sorted(os.listdir(good["hf"]))):
        shutil.copy(os.path.join(good["hf"], name), blobs / f"blob{index}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{index}"), snapshot / name)
    assert config_exit(tmp_path, hf_source(str(snapshot)), capsys)[0] == 0
    link(str(snapshot / "tokenizer.json"), good["notes"])  # but not anywhere else
    code, err = config_exit(tmp_path, hf_source(str(snapshot)), capsys)
    assert code == 2 and f"{snapshot}/tokenizer.json is a link to {good['notes']}" in err


# --------------------------------------------------------------------------------------------------
# Exported folders: load_model, classify, eval_retrieval
# --------------------------------------------------------------------------------------------------


def classify_exit(good, folder, tmp_path, capsys, *flags):
    code = classify.main(["--model", folder, "--images", good["images"], "--out", str(tmp_path / "top1.json"),
                          *flags])
    return code, capsys.readouterr().err


def test_an_exported_tokenizer_linked_to_a_file_outside_that_is_not_json_under_classify(good, tmp_path, capsys):
    folder = copy_of(good["exported"], tmp_path)
    tokenizer_json = os.path.join(folder, "tokenizer", "tokenizer.json")
    link(tokenizer_json, good["notes"])
    code, err = classify_exit(good, folder, tmp_path, capsys)
    assert code == 2 and f"{tokenizer_json} is a link to {good['notes']}, outside the model folder" in err
    assert OPT_IN_FLAG in err
    code, err = classify_exit(good, folder, tmp_path, capsys, OPT_IN_FLAG)
    assert code == 2 and f"{tokenizer_json} is not valid JSON" in err and "Traceback" not in err
    # the good folder classifies: the refusals are about the broken files
    assert classify_exit(good, good["exported"], tmp_path, capsys)[0] == 0


def test_exported_weights_linked_elsewhere_under_eval_retrieval_and_load_model(good, tmp_path, capsys):
    folder = copy_of(good["exported"], tmp_path)
    weights, elsewhere = os.path.join(folder, "model.safetensors"), str(tmp_path / "elsewhere.safetensors")
    shutil.move(weights, elsewhere)
    link(weights, elsewhere)
    # the model folder is read before --cfg, which is not reached
    code = eval_retrieval.main(["--model", folder, "--cfg", str(tmp_path / "not_read.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{weights} is a link to {elsewhere}, outside the model folder" in err
    with pytest.raises(ExportError, match="allow_outside_files=True"):
        load_model(folder)
    accepted = load_model(folder, allow_outside_files=True)
    assert torch.equal(accepted.model.state_dict()["text_projection.weight"],
                       load_file(elsewhere)["text_projection.weight"])
    # linked to a file that is not safetensors, the accepted link still gets a message naming the file
    link(weights, good["notes"])
    with pytest.raises(ExportError, match=f"{weights}: not a readable safetensors file"):
        load_model(folder, allow_outside_files=True)


def test_a_tokenizer_with_more_ids_than_the_text_tower_has_rows_is_refused(good, tmp_path, capsys):
    """The check behind it (``check_tokenizer``): without it the folder loads and ``encode_text`` fails later."""
    from transformers import AutoTokenizer

    folder = copy_of(good["exported"], tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True)
    tokenizer.add_tokens([f"zzextra{index}" for index in range(5)])
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    code, err = classify_exit(good, folder, tmp_path, capsys)
    assert code == 2
    assert f"has {DEMO_VOCAB + 5} tokens, the text tower's vocabulary {DEMO_VOCAB}" in err
    assert os.path.join(folder, "tokenizer") in err
