"""The trainer's own wiring against the full-batch reference: the real entry point, 2 ranks, 2 steps.

The exactness tests in tests/dist build the step's options, mixup partner, draws and seeds themselves; this one
runs ``zvl_ds/train.py`` under torchrun (DGA, dropout and drop-path, MixUpNCE, a learnable temperature, ZeRO-2),
reads which samples each rank took at each step (``log.record_sample_keys``), rebuilds that global batch here from
the shards with Python's tarfile, and recomputes both steps in one process with ``objective.exactness``'s dense
loss. The run's consolidated checkpoint must equal the reference's parameters within 1e-5 (relative, per tensor).
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import torch

from tests.helpers.data_fixtures import write_dataset
from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
STEPS = 2
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
OVERRIDES = ["seed=3", "data.train_name=[exact]", "data.valid_name=[exact]", "data.train_type=debias",
             "data.batch_size=8", "data.batch_size_train=4", "data.batch_size_val=8", "data.num_workers=0",
             "data.shuffle_buffer=10", "transforms.train_transforms=[resize,center_crop]",
             f"transforms.normalize.mean={MEAN}", f"transforms.normalize.std={STD}",
             "model.image_encoder.kwargs.drop_path_rate=0.2",  # the text tower's dropout (0.1) is on by default
             "loss.mixup.beta=2.0", "optim.name=SGD", "optim.lr.name=constant", "optim.lr.init=0.5",
             "optim.param.weight_decay=0.01", "optim.param.momentum=0.0", "optim.grad_clip=0.0",
             f"runner.train_steps={STEPS}", "runner.val_interval_steps=1000", "ckpt.step_interval=1000",
             "log.record_sample_keys=true", "log.tensorboard=false"]


def shard_samples(folder):
    """key -> (image bytes, captions) of every sample in the folder's tar shards, read with tarfile."""
    samples = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(folder, name)) as archive:
            members = {member.name: archive.extractfile(member).read() for member in archive.getmembers()}
        for member, data in members.items():
            if member.endswith(".jpg"):
                key = member[:-len(".jpg")]
                samples[key] = (data, json.loads(members[key + ".json"])["captions"])
    return samples


def recorded_keys(run_dir, world_size):
    """step -> the global batch's keys, rank 0's samples first (each rank's file: "STEP key key ...")."""
    per_step = {}
    for rank in range(world_size):
        with open(os.path.join(run_dir, "sample_keys", f"rank_{rank}.txt")) as handle:
            for line in handle:
                step, *keys = line.split()
                per_step.setdefault(int(step), []).extend(keys)
    return per_step


def rebuild_batch(cfg, keys, samples):
    """The global batch of ``keys`` as the loader makes it: square resize, centre crop, the one caption."""
    import random

    from zvl_ds.data.transforms import ImageTransform, load_tokenizer, to_uint8_chw, tokenize

    transform = ImageTransform(cfg.transforms.train_transforms, cfg.transforms)  # no random op in this list
    images = torch.stack([to_uint8_chw(transform(samples[key][0], random.Random(0))) for key in keys])
    captions = [samples[key][1][0] for key in keys]
    input_ids, attention_mask = tokenize(load_tokenizer(cfg.model.text_encoder), captions, cfg.model.max_length)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std, input_ids, attention_mask


def reference_parameters(cfg, batches, world_size):
    """Both steps in one process: dense full-batch loss over every rank's chunks, plain SGD."""
    from zvl_ds.model.build import build_model
    from zvl_ds.objective.exactness import reference_loss
    from zvl_ds.objective.mixup import draw_mixup
    from zvl_ds.runtime.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss).train()
    optimizer = build_optimizer(model, cfg.optim)
    chunk = cfg.data.batch_size_train // world_size
    for step in range(STEPS):
        images, input_ids, attention_mask = batches[step]
        optimizer.zero_grad()
        loss = reference_loss(model, images, input_ids, attention_mask, world_size=world_size, chunk=chunk,
                              seed=cfg.seed, step=step, mixup=draw_mixup(cfg.seed, step, cfg.loss.mixup.beta))
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trained_run_equals_full_batch_reference(tmp_path):
    from zvl_ds.model.saved_run import consolidate_state_dict, run_config
    from zvl_ds.model.build import build_model
    from zvl_ds.objective.exactness import compare_tensors

    data = tmp_path / "shards"
    write_dataset(str(data), "exact", "train", [12, 12], captions_per_image=1)
    write_dataset(str(data), "exact", "valid", [8], captions_per_image=1, id_offset=100)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), TRAIN, "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
               "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), *OVERRIDES,
               f"data.data_path={data}", f"ckpt.dir={tmp_path / 'out'}", "data.exp_name=exact"]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = str(tmp_path / "out" / "exact")
    tag = f"step_{STEPS:08d}"
    cfg = run_config(run_dir, tag)
    assert cfg.runner.name == "clip_bsgs" and cfg.loss.name == "MixUpNCE" and cfg.runner.stable_random == "step"
    trained = consolidate_state_dict(run_dir, tag, build_model(cfg.model, cfg.loss), cfg)

    samples = shard_samples(str(data / "exact"))
    keys = recorded_keys(run_dir, 2)
    assert sorted(keys) == list(range(STEPS)) and all(len(keys[step]) == 8 for step in keys)
    batches = [rebuild_batch(cfg, keys[step], samples) for step in range(STEPS)]
    expected = reference_parameters(cfg, batches, 2)
    worst = compare_tensors(trained, expected)
    name, value = max(worst.items(), key=lambda item: item[1])
    assert value <= 1e-5, f"{name}: relative difference {value:.2e} from the full-batch reference"
    torch.manual_seed(cfg.seed)
    initial = dict(build_model(cfg.model, cfg.loss).named_parameters())
    moved = max(float((trained[name] - p).abs().max()) for name, p in initial.items())
    assert moved > 1e-3  # the two steps really changed the weights
