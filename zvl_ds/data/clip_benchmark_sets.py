"""clip_benchmark's WebDataset layout (``clip_benchmark eval --dataset wds/NAME --dataset_root DIR``), and reading a
classification set of it back (a ``data.zeroshot`` set may be one). ``data/writing/clip_benchmark.py`` writes it.

The layout clip_benchmark 1.6's ``build_wds_dataset`` reads::

    DIR/dataset_type.txt                        classification | retrieval
    DIR/classnames.txt                          classification: one name per line, in label order
    DIR/zeroshot_classification_templates.txt   classification: one prompt per line, {c} = the class name
    DIR/test/nshards.txt                        the number of tars
    DIR/test/0.tar, 1.tar, ...                  KEY.jpg|png|webp with KEY.cls (label) or KEY.txt (captions, one
                                                per line); at least as many tars as clip_benchmark eval's
                                                default workers, where the set has that many images
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import List, Tuple

from zvl_ds.base.errors import UserError

SPLIT = "test"  # clip_benchmark eval's default --split
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
# clip_benchmark eval's default --num_workers: webdataset hands each dataloader worker whole tars, and a worker left
# without one stops the evaluation ("No samples found in dataset; perhaps you have fewer shards than workers")
DEFAULT_EVAL_WORKERS = 4
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # the extensions clip_benchmark's reader decodes


class BenchmarkSetError(UserError, ValueError):
    """A clip_benchmark folder that cannot be read; the message names the file."""


# --------------------------------------------------------------------------------------------------
# Templates: zvl_ds marks the class name with {}, clip_benchmark formats {c}
# --------------------------------------------------------------------------------------------------


def to_benchmark_template(template: str) -> str:
    """``"a photo of a {}."`` -> ``"a photo of a {c}."``; other braces escaped, as ``str.format(c=...)`` reads them."""
    return "{c}".join(part.replace("{", "{{").replace("}", "}}") for part in template.split("{}"))


def from_benchmark_template(template: str) -> str:
    """The inverse of ``to_benchmark_template``: ``{c}`` -> ``{}``, ``{{``/``}}`` -> ``{``/``}``."""
    return "{}".join(part.replace("{{", "{").replace("}}", "}") for part in template.split("{c}"))


# --------------------------------------------------------------------------------------------------
# Reading a classification set back (data.zeroshot)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarImage:
    """One image inside a tar, read on demand (a sample source ``zero_shot`` opens like a file path)."""

    tar_path: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.tar_path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)

    def __str__(self) -> str:
        return f"{self.tar_path}:{self.name}"


def is_benchmark_set(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPLIT, NSHARDS_FILE)) if os.path.isdir(path) else False


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def read_classification_set(folder: str, split: str = SPLIT) -> Tuple[List[Tuple[TarImage, int]], List[str],
                                                                       List[str]]:
    """(``(image, label)`` samples, class names, ``{}`` templates) of a clip_benchmark classification folder."""
    kind_file = os.path.join(folder, TYPE_FILE)
    kind = _read_lines(kind_file)[0].lower() if os.path.isfile(kind_file) else "classification"
    if kind != "classification":
        raise BenchmarkSetError(f"{folder} is a clip_benchmark {kind} set ({kind_file}); zero-shot classification needs a "
                         f"classification set")
    for needed in (CLASSNAMES_FILE, TEMPLATES_FILE):
        if not os.path.isfile(os.path.join(folder, needed)):
            raise BenchmarkSetError(f"{folder}: {needed} is missing (a clip_benchmark classification set needs it)")
    classnames = _read_lines(os.path.join(folder, CLASSNAMES_FILE))
    templates = [from_benchmark_template(t) for t in _read_lines(os.path.join(folder, TEMPLATES_FILE))]
    with open(os.path.join(folder, split, NSHARDS_FILE), encoding="utf-8") as handle:
        shards = int(handle.read().strip())
    samples: List[Tuple[TarImage, int]] = []
    for shard in range(shards):
        tar_path = os.path.join(folder, split, f"{shard}.tar")
        images, labels = {}, {}
        with tarfile.open(tar_path) as archive:
            for member in archive:
                key, _, extension = member.name.partition(".")
                if extension in KEPT_FORMATS.values() or extension == "jpeg":
                    images[key] = TarImage(tar_path, member.offset_data, member.size, member.name)
                elif extension == "cls":
                    labels[key] = int(archive.extractfile(member).read().decode().strip())
        bad = [labels[key] for key in labels if not 0 <= labels[key] < len(classnames)]
        if bad:
            raise BenchmarkSetError(f"{tar_path}: label {bad[0]} is outside the {len(classnames)} classes of "
                             f"{CLASSNAMES_FILE}")
        samples.extend((images[key], labels[key]) for key in images if key in labels)
    if not samples:
        raise BenchmarkSetError(f"{folder}/{split}: no labelled images in its tars")
    return samples, classnames, templates
