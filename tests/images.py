"""Real photos and generated odd, hostile or broken images for the tests."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from skimage import data as skdata


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def chelsea() -> Image.Image:
    """Chelsea the cat (skimage), 451x300 RGB."""
    return Image.fromarray(skdata.chelsea())


def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())


def chelsea_jpeg() -> bytes:
    return encode(chelsea(), "JPEG", quality=92)


def noise_png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A distinct small PNG per seed (a fresh cache key for every test that needs one)."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), "PNG")


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    """Store ``image`` rotated so that EXIF ``orientation`` is needed to show it upright.

    Orientation 6 means "rotate 90 degrees clockwise to view", so the stored pixels are the
    upright picture turned 90 degrees counter-clockwise.
    """
    stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_with_corrupt_pixels() -> bytes:
    """A PNG whose chunks and CRCs are intact but whose compressed pixel data is garbage.

    It passes every header check, so only the worker's decode can find the fault.
    """
    good = encode(Image.new("RGB", (32, 32), (200, 10, 10)), "PNG")
    pos = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[pos:pos + 4])[0]
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    return good[:pos + 8] + garbage + crc + good[pos + 12 + length:]


def cmyk_jpeg() -> bytes:
    return encode(chelsea().convert("CMYK"), "JPEG", quality=90)


def png16() -> bytes:
    gray = np.asarray(chelsea().convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


def animated_gif() -> bytes:
    frames = [chelsea().convert("P"), coffee().resize((451, 300)).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def odd_valid_images() -> dict[str, bytes]:
    """Unusual but valid images that must all be classified."""
    cat = chelsea()
    rgba = cat.convert("RGBA")
    rgba.putalpha(200)
    return {
        "grayscale": encode(cat.convert("L"), "PNG"),
        "rgba": encode(rgba, "PNG"),
        "palette": encode(cat.convert("P"), "PNG"),
        "cmyk_jpeg": cmyk_jpeg(),
        "png_16bit": png16(),
        "exif_rotated": exif_rotated_jpeg(cat),
        "animated_gif": animated_gif(),
        "webp": encode(cat, "WEBP"),
        "bmp": encode(cat, "BMP"),
        "tiny_1x1": encode(Image.new("RGB", (1, 1), (120, 80, 60)), "PNG"),
        "strip_2000x10": encode(Image.new("RGB", (2000, 10), (30, 90, 200)), "PNG"),
    }


def bad_uploads() -> dict[str, tuple[bytes, int, str]]:
    """Uploads that must be refused: name -> (bytes, HTTP status, error code)."""
    jpeg = chelsea_jpeg()
    png = encode(chelsea(), "PNG")
    return {
        "zero_bytes": (b"", 400, "empty_image"),
        "plain_text": (b"hello, this is not an image\n", 415, "unsupported_image"),
        "html_as_jpg": (b"<!DOCTYPE html><html><body>hi</body></html>", 415, "unsupported_image"),
        "svg_as_jpg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', 415,
                       "unsupported_image"),
        "pdf_as_jpg": (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n%%EOF\n", 415, "unsupported_image"),
        "zip_as_jpg": (b"PK\x03\x04" + b"\x00" * 40, 415, "unsupported_image"),
        "random_bytes": (np.random.default_rng(7).bytes(4096), 415, "unsupported_image"),
        "jpeg_magic_only": (b"\xff\xd8\xff", 400, "corrupt_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], 400, "corrupt_image"),
        "truncated_png": (png[: len(png) // 2], 400, "corrupt_image"),
        "truncated_png_header": (png[:20], 400, "corrupt_image"),
        "png_bomb_30000x30000": (png_declaring(30000, 30000), 413, "too_many_pixels"),
    }
