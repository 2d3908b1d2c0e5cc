"""One job per run folder: an exclusive OS file lock, held by rank 0 for the whole run.

Two jobs started on the same folder (a requeued job whose first copy still runs, a submission sent twice) would
resume each other's checkpoints, move ``latest`` backwards and delete each other's step folders. Rank 0 therefore
takes an exclusive ``flock`` on ``RUN/run.lock`` before anything is written and keeps it until the process ends.
The kernel drops the lock when the process ends in any way (SIGKILL included), so a killed job never leaves a
stale lock behind. The file records the holder (host, pid, start time) so that a refused job can name it.

On a file system without ``flock`` support (Lustre mounted without ``-o flock``) the lock cannot be taken; the
run then goes on with a warning, without the guarantee.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import List, Optional, Tuple

from zvl_ds.base.errors import UserError

LOG = logging.getLogger(__name__)

LOCK_FILE = "run.lock"

# locks this process holds, as (file descriptor, (device, inode) of the lock file): a forked child (a DataLoader
# worker) closes its copies, so that the lock goes away with this process and not with the last of its children.
# The file's identity is kept because a descriptor number closed elsewhere is reused (for a pipe, say), and a
# child must never close what is no longer the lock.
_HELD: List[Tuple[int, Tuple[int, int]]] = []


class RunFolderBusy(UserError):
    """Another job holds the run folder's lock."""


def _holder_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.loads(handle.read() or "{}")
        return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                f"{holder.get('started', '?')}")
    except (OSError, ValueError, AttributeError):
        return "holder unknown"


def acquire_run_lock(run_dir: str) -> Optional[int]:
    """Lock ``run_dir`` for this process (creating the folder if needed); return the lock's file descriptor.

    Raises RunFolderBusy naming the folder and the holder when another job has it. Returns None (after a
    warning) when the file system does not support ``flock``.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderBusy(f"{run_dir} is in use by another job ({_holder_text(path)}): one job per run "
                                "folder. Wait for it to end, stop it, or choose another data.exp_name / "
                                "ckpt.dir") from None
        if error.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            LOG.warning(f"cannot lock {path} ({error.strerror}): this file system has no flock, so nothing stops "
                        "a second job from using the same run folder")
            return None
        raise
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    status = os.fstat(fd)
    _HELD.append((fd, (status.st_dev, status.st_ino)))
    return fd


def release_run_lock(fd: int) -> None:
    """Give up a lock ``acquire_run_lock`` returned (close its descriptor and forget it)."""
    _HELD[:] = [(held, identity) for held, identity in _HELD if held != fd]
    os.close(fd)


def _same_file(fd: int, identity: Tuple[int, int]) -> bool:
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == identity


def close_inherited_locks() -> None:
    """In a forked child (a loader worker): close the inherited lock descriptors, so the lock is released as soon
    as the process that took it ends, even if a child outlives it for a moment."""
    while _HELD:
        fd, identity = _HELD.pop()
        if _same_file(fd, identity):
            os.close(fd)
