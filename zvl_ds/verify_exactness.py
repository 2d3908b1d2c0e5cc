"""Check, on your own cluster, model and DeepSpeed config, that one distributed step equals a full-batch step.

Run it exactly like training, with a smaller batch:

    deepspeed --module zvl_ds.verify_exactness --deepspeed_config ds_configs/zero2.json --cfg configs/my.yaml \
        data.batch_size=64 data.batch_size_train=16

Each rank takes one batch (from your data, or random inputs with --synthetic) and runs one step of the
configured runner with plain SGD at lr 1 (no momentum, decay or clipping), so the parameter update IS the
averaged gradient. Rank 0 then recomputes the gradient of the same global batch in a single process with a
dense full-batch loss (zvl_ds.objective.exactness), replaying each rank's dropout, and prints the largest relative
difference per parameter group. Exit code 1 when a group exceeds the tolerance. With distill.teacher set, the
teacher embeds the batch in the step (partitioned at ZeRO-3) and the reference adds the dense distillation term,
from the teacher's embeddings of the whole batch; with distill.source=stored the batch carries the embeddings stored
beside your shards (--synthetic: random unit vectors of width 64 stand for them, at distill.scale, default 100, and
for a SigLIP student distill.bias, default -10), and the reference takes the same ones.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import deepspeed
import torch

import zvl_ds  # noqa: F401  (torchvision shim before timm/transformers)
from zvl_ds.base.cli import run
from zvl_ds.config import Config, ConfigError, check_world_size, load_config
from zvl_ds.data import TeacherInputs, build_train_loader, load_tokenizer
from zvl_ds.data.sources import resolve_train_datasets
from zvl_ds.data.transforms import ImageTransform
from zvl_ds.model.build import build_model
from zvl_ds.model.teacher import StoredTeacher, Teacher, load_teacher, stored_teacher
from zvl_ds.objective.distill_loss import TeacherEmbeddings
from zvl_ds.objective.build import build_step
from zvl_ds.objective.exactness import GroupDifference, ReferenceDistillation, compare_by_group, reference_loss
from zvl_ds.objective.mixup import draw_mixup
from zvl_ds.objective.step import StepBatch
from zvl_ds.observe.logs import setup_logging
from zvl_ds.runtime import dist
from zvl_ds.runtime.engine import build_ds_config, initialize_engine, resolve_placement
from zvl_ds.runtime.optim import build_optimizer

SGD_OVERRIDES = ["optim.name=SGD", "optim.lr.init=1.0", "optim.param.weight_decay=0.0", "optim.param.momentum=0.0",
                 "optim.grad_clip=0.0"]
DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}
MAX_OVERFLOW_RETRIES = 20


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.verify_exactness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    parser.add_argument("--synthetic", action="store_true", help="random images and tokens instead of your data")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed relative difference per group (default: 1e-4 fp32, 5e-2 bf16, "
                             "2e-2 fp16)")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def _random_tokens(tokenizer, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    vocab = max(8, getattr(tokenizer, "vocab_size", 1000))
    return torch.randint(5, vocab, (count, length), generator=generator)


SYNTHETIC_STORED_WIDTH = 64


def synthetic_stored_teacher(cfg: Config) -> StoredTeacher:
    """What --synthetic stands in for stored embeddings with: no shards, no teacher; the config's scale and bias."""
    bias = cfg.distill.bias if cfg.distill.bias is not None else -10.0
    return StoredTeacher(identity={"teacher": "synthetic"}, scale=cfg.distill.scale or 100.0,
                         bias=bias if cfg.loss.name == "SigLIP" else None, width=SYNTHETIC_STORED_WIDTH, shards=0)


def _stored_embeddings(batch, per_rank: int, generator: Optional[torch.Generator]) -> TeacherEmbeddings:
    """The loader's stored embeddings (float16, to float32 as the trainer hands them over), or random ones."""
    if generator is None:
        return TeacherEmbeddings(batch.teacher_image_embeds.float(), batch.teacher_text_embeds.float())
    image, text = (torch.nn.functional.normalize(torch.randn(per_rank, SYNTHETIC_STORED_WIDTH, generator=generator),
                                                 dim=-1).half().float() for _ in range(2))
    return TeacherEmbeddings(image, text)


