"""Zero-shot classification with a dual encoder: prompts from class names and templates, a text classifier
matrix, top-1/top-5 accuracy of labelled images (a folder laid out by class, or an image,label CSV), and the
``data.zeroshot`` sets evaluated during training, every image once over the ranks.

``zvl_ds.classify`` is the command line around this module.
"""
from __future__ import annotations

import csv
import io
import os
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as tdist
from PIL import Image
from torch import Tensor

from zvl_ds.base.errors import UserError
from zvl_ds.data import normalize_images, tokenize
from zvl_ds.data.clip_benchmark_sets import TarImage, is_benchmark_set, read_classification_set
from zvl_ds.data.transforms import ImageTransform, caption_preparer, load_rgb, to_uint8_chw
from zvl_ds.runtime import dist

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# A short ensemble of CLIP-style photo prompts; a task of its own is better served by its own file (--templates).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "itap of a {}.",
    "a picture of a {}.",
)


class ClassifyInputError(UserError, ValueError):
    """A class-name or template file the user must fix; the message names the file and line."""


def read_lines(path: str, what: str) -> List[str]:
    """Non-empty, stripped lines of a text file; lines starting with # are comments."""
    if not os.path.isfile(path):
        raise ClassifyInputError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ClassifyInputError(f"{path}: no {what} in it (one per line)")
    return lines


