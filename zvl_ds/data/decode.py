"""Turning raw samples into decoded ones, in the DataLoader workers of both loaders.

A sample that cannot be used raises ``SampleSkipped`` with one of ``failures.py``'s reasons; the streams count it
and take the next sample. ``_data_loader`` is the DataLoader both streams run in, ``_private_torch_rng`` keeps the
per-sample seeding of AutoAugment out of the caller's torch generator.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

import zvl_ds.data.failures as failures
import zvl_ds.data.reader as reader
from zvl_ds.data.failures import SampleSkipped
from zvl_ds.data.reader import FieldLoader, RawSample
from zvl_ds.data.transforms import ImageTransform, TooManyPixels, to_uint8_chw
from zvl_ds.runtime.preemption import ignore_preemption_signals
from zvl_ds.runtime.run_lock import close_inherited_locks


def _load_fields(loader: FieldLoader, raw: RawSample) -> Dict[str, bytes]:
    try:
        return loader.load(raw)
    except OSError as error:
        raise SampleSkipped(failures.UNREADABLE_SHARD, f"{raw.path}: {error}") from None
    except Exception as error:
        if reader.is_truncation(error):
            raise SampleSkipped(failures.TRUNCATED_SHARD, str(error)) from None
        raise


def _image_bytes(fields: Dict[str, bytes], where: str) -> bytes:
    for ext in reader.IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    raise SampleSkipped(failures.MISSING_IMAGE, f"{where}: no {'/'.join(reader.IMAGE_EXTENSIONS)} member")


def _json_meta(fields: Dict[str, bytes], where: str) -> Optional[dict]:
    if "json" not in fields:
        return None
    try:
        meta = json.loads(fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise SampleSkipped(failures.BAD_JSON, f"{where}: {error}") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise SampleSkipped(failures.BAD_JSON, f"{where}: json nested too deeply") from None
    if not isinstance(meta, dict):
        raise SampleSkipped(failures.BAD_JSON, f"{where}: json is a {type(meta).__name__}, not an object")
    return meta


def _captions(meta: Optional[dict], fields: Dict[str, bytes], where: str) -> List[str]:
    """The json ``captions`` (or img2dataset's single ``caption``), else the ``.txt``; empty ones dropped."""
    captions: List[str] = []
    if meta is not None:
        value = meta.get("captions")
        if value is not None and not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
            raise SampleSkipped(failures.BAD_JSON, f"{where}: json 'captions' is not a list of strings")
        captions = [c for c in (value or []) if c.strip()]
        if not captions and isinstance(meta.get("caption"), str) and meta["caption"].strip():
            captions = [meta["caption"]]
    if not captions and "txt" in fields:
        try:
            text = fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if text:
            captions = [text]
    if not captions:
        raise SampleSkipped(failures.MISSING_CAPTION, f"{where}: no caption in .json or .txt")
    return captions


def _decode_image(transform: ImageTransform, data: bytes, rng: random.Random, where: str) -> torch.Tensor:
    try:
        return to_uint8_chw(transform(data, rng))
    except TooManyPixels as error:
        raise SampleSkipped(failures.TOO_MANY_PIXELS, f"{where}: {error}") from None
    except Exception as error:  # Pillow raises many types on bad bytes; every one means "skip this sample"
        raise SampleSkipped(failures.CORRUPT_IMAGE, f"{where}: {type(error).__name__}: {error}") from None


def _is_int64(value: object) -> bool:
    """Ids become int64 tensors: larger ones (or bools, floats) cannot be collated."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def _describe(raw: RawSample) -> str:
    return f"{raw.path} sample {raw.key!r}"



@contextlib.contextmanager
def _private_torch_rng(enabled: bool):
    """AutoAugment seeds torch's global generator per sample; keep that from leaking into the caller's process."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        yield


def _keep(item):
    return item


def _init_worker(worker_id: int) -> None:
    """A forked worker outlives no preemption signal of its rank and holds no copy of the run folder's lock."""
    ignore_preemption_signals()
    close_inherited_locks()


def end_workers(iterator) -> None:
    """Stop a DataLoader iterator's workers. They ignore the preemption signals (``_init_worker``), SIGTERM among
    them, so the SIGTERM of DataLoader's own shutdown cannot end a worker stuck in a read (a hung filesystem, a pipe
    with no writer); whatever is still alive after the shutdown is killed, so that closing never waits forever."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", None) or []:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _data_loader(dataset: IterableDataset, num_workers: int, timeout: float) -> DataLoader:
    if num_workers > 0:
        # Workers are forked after the tokenizer has been used here; its thread pool must not be inherited.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A private generator: the DataLoader otherwise draws its workers' base seed from the caller's global torch
    # generator (the workers seed everything themselves), which would shift the trainer's random stream.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_keep,
                      pin_memory=torch.cuda.is_available(), timeout=timeout if num_workers > 0 else 0,
                      prefetch_factor=2 if num_workers > 0 else None, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_init_worker if num_workers > 0 else None)
