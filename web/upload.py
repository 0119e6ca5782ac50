"""Check an upload without decoding its pixels: magic bytes, header, pixel count, truncation.

Only the header is parsed (Pillow's lazy ``open``), so a 12 MP JPEG costs microseconds here; the
worker decodes. Each refusal raises an error from shared.errors with a stable code.
"""
from __future__ import annotations

import dataclasses
import io
import struct
import warnings

from PIL import Image

from shared.errors import CorruptImage, EmptyImage, TooManyPixels, UnsupportedImage

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says: format and upright size."""

    format: str
    width: int
    height: int

    def to_dict(self, sha256: str) -> dict:
        return {"sha256": sha256, "format": self.format, "width": self.width, "height": self.height}


def sniff(data: bytes) -> str | None:
    """Return the image format named by the file's magic bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    for marker, name in ((b"%pdf", "a PDF document"), (b"<svg", "an SVG drawing"),
                         (b"<?xml", "an XML document"), (b"<!doctype html", "an HTML page"),
                         (b"<html", "an HTML page"), (b"pk\x03\x04", "a ZIP archive")):
        if head.startswith(marker) or (marker == b"<svg" and marker in head):
            return name
    return "not a supported image"


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Return the upload's format and upright size, or raise why it cannot be accepted."""
    if not data:
        raise EmptyImage("The upload is empty (zero bytes).")
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedImage(f"The upload is {_describe_non_image(data)}; "
                               f"send one of {', '.join(FORMATS)}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise TooManyPixels(f"The image is {width}x{height} ({width * height} pixels); "
                                    f"the limit is {max_pixels} pixels.")
            orientation = _orientation(image)
            _check_complete(fmt, data, image)
    except (TooManyPixels, CorruptImage):
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise TooManyPixels(f"The image declares too many pixels: {exc}") from exc
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError) as exc:
        raise CorruptImage(f"The {fmt} header could not be read: {exc}") from exc
    if width < 1 or height < 1:
        raise CorruptImage(f"The image declares an empty size {width}x{height}.")
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(fmt, width, height)


def _orientation(image: Image.Image) -> int | None:
    """Return the EXIF orientation tag without decoding pixels (PNG's getexif() would load them)."""
    if image.format in ("JPEG", "TIFF"):
        return image.getexif().get(_ORIENTATION)
    raw = image.info.get("exif")
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(_ORIENTATION)


def _check_complete(fmt: str, data: bytes, image: Image.Image) -> None:
    """Raise CorruptImage when the file visibly ends early (cheap checks, no pixel decoding)."""
    if fmt == "JPEG":
        # Entropy-coded data never holds FF D9 (FF is byte-stuffed), so the end-of-image marker
        # after the last start-of-scan proves the scan data is all there. Searched from the ends
        # (the last EOI, no SOS after it, an SOS before it), not through the scan data: the same answer.
        last_end = data.rfind(b"\xff\xd9")
        if last_end < 0 or data.find(b"\xff\xda", last_end) >= 0 or data.find(b"\xff\xda", 0, last_end) < 0:
            raise CorruptImage("The JPEG is truncated: its scan data has no end-of-image marker.")
    elif fmt == "PNG":
        try:
            image.verify()  # walks chunks and checks CRCs; does not inflate pixel data
        except Exception as exc:  # Pillow raises a zoo of types here
            raise CorruptImage(f"The PNG is damaged or truncated: {exc}") from exc
        if b"IEND" not in data[-32:]:
            raise CorruptImage("The PNG is truncated: it has no IEND chunk.")
    elif fmt == "GIF":
        if not data.rstrip(b"\x00").endswith(b";"):
            raise CorruptImage("The GIF is truncated: it has no trailer.")
    elif fmt == "WEBP":
        declared = struct.unpack("<I", data[4:8])[0] + 8
        if declared > len(data):
            raise CorruptImage(f"The WebP is truncated: {len(data)} of {declared} bytes.")
