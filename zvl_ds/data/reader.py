"""Raw samples out of tar shards; what cannot be read is counted in a ``FailureCounter``.

A sample is a run of consecutive tar members sharing a key (``dir/KEY.ext``: the key is the path up to the first
dot of the file name, as webdataset groups them). Its *position* is its index among the samples of the tar; the
sampler addresses samples by (shard, position), so a segment ``[start, stop)`` can be read without touching the
samples before it.

Plain local ``.tar`` files are read by seeking from header to header: a skipped sample costs one header read and
no data, and the members kept are remembered as (offset, size) until the sample is actually needed, so resuming
deep inside a shard or keeping a large shuffle buffer costs almost nothing. Other shards (URLs, ``pipe:``,
compressed tars) are streamed through webdataset's ``gopen`` and their member bytes kept in memory.

Only image, text and JSON members are ever kept; every other member (``.pyd``, ``.pth``, ``.npy`` ...) is passed
over unread, so nothing from a shard is ever unpickled.
"""
from __future__ import annotations

import logging
import os
import tarfile
from collections import OrderedDict
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import webdataset as wds

from zvl_ds.data.failures import SHORT_SHARD, TRUNCATED_SHARD, UNREADABLE_SHARD, FailureCounter
from zvl_ds.data.sources import is_seekable_local_tar

LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KEPT_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))

_BLOCK = tarfile.BLOCKSIZE
FieldData = Union[bytes, Tuple[int, int]]  # the bytes, or (offset, size) inside the local tar


class RawSample:
    """One sample's kept members, not yet decoded."""

    __slots__ = ("key", "path", "shard", "position", "fields", "dataset", "pass_index")

    def __init__(self, key: str, path: str, shard: int, position: int, fields: Dict[str, FieldData]):
        self.key, self.path, self.shard, self.position, self.fields = key, path, shard, position, fields
        self.dataset = 0
        self.pass_index = 0


def split_member_name(name: str) -> Tuple[str, str]:
    """``dir/KEY.a.b`` -> (``dir/KEY``, ``a.b``), extension lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


class _Truncated(Exception):
    pass


def read_segment(path: str, shard: int, start: int, stop: int, faults: FailureCounter) -> Iterator[RawSample]:
    """Samples at positions ``[start, stop)`` of one shard; what cannot be read is counted in ``faults``."""
    if stop <= start:
        return
    reader = _read_local if is_seekable_local_tar(path) else _read_stream
    delivered = 0
    outcome = ""
    try:
        for sample in reader(path, shard, start, stop):
            delivered += 1
            yield sample
    except _Truncated as error:
        outcome = f"{path}: truncated ({error})"
    except (OSError, ValueError, EOFError, tarfile.TarError) as error:  # could not even be opened
        faults.add(UNREADABLE_SHARD, f"{path}: {type(error).__name__}: {error}", stop - start - delivered)
        return
    missing = stop - start - delivered
    if outcome:
        faults.add(TRUNCATED_SHARD, outcome, missing)
    elif missing:
        faults.add(SHORT_SHARD, f"{path}: {missing} of samples {start}..{stop - 1} absent (shard size "
                                f"entry too large?)", missing)


def _group(members: Iterator[Tuple[tarfile.TarInfo, Optional[Callable[[], FieldData]]]], path: str, shard: int,
           start: int, stop: int) -> Iterator[RawSample]:
    """Group consecutive members by key; keep only the kept extensions of positions in ``[start, stop)``.
    A member given without a reader is one whose data the file does not hold in full."""
    position = -1
    key: Optional[str] = None
    fields: Dict[str, FieldData] = {}
    for info, read in members:
        member_key, ext = split_member_name(info.name)
        if read is None:  # this member is cut short: the sample before it is complete, its own is lost
            if member_key != key and key is not None and start <= position < stop:
                yield RawSample(key, path, shard, position, fields)
            raise _Truncated(f"member {info.name} runs past the end of the file")
        if member_key != key:
            if key is not None and position >= start:
                yield RawSample(key, path, shard, position, fields)
            key, position, fields = member_key, position + 1, {}
            if position >= stop:
                return
        if position >= start and ext in KEPT_EXTENSIONS and ext not in fields:
            fields[ext] = read()
    if key is not None and start <= position < stop:
        yield RawSample(key, path, shard, position, fields)


def _read_local(path: str, shard: int, start: int, stop: int) -> Iterator[RawSample]:
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        archive = tarfile.open(fileobj=handle, mode="r:")

        def members() -> Iterator[Tuple[tarfile.TarInfo, Optional[Callable[[], FieldData]]]]:
            while True:
                try:
                    info = archive.next()
                except tarfile.ReadError as error:  # data cut short: tarfile notices when it seeks past it
                    raise _Truncated(str(error)) from None
                if info is None:
                    if not _ends_with_zero_block(handle, archive.offset, file_size):
                        raise _Truncated(f"no end-of-archive block after byte {archive.offset}")
                    return
                archive.members.clear()  # tarfile remembers every header; a stream does not need them
                if not info.isfile():
                    continue
                if info.offset_data + info.size > file_size:
                    yield info, None
                    return
                location = (info.offset_data, info.size)
                yield info, (lambda loc=location: loc)

        yield from _group(members(), path, shard, start, stop)


def _ends_with_zero_block(handle, offset: int, file_size: int) -> bool:
    if offset + _BLOCK > file_size:
        return False
    handle.seek(offset)
    return handle.read(_BLOCK) == bytes(_BLOCK)


def _read_stream(path: str, shard: int, start: int, stop: int) -> Iterator[RawSample]:
    stream = wds.gopen(path, "rb")
    finished = False
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")

        def members() -> Iterator[Tuple[tarfile.TarInfo, Callable[[], FieldData]]]:
            for info in archive:
                if info.isfile():
                    yield info, (lambda member=info: archive.extractfile(member).read())

        try:
            yield from _group(members(), path, shard, start, stop)
        except (OSError, ValueError, EOFError, tarfile.TarError) as error:
            raise _Truncated(f"{type(error).__name__}: {error}") from None
        finished = True
    finally:
        try:
            stream.close()
        except Exception as error:  # a pipe closed early exits non-zero; only a failure matters
            if finished:
                LOG.debug("closing %s: %s", path, error)


class FieldLoader:
    """Reads the (offset, size) members of local tars, keeping a few files open."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._files: "OrderedDict[str, object]" = OrderedDict()

    def load(self, sample: RawSample) -> Dict[str, bytes]:
        out: Dict[str, bytes] = {}
        for ext, value in sample.fields.items():
            if isinstance(value, bytes):
                out[ext] = value
                continue
            offset, size = value
            handle = self._open(sample.path)
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise _Truncated(f"{sample.path}: member {sample.key}.{ext} is cut short")
            out[ext] = data
        return out

    def _open(self, path: str):
        handle = self._files.get(path)
        if handle is None:
            handle = open(path, "rb")
            self._files[path] = handle
            if len(self._files) > self.max_open:
                _, oldest = self._files.popitem(last=False)
                oldest.close()
        else:
            self._files.move_to_end(path)
        return handle

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def is_truncation(error: BaseException) -> bool:
    return isinstance(error, _Truncated)
