"""Decoding one image file and converting it to the JPEG stored in a shard (upright RGB, shorter side limited).

Images that cannot be used (missing, empty, not a regular file, too large, outside the image folder, not an image,
truncated, over the pixel limit, float pixels) raise ``SampleSkipped`` with the reason they are counted under.
Reading is bounded: a FIFO, a device or a link to one is refused before a byte is read, and no file is read past
the size limit. ``original_width``/``original_height`` are the size after EXIF orientation.
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zvl_ds.base.folder_links import outside_target
from zvl_ds.data.failures import (CORRUPT_IMAGE, EMPTY_FILE, FILE_TOO_LARGE, FLOAT_IMAGE, MISSING_FILE,
                                  NOT_A_REGULAR_FILE, NOT_AN_IMAGE, OTHER_ERROR, PATH_OUTSIDE_IMAGES, TOO_MANY_PIXELS,
                                  SampleSkipped)

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default MAX_IMAGE_PIXELS
# An uncompressed RGB image at the pixel limit is ~270 MB; a larger file is no image we would accept.
DEFAULT_MAX_FILE_MB = 256


RESAMPLING = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


@dataclass
class ConvertedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


class ImageSettings(Protocol):
    """What converting an image reads from the shard settings (``shards.ShardSettings`` has these fields)."""

    @property
    def max_size(self) -> int: ...

    @property
    def max_pixels(self) -> int: ...

    @property
    def jpeg_quality(self) -> int: ...

    @property
    def resample(self) -> str: ...


def read_image_file(path: str, folder: Optional[str] = None, max_bytes: int = DEFAULT_MAX_FILE_MB << 20,
                    allow_outside: bool = False) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. Unless ``allow_outside``, the file must lie inside
    ``folder`` once symbolic links are resolved (a link may not lead where a `..` path may not go)."""
    if folder is not None and not allow_outside:
        real = outside_target(path, folder, [os.path.realpath(folder)])
        if real is not None:
            raise SampleSkipped(PATH_OUTSIDE_IMAGES, f"a symbolic link leads out of the image folder (to {real}); "
                                                     "--allow-outside-images accepts it")
    try:  # non-blocking: opening a FIFO for reading would otherwise wait for a writer forever
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise SampleSkipped(MISSING_FILE, "no such file") from None
    except OSError as error:
        raise SampleSkipped(OTHER_ERROR, f"cannot open: {error}") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise SampleSkipped(NOT_A_REGULAR_FILE, f"not a regular file ({_file_kind(status.st_mode)})")
    if status.st_size > max_bytes:
        os.close(descriptor)
        raise SampleSkipped(FILE_TOO_LARGE, f"{status.st_size} bytes > limit {max_bytes} (--max-file-mb)")
    with os.fdopen(descriptor, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)  # a file that grows while read is still cut off at the limit
        except OSError as error:
            raise SampleSkipped(OTHER_ERROR, f"cannot read: {error}") from None
    if len(data) > max_bytes:
        raise SampleSkipped(FILE_TOO_LARGE, f"more than the limit of {max_bytes} bytes (--max-file-mb)")
    if not data:
        raise SampleSkipped(EMPTY_FILE, "zero bytes")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def scaled_size(width: int, height: int, max_size: int) -> Tuple[int, int]:
    """(width, height) with the shorter side brought down to max_size, aspect kept; unchanged when smaller."""
    shorter = min(width, height)
    if max_size <= 0 or shorter <= max_size:
        return width, height
    scale = max_size / shorter
    if width <= height:
        return max_size, max(1, round(height * scale))
    return max(1, round(width * scale)), max_size


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not cost the image; it is then shown as stored
        return 1


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode. 16-bit grey is scaled (Pillow's own convert clips at 255); transparency is
    composited onto white (dropping alpha would expose whatever colour the transparent pixels hold)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode == "RGB":
            return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SampleSkipped(NOT_AN_IMAGE, "not a recognised image format") from None
    except Image.DecompressionBombError as error:
        raise SampleSkipped(TOO_MANY_PIXELS, str(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
        raise SampleSkipped(CORRUPT_IMAGE, f"unreadable header: {error}") from None


def convert_image(data: bytes, settings: ImageSettings) -> ConvertedImage:
    """The JPEG to store. Original bytes are kept for an upright RGB JPEG already within max_size (after a full
    decode that proves it is complete); anything else is decoded (JPEG draft mode for cheap downscaling),
    turned upright, converted to RGB, resized so the shorter side is max_size and encoded at jpeg_quality."""
    image = _open_image(data)
    if image.mode == "F" or image.mode.startswith("F;"):
        raise SampleSkipped(FLOAT_IMAGE, f"floating-point pixels (mode {image.mode}) have no defined 0..255 range; "
                                         "convert the image to 8-bit first")
    width, height = image.size
    if width * height > settings.max_pixels:
        raise SampleSkipped(TOO_MANY_PIXELS,
                            f"{width}x{height} = {width * height} pixels > limit {settings.max_pixels}")
    orientation = _exif_orientation(image)
    turned = orientation in (5, 6, 7, 8)  # EXIF transposes: width and height swap
    stored_target = scaled_size(width, height, settings.max_size)
    upright_size = (height, width) if turned else (width, height)
    target = (stored_target[1], stored_target[0]) if turned else stored_target
    try:
        if image.format == "JPEG" and image.mode == "RGB" and orientation == 1 and target == upright_size:
            image.load()
            return ConvertedImage(data, width, height, width, height)
        if image.format == "JPEG" and stored_target != (width, height):
            # Draft picks the largest DCT scale (1/2, 1/4, 1/8) that stays at least as large as asked.
            image.draft(None, stored_target)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
        if rgb.size != target:
            rgb = rgb.resize(target, RESAMPLING[settings.resample], reducing_gap=3.0)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=settings.jpeg_quality)
    except SampleSkipped:
        raise
    except Image.DecompressionBombError as error:
        raise SampleSkipped(TOO_MANY_PIXELS, str(error)) from None
    except (OSError, SyntaxError, EOFError, struct.error, zlib.error) as error:
        raise SampleSkipped(CORRUPT_IMAGE, f"truncated or corrupt: {error}") from None
    except Exception as error:  # any other decoder failure costs this image only
        raise SampleSkipped(OTHER_ERROR, f"{type(error).__name__}: {error}") from None
    return ConvertedImage(buffer.getvalue(), rgb.width, rgb.height, *upright_size)


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check at our limit (its error fires at twice the limit; our own check covers the rest)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous

