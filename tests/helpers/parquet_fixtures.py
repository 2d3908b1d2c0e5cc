"""Parquet files for the data tests, written with pyarrow as a Hugging Face dataset snapshot or img2dataset lays
them out, holding the same samples as ``data_fixtures.write_dataset``'s tars."""
from __future__ import annotations

import json
import os
import zlib
from typing import List, Optional, Sequence

from tests.helpers.data_fixtures import image_bytes



def hf_image_type():
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(path: str, columns: dict, row_groups: Sequence[int], types: Optional[dict] = None,
                  hf_features: Optional[dict] = None, **writer_options) -> None:
    """One file whose row groups hold ``row_groups`` rows each, in order (a Hugging Face snapshot's
    ``huggingface`` metadata when ``hf_features`` is given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, (types or {}).get(name) or pa.array(values).type) for name, values in columns.items()])
    if hf_features is not None:
        schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": hf_features}})})
    table = pa.table({name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()},
                     schema=schema)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with pq.ParquetWriter(path, schema, **writer_options) as writer:
        first = 0
        for rows in row_groups:
            writer.write_table(table.slice(first, rows), row_group_size=max(rows, 1))
            first += rows


def tar_like_rows(name: str, split: str, shard_sizes: Sequence[int], captions_per_image: int = 2,
                  id_offset: int = 0):
    """The keys, images and caption lists ``write_dataset(root, name, split, shard_sizes)`` writes, in order."""
    keys: List[str] = []
    images: List[bytes] = []
    captions: List[List[str]] = []
    counter = 0
    for shard, count in enumerate(shard_sizes):
        for position in range(count):
            key = f"{name}_{split}_{shard:03d}_{position:04d}"
            image_id = id_offset + counter
            keys.append(key)
            images.append(image_bytes(zlib.crc32(key.encode())))
            captions.append([f"{name} {image_id} caption {j}" for j in range(captions_per_image)])
            counter += 1
    return keys, images, captions


def write_hf_snapshot(root: str, name: str, split: str, files: Sequence[Sequence[int]], captions_per_image: int = 2,
                      id_offset: int = 0) -> List[str]:
    """``root/<name>/data/<split>-0000i-of-0000n.parquet`` with an ``image`` struct column (Hugging Face ``Image``)
    and a ``caption`` list column; ``files`` gives each file's row-group sizes. The rows are those of
    ``write_dataset(root, name, split, [all row groups...])``, in order; returns their keys."""
    sizes = [rows for groups in files for rows in groups]
    keys, images, captions = tar_like_rows(name, split, sizes, captions_per_image, id_offset)
    first = 0
    for index, groups in enumerate(files):
        count = sum(groups)
        rows = slice(first, first + count)
        cells = [{"bytes": data, "path": f"{key}.jpg"} for data, key in zip(images[rows], keys[rows])]
        write_parquet(os.path.join(root, name, "data", f"{split}-{index:05d}-of-{len(files):05d}.parquet"),
                      {"image": cells, "caption": captions[rows]}, groups, types={"image": hf_image_type()},
                      hf_features={"image": {"_type": "Image"}, "caption": {"feature": {"dtype": "string"},
                                                                             "_type": "Sequence"}})
        first += count
    return keys
