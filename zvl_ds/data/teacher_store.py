"""A teacher's embeddings stored beside the shards ("reinforced" shards, ``distill.source: stored``): the file format,
the checks a run makes before it trusts them, and the look-up the training loader does per sample.

Each shard ``<name>.tar`` gets ``<name>.teacher.safetensors`` next to it (``python -m zvl_ds.reinforce_shards``
writes it; ``writing/teacher_embeddings.py``). Safetensors holds plain tensors and a string header, so reading it
never runs code. Its tensors, fp16, in the tar's sample order:

- ``image`` [n, d]: each sample's image embedding, of the teacher's EVALUATION view (its validation transforms: a
  resize and centre crop, not the training loader's random crop);
- ``text`` [m, d]: one embedding per caption, the samples' captions one after another (the loaders' caption list:
  ``decode._captions``), each prepared as the teacher's evaluation prepares captions;
- ``caption_offsets`` [n + 1] (int64): sample i's captions are rows ``caption_offsets[i]:caption_offsets[i + 1]``
  of ``text``; a sample the teacher could not read has none (its reason is in the header).

The header (``metadata``) records the teacher's identity (name, kind, weights file and its SHA-256), its own logit
scale and bias, the width, the shard's file name and size in bytes, and the samples' keys. Embeddings are
L2-normalised in float32 before the cast to fp16. A file appears complete or not at all (written under a temporary
name, then renamed).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zvl_ds.base.atomic_write import atomic_path
from zvl_ds.base.errors import UserError
from zvl_ds.data.failures import SampleSkipped
from zvl_ds.data.sources import SHARD_SUFFIXES, ResolvedDataset, is_url

FORMAT = "zvl_ds.teacher_embeddings.v1"
FILE_SUFFIX = ".teacher.safetensors"
TEMP_SUFFIX = ".tmp"
IDENTITY_KEYS = ("teacher", "kind", "weights", "sha256")
MISSING_TEACHER_EMBEDDING = "missing_teacher_embedding"  # a skip reason: the teacher could not read the sample


class StoredTeacherError(UserError):
    """Stored teacher embeddings that a run cannot use: missing, of another teacher, or of another shard."""


def refuse_parquet(datasets: Sequence[ResolvedDataset]) -> None:
    """Stored embeddings live beside tar shards; a Parquet dataset (read in place) has none to sit beside."""
    parquet = [dataset.name for dataset in datasets if dataset.parquet is not None]
    if parquet:
        raise StoredTeacherError(f"distill.source=stored reads the teacher's embeddings stored beside tar shards; "
                                 f"dataset {parquet[0]} is Parquet, read in place. Write it to shards first "
                                 "(python -m zvl_ds.make_shards --parquet ...) and reinforce those, or use "
                                 "distill.source=online")


def embeddings_path(shard: str) -> str:
    """The file of ``shard``'s embeddings, beside it: ``train-000000.tar`` -> ``train-000000.teacher.safetensors``."""
    for suffix in SHARD_SUFFIXES:
        if shard.endswith(suffix):
            return shard[:-len(suffix)] + FILE_SUFFIX
    return shard + FILE_SUFFIX


@dataclass(frozen=True)
class EmbeddingsHeader:
    """What a stored file says about itself (its header only: reading it touches no tensor)."""

    path: str
    identity: Dict[str, str]
    scale: float  # the teacher's own logit scale
    bias: Optional[float]  # its own logit bias; None for a softmax (CLIP) teacher
    width: int
    shard: str  # the shard's file name
    shard_bytes: int
    keys: Tuple[str, ...]
    missing: Dict[str, str]  # key -> why the teacher could not read that sample

    @property
    def samples(self) -> int:
        return len(self.keys)


def _metadata(identity: Dict[str, str], scale: float, bias: Optional[float], width: int, shard: str,
              keys: Sequence[str], missing: Dict[str, str]) -> Dict[str, str]:
    return {"format": FORMAT, "identity": json.dumps({key: identity[key] for key in IDENTITY_KEYS}),
            "scale": repr(float(scale)), "bias": "" if bias is None else repr(float(bias)), "width": str(width),
            "shard": os.path.basename(shard), "shard_bytes": str(os.path.getsize(shard)),
            "keys": json.dumps(list(keys)), "missing": json.dumps(missing)}


