"""Files that appear complete or not at all: write under a temporary name, flush to disk, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, temp_suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path to write; once the block succeeds it is synced to disk and renamed to ``path``.

    A process killed mid-write leaves only ``path + temp_suffix``, never a truncated file under the final name;
    an error inside the block removes the temporary file and re-raises.
    """
    temp = path + temp_suffix
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        # a failed write (full disk, an exception in the block) leaves neither a half file nor a stray temp
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise


def write_text_atomic(path: str, text: str, temp_suffix: str = ".tmp") -> None:
    with atomic_path(path, temp_suffix) as temp, open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_folder(path: str, temp_suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary folder to fill; once the block succeeds it replaces ``path`` (a folder) as a whole.

    Readers see the old folder or the new one, never a half-written mix; an error removes the temporary folder.
    """
    temp = path + temp_suffix
    shutil.rmtree(temp, ignore_errors=True)  # left by an earlier, killed attempt
    os.makedirs(temp)
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old = path + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(temp, path)
    shutil.rmtree(old, ignore_errors=True)
