"""Image decoding, checking and resizing.

Images arrive as PIL images, as the ``{"bytes", "path"}`` dicts of the ``datasets`` Image feature,
as raw bytes or as file paths. Checking reads the header first (size, so a decompression bomb is
refused before its pixels are decoded) and then decodes once (corrupt data fails there).
"""

from __future__ import annotations

import math
import os
from io import BytesIO
from typing import Any

from PIL import Image, UnidentifiedImageError

# Refuse images above this many pixels before decoding them (8192 x 8192; PIL's own limit is ~89M).
MAX_IMAGE_PIXELS = 8192 * 8192
# Qwen's smart_resize raises above 200; nothing sensible reaches a VLM beyond it either.
MAX_ASPECT_RATIO = 200.0


class ImageProblem(Exception):
    """Why an image cannot be used; ``reason`` is a stable key counted by validation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``; transparency is composited on white (dropping alpha leaves garbage)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fitted_size(
    width: int, height: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """``(width, height)`` scaled to keep ``min_pixels <= w*h <= max_pixels`` with the aspect ratio kept.

    On the way down the short side is rounded up, so the aspect ratio never grows past the original
    one (Qwen refuses ratios above 200); ``None`` bounds are not enforced.
    """
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        long, short = max(width, height), min(width, height)
        new_long = max(1, math.floor(long * math.sqrt(max_pixels / pixels)))
        new_short = math.ceil(new_long * short / long)
        while new_long * new_short > max_pixels and new_long > 1:
            new_long -= 1
            new_short = math.ceil(new_long * short / long)
        return (new_long, new_short) if width >= height else (new_short, new_long)
    if min_pixels is not None and pixels < min_pixels:
        scale = math.sqrt(min_pixels / pixels)
        return math.ceil(width * scale), math.ceil(height * scale)
    return width, height


def fit_image(
    image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """``image`` in RGB, resized (aspect kept) into ``[min_pixels, max_pixels]``."""
    image = to_rgb(image)
    size = fitted_size(image.width, image.height, min_pixels, max_pixels)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def image_bytes(value: Any, base_dir: str | None = None) -> bytes:
    """The encoded bytes behind an image value (Image-feature dict, bytes or path).

    Raises ImageProblem ``empty_image`` or ``missing_image_file``.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    else:
        raise ImageProblem(
            "bad_image_value", f"expected image bytes, a path or a PIL image, got {type(value).__name__}"
        )
    if data is not None:
        if len(data) == 0:
            raise ImageProblem("empty_image", "the image bytes are empty")
        return bytes(data)
    if not path:
        raise ImageProblem("empty_image", "the image has neither bytes nor a path")
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    if not os.path.isfile(path):
        raise ImageProblem("missing_image_file", f"image file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ImageProblem("empty_image", f"the image file {path} is empty")
    return data


def check_image(
    value: Any,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    base_dir: str | None = None,
) -> tuple[int, int]:
    """Decode an image once and return its ``(width, height)``, or raise ImageProblem.

    Reasons: ``empty_image``, ``missing_image_file``, ``corrupt_image``, ``decompression_bomb``,
    ``extreme_aspect_ratio``. The size is checked from the header before any pixel is decoded.
    """
    if isinstance(value, Image.Image):
        width, height = value.size
        _check_size(width, height, max_image_pixels, max_aspect_ratio)
        return width, height
    data = image_bytes(value, base_dir)
    try:
        with Image.open(BytesIO(data)) as image:
            width, height = image.size
            _check_size(width, height, max_image_pixels, max_aspect_ratio)
            image.load()
    except Image.DecompressionBombError as e:
        raise ImageProblem("decompression_bomb", f"PIL refused it as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageProblem("corrupt_image", "the data is not an image format PIL can read") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports broken data through all of these, depending on the codec and where it breaks.
        raise ImageProblem("corrupt_image", f"the image cannot be decoded ({type(e).__name__}: {e})") from e
    return width, height


def _check_size(width: int, height: int, max_image_pixels: int, max_aspect_ratio: float) -> None:
    if width < 1 or height < 1:
        raise ImageProblem("corrupt_image", f"the image has size {width}x{height}")
    if width * height > max_image_pixels:
        raise ImageProblem(
            "decompression_bomb",
            f"the image is {width}x{height} = {width * height} pixels, above "
            f"max_image_pixels={max_image_pixels} (a possible decompression bomb)",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageProblem(
            "extreme_aspect_ratio",
            f"the image is {width}x{height}, aspect ratio {ratio:.0f} above {max_aspect_ratio:.0f} "
            f"(Qwen-VL's processor refuses it)",
        )


def decode_image(value: Any, base_dir: str | None = None) -> Image.Image:
    """A PIL image from any image value (already-decoded PIL images pass through)."""
    if isinstance(value, Image.Image):
        return value
    image = Image.open(BytesIO(image_bytes(value, base_dir)))
    image.load()
    return image
