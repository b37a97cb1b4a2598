"""images.load_image: what users upload, and what must be refused with a clear reason."""

from __future__ import annotations

import struct
import zlib

import pytest
from conftest import encode, make_image
from PIL import Image

from glm4v_bento.images import ImageError, ImageLimits, load_image

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, max_aspect_ratio=200, min_side=28)


def refused(data: bytes, limits: ImageLimits = LIMITS) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(data, limits)
    return info.value


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {})],
)
def test_supported_formats_decode_to_rgb(fmt, kwargs):
    image = load_image(encode(make_image(64, 40), fmt, **kwargs), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (64, 40)


def test_zero_bytes():
    error = refused(b"")
    assert error.reason == "empty"
    assert "0 bytes" in str(error)


def test_not_an_image():
    error = refused(b"%PDF-1.4 this is a document, not a picture")
    assert error.reason == "unsupported_format"
    assert "JPEG" in str(error)  # the message lists what is supported


def test_corrupt_bytes_after_a_valid_header():
    data = bytearray(encode(make_image(64, 64), "PNG"))
    data[60:] = b"\x00" * (len(data) - 60)
    assert refused(bytes(data)).reason == "corrupt"


def test_truncated_jpeg():
    data = encode(make_image(128, 128), "JPEG", quality=95)
    assert refused(data[: len(data) // 2]).reason == "corrupt"


def test_truncated_png_header():
    data = encode(make_image(16, 16), "PNG")
    assert refused(data[:20]).reason in {"corrupt", "unsupported_format"}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (wrong) image data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    data = _png_header_only(60000, 60000)
    assert len(data) < 100  # tiny file, 3.6 billion claimed pixels
    error = refused(data)
    assert error.reason == "too_many_pixels"
    assert "4,000,000" in str(error)


def test_pixel_limit_names_the_size():
    error = refused(encode(make_image(3000, 2000), "PNG"))
    assert error.reason == "too_many_pixels"
    assert "3000x2000" in str(error)


def test_byte_limit():
    limits = ImageLimits(max_bytes=1000, max_pixels=4_000_000, max_aspect_ratio=200, min_side=28)
    error = refused(encode(make_image(200, 200), "PNG"), limits)
    assert error.reason == "too_many_bytes"
    assert "1,000 bytes" in str(error)


def test_extreme_aspect_ratio():
    error = refused(encode(make_image(2000, 2), "PNG"))
    assert error.reason == "aspect_ratio"
    assert "1000:1" in str(error) and "200:1" in str(error)


def test_one_pixel_image_is_upscaled_to_the_model_minimum():
    image = load_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), LIMITS)
    assert image.size == (28, 28)
    assert image.getpixel((14, 14)) == (10, 20, 30)


def test_narrow_image_keeps_its_aspect_when_upscaled():
    image = load_image(encode(make_image(10, 100), "PNG"), LIMITS)
    assert image.size == (28, 280)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(encode(cmyk, "JPEG", quality=95), LIMITS)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((20, 20))
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_greyscale_png_keeps_its_contrast():
    grey = Image.new("I;16", (40, 40), 0)
    for x in range(20, 40):
        for y in range(40):
            grey.putpixel((x, y), 65535)
    image = load_image(encode(grey, "PNG"), LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (0, 0, 0)
    assert image.getpixel((30, 5)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (40, 40), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = load_image(data, LIMITS)
    red, green, blue = image.getpixel((20, 20))
    assert red > 200 and green < 50 and blue < 50


def test_transparent_png_is_flattened_on_white():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    image = load_image(encode(rgba, "PNG"), LIMITS)
    assert image.getpixel((20, 20)) == (255, 255, 255)


def test_palette_image_with_transparency():
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    image = load_image(encode(palette, "PNG", transparency=0), LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    wide = make_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load_image(encode(wide, "JPEG", exif=exif.tobytes()), LIMITS)
    assert image.size == (30, 60)


def test_defaults_come_from_settings(monkeypatch):
    from glm4v_bento.config import Settings

    limits = ImageLimits.from_settings(Settings(max_image_bytes=123))
    assert limits.max_bytes == 123
    assert limits.min_side == 28