def local_batch(cfg: Config, rank: int, world_size: int, synthetic: bool, tokenizer,
                teacher: Optional[Teacher] = None, stored: bool = False) -> StepBatch:
    per_rank = cfg.data.batch_size // world_size
    if synthetic:
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        size = cfg.transforms.input_size
        if teacher is not None:  # the loader's side: the larger of the student's and the teacher's views
            size = max(ImageTransform(cfg.transforms.train_transforms, cfg.transforms).size, teacher.image_size)
        images = torch.randint(0, 256, (per_rank, 3, size, size), dtype=torch.uint8, generator=generator)
        input_ids = _random_tokens(tokenizer, per_rank, cfg.model.max_length, generator)
        batch = StepBatch(images, input_ids, torch.ones_like(input_ids))
        if teacher is not None:
            batch.teacher_input_ids = _random_tokens(teacher.tokenizer, per_rank, teacher.max_length, generator)
            batch.teacher_attention_mask = torch.ones_like(batch.teacher_input_ids)
        if stored:
            batch.teacher_embeddings = _stored_embeddings(None, per_rank, generator)
        return batch
    inputs = None if teacher is None else TeacherInputs(teacher.image_size, teacher.tokenizer, teacher.max_length)
    loader = build_train_loader(cfg, rank, world_size, tokenizer, inputs)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    return StepBatch(batch.images, batch.input_ids, batch.attention_mask, batch.teacher_input_ids,
                     batch.teacher_attention_mask, _stored_embeddings(batch, per_rank, None) if stored else None)


