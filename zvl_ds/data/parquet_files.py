"""Where a Parquet dataset's rows are: its files, their row groups and sizes (from the files' metadata), its columns.

``data.datasets.<name>.parquet`` names the files: a file, a glob (a Hugging Face dataset snapshot's
``data/train-*.parquet``) or a folder (its ``*.parquet``), several joined by ``::``. Relative paths are looked up
under ``data.data_path`` first, then the working folder; only local files are read. Every row group is one *unit*
of the sampling plan, as a tar shard is, and its row count (from the footer, no sizes file) is the unit's size.

Columns: the image column holds bytes, as a binary column (img2dataset's ``jpg``) or a struct with a binary
``bytes`` field (the Hugging Face ``Image`` feature); the caption column holds a string or a list of strings (several
captions of one image). Every file must have both, with those types; a file whose footer cannot be read, or that
lacks them, is a user error at start (its row count would be unknown), naming the file.

pyarrow is the optional extra ``parquet``; without it a Parquet source is a user error (exit 2) that names it.
No code from data: pyarrow before 14.0.1 unpickled a Python extension type named in a file's metadata
(CVE-2023-47248), so older versions are refused; Parquet's own extension types are read as their plain storage
(``arrow_extensions_enabled=False``), and a column whose type is an extension type is refused, so no cell is ever
turned into a Python object by anything but the plain binary and string conversions.
"""
from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from braceexpand import braceexpand

from zvl_ds.base.errors import UserError

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")  # the first one a file has, when none is named
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences")
IMAGE_BYTES_FIELD = "bytes"  # the Hugging Face Image struct: {bytes: binary, path: string}
IMAGE_PATH_FIELD = "path"
INSTALL_HINT = ("pip install -c constraints.txt -e \".[parquet]\" (the optional extra `parquet`; bash "
                "tools/install.sh --test installs it too)")
SAFE_PYARROW = (14, 0, 1)  # earlier versions unpickle Python extension types named in a file (CVE-2023-47248)
# Bounds of what one file may make the reader allocate before any row is read: the footer's Thrift strings and
# containers (Arrow's own defaults are 100 MB and 1M) and the schema's nesting.
THRIFT_STRING_LIMIT = 64 << 20
THRIFT_CONTAINER_LIMIT = 1 << 20
SCHEMA_DEPTH_LIMIT = 16
READ_BUFFER_BYTES = 1 << 20  # column chunks are read through a buffer of this size, not whole


class ParquetSourceError(UserError, ValueError):
    """A Parquet source that cannot be used: pyarrow missing, no files, an unreadable footer, a missing column."""


@dataclass(frozen=True)
class ParquetLayout:
    """How a Parquet dataset's units map onto its files: ``ResolvedDataset.shards[i]`` is the file of unit ``i`` and
    ``row_groups[i]`` its row group there."""

    row_groups: Tuple[int, ...]
    image_column: str
    caption_column: str


def import_parquet():
    """``pyarrow.parquet``, or a user error naming the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise ParquetSourceError(f"reading Parquet needs pyarrow: {INSTALL_HINT}") from None
    version = tuple(int(part) for part in pyarrow.__version__.split(".")[:3] if part.isdigit())
    if version < SAFE_PYARROW:
        raise ParquetSourceError(f"pyarrow {pyarrow.__version__} would unpickle objects named in a Parquet file's "
                                 f"metadata (CVE-2023-47248); install pyarrow >= 14.0.1: {INSTALL_HINT}")
    return parquet


def open_parquet(path: str):
    """A ``pyarrow.parquet.ParquetFile`` of a local regular file, under this module's bounds. Raises OSError for a
    path that is not a regular file (a FIFO would block the reader) and pyarrow's errors for a bad footer."""
    parquet = import_parquet()
    from pyarrow.fs import LocalFileSystem

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path}: not a regular file")
    # a local file system named explicitly: a path is never taken for a URI (``s3://``, ``hdfs://``)
    return parquet.ParquetFile(path, filesystem=LocalFileSystem(), pre_buffer=False, buffer_size=READ_BUFFER_BYTES,
                               thrift_string_size_limit=THRIFT_STRING_LIMIT,
                               thrift_container_size_limit=THRIFT_CONTAINER_LIMIT,
                               schema_depth_limit=SCHEMA_DEPTH_LIMIT, arrow_extensions_enabled=False)


