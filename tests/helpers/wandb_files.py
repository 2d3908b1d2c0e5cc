"""Reading an offline W&B run back from its files, without W&B's servers or its own code paths under test.

An offline run is a folder ``WANDB_DIR/wandb/offline-run-<time>-<id>/`` whose ``run-<id>.wandb`` file holds every
record the run sent: a 7-byte header (``:W&B``, magic 0xBEE1, version), then LevelDB's log format (32 KiB blocks
of records, each ``crc32 | length | type`` + payload, FULL/FIRST/MIDDLE/LAST pieces), each payload a serialized
``wandb_internal_pb2.Record`` protobuf. The format is W&B's transaction log, which ``wandb sync`` uploads.
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
import time
import zlib
from typing import Any, Dict, Iterator, List

HEADER = b":W&B"
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_payloads(path: str) -> Iterator[bytes]:
    """The payload of every record of a ``.wandb`` file, checksums verified."""
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == HEADER, f"{path}: not a W&B transaction log (header {data[:7]!r})"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:  # zero padding: the end of what was written
            break
        if position + 7 + length > len(data):  # a record still being written
            break
        payload = data[position + 7:position + 7 + length]
        assert zlib.crc32(bytes([kind]) + payload) == checksum, f"{path}: bad checksum at byte {position}"
        position += 7 + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pieces = payload
        elif kind == MIDDLE:
            pieces += payload
        elif kind == LAST:
            yield pieces + payload


def records(path: str, timeout: float = 60.0) -> List[Any]:
    """Every record of a finished run's log. W&B's service writes the log on its own after ``run.finish()``
    returns (in a process that goes on, the file may hold only its header for a moment), so this waits, within
    ``timeout`` seconds, for the run's last record: its exit record."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        parsed = []
        if os.path.getsize(path) >= len(HEADER):
            for payload in record_payloads(path):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                parsed.append(record)
        if any(record.WhichOneof("record_type") == "exit" for record in parsed):
            return parsed
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s: the run did not finish"
        time.sleep(0.2)


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_runs(wandb_dir: str, run_id: str) -> List[str]:
    """The offline run folders of ``run_id`` under ``wandb_dir``, oldest first: ``offline-run-<time>-<id>``, and
    ``offline-run-<time>-<id>-<n>`` for the n-th other one started within the same second."""
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for folder in glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")):
        match = name.fullmatch(os.path.basename(folder))
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), folder))
    return [folder for _, folder in sorted(found)]


def history(folder: str) -> List[Dict[str, Any]]:
    """The history rows of one offline run folder, in order: ``{key: value}`` with ``_step`` among the keys. A
    value W&B split into nested keys (an image: ``[key, "path"]``, ``[key, "width"]``, ...) comes back as a dict."""
    (log_file,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    rows = []
    for record in records(log_file):
        if record.WhichOneof("record_type") != "history":
            continue
        row: Dict[str, Any] = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def config(folder: str) -> Dict[str, Any]:
    """The run config the offline run recorded, ``{top-level key: value}`` (W&B's own ``_wandb`` entry left out)."""
    (log_file,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    values: Dict[str, Any] = {}
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            values[item_key(item)] = json.loads(item.value_json)
    values.pop("_wandb", None)
    return values
