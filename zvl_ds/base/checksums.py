"""Streaming file checksums: a file of any size is hashed in fixed blocks, never read whole into memory."""
from __future__ import annotations

import hashlib
import zipfile
from typing import Optional

BLOCK_BYTES = 1 << 22


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes (``sha256sum`` prints the same)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def zip_damage(path: str) -> Optional[str]:
    """For a zip file (what ``torch.save`` writes): the first member whose bytes fail the zip's own CRC-32, or a
    description of the damage; None when it is intact or not a zip file at all."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return f"member {bad} fails its CRC-32" if bad is not None else None
