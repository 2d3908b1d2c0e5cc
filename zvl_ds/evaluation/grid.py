"""The retrieval-examples image for TensorBoard: each example image next to its top captions, drawn with PIL."""
from __future__ import annotations

import textwrap
from typing import List, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

_BACKGROUND = (24, 24, 24)
_HIT_COLOUR = (120, 230, 120)
_MISS_COLOUR = (225, 225, 225)


def _to_hwc_uint8(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected a CHW image with 1 or 3 channels, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {array.dtype}")
    array = np.transpose(array, (1, 2, 0))
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def _fit_line(draw, text: str, font, width: int) -> str:
    """Cut ``text`` with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_retrieval_grid(images_uint8, captions_top3: List[List[str]],
                          correct: Optional[List[List[bool]]] = None, thumb_size: int = 128,
                          text_width: int = 520) -> np.ndarray:
    """One row per image: the image (scaled to ``thumb_size``) and its retrieved captions, best first.

    ``images_uint8`` is [n, 3, H, W] uint8 (tensor or array). Captions marked ``correct`` (belonging to the
    image) are drawn in green. Returns an HWC uint8 array (``SummaryWriter.add_image(..., dataformats="HWC")``).
    """
    if len(images_uint8) != len(captions_top3):
        raise ValueError(f"{len(images_uint8)} images but {len(captions_top3)} caption lists")
    if correct is not None and [len(c) for c in correct] != [len(c) for c in captions_top3]:
        raise ValueError("correct must have one flag per caption")
    font = ImageFont.load_default()
    line_height = font.getbbox("Hg")[3] + 4
    padding = 6
    row_height = thumb_size + 2 * padding
    canvas = Image.new("RGB", (thumb_size + text_width + 3 * padding, max(1, len(captions_top3)) * row_height),
                       _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (image, captions) in enumerate(zip(images_uint8, captions_top3)):
        top = row * row_height + padding
        thumb = Image.fromarray(_to_hwc_uint8(image)).resize((thumb_size, thumb_size), Image.Resampling.BILINEAR)
        canvas.paste(thumb, (padding, top))
        y = top
        max_chars = max(8, text_width // 6)  # wrap estimate; each line is cut to the real pixel width below
        for rank, caption in enumerate(captions):
            hit = bool(correct[row][rank]) if correct is not None else False
            lines = textwrap.wrap(f"{rank + 1}. {caption}", width=max_chars)[:2] or [f"{rank + 1}."]
            for line in lines:
                if y + line_height > top + thumb_size:
                    break
                draw.text((thumb_size + 2 * padding, y), _fit_line(draw, line, font, text_width), font=font,
                          fill=_HIT_COLOUR if hit else _MISS_COLOUR)
                y += line_height
            y += 2
    return np.asarray(canvas, dtype=np.uint8)
