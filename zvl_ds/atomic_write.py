"""Files that appear complete or not at all: write under a temporary name, flush to disk, then rename."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, temp_suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path to write; once the block succeeds it is synced to disk and renamed to ``path``.

    A process killed mid-write leaves only ``path + temp_suffix``, never a truncated file under the final name.
    """
    temp = path + temp_suffix
    yield temp
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


def write_text_atomic(path: str, text: str, temp_suffix: str = ".tmp") -> None:
    with atomic_path(path, temp_suffix) as temp, open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
