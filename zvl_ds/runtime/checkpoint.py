"""Checkpoints: DeepSpeed engine state plus per-rank resume state, an atomic ``latest``, keep-last pruning.

Layout of a run folder (``ckpt.dir/data.exp_name``)::

    config.yaml                  resolved config of the run
    latest                       tag of the newest COMPLETE checkpoint (written last, atomically)
    step_00000050/               DeepSpeed's files for that step (engine.save_checkpoint)
        config.yaml              resolved config at that step
        zvl_rank_00000.pt        per-rank state: data-loader position, RNG states (tensors and plain values)
        manifest.json            world size, every file's size and SHA-256, written after all ranks reported success

A checkpoint is complete when every rank's writes succeeded: only then does rank 0 write the manifest, move
``latest`` and prune. A failure on any rank stops the run with that rank's error and leaves ``latest`` (and
the checkpoint it names) untouched. Resume checks the files against the manifest before loading anything: each
file's size, then its SHA-256 (the ranks share the reading; a checkpoint from before checksums gets the zip CRC-32
check of its torch files instead), and refuses a damaged file by name.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from zvl_ds.base.atomic_write import atomic_path, write_text_atomic
from zvl_ds.base.checksums import file_sha256, zip_damage
from zvl_ds.base.errors import UserError
from zvl_ds.runtime import dist

LOG = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"


class CheckpointError(UserError, RuntimeError):
    pass


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(run_dir: str) -> List[str]:
    """Checkpoint tags in ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(name for name in os.listdir(run_dir)
                  if TAG_PATTERN.match(name) and os.path.isdir(os.path.join(run_dir, name)))