def expand_parquet_spec(spec: str, bases: Sequence[str] = ("",)) -> List[str]:
    """The files named by ``spec`` (files, globs, folders, brace patterns; joined by ``::``), in order, each once."""
    files: List[str] = []
    for entry in (part.strip() for part in spec.split("::")):
        if not entry:
            continue
        if "://" in entry or entry.startswith("pipe:"):
            raise ParquetSourceError(f"{entry!r}: Parquet sources are local files (download a Hugging Face dataset "
                                     "with huggingface-cli download, then name its files)")
        matched = next((found for base in bases for found in [_expand_entry(entry, base)] if found), [])
        if not matched:
            tried = ", ".join(repr(os.path.join(base, entry) if base else entry) for base in bases)
            raise ParquetSourceError(f"{entry!r} matches no Parquet file (looked for {tried})")
        files.extend(matched)
    if not files:
        raise ParquetSourceError("empty Parquet spec")
    return list(dict.fromkeys(files))


def _expand_entry(entry: str, base: str) -> List[str]:
    found: List[str] = []
    for item in braceexpand(entry):
        path = item if os.path.isabs(item) or not base else os.path.join(base, item)
        if set("*?[") & set(item):
            found.extend(sorted(p for p in glob.glob(path) if os.path.isfile(p)))
        elif os.path.isdir(path):
            found.extend(sorted(p for p in glob.glob(os.path.join(glob.escape(path), "*.parquet"))
                                if os.path.isfile(p)))
        elif os.path.isfile(path):
            found.append(path)
    return found


def _plain_type_error(column: str, kind: str, arrow_type) -> Optional[str]:
    """Why a column's type cannot be read as ``kind`` ("image" or "caption"), else None."""
    import pyarrow.types as types

    def absent(_) -> bool:  # the view types came with pyarrow 16
        return False

    def binary(t) -> bool:
        return types.is_binary(t) or types.is_large_binary(t) or getattr(types, "is_binary_view", absent)(t)

    def text(t) -> bool:
        return types.is_string(t) or types.is_large_string(t) or getattr(types, "is_string_view", absent)(t)

    if kind == "image":
        if binary(arrow_type):
            return None
        if types.is_struct(arrow_type):
            index = arrow_type.get_field_index(IMAGE_BYTES_FIELD)
            if index >= 0 and binary(arrow_type.field(index).type):
                return None
        return (f"image column {column!r} is {arrow_type}: it must be binary, or a struct with a binary "
                f"{IMAGE_BYTES_FIELD!r} field (the Hugging Face Image feature)")
    if text(arrow_type) or ((types.is_list(arrow_type) or types.is_large_list(arrow_type))
                            and text(arrow_type.value_type)):
        return None
    return f"caption column {column!r} is {arrow_type}: it must be a string or a list of strings"


def _pick_column(names: Sequence[str], chosen: str, defaults: Sequence[str], key: str, path: str) -> str:
    if chosen:
        if chosen not in names:
            raise ParquetSourceError(f"{path}: no column {chosen!r} ({key}); the file's columns: {', '.join(names)}")
        return chosen
    found = next((name for name in defaults if name in names), None)
    if found is None:
        raise ParquetSourceError(f"{path}: none of the columns {', '.join(defaults)}; the file's columns: "
                                 f"{', '.join(names)}; name one with {key}")
    return found


Keys = Tuple[str, str]


def read_layout(files: Sequence[str], image_column: str = "", caption_column: str = "",
                keys: Keys = ("image_column", "caption_column")) -> Tuple[List[str], List[int], ParquetLayout]:
    """(file of each unit, rows of each unit, layout) of the row groups of ``files`` in order. ``keys`` name the
    settings that choose the image and caption columns, for messages."""
    unit_files: List[str] = []
    sizes: List[int] = []
    row_groups: List[int] = []
    chosen: Dict[str, str] = {}
    for path in files:
        try:
            handle = open_parquet(path)
            schema = handle.schema_arrow
            metadata = handle.metadata
        except ParquetSourceError:
            raise
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError and others for a bad footer
            raise ParquetSourceError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error}); "
                                     "fix or remove it from the spec") from None
        names = list(schema.names)
        if not chosen:
            chosen["image"] = _pick_column(names, image_column, IMAGE_COLUMNS, keys[0], path)
            chosen["caption"] = _pick_column(names, caption_column, CAPTION_COLUMNS, keys[1], path)
        for key, (kind, column) in zip(keys, chosen.items()):
            if column not in names:
                raise ParquetSourceError(f"{path}: no column {column!r} (the first file has it); the file's columns: "
                                         f"{', '.join(names)}")
            problem = _plain_type_error(column, kind, schema.field(column).type)
            if problem:
                raise ParquetSourceError(f"{path}: {problem}; choose another with {key}")
        for group in range(metadata.num_row_groups):
            unit_files.append(path)
            row_groups.append(group)
            sizes.append(metadata.row_group(group).num_rows)
        handle.close()
    return unit_files, sizes, ParquetLayout(tuple(row_groups), chosen["image"], chosen["caption"])