def write_embeddings(shard: str, image: torch.Tensor, text: torch.Tensor, caption_counts: Sequence[int],
                     keys: Sequence[str], missing: Dict[str, str], identity: Dict[str, str], scale: float,
                     bias: Optional[float]) -> str:
    """Write the embeddings of ``shard`` beside it, atomically; returns the file's path. ``image`` [n, d] and
    ``text`` [sum(caption_counts), d] are cast to fp16; ``missing`` names the samples without embeddings."""
    if image.shape[0] != len(keys) or len(caption_counts) != len(keys) or text.shape[0] != sum(caption_counts):
        raise ValueError(f"{shard}: {image.shape[0]} image rows, {len(caption_counts)} caption counts and "
                         f"{len(keys)} keys; {text.shape[0]} text rows for {sum(caption_counts)} captions")
    offsets = torch.zeros(len(keys) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(list(caption_counts), dtype=torch.int64), 0)
    tensors = {"image": image.detach().to("cpu", torch.float16).contiguous(),
               "text": text.detach().to("cpu", torch.float16).contiguous(), "caption_offsets": offsets}
    path = embeddings_path(shard)
    metadata = _metadata(identity, scale, bias, image.shape[1], shard, keys, missing)
    with atomic_path(path, TEMP_SUFFIX) as temp:
        save_file(tensors, temp, metadata=metadata)
        os.chmod(temp, 0o644)  # readable as the shards are (safetensors creates its files private)
    return path


def read_header(path: str) -> EmbeddingsHeader:
    """The header of a stored file; a file that is not one (or is damaged) is a ``StoredTeacherError``."""
    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        identity = json.loads(meta["identity"])
        return EmbeddingsHeader(path=path, identity={key: str(identity[key]) for key in IDENTITY_KEYS},
                                scale=float(meta["scale"]), bias=float(meta["bias"]) if meta["bias"] else None,
                                width=int(meta["width"]), shard=meta["shard"], shard_bytes=int(meta["shard_bytes"]),
                                keys=tuple(json.loads(meta["keys"])), missing=dict(json.loads(meta["missing"])))
    except Exception as error:  # noqa: BLE001  (safetensors' own errors derive from Exception only)
        raise StoredTeacherError(f"{path}: not a readable teacher embeddings file ({type(error).__name__}: "
                                 f"{error}); write it again: python -m zvl_ds.reinforce_shards ... --overwrite"
                                 ) from None


def same_teacher(identity: Dict[str, str], other: Dict[str, str]) -> bool:
    """One teacher: the same weights (by SHA-256; the folder may have moved)."""
    return identity.get("sha256") == other.get("sha256")


def header_problem(shard: str, identity: Dict[str, str], size: Optional[int] = None) -> Optional[str]:
    """Why the stored embeddings of ``shard`` cannot be used with the teacher ``identity`` (None: they can). ``size``:
    the shard's sample count when known (``sizes.json``)."""
    path = embeddings_path(shard)
    if not os.path.isfile(path):
        return "missing"
    try:
        header = read_header(path)
    except StoredTeacherError as error:
        return f"unreadable: {error}"
    if not same_teacher(header.identity, identity):
        return (f"another teacher: {header.identity['teacher']!r} (sha256 {header.identity['sha256'][:12]}), not "
                f"{identity['teacher']!r} (sha256 {identity['sha256'][:12]})")
    try:
        shard_bytes = os.path.getsize(shard)
    except OSError as error:
        return f"the shard cannot be read: {error}"
    if shard_bytes != header.shard_bytes:
        return f"written for another version of the shard ({header.shard_bytes} bytes, the shard has {shard_bytes})"
    if size is not None and size != header.samples:
        return f"embeddings of {header.samples} samples, the shard holds {size}"
    return None


@dataclass(frozen=True)
class ShardToCheck:
    dataset: str
    path: str
    size: Optional[int]  # samples, when known


