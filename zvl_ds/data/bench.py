"""Loader throughput: samples/s of the real training loader on synthetic 256 px JPEG shards.

``benchmark_loader()`` writes a few shards of photo-like JPEGs (smooth colour fields with fine noise, ~20 KB at
256 px, about what real 256 px photos weigh), then times ``TrainLoader`` end to end (tar reading, JPEG decode,
transforms, tokenisation, batching, transfer from the workers) for each transform list and worker count.
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
from PIL import Image

PIPELINES = {"random_resize_crop": ["random_resize_crop"],
             "random_resize_crop+autoaug": ["random_resize_crop", "autoaug"]}


def _photo_like_jpeg(rng: np.random.Generator, size: int) -> bytes:
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 6, size=smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_benchmark_shards(folder: str, num_samples: int, image_size: int = 256, shards: int = 4) -> None:
    """``folder/bench/train-NNNNNN.tar`` in the shard format, with sizes.json."""
    rng = np.random.default_rng(0)
    target = os.path.join(folder, "bench")
    os.makedirs(target, exist_ok=True)
    sizes = {}
    per_shard = -(-num_samples // shards)
    for shard in range(shards):
        name = f"train-{shard:06d}.tar"
        count = min(per_shard, num_samples - shard * per_shard)
        with tarfile.open(os.path.join(target, name), "w") as archive:
            for position in range(count):
                key = f"{shard:06d}{position:06d}"
                caption = f"a photo number {shard * per_shard + position} of a small scene"
                meta = {"image_id": shard * per_shard + position, "captions": [caption], "caption_ids": [0]}
                for ext, data in (("jpg", _photo_like_jpeg(rng, image_size)), ("json", json.dumps(meta).encode()),
                                  ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        sizes[name] = count
    with open(os.path.join(target, "sizes.json"), "w") as handle:
        json.dump(sizes, handle)


def _config(root: str, transforms: List[str], crop_size: int, workers: int, batch_size: int, tokenizer: str):
    from zvl_ds.config import config_from_dict

    return config_from_dict({
        "data": {"data_path": root, "train_name": ["bench"], "train_type": "shuffle", "batch_size": batch_size,
                 "num_workers": workers, "shuffle_buffer": 256},
        "transforms": {"train_transforms": transforms, "random_resize_crop": {"size": crop_size, "scale": [0.6, 1.0]}},
        "model": {"max_length": 25, "text_encoder": {"tokenizer": tokenizer}},
    })


def _measure(cfg, tokenizer, batches: int, warmup: int) -> float:
    from zvl_ds.data.stream import build_train_loader

    loader = build_train_loader(cfg, 0, 1, tokenizer)
    try:
        iterator = iter(loader)
        for _ in range(warmup):  # worker start-up and the first shard opens
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * cfg.data.batch_size / (time.perf_counter() - start)
    finally:
        loader.close()


def benchmark_loader(workers: Sequence[int] = (1, 2), pipelines: Optional[Dict[str, List[str]]] = None,
                     image_size: int = 256, crop_size: int = 224, batch_size: int = 64, batches: int = 8,
                     warmup: int = 2, tokenizer: str = "zvl_ds:demo_tokenizer", root: Optional[str] = None,
                     verbose: bool = True) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Samples/s of the training loader; returns ``{pipeline: {"workers=N": {"total": ..., "per_worker": ...}}}``.

    Each worker makes whole batches, so every worker count needs ``(warmup + batches) * batch_size`` samples of
    its own; the shards are sized for the largest count (epochs wrap around if they are not).
    """
    from zvl_ds.config import TextEncoderConfig
    from zvl_ds.data.transforms import load_tokenizer

    pipelines = dict(PIPELINES if pipelines is None else pipelines)
    text = load_tokenizer(TextEncoderConfig(tokenizer=tokenizer))
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=root) as folder:
        write_benchmark_shards(folder, (warmup * max(workers) + batches) * batch_size, image_size)
        for label, names in pipelines.items():
            results[label] = {}
            for count in workers:
                rate = _measure(_config(folder, names, crop_size, count, batch_size, tokenizer), text, batches,
                                warmup * max(1, count))
                per_worker = rate / max(1, count)
                results[label][f"workers={count}"] = {"total": rate, "per_worker": per_worker}
                if verbose:
                    print(f"{label:28s} {crop_size} px from {image_size} px  workers={count}: "
                          f"{rate:7.1f} samples/s  ({per_worker:6.1f} per worker)", flush=True)
    return results


if __name__ == "__main__":
    import zvl_ds  # noqa: F401  (torchvision shim before AutoAugment)

    benchmark_loader()