def read_latest(run_dir: str) -> Optional[str]:
    """The newest complete tag, or None when the folder holds no complete checkpoint."""
    path = os.path.join(run_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        tag = handle.read().strip()
    if not tag or not os.path.isdir(os.path.join(run_dir, tag)):
        raise CheckpointError(f"{path} names checkpoint {tag!r}, which does not exist in {run_dir}")
    return tag


# ------------------------------------------------------------------------------------------------ RNG state

def capture_rng_state() -> Dict[str, Any]:
    """Every generator a step can draw from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# ------------------------------------------------------------------------------------------------ save

def rank_file(rank: int) -> str:
    return f"zvl_rank_{rank:05d}.pt"


def save_checkpoint(engine, run_dir: str, step: int, shared_state: Dict[str, Any], rank_state: Dict[str, Any],
                    config_yaml: str, keep_last: int, extra_files: Optional[Dict[str, Any]] = None,
                    json_files: Optional[Dict[str, Any]] = None, trainable_only: bool = False) -> str:
    """Save on every rank; ``latest`` moves to the new tag only after every rank reported that its writes
    succeeded. Otherwise raises CheckpointError naming the failed ranks and their errors, on every rank.
    ``extra_files``: more ``{file name: weights-only contents}`` this rank writes into the folder (the model EMA);
    ``json_files``: ``{file name: JSON contents}`` rank 0 writes (the frozen base of a run with adapters).
    ``trainable_only``: the module state leaves out frozen parameters (DeepSpeed's ``exclude_frozen_parameters``):
    a run with adapters rebuilds its frozen base from the config."""
    tag = tag_for_step(step)
    folder = os.path.join(run_dir, tag)
    if dist.is_main_process():
        clear_leftover(run_dir, tag)
    dist.barrier()  # nobody writes into the folder while rank 0 clears it
    failure = None
    try:
        engine.save_checkpoint(run_dir, tag=tag, client_state=shared_state, save_latest=False,
                               exclude_frozen_parameters=trainable_only)
        for name, contents in [(rank_file(dist.get_rank()), rank_state), *(extra_files or {}).items()]:
            with atomic_path(os.path.join(folder, name)) as temp:
                torch.save(contents, temp)
        if dist.is_main_process():
            for name, contents in (json_files or {}).items():
                write_text_atomic(os.path.join(folder, name), json.dumps(contents, indent=1) + "\n")
    except Exception as error:  # noqa: BLE001  (reported to every rank below, then raised there)
        failure = f"{type(error).__name__}: {error}"
    failures = gather_failures(failure)
    if failures:
        raise CheckpointError(f"checkpoint {tag} in {run_dir} is incomplete and was not made `latest` ("
                              + "; ".join(f"rank {rank}: {text}" for rank, text in failures)
                              + f"); `latest` still names {read_latest(run_dir) or 'no checkpoint'}")
    if dist.is_main_process():
        write_text_atomic(os.path.join(folder, "config.yaml"), config_yaml)
        write_manifest(folder, dist.get_world_size())  # last file of the checkpoint: it is now complete
        write_text_atomic(os.path.join(run_dir, LATEST_FILE), tag)
        prune_checkpoints(run_dir, keep_last)
    dist.barrier()
    return tag


def clear_leftover(run_dir: str, tag: str) -> None:
    """Remove a ``tag`` folder left by an earlier attempt that never completed, so no stale file of it mixes
    with the new one (the checkpoint ``latest`` names is never touched)."""
    folder = os.path.join(run_dir, tag)
    if os.path.isdir(folder) and read_latest(run_dir) != tag:
        shutil.rmtree(folder)


def gather_failures(failure: Optional[str]) -> List[Tuple[int, str]]:
    """(rank, error text) of every rank whose ``failure`` is not None; the same list on every rank."""
    outcomes: List[Optional[str]] = [failure]
    if dist.get_world_size() > 1:
        import torch.distributed

        outcomes = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(outcomes, failure)
    return [(rank, text) for rank, text in enumerate(outcomes) if text is not None]


def write_manifest(folder: str, world_size: int) -> None:
    """Record the size and SHA-256 of every file of a checkpoint folder (all ranks' writes are done: they
    reported). Hashing streams each file once (measured 3 s per GiB on one busy core)."""
    files, checksums = {}, {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
            checksums[os.path.relpath(path, folder)] = file_sha256(path)
    manifest = {"world_size": world_size, "files": dict(sorted(files.items())),
                "sha256": dict(sorted(checksums.items()))}
    write_text_atomic(os.path.join(folder, MANIFEST_FILE), json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: str) -> Optional[Dict[str, Any]]:
    """The manifest of a checkpoint folder; None for checkpoints written before manifests existed."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        return {"world_size": int(manifest["world_size"]),
                "files": {str(k): int(v) for k, v in manifest["files"].items()},
                "sha256": {str(k): str(v) for k, v in manifest.get("sha256", {}).items()}}  # none before checksums
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"{path} is not a valid checkpoint manifest: {type(error).__name__}: {error}") from None


