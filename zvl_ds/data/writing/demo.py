"""Procedural demo data in the ZeroVL layout: coloured shapes with captions that say what is drawn.

``make_demo_data(out)`` writes three datasets:

- ``demo_flat/``  train_anno.csv + train/*.jpg: filled shapes on a plain light background;
- ``demo_sketch/`` train_anno.csv + train/*.jpg: the same concepts as thick outlines on a dark noisy background;
- ``demo_val/``   valid_anno.csv + valid/*.jpg: both styles mixed, several differently worded captions per image,
  with image_id and caption_id columns; rows of one image are not adjacent (as in real CSVs).

The two training sets share concepts and caption distribution but differ in style, so a batch drawn from one
dataset is easy to tell apart by style alone: the shortcut that debiased sampling removes. Concepts: one shape
kind per image (circle, square, triangle, star, cross), a colour, a count (one to three) and a position (left,
right, top, bottom, center). Shapes are large and colours saturated so a tiny model learns them at 32 px.
Captions use words from the packaged demo tokenizer's vocabulary. Output is byte-identical for the same seed.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (30, 175, 45), "blue": (35, 75, 235),
    "yellow": (245, 215, 20), "purple": (150, 45, 190), "orange": (250, 135, 15),
}
COUNT_WORDS = {1: ("one", "a", "a single", "1"), 2: ("two", "2"), 3: ("three", "3")}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "on the left side", "near the left"),
    "right": ("on the right", "at the right side", "on the right side", "near the right"),
    "top": ("at the top", "near the top", "on the upper side", "at the top side"),
    "bottom": ("at the bottom", "near the bottom", "on the lower side", "at the bottom side"),
    "center": ("in the center", "in the middle", "at the center", "in the centre"),
}
# Region of each position as fractions of the canvas (x0, y0, x1, y1); objects are laid out along its long axis.
REGIONS = {
    "left": (0.02, 0.05, 0.45, 0.95), "right": (0.55, 0.05, 0.98, 0.95),
    "top": (0.05, 0.02, 0.95, 0.45), "bottom": (0.05, 0.55, 0.95, 0.98),
    "center": (0.18, 0.28, 0.82, 0.72),
}
TEMPLATES = (
    "{n} {c} {s} {p}",
    "a drawing of {n} {c} {s} {p}",
    "a picture showing {n} {c} {s} {p}",
    "{p} there {be} {n} {c} {s}",
    "an image with {n} {c} {s} {p}",
    "{n} {s} in {c} {p}",
    "{n} {c} {s} drawn {p}",
)
STYLES = ("flat", "sketch")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    position: str


@dataclass(frozen=True)
class DemoDataset:
    name: str
    split: str
    csv_path: str
    images: int
    captions: int


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 count=int(rng.integers(1, 4)), position=POSITIONS[rng.integers(len(POSITIONS))])


def caption_for(scene: Scene, template: str, rng: np.random.Generator) -> str:
    count_word = COUNT_WORDS[scene.count][rng.integers(len(COUNT_WORDS[scene.count]))]
    noun = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    phrase = POSITION_PHRASES[scene.position][rng.integers(len(POSITION_PHRASES[scene.position]))]
    return template.format(n=count_word, c=scene.colour, s=noun, p=phrase, be="is" if scene.count == 1 else "are")


def object_boxes(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> List[Tuple[float, float, float]]:
    """(centre x, centre y, radius) of each object: evenly spaced along the region's long axis, jittered."""
    x0, y0, x1, y1 = (value * size for value in REGIONS[scene.position])
    width, height = x1 - x0, y1 - y0
    along_x = width >= height
    slot = (width if along_x else height) / scene.count
    radius = 0.4 * min(slot, height if along_x else width)
    boxes = []
    for index in range(scene.count):
        offset = (index + 0.5) * slot
        cx, cy = (x0 + offset, (y0 + y1) / 2) if along_x else ((x0 + x1) / 2, y0 + offset)
        jitter = 0.08 * radius
        boxes.append((cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter),
                      radius * rng.uniform(0.9, 1.0)))
    return boxes