def check_stored(shards: Sequence[ShardToCheck], identity: Dict[str, str], fix: str) -> List[EmbeddingsHeader]:
    """Every shard's stored embeddings, of the teacher ``identity`` and complete; else a ``StoredTeacherError``
    listing the shards and why (the first few of each dataset), ending with ``fix`` (the command that writes them).
    Returns the headers."""
    remote = [shard.path for shard in shards if is_url(shard.path)]
    if remote:
        raise StoredTeacherError(f"distill.source=stored reads the teacher's embeddings beside local shards; "
                                 f"{remote[0]} is a URL or pipe ({len(remote)} such shards). Copy the shards to a "
                                 "local folder, or use distill.source=online")
    problems: Dict[str, List[str]] = {}
    for shard in shards:
        problem = header_problem(shard.path, identity, shard.size)
        if problem is not None:
            problems.setdefault(shard.dataset, []).append(f"{shard.path}: {problem}")
    if problems:
        lines = []
        for dataset, found in problems.items():
            shown = "\n    ".join(found[:5]) + (f"\n    ... and {len(found) - 5} more" if len(found) > 5 else "")
            lines.append(f"dataset {dataset!r}: {len(found)} shard(s) without usable stored embeddings of this "
                         f"teacher:\n    {shown}")
        raise StoredTeacherError("distill.source=stored: " + "\n".join(lines) + f"\nWrite them with: {fix}")
    return [read_header(embeddings_path(shard.path)) for shard in shards]


@dataclass
class ShardEmbeddings:
    """One shard's stored embeddings, loaded whole (float16)."""

    image: torch.Tensor
    text: torch.Tensor
    offsets: torch.Tensor
    header: EmbeddingsHeader

    @classmethod
    def load(cls, shard: str) -> "ShardEmbeddings":
        path = embeddings_path(shard)
        header = read_header(path)
        tensors = load_file(path)
        return cls(tensors["image"], tensors["text"], tensors["caption_offsets"], header)

    def captions(self, position: int) -> torch.Tensor:
        """The text embeddings of sample ``position``'s captions, [c, d]."""
        return self.text[int(self.offsets[position]):int(self.offsets[position + 1])]


class StoredEmbeddingsReader:
    """The training loader's look-up, per worker: a sample's image embedding and the embedding of the caption the
    loader picked for it. Keeps the last few shards' embeddings in memory."""

    def __init__(self, max_open: int = 4):
        self.max_open = max_open
        self._shards: "OrderedDict[str, ShardEmbeddings]" = OrderedDict()

    def _shard(self, path: str) -> ShardEmbeddings:
        loaded = self._shards.get(path)
        if loaded is None:
            loaded = self._shards[path] = ShardEmbeddings.load(path)
            if len(self._shards) > self.max_open:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(path)
        return loaded

    def lookup(self, shard: str, position: int, key: str, caption: int, captions: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image embedding [d], caption embedding [d]) of sample ``position`` (key ``key``) of ``shard``, whose
        caption number ``caption`` of ``captions`` the loader picked."""
        stored = self._shard(shard)
        keys = stored.header.keys
        if position >= len(keys) or keys[position] != key:
            found = keys[position] if position < len(keys) else "nothing"
            raise StoredTeacherError(f"{stored.header.path}: sample {position} of {shard} is {key!r}, the stored "
                                     f"embeddings have {found!r} there: the shard changed after its embeddings were "
                                     "written; write them again (python -m zvl_ds.reinforce_shards ... --resume)")
        texts = stored.captions(position)
        if key in stored.header.missing:
            raise SampleSkipped(MISSING_TEACHER_EMBEDDING, f"{shard} sample {key!r}: the teacher could not read it "
                                                           f"({stored.header.missing[key]})")
        if texts.shape[0] != captions:
            raise StoredTeacherError(f"{stored.header.path}: sample {key!r} has {texts.shape[0]} stored caption "
                                     f"embeddings, the loader reads {captions} captions")
        return stored.image[position], texts[caption]

    def close(self) -> None:
        self._shards.clear()
