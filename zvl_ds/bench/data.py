"""Data-side benchmarks: shard-writer images/s (``benchmark_shards``) and training-loader samples/s
(``python -m zvl_ds.bench shards`` / ``data``).

``benchmark_shards()`` converts generated 640x480 photo-like JPEGs with the real shard writer at each worker count.
``benchmark_loader()`` writes a few shards of photo-like JPEGs (smooth colour fields with fine noise, ~20 KB at
256 px, about what real 256 px photos weigh), then times ``TrainLoader`` end to end (tar reading, JPEG decode,
transforms, tokenisation, batching, transfer from the workers) for each transform list and worker count.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from zvl_ds.config import TextEncoderConfig, config_from_dict
from zvl_ds.data.train_stream import build_train_loader
from zvl_ds.data.transforms import load_tokenizer
from zvl_ds.data.writing.annotations import SplitSource
from zvl_ds.data.writing.shard_writer import ShardSettings, convert_split

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
    return config_from_dict({
        "data": {"data_path": root, "train_name": ["bench"], "train_type": "shuffle", "batch_size": batch_size,
                 "num_workers": workers, "shuffle_buffer": 256},
        "transforms": {"train_transforms": transforms, "random_resize_crop": {"size": crop_size, "scale": [0.6, 1.0]}},
        "model": {"max_length": 25, "text_encoder": {"tokenizer": tokenizer}},
    })


def _measure(cfg, tokenizer, batches: int, warmup: int) -> float:
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


def _benchmark_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like frame: smooth gradients, a few solid shapes and mild sensor-like noise."""
    from PIL import ImageDraw

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    tilt = rng.uniform(-0.2, 0.2, size=(2, 3)).astype(np.float32)
    pixels = base + xs[..., None] * tilt[0] + ys[..., None] * tilt[1] + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        size = int(rng.integers(20, 160))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x, y, x + size, y + size), fill=colour)
    return image


def write_benchmark_dataset(root: str, num_images: int, size: Tuple[int, int] = (640, 480), seed: int = 0
                            ) -> SplitSource:
    """``root/bench/train_anno.csv`` + ``train/*.jpg`` of photo-like JPEGs (quality 90)."""
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(root, "bench", "train")
    os.makedirs(images_dir, exist_ok=True)
    rows = ["image,caption"]
    for index in range(num_images):
        name = f"{index:06d}.jpg"
        _benchmark_image(rng, *size).save(os.path.join(images_dir, name), format="JPEG", quality=90)
        rows.append(f"{name},benchmark image {index}")
    csv_path = os.path.join(root, "bench", "train_anno.csv")
    with open(csv_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    return SplitSource("bench", "train", csv_path, images_dir)


def benchmark_shards(num_images: int = 512, workers: Sequence[int] = (1, 2), max_size: int = 256,
                     resample: str = "box", work_dir: Optional[str] = None, progress: bool = False
                     ) -> Dict[str, object]:
    """Convert generated 640x480 JPEGs to max_size at each worker count; images/s per worker and speed-up.

    Timings are end to end (CSV read, pool start, decode, resize, encode, tar and stats writes)."""
    runs = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="zvl_shards_bench_") as root:
        source = write_benchmark_dataset(root, num_images)
        # Enough shards that every worker count divides the work evenly.
        settings = ShardSettings(samples_per_shard=max(1, math.ceil(num_images / (4 * max(workers)))),
                                 max_size=max_size, resample=resample)  # type: ignore[arg-type]
        for count in workers:
            start = time.perf_counter()
            report = convert_split(source, os.path.join(root, f"out_{count}"), settings, workers=count,
                                   progress=progress)
            seconds = time.perf_counter() - start
            if report.images_written != num_images:
                raise RuntimeError(f"benchmark wrote {report.images_written} of {num_images} images")
            # unrounded: on a slow machine a rate rounded to 0.1 before the division is off by far more than 1%
            runs.append({"workers": count, "seconds": round(seconds, 3), "images_per_sec": num_images / seconds,
                         "images_per_sec_per_worker": num_images / seconds / count})
    base = runs[0]["images_per_sec"]
    return {"images": num_images, "image_size": [640, 480], "max_size": max_size, "resample": resample,
            "cpu_count": os.cpu_count(),
            "runs": runs,
            "speedup": {str(r["workers"]): round(float(r["images_per_sec"]) / float(base), 2) for r in runs}}


def format_benchmark(result: Dict[str, object]) -> str:
    """A ``benchmark_shards`` result as lines of text."""
    lines = [f"shard writer benchmark: {result['images']} JPEGs 640x480 -> max-size {result['max_size']} "
             f"({result['resample']}, {result['cpu_count']} CPUs)"]
    for run in result["runs"]:  # type: ignore[union-attr]
        lines.append(f"  workers={run['workers']}: {run['images_per_sec']:.1f} img/s total, "
                     f"{run['images_per_sec_per_worker']:.1f} img/s per worker ({run['seconds']:.2f}s), "
                     f"speed-up x{result['speedup'][str(run['workers'])]:.2f}")  # type: ignore[index]
    return "\n".join(lines)
