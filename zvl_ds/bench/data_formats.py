"""The training loader on Parquet against tar shards of the same images (part of ``python -m zvl_ds.bench data``).

``benchmark_formats()`` writes the same photo-like 256 px JPEGs, one caption each, twice: as tar shards in the
shard writer's format, and as Parquet laid out like a Hugging Face dataset snapshot (an ``Image`` struct column of
bytes and path, a caption column, row groups of 100 rows as the ``datasets`` library writes image datasets). It then
times ``TrainLoader`` on each, end to end (reading, JPEG decode, 224 px random_resize_crop, tokenisation, batching,
transfer from the workers), the two formats alternating round by round so that a busy machine slows both alike,
and reports the best round's samples/s per worker of each and the ratio Parquet / tar. The reading alone (every
sample's raw bytes, nothing decoded, in this process) is timed the same way.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from zvl_ds.bench.data import _measure, _photo_like_jpeg
from zvl_ds.config import Config, TextEncoderConfig, config_from_dict
from zvl_ds.data.failures import FailureCounter
from zvl_ds.data.parquet_files import import_parquet
from zvl_ds.data.pieces import read_unit
from zvl_ds.data.reader import FieldLoader
from zvl_ds.data.sources import resolve_dataset
from zvl_ds.data.transforms import load_tokenizer

FORMATS = ("tar", "parquet")
HF_ROW_GROUP_ROWS = 100  # datasets' row group size for image datasets


def write_both_formats(folder: str, num_samples: int, image_size: int = 256, files: int = 4) -> None:
    """``folder/tar/bench/train-NNNNNN.tar`` (+ sizes.json) and ``folder/parquet/train-0000i-of-0000n.parquet``,
    the same samples in the same order."""
    parquet = import_parquet()
    import pyarrow

    rng = np.random.default_rng(0)
    images = [_photo_like_jpeg(rng, image_size) for _ in range(num_samples)]
    captions = [f"a photo number {index} of a small scene" for index in range(num_samples)]
    per_file = -(-num_samples // files)
    tar_folder, parquet_folder = os.path.join(folder, "tar", "bench"), os.path.join(folder, "parquet")
    os.makedirs(tar_folder)
    os.makedirs(parquet_folder)
    sizes = {}
    image_type = pyarrow.struct([("bytes", pyarrow.binary()), ("path", pyarrow.string())])
    for part in range(files):
        rows = range(part * per_file, min((part + 1) * per_file, num_samples))
        name = f"train-{part:06d}.tar"
        with tarfile.open(os.path.join(tar_folder, name), "w") as archive:
            for index in rows:
                meta = {"image_id": index, "captions": [captions[index]], "caption_ids": [index]}
                for ext, data in (("jpg", images[index]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        sizes[name] = len(rows)
        table = pyarrow.table({"image": pyarrow.array([{"bytes": images[i], "path": f"{i:09d}.jpg"} for i in rows],
                                                      image_type),
                               "caption": pyarrow.array([captions[i] for i in rows], pyarrow.string())})
        parquet.write_table(table, os.path.join(parquet_folder, f"train-{part:05d}-of-{files:05d}.parquet"),
                            row_group_size=HF_ROW_GROUP_ROWS)
    with open(os.path.join(tar_folder, "sizes.json"), "w", encoding="utf-8") as handle:
        json.dump(sizes, handle)


def _config(folder: str, form: str, workers: int, batch_size: int, crop_size: int, tokenizer: str) -> Config:
    sources = {"bench": {"parquet": os.path.join(folder, "parquet")}} if form == "parquet" else {}
    return config_from_dict({
        "data": {"data_path": os.path.join(folder, "tar"), "train_name": ["bench"], "datasets": sources,
                 "train_type": "shuffle", "batch_size": batch_size, "num_workers": workers, "shuffle_buffer": 256},
        "transforms": {"train_transforms": ["random_resize_crop"],
                       "random_resize_crop": {"size": crop_size, "scale": [0.6, 1.0]}},
        "model": {"max_length": 25, "text_encoder": {"tokenizer": tokenizer}},
    })


def read_rate(cfg: Config) -> float:
    """Raw samples/s of reading every unit of the dataset once, image and caption bytes loaded, nothing decoded."""
    dataset = resolve_dataset(cfg.data, "bench", cfg.data.train_splits)
    fields, faults, count = FieldLoader(), FailureCounter(), 0
    start = time.perf_counter()
    try:
        for unit, size in enumerate(dataset.shard_sizes or ()):
            for raw in read_unit(dataset, unit, 0, size, faults):
                fields.load(raw)
                count += 1
    finally:
        fields.close()
    if faults.counts:
        raise RuntimeError(f"benchmark data unreadable: {faults.to_json()}")
    return count / (time.perf_counter() - start)


def benchmark_formats(workers: Sequence[int] = (1, 2), rounds: int = 3, image_size: int = 256, crop_size: int = 224,
                      batch_size: int = 64, batches: int = 8, warmup: int = 2,
                      tokenizer: str = "zvl_ds:demo_tokenizer", root: Optional[str] = None,
                      verbose: bool = True) -> Dict[str, object]:
    """``{"loader": {"workers=N": {format: per-worker samples/s, "ratio": parquet / tar}}, "read": {...}}``."""
    text = load_tokenizer(TextEncoderConfig(tokenizer=tokenizer))
    samples = (warmup * max(workers) + batches) * batch_size
    loader: Dict[str, Dict[str, float]] = {}
    rounds_seen: Dict[str, List[Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=root, prefix="zvl_formats_bench_") as folder:
        write_both_formats(folder, samples, image_size)
        reads = {form: max(read_rate(_config(folder, form, 0, batch_size, crop_size, tokenizer))
                           for _ in range(rounds)) for form in FORMATS}
        for count in workers:
            label = f"workers={count}"
            for _ in range(rounds):
                rates = {form: _measure(_config(folder, form, count, batch_size, crop_size, tokenizer), text,
                                        batches, warmup * max(1, count)) / max(1, count) for form in FORMATS}
                rounds_seen.setdefault(label, []).append(rates)
            best = {form: max(r[form] for r in rounds_seen[label]) for form in FORMATS}
            loader[label] = {**best, "ratio": best["parquet"] / best["tar"]}
    result = {"samples": samples, "image_size": image_size, "crop_size": crop_size, "rounds": rounds_seen,
              "loader": loader, "read": {**reads, "ratio": reads["parquet"] / reads["tar"]},
              "parquet_row_group_rows": HF_ROW_GROUP_ROWS, "cpu_count": os.cpu_count()}
    if verbose:
        print(format_formats(result), flush=True)
    return result


def format_formats(result: Dict[str, object]) -> str:
    """A ``benchmark_formats`` result as lines of text."""
    lines = [f"loader on Parquet vs tar: {result['samples']} JPEGs {result['image_size']} px -> "
             f"{result['crop_size']} px random_resize_crop, best of {len(next(iter(result['rounds'].values())))} "
             f"alternating rounds"]  # type: ignore[union-attr]
    for label, rates in result["loader"].items():  # type: ignore[union-attr]
        lines.append(f"  {label}: tar {rates['tar']:.1f}, parquet {rates['parquet']:.1f} samples/s per worker; "
                     f"parquet / tar = {rates['ratio']:.2f}")
    read = result["read"]
    lines.append(f"  reading alone (no decode): tar {read['tar']:.0f}, parquet {read['parquet']:.0f} samples/s; "
                 f"parquet / tar = {read['ratio']:.2f}")  # type: ignore[index]
    return "\n".join(lines)
