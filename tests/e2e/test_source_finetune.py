"""Fine-tuning a Hugging Face CLIP / SigLIP checkpoint through the entry points, as docs/fine-tuning.md runs it:
python -m zvl_ds.verify_exactness accepts the library's towers on 2 ranks, and a short training run of
configs/clip/finetune_hf_clip.yaml exports back to a folder transformers loads (--format hf) and to a zvl_ds folder,
with equal embeddings. The checkpoints are tiny random ones written by tools/make_tiny_checkpoint.py."""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from tests.helpers.data_fixtures import make_demo_shards
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.export.__main__ import main as export_main
from zvl_ds.runtime.dist import free_port

RECIPE = os.path.join(REPO_ROOT, "configs", "clip", "finetune_hf_clip.yaml")
TOOL = os.path.join(REPO_ROOT, "tools", "make_tiny_checkpoint.py")


def run(command, cwd):
    env = dict(child_env(), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def tiny_checkpoint(kind, folder, in_process=False):
    """``python tools/make_tiny_checkpoint.py --kind KIND --out FOLDER``, or its function here (``in_process``)."""
    if in_process:
        from tools.tiny_checkpoints import write_tiny_checkpoint

        return write_tiny_checkpoint(kind, str(folder))
    run([sys.executable, TOOL, "--kind", kind, "--out", str(folder)], REPO_ROOT)
    return str(folder)


def test_verify_exactness_accepts_siglip_towers_with_dropout(tmp_path):
    folder = tiny_checkpoint("hf_siglip", tmp_path / "siglip", in_process=True)  # the tool runs in the next test
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "zvl_ds.verify_exactness", "--synthetic",
               "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"), "--cfg", RECIPE,
               "model.arch=hf_siglip", f"model.hf_folder={folder}", "model.hf_config.vision_config.attention_dropout=0.2",
               "device=cpu", "precision=fp32", "data.batch_size=8", "data.batch_size_train=4", "loss.chunk_cols=3"],
              REPO_ROOT)
    assert "loss SigLIP" in out
    for group in ("image tower", "text tower", "text projection", "sigmoid scale/bias", "PASS"):
        assert group in out


def test_finetune_a_clip_folder_and_export_it_back(tmp_path):
    from transformers import CLIPModel

    import zvl_ds

    folder = tiny_checkpoint("hf_clip", tmp_path / "clip")
    _, shards = make_demo_shards(tmp_path, train_size=16, valid_size=8, captions_per_image=1, classify_size=4,
                                 in_process=True)
    run([sys.executable, os.path.join(REPO_ROOT, "zvl_ds", "train.py"), "--cfg", RECIPE, f"model.hf_folder={folder}",
         "device=cpu", "precision=fp32", "data.batch_size=8", "data.batch_size_train=4", "data.batch_size_val=8",
         "data.num_workers=0", "data.shuffle_buffer=8", "runner.train_steps=2", "runner.val_interval_steps=2",
         "log.num_image_samples=0", "optim.lr.init=1e-3", f"data.data_path={shards}",
         f"ckpt.dir={tmp_path / 'out'}"], tmp_path)
    resolved = (tmp_path / "out" / "finetune_hf_clip" / "config.yaml").read_text()
    assert f"tokenizer: {folder}" in resolved and "max_length: 16" in resolved  # what the folder set, recorded
    run_dir = str(tmp_path / "out" / "finetune_hf_clip")
    # python -m zvl_ds.export's main(), here: the export's command line is run as a process in test_ema_resume
    assert export_main([run_dir, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert export_main([run_dir, "--out", str(tmp_path / "zvl")]) == 0
    library, info = CLIPModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    moved = (library.vision_model.encoder.layers[0].mlp.fc1.weight - source.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert moved.abs().max() > 1e-6  # trained: the export is not the source
    exported = zvl_ds.load_model(str(tmp_path / "zvl"))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = exported.tokenize(["a red circle", "two blue squares"])
    with torch.no_grad():
        image = F.normalize(library.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(library.get_text_features(**tokens).pooler_output, dim=-1)
        assert (image - exported.encode_image(pixels)).abs().max() <= 1e-5
        assert (text - exported.encode_text(tokens)).abs().max() <= 1e-5