def read_templates(path: Optional[str]) -> List[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ClassifyInputError(f"{path}: every template needs a '{{}}' for the class name; these have none: "
                                 f"{bad[:5]}")
    return templates


def prompt_names(classes: Sequence[str], names_file: Optional[str]) -> List[str]:
    """The class names the prompts use: the file's lines, else the folder names / labels with _ as a space."""
    if names_file is None:
        return [name.replace("_", " ") for name in classes]
    names = read_lines(names_file, "class name")
    if len(names) != len(classes):
        raise ClassifyInputError(f"{names_file} has {len(names)} class names but the images have {len(classes)} "
                                 f"classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return names


def list_class_folders(folder: str) -> List[str]:
    """Class names of an ImageFolder-style tree: its sub-folders, sorted (the class index order)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders (expected FOLDER/<class>/<image files>)")
    return classes


def _list_images(folder: str, classes: Sequence[str]) -> List[Tuple[str, int]]:

    samples = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        for root, _, files in sorted(os.walk(class_dir)):
            samples.extend((os.path.join(root, f), label) for f in sorted(files)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
    return samples


@torch.no_grad()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                               max_length: int, device: Optional[torch.device] = None,
                               batch_size: int = 256, prepare_text: Optional[Callable[[str], str]] = None) -> Tensor:
    """A [d, C] matrix: column c is the normalised mean of the text embeddings of class c's prompts.

    ``templates`` mark the class name with ``{}`` (every occurrence is replaced: ``"a photo of a {}."``);
    prompts are tokenised as in training (``max_length`` = the config's ``model.max_length``), after
    ``prepare_text`` (the evaluation captions' preparation, ``transforms.caption_eval``) when given. ``model`` is a
    DualEncoder (or anything with ``encode_text(input_ids, attention_mask)`` returning L2-normalised rows).
    """
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template, got {len(classnames)} and "
                         f"{len(templates)}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' for the class name; these have none: {bad}")

    device = device or _module_device(model)
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    if prepare_text is not None:
        prompts = [prepare_text(prompt) for prompt in prompts]
    embeds = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = tokenize(tokenizer, prompts[start:start + batch_size], max_length)
        embeds.append(model.encode_text(input_ids.to(device), attention_mask.to(device)).float())
    per_prompt = torch.cat(embeds).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


def list_class_folder_images(folder: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(``(image path, class index)`` for every image under ``folder/<class>/``, class names = sorted folders)."""
    classes = list_class_folders(folder)
    samples = _list_images(folder, classes)
    if not samples:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {folder}")
    return samples, classes


def read_labelled_csv(path: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``image,label`` rows (a header row ``image,label`` is optional) -> (samples, class names sorted).

    Relative image paths are relative to the CSV's folder. A row without two fields is an error naming its line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV not found: {path}")
    rows: List[Tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{line_no}: expected 'image,label', got {','.join(row)!r}")
            if line_no == 1 and [cell.strip().lower() for cell in row] == ["image", "label"]:
                continue
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path} has no image,label rows")
    classes = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    base = os.path.dirname(os.path.abspath(path))
    return [(os.path.join(base, image), index[label]) for image, label in rows], classes


MAX_UNREADABLE_WARNINGS = 5  # per classification run; every unreadable image is counted all the same


ImageSource = Union[str, TarImage]  # a file path, or an image inside a clip_benchmark tar


def _open_image(source: ImageSource) -> Image.Image:
    return Image.open(io.BytesIO(source.read())) if isinstance(source, TarImage) else Image.open(source)


def _load_images(paths: Sequence[ImageSource], preprocess, warnings_left: int
                 ) -> Tuple[List[Tensor], List[int], int]:
    """(preprocessed images, their positions in ``paths``, number unreadable); the first unreadable files are
    reported (``warnings_left``)."""
    images, kept, skipped = [], [], 0
    for position, path in enumerate(paths):
        try:
            with _open_image(path) as image:
                images.append(preprocess(image.convert("RGB")))
        except (OSError, ValueError) as error:  # unreadable, missing or truncated file: skip it, count it
            skipped += 1
            if skipped <= warnings_left:
                print(f"[zvl_ds] skipping unreadable image {path}: {error}", flush=True)
            continue
        kept.append(position)
    return images, kept, skipped


@torch.no_grad()
def count_hits(model, classifier: Tensor, samples: Sequence[Tuple[str, int]], preprocess, batch_size: int,
               device: torch.device, dtype: torch.dtype, num_batches: Optional[int] = None) -> Tensor:
    """``[top-1 hits, top-k hits, images seen, images skipped]`` (long) of ``samples`` against ``classifier``.

    Runs exactly ``num_batches`` forwards (default: as many as the samples need); a batch without a readable
    image runs one blank image whose result is dropped, so that every rank of a sharded model (ZeRO-3) takes
    part in the same number of forwards.
    """
    k = min(5, classifier.shape[1])
    classifier = classifier.to(device).float()
    counts = torch.zeros(4, dtype=torch.long)
    needed = -(-len(samples) // batch_size)
    for index in range(needed if num_batches is None else num_batches):
        chunk = samples[index * batch_size:(index + 1) * batch_size]
        images, kept, skipped = _load_images([path for path, _ in chunk], preprocess,
                                             MAX_UNREADABLE_WARNINGS - int(counts[3]))
        counts[3] += skipped
        if not images and num_batches is None:
            continue
        batch = torch.stack(images) if images else torch.zeros((1, 3) + _image_shape(preprocess))
        logits = model.encode_image(batch.to(device=device, dtype=dtype)).float() @ classifier
        if not images:
            continue
        top = logits.topk(k, dim=1).indices.cpu()
        target = torch.tensor([chunk[i][1] for i in kept]).unsqueeze(1)
        counts[0] += int((top[:, :1] == target).sum())
        counts[1] += int((top == target).any(dim=1).sum())
        counts[2] += len(kept)
    return counts


def _image_shape(preprocess) -> Tuple[int, int]:

    return tuple(preprocess(Image.new("RGB", (8, 8))).shape[1:])  # type: ignore[return-value]


def accuracy_summary(counts: Tensor, num_classes: int, num_samples: int) -> Dict[str, float]:
    hits1, hits5, seen, skipped = (int(c) for c in counts)
    if seen == 0:
        raise ValueError(f"none of the {num_samples} image files could be read")
    return {"top1": 100.0 * hits1 / seen, "top5": 100.0 * hits5 / seen, "topk": float(min(5, num_classes)),
            "num_images": float(seen), "num_skipped": float(skipped), "num_classes": float(num_classes)}


def classify_samples(model, classifier: Tensor, samples: Sequence[Tuple[str, int]], preprocess,
                     batch_size: int = 64, device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """Zero-shot top-1/top-5 accuracy (%) of ``(image path, class index)`` samples against ``classifier`` [d, C].

    ``preprocess`` maps a PIL image to a normalised [3, S, S] tensor. Unreadable images are skipped and counted
    (``num_skipped``). With fewer than 5 classes, top-5 is top-C (reported as ``topk``).
    """
    device = device or _module_device(model)
    counts = count_hits(model, classifier, list(samples), preprocess, batch_size, device, dtype)
    return accuracy_summary(counts, classifier.shape[1], len(samples))


def classify_folder(model, classifier: Tensor, folder: str, preprocess, batch_size: int = 64,
                    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """``classify_samples`` on ``folder/<class>/<image>``; class c is the c-th sorted sub-folder."""
    classes = list_class_folders(folder)
    if classifier.shape[1] != len(classes):
        raise ValueError(f"classifier has {classifier.shape[1]} classes but {folder} has {len(classes)} class "
                         f"folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    samples, _ = list_class_folder_images(folder)
    return classify_samples(model, classifier, samples, preprocess, batch_size, device, dtype)


def chance_accuracy(num_classes: int) -> Dict[str, float]:
    """Expected top-1 / top-5 (%) of a random guess among ``num_classes`` classes."""
    return {"top1": 100.0 / num_classes, "top5": 100.0 * min(5, num_classes) / num_classes}


def _module_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Zero-shot classification sets of a config (data.zeroshot), every image once over the ranks
# --------------------------------------------------------------------------------------------------


def validation_preprocess(transforms_cfg):
    """PIL image -> normalised float32 [3, S, S] through the config's validation transforms (as the loader)."""
    transform = ImageTransform(transforms_cfg.valid_transforms, transforms_cfg)

    def preprocess(image) -> Tensor:
        image = load_rgb(image.copy())
        for op in transform.ops:
            image = op(image, random.Random(0))  # validation transforms draw nothing
        uint8 = to_uint8_chw(image.convert("RGB")).unsqueeze(0)
        return normalize_images(uint8, transforms_cfg.normalize, torch.device("cpu"), torch.float32)[0]

    return preprocess


def labelled_images(path: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """A folder laid out by class, or a CSV of image,label rows."""
    return read_labelled_csv(path) if path.lower().endswith(".csv") else list_class_folder_images(path)


def zero_shot_set(path: str, classes_file: Optional[str], templates_file: Optional[str]
                  ) -> Tuple[List[Tuple[ImageSource, int]], List[str], List[str]]:
    """(samples, prompt class names, templates) of a ``data.zeroshot`` set: a folder by class or an image,label CSV
    (names from the labels, the built-in templates), or a clip_benchmark classification folder (its
    classnames.txt and templates); ``classes_file`` / ``templates_file`` replace either when given."""
    if is_benchmark_set(path):
        samples, names, templates = read_classification_set(path)
        if classes_file is not None:
            names = prompt_names(names, classes_file)
        return samples, names, read_templates(templates_file) if templates_file is not None else templates
    samples, classes = labelled_images(path)
    return samples, prompt_names(classes, classes_file), read_templates(templates_file)


def evaluate_zero_shot(cfg, model, tokenizer, device: torch.device, dtype: torch.dtype) -> Dict[str, Dict[str, float]]:
    """``{set: {"top1", "top5", ...}}`` for every ``data.zeroshot`` set, the same on every rank.

    Rank r classifies the samples r, r + W, r + 2W, ...; the counts are summed over the ranks, so every image
    is counted exactly once whatever the world size.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    preprocess = validation_preprocess(cfg.transforms)
    batch_size = max(1, cfg.data.batch_size_val // world_size)
    was_training = model.training
    model.eval()
    results: Dict[str, Dict[str, float]] = {}
    try:
        for name, zs in cfg.data.zeroshot.items():
            samples, names, templates = zero_shot_set(zs.path, zs.classes, zs.templates)
            classifier = build_zero_shot_classifier(model, tokenizer, names, templates,
                                                    cfg.model.max_length, device,
                                                    prepare_text=caption_preparer(cfg.transforms.caption_eval))
            mine = samples[rank::world_size]
            num_batches = torch.tensor([-(-len(mine) // batch_size)], dtype=torch.long, device=device)
            if world_size > 1:

                tdist.all_reduce(num_batches, op=tdist.ReduceOp.MAX)
            counts = count_hits(model, classifier, mine, preprocess, batch_size, device, dtype, int(num_batches))
            if world_size > 1:
                counts = counts.to(device)
                tdist.all_reduce(counts)
            results[name] = accuracy_summary(counts.cpu(), len(names), len(samples))
    finally:
        model.train(was_training)
    return results
