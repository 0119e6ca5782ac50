"""A corpus of hostile and odd uploads with the answer each must get.

``python -m tests.corpus DIR`` writes the files to DIR (to try them by hand with curl); the tests
use ``CORPUS`` directly. Each entry: name -> (bytes, expected), where expected is
``("refused", http_status, code)``, ``("done",)`` or ``("failed", code)``.
"""
from __future__ import annotations

import io
import struct
import sys
import zipfile
from pathlib import Path

from PIL import Image

from tests import images


def _zip_bytes() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("payload.txt", "hello from inside the zip")
    return out.getvalue()


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame declare ``width`` x ``height``."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF header is rewritten to declare ``width`` x ``height``."""
    data = bytearray(images.encode(Image.new("RGB", (16, 16), (10, 200, 10)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A WebP whose VP8X canvas declares ``width`` x ``height`` (24-bit minus-one fields)."""
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def huge_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: ~60 KB of metadata
    return images.encode(images.chelsea(), "JPEG", quality=85, exif=exif.tobytes())


def png_with_bad_crc() -> bytes:
    data = bytearray(images.encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG"))
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    return bytes(data)


def _build() -> dict[str, tuple[bytes, tuple]]:
    jpeg, gif, webp = images.chelsea_jpeg(), images.animated_gif(), images.encode(images.chelsea(), "WEBP")
    bmp = images.encode(images.chelsea(), "BMP")
    corpus = {name: (data, ("refused", status, code))
              for name, (data, status, code) in images.bad_uploads().items()}
    corpus.update({name: (data, ("done",)) for name, data in images.odd_valid_images().items()})
    corpus.update({
        "polyglot_jpeg_then_zip": (jpeg + _zip_bytes(), ("done",)),
        "zip_then_jpeg": (_zip_bytes() + jpeg, ("refused", 415, "unsupported_image")),
        "gifar_javascript": (b"GIF89a/*\x00\x00*/=alert(1);", ("refused", 400, "corrupt_image")),
        "gif_bomb_30000x30000": (gif_declaring(30000, 30000), ("refused", 413, "too_many_pixels")),
        "jpeg_bomb_30000x30000": (jpeg_declaring(30000, 30000), ("refused", 413, "too_many_pixels")),
        "webp_bomb_16383x16383": (webp_declaring(16383, 16383), ("refused", 413, "too_many_pixels")),
        "truncated_gif": (gif[: len(gif) // 2], ("refused", 400, "corrupt_image")),
        "truncated_webp": (webp[: len(webp) // 2], ("refused", 400, "corrupt_image")),
        "png_bad_crc": (png_with_bad_crc(), ("refused", 400, "corrupt_image")),
        "huge_exif_jpeg": (huge_exif_jpeg(), ("done",)),
        "strip_10000x10": (images.encode(Image.new("RGB", (10000, 10), (30, 90, 200)), "PNG"), ("done",)),
        "strip_10x10000": (images.encode(Image.new("L", (10, 10000), 128), "PNG"), ("done",)),
        "tiff": (images.encode(images.chelsea(), "TIFF"), ("done",)),
        "png_corrupt_pixel_data": (images.png_with_corrupt_pixels(), ("failed", "decode_failed")),
        "truncated_bmp_pixels": (bmp[: len(bmp) // 2], ("failed", "decode_failed")),
    })
    return corpus


CORPUS = _build()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    target.mkdir(parents=True, exist_ok=True)
    for name, (data, expected) in CORPUS.items():
        (target / f"{name}.jpg").write_bytes(data)
        print(f"{name}.jpg\t{len(data)} bytes\texpect {expected}")
