"""The training loop: build the parts from a config, step, checkpoint and resume, evaluate, log.

``Trainer`` wires the rooms together: the data stream (``data``), the model and a distillation teacher (``model``),
the DeepSpeed engine with its optimizer and schedule (``runtime``), one configured step (``objective.build``),
checkpoints and metrics (``runtime``) and evaluation (``evaluation``). ``train.py`` parses the command line and runs
it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

import zvl_ds
from zvl_ds.base.errors import UserError
from zvl_ds.config import Config, ConfigError
from zvl_ds.data import TeacherInputs, build_train_loader, load_tokenizer
from zvl_ds.data.failures import DataLossError
from zvl_ds.data.sources import resolve_dataset, resolve_train_datasets
from zvl_ds.evaluation.retrieval import evaluate_with_examples, log_retrieval_examples, stored_teacher_metrics
from zvl_ds.evaluation.zero_shot import evaluate_zero_shot, zero_shot_set
from zvl_ds.model.adapters import ADAPTER_BASE_FILE, base_change, base_identity, has_adapters
from zvl_ds.model.build import build_model
from zvl_ds.model.init_weights import initialise_from_config, selected_source
from zvl_ds.model.safe_load import check_checkpoint_folder
from zvl_ds.model.teacher import StoredTeacher, Teacher, check_teacher_identity, load_teacher, stored_teacher
from zvl_ds.model.towers import compile_towers
from zvl_ds.objective.build import build_step
from zvl_ds.objective.skip import NonFiniteWeights, SkipPolicy, local_weights_finite, non_finite_weights_message
from zvl_ds.objective.distill_loss import TeacherEmbeddings
from zvl_ds.objective.step import StepBatch, StepResult
from zvl_ds.observe.monitor import Monitor, PhaseTimer, SideOutputError, peak_memory_bytes
from zvl_ds.observe.records import drop_rows_after
from zvl_ds.observe.wandb_sink import sinks_for
from zvl_ds.runtime import dist
from zvl_ds.runtime.checkpoint import (CheckpointError, capture_rng_state, convert_to_universal, find_resume_point,
                                       gather_failures, load_checkpoint, needs_universal_conversion, read_json_file,
                                       read_latest, restore_rng_state, save_checkpoint, written_folder)
from zvl_ds.runtime.ema import EmaFileError, build_ema
from zvl_ds.runtime.engine import Placement, initialize_engine, set_learning_rate, zero_stage
from zvl_ds.runtime.optim import build_optimizer
from zvl_ds.runtime.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch, signal_name
from zvl_ds.runtime.schedule import learning_rate

LOG = logging.getLogger(__name__)


def total_train_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.runner.train_steps > 0:
        return cfg.runner.train_steps
    if cfg.data.train_steps > 0:
        return cfg.data.train_steps
    return cfg.epoch * steps_per_epoch


def check_zero_shot_sets(cfg: Config) -> None:
    """Fail at the start, not at the first evaluation, when a ``data.zeroshot`` set cannot be read."""
    for name, zeroshot in cfg.data.zeroshot.items():
        try:
            zero_shot_set(zeroshot.path, zeroshot.classes, zeroshot.templates)
        except (OSError, ValueError, UserError) as error:
            raise ConfigError(f"data.zeroshot.{name}: {error}") from None



class Trainer:
    def __init__(self, cfg: Config, ds_config: Dict, placement: Placement):
        self.cfg = cfg
        self.placement = placement
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.tokenizer = load_tokenizer(cfg.model.text_encoder)
        model = build_model(cfg.model, cfg.loss)
        self.zero_stage = zero_stage(ds_config)
        # evaluating finetuned weights (LAVIS's load_finetuned) evaluates those, not the run folder's checkpoint
        evaluating_finetuned = cfg.evaluate and cfg.model.load_finetuned
        self.resume_point = (None if evaluating_finetuned else
                             find_resume_point(self.run_dir, cfg.resume_ckpt_path, cfg.ckpt.auto_resume))
        self._refuse_code_in_checkpoint()
        # whole-model weights only for a fresh start (a resumed run restores its own checkpoint; one with adapters
        # only its trainable tensors, so it loads its frozen base again), and before DeepSpeed wraps (and at ZeRO-3
        # partitions) the parameters
        self.adapters = has_adapters(model)
        self.init_report = (None if self.resume_point and not self.adapters
                            else initialise_from_config(model, cfg))
        self.base_identity = base_identity(cfg.model, model) if self.adapters else None
        self._refuse_changed_base()
        model = compile_towers(model, cfg.model.compile)
        if self.resume_point and needs_universal_conversion(self.resume_point, self.world_size, self.zero_stage):
            self.resume_point = convert_to_universal(self.resume_point)
            self._refuse_code_in_checkpoint()
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        optimizer = build_optimizer(model, cfg.optim, placement.device)
        self.lr_scales = [group["lr_scale"] for group in optimizer.param_groups]
        self.engine = initialize_engine(model, optimizer, ds_config)
        self.ema = build_ema(cfg.model.ema, self.engine, self.zero_stage)  # None unless model.ema.decay is set
        check_zero_shot_sets(cfg)
        # a distillation teacher trains nothing and is not needed to evaluate (evaluate: true); a stored one is never
        # loaded: its embeddings beside the shards are checked against its weights' hash
        distilling = cfg.distill.enabled and not cfg.evaluate
        self.teacher: Optional[Teacher] = (load_teacher(cfg, placement.device, placement.dtype, ds_config)
                                           if distilling and cfg.distill.source == "online" else None)
        self.stored_teacher: Optional[StoredTeacher] = (
            stored_teacher(cfg, resolve_train_datasets(cfg.data)) if distilling and cfg.distill.source == "stored"
            else None)
        # evaluation-only runs (evaluate: true) need no training data
        self.loader = None if cfg.evaluate else build_train_loader(cfg, self.rank, self.world_size, self.tokenizer,
                                                                   self._teacher_inputs())
        self.steps_per_epoch = max(1, self.loader.steps_per_epoch) if self.loader is not None else 1
        self.total_steps = total_train_steps(cfg, self.steps_per_epoch)
        self.run_step = build_step(cfg, self.world_size, self.rank, placement.device, placement.dtype, self.teacher,
                                   self.stored_teacher)
        self.monitor = Monitor(self.run_dir, dist.is_main_process(), cfg.log.tensorboard, self.total_steps,
                               sinks_for(cfg, self.run_dir, self.resume_point is not None)
                               if dist.is_main_process() else ())
        if self.resume_point and selected_source(cfg) and not self.adapters:
            self.monitor.console(f"{selected_source(cfg)[0]} is not loaded: the run resumes from its checkpoint "
                                 f"{os.path.join(self.resume_point.run_dir, self.resume_point.tag)}")
        self.timer = PhaseTimer(placement.device)
        self.step = 0
        self.skips = SkipPolicy(cfg.runner.max_skipped_steps)
        self.last_saved_step: Optional[int] = None
        for tower, names in getattr(self.engine.module, "adapted_modules", {}).items():
            self.monitor.console(f"{tower}: LoRA adapters on {len(names)} modules")
        if self.adapters:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.monitor.console(f"{trainable} trainable parameters of {sum(p.numel() for p in model.parameters())};"
                                 " checkpoints hold the trainable tensors only")
        for tower, lock in getattr(self.engine.module, "tower_locks", {}).items():
            self.monitor.console(f"{tower}: the last {lock.unlocked} of {lock.groups} groups of blocks train, "
                                 f"{len(lock.frozen_parameters)} parameter tensors frozen")
        self.preemption = PreemptionWatch(cfg.runner.preempt_timeout, self.rank)
        self.preempted = False  # the run stopped on a signal after saving: train.py exits with PREEMPTED_EXIT_CODE
        self.side_output_failure: Optional[str] = None

    def _refuse_code_in_checkpoint(self) -> None:
        """DeepSpeed (and its universal conversion) unpickles checkpoint files with ``weights_only=False``: every
        file is checked with the weights-only unpickler first, so a crafted file is refused instead of run."""
        point = self.resume_point
        if point is not None and not self.cfg.ckpt.trust_checkpoint:
            check_checkpoint_folder(os.path.join(point.run_dir, point.tag), CheckpointError,
                                    "set ckpt.trust_checkpoint=true")

    def _refuse_changed_base(self) -> None:
        """A run with adapters resumes only onto the frozen base its checkpoint was trained on."""
        point = self.resume_point
        if point is None:
            return
        saved = read_json_file(point, ADAPTER_BASE_FILE)
        folder = os.path.join(point.run_dir, point.tag)
        if saved is None and self.adapters:
            raise CheckpointError(f"cannot resume {folder} with model.*.lora: it was written without adapters (it "
                                  "has no adapter_base.json); start a new run (another data.exp_name)")
        if saved is not None and not self.adapters:
            raise CheckpointError(f"cannot resume {folder} without adapters: it holds LoRA adapters and their "
                                  "trainable tensors only; resume with the model.*.lora keys it was trained with")
        change = base_change(saved, self.base_identity) if saved is not None else None
        if change:
            raise CheckpointError(f"cannot resume {folder}: {change}. Resume with the base it was trained on, or "
                                  "start a new run (another data.exp_name)")

    def _teacher_inputs(self) -> Optional[TeacherInputs]:
        teacher = self.teacher
        return None if teacher is None else TeacherInputs(teacher.image_size, teacher.tokenizer, teacher.max_length)

    def _teacher_identity(self) -> Optional[Dict[str, str]]:
        teacher = self.teacher or self.stored_teacher
        return None if teacher is None else teacher.identity

    # ------------------------------------------------------------------ pieces the loop uses

    def _to_step_batch(self, batch) -> StepBatch:
        images = batch.images
        if self.cfg.runner.offload_inputs and self.placement.device.type == "cuda":
            # chunks travel to the device one at a time; the loader's pin thread has pinned them already
            images = images if images.is_pinned() else images.pin_memory()
        else:
            images = images.to(self.placement.device, non_blocking=True)
        stored = (None if batch.teacher_image_embeds is None else
                  TeacherEmbeddings(batch.teacher_image_embeds.float(), batch.teacher_text_embeds.float()))
        return StepBatch(images=images, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         teacher_input_ids=batch.teacher_input_ids, teacher_attention_mask=batch.teacher_attention_mask,
                         teacher_embeddings=stored)

    def _record_keys(self, step: int, keys: List[str]) -> None:
        folder = os.path.join(self.run_dir, "sample_keys")
        path = os.path.join(folder, f"rank_{self.rank}.txt")
        with self._side_output(path):
            os.makedirs(folder, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{step} {' '.join(keys)}\n")

    @contextlib.contextmanager
    def _side_output(self, path: str):
        """TensorBoard, eval_metrics.jsonl and sample_keys are side outputs: when one cannot be written (a full
        disk) the failure is noted, and at the next step boundary every rank saves the training state before the
        run stops with a message naming the path. Outside training (evaluate: true) it stops at once."""
        try:
            yield
        except (SideOutputError, OSError) as error:
            text = str(error) if isinstance(error, SideOutputError) else \
                f"writing {path} failed: {error.strerror or error}"
            if self.cfg.evaluate:
                raise SideOutputError(text) from error
            self.side_output_failure = self.side_output_failure or text

    def _shared_state(self) -> Dict:
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch, "skipped_steps": self.skips.total,
                "world_size": self.world_size, "config": self.cfg.to_dict(), "zvl_ds_version": zvl_ds.__version__,
                "teacher": self._teacher_identity()}

    def save(self) -> None:
        rank_state = {"step": self.step, "loader": self.loader.state_dict(), "rng": capture_rng_state()}
        tag = save_checkpoint(self.engine, self.run_dir, self.step, self._shared_state(), rank_state,
                              self.cfg.to_yaml(), self.cfg.ckpt.keep_last,
                              self.ema.checkpoint_files() if self.ema else None,
                              json_files={ADAPTER_BASE_FILE: self.base_identity} if self.adapters else None,
                              trainable_only=self.adapters)
        self.last_saved_step = self.step
        self.monitor.console(f"saved checkpoint {os.path.join(self.run_dir, tag)}")

    def resume(self) -> None:
        point = self.resume_point
        if point is None:
            return
        shared, rank_state = load_checkpoint(self.engine, point, self.zero_stage, trainable_only=self.adapters)
        if not self.cfg.evaluate:  # a distilled run goes on with the teacher it started with (its weights' hash)
            check_teacher_identity(shared.get("teacher"), self._teacher_identity(),
                                   os.path.join(point.run_dir, point.tag))
        if self.ema is not None:
            try:
                self.ema.restore(written_folder(point))
            except EmaFileError as error:
                raise CheckpointError(str(error)) from None
        self.step = int(shared.get("step", 0))
        self.skips.total = int(shared.get("skipped_steps", 0))
        self.last_saved_step = self.step
        if rank_state is not None and self.loader is not None:
            try:
                self.loader.load_state_dict(rank_state["loader"])
            except ValueError as error:  # the data settings changed since the checkpoint
                raise CheckpointError(f"cannot continue the data stream of {point.run_dir}/{point.tag}: {error}. "
                                      "Resume with the data settings of the checkpoint, or start a new run "
                                      "(another data.exp_name)") from None
            restore_rng_state(rank_state["rng"])
        self.monitor.console(f"resumed from {os.path.join(point.run_dir, point.tag)} at step {self.step}")

    def _should_evaluate(self, step: int) -> bool:
        if not self.cfg.data.enable_valid:
            return False
        if self.cfg.runner.val_interval_steps > 0:
            return step % self.cfg.runner.val_interval_steps == 0 or step == self.total_steps
        every = self.steps_per_epoch * max(1, self.cfg.runner.val_interval)
        return step % every == 0 or step == self.total_steps

    def _evaluate_weights(self, num_examples: int):
        metrics, grids = evaluate_with_examples(self.cfg, self.engine.module, self.tokenizer, self.placement.device,
                                                self.placement.dtype, num_examples=num_examples)
        metrics.update(evaluate_zero_shot(self.cfg, self.engine.module, self.tokenizer, self.placement.device,
                                          self.placement.dtype))
        return metrics, grids

    def evaluate(self, step: int) -> Dict[str, Dict[str, float]]:
        self.engine.eval()
        try:
            metrics, grids = self._evaluate_weights(max(0, self.cfg.log.num_image_samples))
            if self.ema is not None:  # the same sets with the averaged weights, as <set>_ema
                with self.ema.swapped_in(self.engine):
                    averaged, _ = self._evaluate_weights(0)
                metrics.update({f"{name}_ema": values for name, values in averaged.items()})
        finally:
            self.engine.train()
        with self._side_output(self.monitor.tensorboard_dir):
            log_retrieval_examples(self.monitor, grids, step)
        self._report_metrics(step, metrics)
        return metrics

    def _report_metrics(self, step: int, metrics: Dict[str, Dict[str, float]], note: str = "") -> None:
        """Evaluation figures to TensorBoard, the console and ``eval_metrics.jsonl``."""
        for name, values in metrics.items():
            with self._side_output(self.monitor.tensorboard_dir):
                self.monitor.scalars(step, {f"eval/{name}/{key}": value for key, value in values.items()
                                            if isinstance(value, (int, float))})
            self.monitor.console(f"eval {name} @ step {step}{note}: " + "  ".join(
                f"{key} {values[key]:.2f}" for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "top1", "top5")
                if key in values))
        if dist.is_main_process():
            path = os.path.join(self.run_dir, "eval_metrics.jsonl")
            with self._side_output(path), open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def evaluate_teacher(self) -> Dict[str, Dict[str, float]]:
        """The teacher's retrieval figures on the run's validation sets, once at the start, as ``<set>_teacher``: the
        reference the distilled student is measured against."""
        teacher = self.teacher
        if teacher is not None:
            metrics, _ = evaluate_with_examples(teacher.evaluation_config(self.cfg), teacher.model, teacher.tokenizer,
                                                self.placement.device, self.placement.dtype)
        else:  # a stored teacher: from the embeddings stored beside the validation shards, where they are
            metrics = {}
            for name in self.cfg.data.valid_name:
                values, missing = stored_teacher_metrics(self.cfg, name, self.stored_teacher.identity)
                if values is None:
                    self.monitor.console(f"no teacher reference for {name}: its shards hold no complete stored "
                                         f"embeddings of this teacher ({missing}); reinforce the validation sets "
                                         "too (python -m zvl_ds.reinforce_shards reinforces data.valid_name as well)")
                else:
                    metrics[name] = values
        metrics = {f"{name}_teacher": values for name, values in metrics.items()}
        self._report_metrics(self.step, metrics, " (the teacher, a reference)")
        return metrics

    def _data_error_counts(self) -> Dict[str, int]:
        """Skip counts summed over ranks; raises DataLossError on every rank alike when too many were skipped."""
        reports = [self.loader.skip_report()]
        if self.world_size > 1:
            reports = [None] * self.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(reports, self.loader.skip_report())
        return self.loader.check_skips(reports)

    def _log_step(self, step: int, result: StepResult, lr: float, seconds: float, phases: Dict[str, float]) -> None:
        samples_per_sec = self.cfg.data.batch_size / max(seconds, 1e-9)
        values = {"train/loss": result.loss, "train/i2t_acc": result.i2t_acc, "train/t2i_acc": result.t2i_acc,
                  "train/lr": lr, "train/temperature": result.temperature,
                  "train/samples_per_sec": samples_per_sec,
                  "train/samples_per_sec_per_device": samples_per_sec / self.world_size,
                  "train/skipped_steps": self.skips.total,
                  "memory/peak_device_bytes": peak_memory_bytes(self.placement.device)}
        grad_norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            values["train/grad_norm"] = float(grad_norm)
        values.update({f"time/{name}": value for name, value in phases.items()})
        values.update({f"train/{name}": value for name, value in result.parts.items()})
        on_interval = step % self.cfg.log.interval_train == 0 or step == self.total_steps
        if on_interval:  # summing the counters over ranks is a collective: not on every step
            values.update({f"data/skipped_{reason}": count for reason, count in self._data_error_counts().items()})
        with self._side_output(self.monitor.tensorboard_dir):
            self.monitor.scalars(step, values)
        if on_interval:
            self.monitor.train_line(step, result.loss, lr, samples_per_sec, result.temperature)

    def _count_skip(self, result: StepResult) -> None:
        latest = None
        if not result.applied:
            self.monitor.console(f"step {self.step}: skipped ({result.skip_reason})")
            latest = read_latest(self.run_dir)
        self.skips.record(result, self.step, os.path.join(self.run_dir, latest) if latest else None)

    def _last_good_checkpoint(self) -> Optional[str]:
        latest = read_latest(self.run_dir)
        return os.path.join(self.run_dir, latest) if latest else None

    def _step_boundary(self, weights_changed: bool) -> Tuple[int, bool]:
        """What every rank agrees on after a step, in one small all-reduce: weights left non-finite by the step
        (the run stops before any checkpoint is written from them), and whether any rank received a preemption
        signal (its number) or failed to write a side output; for those two every rank saves, then stops."""
        weights_bad = weights_changed and not local_weights_finite(self.engine.module)
        weights_bad, signal_number, side_failed = dist.max_over_ranks(
            [int(weights_bad), self.preemption.signal_number, int(self.side_output_failure is not None)],
            self.placement.device)
        if weights_bad:
            raise NonFiniteWeights(non_finite_weights_message(self.step, self._last_good_checkpoint()))
        return signal_number, bool(side_failed)

    def _stop(self, signal_number: int) -> None:
        """After an agreed stop: the checkpoint first, then the message (and for a side output, its error)."""
        side_failures = gather_failures(self.side_output_failure)
        try:
            if self.last_saved_step != self.step:
                self.save()
        except CheckpointError as error:
            if side_failures:
                raise SideOutputError(f"{side_failures[0][1]}; the checkpoint attempted first failed too: "
                                      f"{error}") from None
            raise
        saved = self._last_good_checkpoint()
        self.preemption.saved = True
        if side_failures:
            raise SideOutputError(f"{side_failures[0][1]} (rank {side_failures[0][0]}); the training state is "
                                  f"saved first, in {saved}: free the space and start the same command to resume")
        self.preempted = True
        self.monitor.console(f"{signal_name(signal_number)} received (preemption): stopped after step {self.step}; "
                             f"checkpoint {saved} is complete. Exiting with code {PREEMPTED_EXIT_CODE}: start the "
                             "same command again to resume from it")

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        cfg = self.cfg
        self.preemption.start()
        with self._side_output(self.monitor.tensorboard_dir):
            self.monitor.text("config", "```\n" + cfg.to_yaml() + "\n```")
        self.monitor.console(f"training {self.total_steps} steps of {cfg.data.batch_size} samples "
                             f"({cfg.runner.name}, chunk {self.run_step.options.chunk}/rank, {self.world_size} ranks, "
                             f"ZeRO-{self.zero_stage}, {cfg.precision}) -> {self.run_dir}")
        if self.teacher is not None:
            identity, (held, whole) = self.teacher.identity, self.teacher.parameter_bytes()
            self.monitor.console(f"distilling from {identity['teacher']} ({identity['kind']}, "
                                 f"{self.teacher.image_size} px, sha256 {identity['sha256'][:12]}): weights "
                                 f"{held / 2 ** 20:.1f} of {whole / 2 ** 20:.1f} MiB on this rank; loss = "
                                 f"{cfg.distill.contrastive_weight:g} x {cfg.loss.name} + {cfg.distill.weight:g} x "
                                 "distillation")
        if self.stored_teacher is not None:
            stored = self.stored_teacher
            self.monitor.console(f"distilling from the embeddings of {stored.identity['teacher']} (sha256 "
                                 f"{stored.identity['sha256'][:12]}, width {stored.width}) stored beside the "
                                 f"{stored.shards} training shards; loss = {cfg.distill.contrastive_weight:g} x "
                                 f"{cfg.loss.name} + {cfg.distill.weight:g} x distillation")
        drop_rows_after(self.run_dir, self.step, self.rank, dist.is_main_process())  # steps that are replayed
        if (self.teacher or self.stored_teacher) is not None and self.step == 0 and cfg.data.enable_valid:
            self.evaluate_teacher()
        self.engine.train()
        self.monitor.start(self.step)
        batches = iter(self.loader)
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            with self.timer.phase("data_wait"):
                batch = next(batches)
            if cfg.log.record_sample_keys:
                self._record_keys(self.step, batch.keys)
            lr = learning_rate(cfg.optim.lr, self.step, self.total_steps, self.steps_per_epoch)
            set_learning_rate(self.engine, lr, self.lr_scales)
            result = self.run_step(self.engine, self._to_step_batch(batch), self.step, self.timer)
            if self.ema is not None and result.applied:
                self.ema.update()
            self.step += 1
            self._count_skip(result)
            try:
                self._log_step(self.step, result, lr, time.perf_counter() - step_start, self.timer.pop())
            except DataLossError:  # raised on every rank at this step: keep the good state, then stop
                self.save()
                raise
            signal_number, side_failed = self._step_boundary(result.applied)
            if signal_number or side_failed:
                self._stop(signal_number)
                return
            if self.step % cfg.ckpt.step_interval == 0 or self.step == self.total_steps:
                self.save()
            if self._should_evaluate(self.step):
                self.evaluate(self.step)
        if self.last_saved_step != self.step:
            self.save()
        with self._side_output(self.monitor.tensorboard_dir):
            self.monitor.flush()
        if self._step_boundary(weights_changed=False)[1]:  # a side output of the last evaluation failed
            self._stop(0)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        try:
            self.monitor.close()
        except SideOutputError as error:  # must not hide the error the run may be stopping with
            LOG.warning(str(error))


def check_data_sources(cfg: Config) -> None:
    """Resolve the training and validation shards now: a wrong data path must fail in seconds, before the
    model, the engine and the process group are built (raises DataSourceError, a user error)."""
    if not cfg.evaluate:
        resolve_train_datasets(cfg.data)
    if cfg.evaluate or cfg.data.enable_valid:
        for name in cfg.data.valid_name:
            resolve_dataset(cfg.data, name, cfg.data.valid_splits)
