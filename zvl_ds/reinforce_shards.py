"""Reinforce shards: store a distillation teacher's embeddings beside the shards, once, for ``distill.source: stored``
(docs/distillation.md).

Examples:
  python -m zvl_ds.reinforce_shards --cfg configs/demo.yaml data.data_path=shards distill.teacher=exported/big
  python -m zvl_ds.reinforce_shards --cfg my.yaml distill.teacher=/models/clip-vit-large-patch14 --resume
  torchrun --nproc_per_node 8 -m zvl_ds.reinforce_shards --cfg my.yaml device=cuda precision=bf16 --resume

The config is the training run's: its teacher (``distill.teacher``, ``distill.pretrained``), its datasets
(``data.train_name`` and ``data.valid_name``, or --datasets), ``device`` and ``precision``. Beside each shard
``<name>.tar`` goes ``<name>.teacher.safetensors``: the image embedding of the teacher's evaluation view of each
sample and one embedding per caption, fp16, with the teacher's identity (its weights' SHA-256) in the header.
Each file is written whole or not at all; --resume keeps the complete files of this teacher and writes the rest.
Under torchrun (or srun) each process takes every N-th shard (no process group is needed); run --resume once more
afterwards on one process to check that every shard is done.

Exit codes: 0 done; 1 a shard could not be read to its end (nothing written for it; the rest are); 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

import torch

import zvl_ds  # noqa: F401  (torchvision shim before timm/transformers)
from zvl_ds.base.cli import run
from zvl_ds.base.errors import UserError
from zvl_ds.config import Config, ConfigError, load_config
from zvl_ds.data.sources import resolve_dataset, resolve_train_datasets
from zvl_ds.data.teacher_store import refuse_parquet
from zvl_ds.data.transforms import ImageTransform, caption_preparer, normalize_images, tokenize
from zvl_ds.data.writing.teacher_embeddings import ShardJob, TeacherView, reinforce
from zvl_ds.model.teacher import Teacher, load_teacher, own_scale_and_bias
from zvl_ds.observe.logs import setup_logging
from zvl_ds.runtime.dist import slurm_launch_env
from zvl_ds.runtime.engine import resolve_placement


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.reinforce_shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--cfg", required=True, help="the training config (its distill.teacher and datasets)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME",
                        help="datasets to reinforce (default: data.train_name and data.valid_name)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="keep the complete embeddings of this teacher, write the missing ones")
    existing.add_argument("--overwrite", action="store_true", help="write every shard's embeddings again")
    parser.add_argument("--batch-size", type=int, default=256, help="images or captions per teacher forward")
    parser.add_argument("--workers", type=int, default=2, help="processes decoding shards (one shard each at a time)")
    parser.add_argument("--quiet", action="store_true", help="no per-shard lines")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


class _Encoder:
    """The teacher in eval mode, without autograd: uint8 images at its evaluation size, or token ids, to embeddings."""

    def __init__(self, teacher: Teacher, device: torch.device, dtype: torch.dtype):
        self.teacher, self.device, self.dtype = teacher, device, dtype

    @torch.no_grad()
    def images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        pixels = normalize_images(images_uint8, self.teacher.normalize, self.device, self.dtype)
        return self.teacher.model(images=pixels)["image_embeds"].float()

    @torch.no_grad()
    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.teacher.model(input_ids=input_ids.to(self.device),
                                  attention_mask=attention_mask.to(self.device))["text_embeds"].float()


def teacher_view(cfg: Config, teacher: Teacher) -> TeacherView:
    """How the teacher's evaluation on this config's data reads a sample: its validation transforms, caption
    preparation, tokenizer and caption length."""
    evaluated = teacher.evaluation_config(cfg)
    return TeacherView(ImageTransform(evaluated.transforms.valid_transforms, evaluated.transforms),
                       caption_preparer(evaluated.transforms.caption_eval), teacher.tokenizer, teacher.max_length)


def shard_jobs(cfg: Config, names: Optional[List[str]]) -> List[ShardJob]:
    """Every shard of the datasets to reinforce, training sets' splits for training sets, validation ones else."""
    data = cfg.data
    datasets = resolve_train_datasets(data) if names is None else []
    for name in (data.valid_name if names is None else names):
        if name not in [dataset.name for dataset in datasets]:
            splits = data.train_splits if name in data.train_name else data.valid_splits
            datasets.append(resolve_dataset(data, name, splits))
    refuse_parquet(datasets)
    return [ShardJob(dataset.name, path) for dataset in datasets for path in dataset.shards]


def process_share() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's, the deepspeed launcher's or SLURM's variables; (0, 1, 0)."""
    env = {**os.environ, **slurm_launch_env(os.environ)}
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    cfg = load_config(args.cfg, args.overrides)
    if not cfg.distill.enabled:
        raise ConfigError("reinforce_shards needs the teacher: set distill.teacher (in the config or as "
                          "distill.teacher=FOLDER)")
    rank, world_size, local_rank = process_share()
    jobs = shard_jobs(cfg, args.datasets)[rank::world_size]
    placement = resolve_placement(cfg, local_rank)
    teacher = load_teacher(cfg, placement.device, placement.dtype)
    own_scale, own_bias = own_scale_and_bias(teacher.module)
    encoder = _Encoder(teacher, placement.device, placement.dtype)
    ids, mask = tokenize(teacher.tokenizer, ["a"], teacher.max_length)
    width = encoder.texts(ids, mask).shape[1]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the decoding workers fork after the tokenizer ran
    share = f" (process {rank} of {world_size}: every {world_size}th shard)" if world_size > 1 else ""
    print(f"reinforce_shards: {len(jobs)} shard(s){share}, teacher {cfg.distill.teacher} (sha256 "
          f"{teacher.identity['sha256'][:12]}, width {width}, {teacher.image_size} px) on {placement.device}",
          flush=True)

    def on_shard(decoded) -> None:
        if not args.quiet:
            print(f"  {decoded.job.path}: {len(decoded.readable)} images, {decoded.input_ids.shape[0]} captions"
                  + (f", {len(decoded.missing)} unreadable" if decoded.missing else ""), flush=True)

    policy = "resume" if args.resume else "overwrite" if args.overwrite else "refuse"
    report = reinforce(jobs, teacher_view(cfg, teacher), encoder, teacher.identity, own_scale, own_bias, width,
                       policy, args.workers, args.batch_size, on_shard)
    print(report.summary(), flush=True)
    return 1 if report.failed else 0


def cli() -> int:
    """``python -m zvl_ds.reinforce_shards`` and the console script ``zvl-reinforce-shards``."""
    setup_logging()
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