def gather_to_all(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.get_world_size() == 1:
        return tensor
    local = tensor.to(device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts).cpu()


def full_parameters(engine, stage: int) -> Dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {name: p.detach().float().cpu().clone() for name, p in engine.module.named_parameters()
                if p.requires_grad}


# The reference runs in the engine's precision: on CUDA, dropout and drop-path draw different random numbers for
# bf16/fp16 tensors than for fp32 ones, so only a same-precision reference sees the same masks. fp16 gradients
# are taken from a scaled loss so that small ones do not underflow.
REFERENCE_LOSS_SCALE = {torch.float16: 1024.0}


def reference_distillation(cfg: Config, teacher: Teacher, images: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, normalise, device: torch.device,
                           dtype: torch.dtype) -> ReferenceDistillation:
    """The teacher's embeddings of the whole batch in one process: its own module, or at ZeRO-3 (where a forward of
    the partitioned engine is a collective) a second copy loaded here."""
    module = teacher.module
    if module is not teacher.model:
        module = load_teacher(cfg, device, dtype).module
    with torch.no_grad():
        out = module(images=normalise(images), input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return ReferenceDistillation(out["image_embeds"].float(), out["text_embeds"].float(), teacher.scale, teacher.bias,
                                 cfg.distill.weight, cfg.distill.contrastive_weight, cfg.distill.sigmoid_target)


def reference_gradients(cfg: Config, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        world_size: int, chunk: int, normalise, device: torch.device,
                        dtype: torch.dtype, distillation: Optional[ReferenceDistillation] = None
                        ) -> Dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss).to(device=device, dtype=dtype)
    model.train()
    mixup = draw_mixup(cfg.seed, 0, cfg.loss.mixup.beta) if cfg.loss.name == "MixUpNCE" else None
    loss = reference_loss(model, normalise(images), input_ids.to(device), attention_mask.to(device),
                          world_size=world_size, chunk=chunk, seed=cfg.seed, step=0, mixup=mixup,
                          distillation=distillation)
    scale = REFERENCE_LOSS_SCALE.get(dtype, 1.0)
    (loss * scale).backward()
    return {name: p.grad.detach().float().cpu() / scale for name, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def report(groups: List[GroupDifference], tolerance: float) -> bool:
    print(f"{'parameter group':<20} {'max |update - ref grad|':>24} {'max |ref grad|':>16} {'relative':>10}")
    ok = True
    for group in groups:
        flag = "" if group.relative <= tolerance else "  <-- exceeds tolerance"
        ok &= group.relative <= tolerance
        print(f"{group.group:<20} {group.max_abs_diff:>24.3e} {group.reference_max:>16.3e} {group.relative:>10.2e}{flag}")
    print(f"{'PASS' if ok else 'FAIL'}: tolerance {tolerance:.0e}")
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.cfg, list(args.overrides) + SGD_OVERRIDES)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    dist.init_distributed()
    setup_logging(dist.get_rank(), dist.get_world_size())
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        check_world_size(cfg, world_size)
        placement = resolve_placement(cfg, int(os.environ.get("LOCAL_RANK", 0)))
        ds_config = build_ds_config(args.deepspeed_config, cfg, world_size)
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        tokenizer = load_tokenizer(cfg.model.text_encoder)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.loss)
        engine = initialize_engine(model, build_optimizer(model, cfg.optim, placement.device), ds_config)
        online = cfg.distill.enabled and cfg.distill.source == "online"
        teacher = load_teacher(cfg, placement.device, placement.dtype, ds_config) if online else None
        stored = None
        if cfg.distill.enabled and not online:
            stored = (synthetic_stored_teacher(cfg) if args.synthetic else
                      stored_teacher(cfg, resolve_train_datasets(cfg.data)))

        batch = local_batch(cfg, rank, world_size, args.synthetic, tokenizer, teacher, stored is not None)
        chunk = cfg.per_rank_chunk(world_size)
        global_images = gather_to_all(batch.images, placement.device)
        global_ids = gather_to_all(batch.input_ids, placement.device)
        global_mask = gather_to_all(batch.attention_mask, placement.device)
        if teacher is not None:
            global_teacher_ids = gather_to_all(batch.teacher_input_ids, placement.device)
            global_teacher_mask = gather_to_all(batch.teacher_attention_mask, placement.device)
        if stored is not None:
            stored_reference = ReferenceDistillation(
                gather_to_all(batch.teacher_embeddings.image, placement.device),
                gather_to_all(batch.teacher_embeddings.text, placement.device), stored.scale, stored.bias,
                cfg.distill.weight, cfg.distill.contrastive_weight, cfg.distill.sigmoid_target)
        before = full_parameters(engine, stage)
        # the trainer's step, as built there
        step = build_step(cfg, world_size, rank, placement.device, placement.dtype, teacher, stored)
        mixup = step.mixup(0)
        engine.train()
        for _ in range(MAX_OVERFLOW_RETRIES):  # fp16: DeepSpeed lowers its loss scale after each overflow
            result = step(engine, batch, 0)
            if result.applied or result.skip_reason != "fp16 overflow":
                break
        after = full_parameters(engine, stage)
        ok = True
        if rank == 0:
            if not result.applied:
                print(f"the step was skipped ({result.skip_reason}); nothing to compare", file=sys.stderr)
                ok = False
            else:
                update = {name: before[name] - after[name] for name in before}
                distillation = stored_reference if stored is not None else None if teacher is None else (
                    reference_distillation(cfg, teacher, global_images, global_teacher_ids, global_teacher_mask,
                                           step.options.teacher.prepare_images, placement.device, placement.dtype))
                expected = reference_gradients(cfg, global_images, global_ids, global_mask, world_size, chunk,
                                               step.options.prepare_images, placement.device, placement.dtype,
                                               distillation)
                tolerance = args.tolerance or DEFAULT_TOLERANCE[cfg.precision or "fp32"]
                print(f"one {cfg.runner.name} step, {world_size} rank(s), ZeRO-{stage}, {cfg.precision}, "
                      f"global batch {cfg.data.batch_size}, chunk {chunk}/rank, loss {cfg.loss.name}"
                      + (f" ({mixup.side} mixup, lambda {mixup.lam:.3f})" if mixup else "")
                      + (f", distilled from {cfg.distill.teacher} ({teacher.image_size} px)" if teacher else "")
                      + (f", distilled from stored embeddings ({stored.identity['teacher']})" if stored else ""))
                ok = report(compare_by_group(update, expected), tolerance)
        # the report is out before any rank can exit: with exit code 1 on every rank, the launcher ends the ranks
        # still running as soon as one exits, and a block-buffered report of rank 0 would be lost
        sys.stdout.flush()
        sys.stderr.flush()
        flag = torch.tensor([0 if ok else 1], device=placement.device)
        if dist.is_distributed():
            torch.distributed.broadcast(flag, 0)
        return int(flag.item())
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()


def cli() -> int:
    """``python -m zvl_ds.verify_exactness`` and the console script ``zvl-verify-exactness``: errors exit through ``zvl_ds.base.cli.run``."""
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