def shape_outline(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """Polygon points of a shape centred at (cx, cy) with outer radius r (circles are drawn as ellipses)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = 0.35 * r, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def _jittered_colour(colour: Tuple[int, int, int], rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in colour)  # type: ignore[return-value]


def _background(style: str, rng: np.random.Generator, size: int) -> Image.Image:
    if style == "flat":
        tint = rng.integers(225, 251, size=3)
        return Image.new("RGB", (size, size), tuple(int(t) for t in tint))
    # Dark with grain and a few faint scratches: a texture the flat style never has.
    base = rng.integers(25, 55)
    pixels = base + rng.normal(0, 9, (size, size, 1)) + rng.normal(0, 3, (size, size, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y, u, v = (float(value) for value in rng.uniform(0, size, 4))
        shade = int(base + rng.integers(15, 35))
        draw.line((x, y, u, v), fill=(shade, shade, shade), width=1)
    return image


def draw_scene(scene: Scene, style: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    image = _background(style, rng, size)
    draw = ImageDraw.Draw(image)
    colour = _jittered_colour(COLOURS[scene.colour], rng)
    outline_width = max(2, size // 16)
    for cx, cy, r in object_boxes(scene, rng, size):
        if scene.shape == "circle":
            box = (cx - r, cy - r, cx + r, cy + r)
            if style == "flat":
                draw.ellipse(box, fill=colour)
            else:
                draw.ellipse(box, outline=colour, width=outline_width)
        else:
            points = shape_outline(scene.shape, cx, cy, r)
            if style == "flat":
                draw.polygon(points, fill=colour)
            else:
                draw.polygon(points, outline=colour, width=outline_width)
    return image


def _save_jpeg(image: Image.Image, path: str) -> None:
    image.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps thin coloured outlines saturated


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_train_dataset(folder: str, style: str, count: int, rng: np.random.Generator) -> DemoDataset:
    """``folder/train_anno.csv`` (image, caption; one caption per image, no id columns) + ``folder/train/``."""
    images_dir = os.path.join(folder, "train")
    os.makedirs(images_dir, exist_ok=True)
    rows = []
    for index in range(count):
        scene = random_scene(rng)
        name = f"{index:06d}.jpg"
        _save_jpeg(draw_scene(scene, style, rng), os.path.join(images_dir, name))
        rows.append((name, caption_for(scene, TEMPLATES[rng.integers(len(TEMPLATES))], rng)))
    csv_path = os.path.join(folder, "train_anno.csv")
    _write_csv(csv_path, ("image", "caption"), rows)
    return DemoDataset(os.path.basename(folder), "train", csv_path, count, count)


def write_valid_dataset(folder: str, count: int, captions_per_image: int, rng: np.random.Generator) -> DemoDataset:
    """``folder/valid_anno.csv`` (image, image_id, caption, caption_id) + ``folder/valid/``; styles mixed.
    Rows go round-robin over images (every image's first caption, then every second one, ...)."""
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(TEMPLATES)}, got {captions_per_image}")
    images_dir = os.path.join(folder, "valid")
    os.makedirs(images_dir, exist_ok=True)
    per_image: List[List[Tuple[str, int, str, int]]] = []
    for index in range(count):
        scene = random_scene(rng)
        style = STYLES[rng.integers(len(STYLES))]
        name = f"{index:06d}.jpg"
        _save_jpeg(draw_scene(scene, style, rng), os.path.join(images_dir, name))
        templates = [TEMPLATES[t] for t in rng.permutation(len(TEMPLATES))[:captions_per_image]]
        per_image.append([(name, index, caption_for(scene, template, rng), index * captions_per_image + k)
                          for k, template in enumerate(templates)])
    rows = [per_image[i][k] for k in range(captions_per_image) for i in range(count)]
    csv_path = os.path.join(folder, "valid_anno.csv")
    _write_csv(csv_path, ("image", "image_id", "caption", "caption_id"), rows)
    return DemoDataset(os.path.basename(folder), "valid", csv_path, count, len(rows))


def write_classify_dataset(folder: str, count: int, rng: np.random.Generator) -> DemoDataset:
    """A zero-shot classification set by shape: ``folder/<shape>/<index>.jpg``, colours, counts and styles mixed."""
    for shape in SHAPES:
        os.makedirs(os.path.join(folder, shape), exist_ok=True)
    for index in range(count):
        scene = random_scene(rng)
        style = STYLES[rng.integers(len(STYLES))]
        _save_jpeg(draw_scene(scene, style, rng), os.path.join(folder, scene.shape, f"{index:06d}.jpg"))
    return DemoDataset(os.path.basename(folder), "classify", folder, count, 0)


def make_demo_data(out: str, seed: int = 0, train_size: int = 2000, valid_size: int = 200,
                   captions_per_image: int = 5, classify_size: int = 0) -> List[DemoDataset]:
    """Write demo_flat, demo_sketch (train), demo_val (valid) and, when ``classify_size`` > 0, the class folders
    of demo_classify (shapes) under ``out``; existing files are overwritten."""
    if train_size < 1 or valid_size < 1 or classify_size < 0:
        raise ValueError("train_size and valid_size must be >= 1, classify_size >= 0")
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(TEMPLATES)}, got {captions_per_image}")
    # Independent streams per dataset, so changing one size leaves the other datasets' bytes unchanged.
    datasets = [
        write_train_dataset(os.path.join(out, "demo_flat"), "flat", train_size, np.random.default_rng([seed, 0])),
        write_train_dataset(os.path.join(out, "demo_sketch"), "sketch", train_size, np.random.default_rng([seed, 1])),
        write_valid_dataset(os.path.join(out, "demo_val"), valid_size, captions_per_image,
                            np.random.default_rng([seed, 2])),
    ]
    if classify_size > 0:
        datasets.append(write_classify_dataset(os.path.join(out, "demo_classify"), classify_size,
                                               np.random.default_rng([seed, 3])))
    return datasets