def check_complete(folder: str) -> None:
    """Refuse a checkpoint whose files differ from its manifest: a missing or truncated file is named."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for name, size in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing (the manifest lists "
                                  f"{len(manifest['files'])} files of {manifest['world_size']} ranks)")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} has {os.path.getsize(path)} bytes, "
                                  f"the manifest recorded {size}")
    names = sorted(manifest["files"])
    mine = names[dist.get_rank()::dist.get_world_size()]  # every rank reads its share of the files once
    failures = gather_failures(_first_damage(folder, mine, manifest["sha256"]))
    if failures:
        raise CheckpointError(f"checkpoint {folder} is damaged, refused: {failures[0][1]}. Resume from an earlier "
                              "checkpoint (resume_ckpt_path=RUN/step_NNNNNNNN) or restore the file")


def _first_damage(folder: str, names: List[str], checksums: Dict[str, str]) -> Optional[str]:
    """The first of ``names`` whose bytes differ from the recorded SHA-256 (or, without one, fail the zip CRC)."""
    for name in names:
        path = os.path.join(folder, name)
        if name in checksums:
            actual = file_sha256(path)
            if actual != checksums[name]:
                return (f"{name} does not match its SHA-256 in {MANIFEST_FILE} (now {actual[:16]}..., recorded "
                        f"{checksums[name][:16]}...)")
        elif name != MANIFEST_FILE:
            damage = zip_damage(path)
            if damage:
                return f"{name}: {damage}"
    return None


def prune_checkpoints(run_dir: str, keep_last: int) -> List[str]:
    """Delete all but the newest ``keep_last`` tags; never the one ``latest`` names."""
    latest = read_latest(run_dir)
    tags = list_tags(run_dir)
    removed = []
    for tag in tags[:-keep_last] if keep_last > 0 else tags:
        if tag != latest:
            shutil.rmtree(os.path.join(run_dir, tag), ignore_errors=True)
            removed.append(tag)
    return removed


# ------------------------------------------------------------------------------------------------ resume

def refuse_overwrite(run_dir: str, resumes: bool, overwrite: bool) -> None:
    """A run that starts from scratch must not silently replace the checkpoints of an earlier run."""
    tags = list_tags(run_dir)
    if tags and not resumes and not overwrite:
        raise CheckpointError(f"{run_dir} already holds checkpoints ({', '.join(tags[-2:])}) and "
                              "ckpt.auto_resume is false: starting from scratch would replace them. Pass "
                              "ckpt.overwrite=true to do so, ckpt.auto_resume=true to continue, or choose another "
                              "data.exp_name / ckpt.dir")


@dataclass
class ResumePoint:
    run_dir: str
    tag: str
    universal: bool = False  # converted to DeepSpeed's universal format for another world size


def written_folder(point: ResumePoint) -> str:
    """The folder the run wrote for ``point`` (a converted universal checkpoint holds DeepSpeed's files only)."""
    run_dir = os.path.dirname(point.run_dir) if point.universal else point.run_dir
    return os.path.join(run_dir, point.tag)


def find_resume_point(run_dir: str, resume_ckpt_path: Optional[str], auto_resume: bool) -> Optional[ResumePoint]:
    """An explicit ``resume_ckpt_path`` (a run folder or one of its tag folders) wins; else the run's latest.
    The checkpoint found must be complete (``check_complete``)."""
    point = _locate_resume_point(run_dir, resume_ckpt_path, auto_resume)
    if point is not None:
        check_complete(os.path.join(point.run_dir, point.tag))
    return point


def _locate_resume_point(run_dir: str, resume_ckpt_path: Optional[str], auto_resume: bool) -> Optional[ResumePoint]:
    if resume_ckpt_path:
        path = os.path.abspath(resume_ckpt_path)
        if os.path.isfile(os.path.join(path, LATEST_FILE)):
            return ResumePoint(path, read_latest(path))
        if TAG_PATTERN.match(os.path.basename(path)) and os.path.isdir(path):
            return ResumePoint(os.path.dirname(path), os.path.basename(path))
        raise CheckpointError(f"resume_ckpt_path={resume_ckpt_path}: neither a run folder with a '{LATEST_FILE}' "
                              f"file nor a checkpoint folder named like step_00000100")
    if auto_resume:
        tag = read_latest(run_dir)
        if tag is not None:
            return ResumePoint(run_dir, tag)
    return None


def saved_world_size(point: ResumePoint) -> int:
    folder = os.path.join(point.run_dir, point.tag)
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest["world_size"]
    return len([n for n in os.listdir(folder) if n.startswith("zvl_rank_") and n.endswith(".pt")])


UNIVERSAL_FOLDER = "universal"
CONVERSION_TIMEOUT_S = 3 * 3600


def needs_universal_conversion(point: ResumePoint, world_size: int, zero_stage: int) -> bool:
    """ZeRO-1/2 optimizer partitions written by another number of ranks must be re-split before loading."""
    return zero_stage in (1, 2) and saved_world_size(point) != world_size


def convert_to_universal(point: ResumePoint) -> ResumePoint:
    """Convert a checkpoint (once, on rank 0) with DeepSpeed's ds_to_universal, which re-splits the optimizer
    state for any world size; the engine that loads it must be built with ``"checkpoint": {"load_universal": true}``.
    """
    root = os.path.join(point.run_dir, UNIVERSAL_FOLDER)
    target = os.path.join(root, point.tag)
    failure = [None]
    if dist.is_main_process() and not os.path.isdir(target):
        failure[0] = _run_universal_conversion(os.path.join(point.run_dir, point.tag), target)
    if dist.is_distributed():  # every rank learns the outcome, so none waits for a conversion that failed
        import torch.distributed

        torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise CheckpointError(f"converting {point.tag} for another world size failed:\n{failure[0]}")
    if not os.path.isdir(target):
        raise CheckpointError(f"{target} is missing after the conversion on rank 0 (is the run folder shared?)")
    return ResumePoint(root, point.tag, universal=True)


def _run_universal_conversion(source: str, target: str) -> Optional[str]:
    """ds_to_universal into ``target``; returns an error text, or None on success."""
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    LOG.info(f"converting {os.path.basename(source)} to DeepSpeed's universal checkpoint format for a new "
             "world size")
    # plain DeepSpeed (not Megatron) checkpoints lack Megatron's layout metadata: --inject_missing_state
    try:
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
                               "--output_folder", partial, "--inject_missing_state"], capture_output=True, text=True,
                              timeout=CONVERSION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"ds_to_universal did not finish within {CONVERSION_TIMEOUT_S} s"
    if done.returncode != 0:
        return done.stderr[-2000:]
    os.replace(partial, target)
    return None


