"""Tiny shards for the data tests, written with tarfile in the shard writer's format (and img2dataset's)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from zvl_ds.config import Config, config_from_dict


def image_bytes(seed: int, size: Tuple[int, int] = (40, 32), fmt: str = "JPEG") -> bytes:
    """A small image whose pixels depend on ``seed``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: str, members: Sequence[Tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o444
            archive.addfile(info, io.BytesIO(data))


def sample_members(key: str, image_id: int, captions: List[str], caption_ids: List[int], dataset: str, split: str,
                   seed: int) -> List[Tuple[str, bytes]]:
    meta = {"image": f"{key}.jpg", "image_id": image_id, "captions": captions, "caption_ids": caption_ids,
            "width": 40, "height": 32, "original_width": 40, "original_height": 32, "dataset": dataset,
            "split": split}
    return [(f"{key}.jpg", image_bytes(seed)), (f"{key}.json", json.dumps(meta).encode()),
            (f"{key}.txt", captions[0].encode())]


def write_dataset(root: str, name: str, split: str, shard_sizes: Sequence[int], captions_per_image: int = 2,
                  id_offset: int = 0) -> List[str]:
    """``root/name/split-NNNNNN.tar`` with the given samples per shard, plus sizes.json; returns the keys."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    sizes_path = os.path.join(folder, "sizes.json")
    sizes: Dict[str, int] = json.load(open(sizes_path)) if os.path.exists(sizes_path) else {}
    keys: List[str] = []
    counter = 0
    for shard, count in enumerate(shard_sizes):
        members: List[Tuple[str, bytes]] = []
        for position in range(count):
            key = f"{name}_{split}_{shard:03d}_{position:04d}"
            image_id = id_offset + counter
            captions = [f"{name} {image_id} caption {j}" for j in range(captions_per_image)]
            caption_ids = [image_id * 10 + j for j in range(captions_per_image)]
            members += sample_members(key, image_id, captions, caption_ids, name, split, seed=zlib.crc32(key.encode()))
            keys.append(key)
            counter += 1
        base = f"{split}-{shard:06d}.tar"
        write_tar(os.path.join(folder, base), members)
        sizes[base] = count
    with open(sizes_path, "w") as handle:
        json.dump(sizes, handle)
    return keys


def write_img2dataset(folder: str, shard_sizes: Sequence[int], ext: str = "jpg") -> List[str]:
    """img2dataset layout: ``NNNNN.tar`` (jpg/png/webp + txt + json) and ``NNNNN_stats.json``; returns keys."""
    os.makedirs(folder, exist_ok=True)
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    keys: List[str] = []
    index = 0
    for shard, count in enumerate(shard_sizes):
        members: List[Tuple[str, bytes]] = []
        for _ in range(count):
            key = f"{shard:05d}{index:04d}"
            meta = {"url": f"http://example.invalid/{key}", "caption": f"web caption {key}", "key": key,
                    "status": "success"}
            members += [(f"{key}.{ext}", image_bytes(index, fmt=fmt)), (f"{key}.txt", f"web caption {key}".encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
            keys.append(key)
            index += 1
        write_tar(os.path.join(folder, f"{shard:05d}.tar"), members)
        with open(os.path.join(folder, f"{shard:05d}_stats.json"), "w") as handle:
            json.dump({"count": count, "successes": count, "failed_to_download": 0}, handle)
    return keys


def make_config(root: str, train: Sequence[str] = ("flat",), valid: Sequence[str] = ("val",),
                batch_size: int = 8, num_workers: int = 0, train_type: str = "shuffle",
                extra: Optional[Dict] = None, **data) -> Config:
    raw = {
        "seed": 7,
        "data": {"data_path": root, "train_name": list(train), "valid_name": list(valid), "train_type": train_type,
                 "batch_size": batch_size, "batch_size_val": batch_size, "num_workers": num_workers,
                 "shuffle_buffer": 16, "loader_timeout": 120, **data},
        "transforms": {"train_transforms": ["random_resize_crop"], "valid_transforms": ["resize", "center_crop"],
                       "resize": {"size": 20}, "center_crop": {"size": 16},
                       "random_resize_crop": {"size": 16, "scale": [0.5, 1.0]}},
        "model": {"arch": "tiny", "max_length": 12},
    }
    for dotted, value in (extra or {}).items():
        node = raw
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return config_from_dict(raw)


def make_demo_shards(root: Path, train_size: int, valid_size: int, captions_per_image: int,
                     classify_size: Optional[int] = None, samples_per_shard: Optional[int] = None,
                     in_process: bool = False) -> Tuple[Path, Path]:
    """Demo data under ``root/data`` sharded into ``root/shards`` with the user's two commands; returns both folders.

    Each command runs in its own process, as a user runs it; ``in_process`` calls their main() here instead (the
    same files, without two interpreters' start-up; make_shards then writes in this process: no forked workers)."""
    data, out = root / "data", root / "shards"
    demo = ["--out", str(data), "--train-size", str(train_size), "--valid-size", str(valid_size),
            "--captions-per-image", str(captions_per_image)]
    if classify_size is not None:
        demo += ["--classify-size", str(classify_size)]
    shard = ["--data-root", str(data), "--dataset", "demo_flat", "--dataset", "demo_sketch", "--dataset", "demo_val",
             "--split", "all", "--out", str(out), "--quiet"]
    if samples_per_shard is not None:
        shard += ["--samples-per-shard", str(samples_per_shard)]
    if in_process:
        from zvl_ds import make_demo_data, make_shards

        assert make_demo_data.main(demo) == 0
        assert make_shards.main([*shard, "--workers", "1"]) == 0
        return data, out
    subprocess.run([sys.executable, "-m", "zvl_ds.make_demo_data", *demo], check=True, capture_output=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "zvl_ds.make_shards", *shard], check=True, capture_output=True,
                   timeout=120)
    return data, out


def assert_resumes_like_the_reference(cfg, tokenizer, reference, stops, rank: int = 1, world_size: int = 2) -> None:
    """For each of ``stops``: a training loader stopped after that many steps, its state saved as a checkpoint keeps
    it (through JSON), and a new loader resumed from it yields ``reference[stop:]`` (the batches an unbroken loader
    of ``cfg`` gave): the same steps, keys, sources, image bytes and token ids."""
    import torch

    from zvl_ds.data import build_train_loader

    def take(loader, steps):
        iterator = iter(loader)
        return [next(iterator) for _ in range(steps)]

    for stop in stops:
        first = build_train_loader(cfg, rank, world_size, tokenizer)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
        first.close()
        resumed = build_train_loader(cfg, rank, world_size, tokenizer)
        resumed.load_state_dict(state)
        rest = take(resumed, len(reference) - stop)
        resumed.close()
        for got, want in zip(rest, reference[stop:]):
            assert got.step == want.step and got.keys == want.keys and got.dataset == want.dataset
            assert torch.equal(got.images, want.images) and torch.equal(got.input_ids, want.input_ids)
