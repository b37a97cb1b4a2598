"""Turn uploaded bytes into an RGB image the model can take, or say clearly why not.

Every limit is checked as early as possible: the byte size before parsing, the pixel
count from the header before decoding (a small file can claim billions of pixels).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from glm4v_bento.config import Settings, get_settings

SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
_FORMAT_NAMES = "JPEG, PNG, WEBP, GIF, BMP, TIFF"


class ImageError(ValueError):
    """An image the service refuses. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float
    min_side: int

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> ImageLimits:
        s = settings or get_settings()
        return cls(s.max_image_bytes, s.max_image_pixels, s.max_aspect_ratio, s.min_image_side)


@dataclass(frozen=True)
class CheckedImage:
    """An upload both as sent (its bytes key the result cache) and decoded (what the model takes)."""

    data: bytes
    image: Image.Image


def check_image(data: bytes, limits: ImageLimits | None = None) -> CheckedImage:
    """``load_image``, keeping the bytes it came from."""
    return CheckedImage(data, load_image(data, limits))


def load_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Decode ``data`` into an RGB ``PIL.Image`` within ``limits``; raise ``ImageError`` otherwise."""
    limits = limits or ImageLimits.from_settings()
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes were received)")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "too_many_bytes",
            f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes",
        )
    image = _open(data, limits)
    _check_geometry(image.size, limits)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt", f"the image data is corrupt or truncated ({exc})") from None
    image = _to_rgb(ImageOps.exif_transpose(image))
    return _upscale_small(image, limits.min_side)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, limits) from None
    except UnidentifiedImageError:
        looks_like = _claimed_format(data)
        if looks_like:
            raise ImageError(
                "corrupt", f"the data starts like a {looks_like} image but cannot be read (corrupt or truncated)"
            ) from None
        raise ImageError(
            "unsupported_format", f"the data is not an image in a supported format ({_FORMAT_NAMES})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt", f"the image header is corrupt ({exc})") from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageError("unsupported_format", f"{image.format} images are not supported (supported: {_FORMAT_NAMES})")
    return image


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _claimed_format(data: bytes) -> str | None:
    """The format the first bytes announce, if any (to tell corrupt files from other files)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)


def _too_many_pixels(size: tuple[int, int] | None, limits: ImageLimits) -> ImageError:
    claimed = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "more pixels"
    return ImageError("too_many_pixels", f"the image has {claimed}; the limit is {limits.max_pixels:,} pixels")


def _check_geometry(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError("corrupt", f"the image claims an impossible size of {width}x{height}")
    if width * height > limits.max_pixels:
        raise _too_many_pixels(size, limits)
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(
            "aspect_ratio",
            f"the image is {width}x{height}, an aspect ratio of {ratio:.0f}:1; "
            f"the limit is {limits.max_aspect_ratio:.0f}:1",
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (palette, alpha, CMYK, 16-bit, float) to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grey: scale the range down to 8 bits instead of clipping it.
        image = image.convert("I") if mode.startswith("I;16") else image
        low, high = image.getextrema()
        span = max(high - low, 1)
        image = image.point(lambda v: (v - low) * 255 / span).convert("L")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Flatten transparency onto white, as a viewer would show it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _upscale_small(image: Image.Image, min_side: int) -> Image.Image:
    width, height = image.size
    shortest = min(width, height)
    if shortest >= min_side:
        return image
    scale = min_side / shortest
    new_size = (max(min_side, round(width * scale)), max(min_side, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)