def read_json_file(point: ResumePoint, name: str) -> Optional[Dict[str, Any]]:
    """A JSON file of the checkpoint folder the run wrote (``save_checkpoint``'s ``json_files``); None without it."""
    path = os.path.join(written_folder(point), name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def load_checkpoint(engine, point: ResumePoint, zero_stage: int, trainable_only: bool = False
                    ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Restore the engine; return the shared client state and this rank's state. ``trainable_only``: the
    checkpoint holds the trainable parameters only (``save_checkpoint``), the frozen ones keep the model's values.

    The rank state (data position) is only meaningful at the world size that wrote it; with another world size
    it is None and the caller restarts the data stream. ZeRO-0 keeps its optimizer state in one file and ZeRO-1/2
    checkpoints are re-split through the universal format (``convert_to_universal``), so both resume fully;
    ZeRO-3 partitions are not converted, so then only the weights are loaded.
    """
    if point.universal:
        path, client_state = engine.load_checkpoint(point.run_dir, point.tag, load_module_strict=not trainable_only)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the converted checkpoint {point.tag} from {point.run_dir}")
        if dist.is_main_process():
            LOG.info(f"checkpoint {point.tag} was written by another number of ranks: weights and optimizer "
                     "state re-split for this world size; the data stream starts over from its beginning")
        return client_state or {}, None
    world_size = dist.get_world_size()
    before = saved_world_size(point)
    same_world = before == world_size
    if not same_world and zero_stage > 0:
        if dist.is_main_process():
            LOG.warning(f"checkpoint {point.tag} was written by {before} ranks, now {world_size}: ZeRO-{zero_stage} "
                        "optimizer partitions are not re-split, so only the weights are loaded (the optimizer state "
                        "restarts)")
        path, client_state = engine.load_checkpoint(point.run_dir, point.tag, load_optimizer_states=False,
                                                    load_lr_scheduler_states=False, load_module_only=True,
                                                    load_module_strict=not trainable_only)
    else:
        path, client_state = engine.load_checkpoint(point.run_dir, point.tag, load_module_strict=not trainable_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {point.tag} from {point.run_dir}")
    rank_state = None
    if same_world:
        path = os.path.join(point.run_dir, point.tag, rank_file(dist.get_rank()))
        rank_state = torch.load(path, map_location="cpu", weights_only=True)
    elif dist.is_main_process():
        LOG.warning(f"checkpoint {point.tag} was written by {before} ranks, now {world_size}: the data stream "
                    "starts over from its beginning instead of the exact sample position")
    return client_state or {}, rank_state
