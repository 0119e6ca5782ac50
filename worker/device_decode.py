"""Decode and preprocess a batch on the model's device: nvJPEG for JPEGs, Pillow for the rest.

On a GPU the CPU's two heaviest steps per image, JPEG decoding (1.1 ms for 640x480) and resizing
(0.8 ms), move to the device: the batch's baseline RGB and greyscale JPEGs are decoded in one
``torchvision.io.decode_jpeg(list, device="cuda")`` call (nvJPEG's batched decoder), then resized,
cropped and normalised as tensors where they already are. Everything else (PNG, GIF, WebP, BMP,
TIFF, CMYK JPEGs, and any JPEG nvJPEG refuses) takes the CPU path of ``shared.pictures.decode``,
image by image, with its EXIF and colour rules, and joins the batch as an 8-bit tensor, so one bad
image fails alone. EXIF orientation is read from the header (Pillow, without decoding pixels) and
applied on the device: torchvision applies it only when decoding on the CPU.

On a GPU all of it runs on the stage thread's own CUDA stream (worker.streams): nvJPEG writes from
a stream of its own, so that stream is synchronised before each decode call, and the batch is
handed to the compute stream with an event. Only complete, baseline JPEGs go to nvJPEG: one
without its end-of-image marker (truncated) may decode to grey there instead of failing, and
progressive ones are decoded one at a time under a global lock, slower than Pillow's reduced
(draft) decode; both take the CPU path. The resize weights are made on the device, in full fp32
(TF32 would move pixels by a level: worker.devices turns it off), and kept per size.

The same code runs with ``device=cpu`` (torchvision's libjpeg-turbo decoder); that is how the tests
run it on machines without a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from shared.cards import ModelCard
from shared.errors import DecodeFailed
from shared.pictures import ALLOWED_FORMATS, decode
from worker.imaging import normalise_on_device
from worker.streams import DeviceInput, mark_ready, on_stream, settle

_ORIENTATION = 0x0112
_DEVICE_JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as Pillow would; CMYK/YCCK go to Pillow
BAND_PIXELS = 1 << 20  # source pixels converted to float at once while resizing (12 MiB)
_EOI = b"\xff\xd9"
_TAIL = 1024  # how far from the end an end-of-image marker may sit (padding after it is allowed)


@dataclasses.dataclass
class DeviceBatch:
    """A batch decoded and preprocessed on the device, and what could not be."""

    tensor: torch.Tensor | None  # N_ok x 3 x S x S float32, normalised, channels_last, on the device
    rows: list[int]  # for each row of tensor, the index of its item in the input
    crop_boxes: list[tuple[float, float, float, float]]  # per row: left, top, right, bottom (fractions)
    sizes: list[tuple[int, int]]  # per row: upright (width, height) as decoded
    failures: dict[int, DecodeFailed]  # item index -> why it could not be decoded
    fallbacks: int  # items decoded on the CPU (Pillow) rather than by the device's JPEG decoder
    ready: "torch.cuda.Event | None" = None  # recorded on the stage stream once ``tensor`` is complete

    def handover(self) -> DeviceInput | None:
        """The batch for the compute thread: it waits for ``ready`` on the device, not on the host."""
        return None if self.tensor is None else DeviceInput(self.tensor, self.ready)


@dataclasses.dataclass(frozen=True)
class _Header:
    format: str
    mode: str
    orientation: int
    pixels: int
    progressive: bool = False
    complete: bool = True  # ends with an end-of-image marker (JPEG)

    @property
    def for_device_decoder(self) -> bool:
        """Whether nvJPEG gets it: a complete baseline RGB or greyscale JPEG (the rest take Pillow)."""
        return self.format == "JPEG" and self.mode in _DEVICE_JPEG_MODES and self.complete and not self.progressive


def decode_batch(datas: list[bytes], card: ModelCard, device: torch.device, *, max_pixels: int,
                 budget=None, stream: "torch.cuda.Stream | None" = None) -> DeviceBatch:
    """Decode, orient, resize, crop and normalise ``datas`` for ``card`` on ``device``.

    Full-size pictures live only until they are cropped: JPEGs are decoded in batched calls of
    no more pixels together than ``budget`` (a worker.pipeline.PixelBudget) allows, every other
    picture one at a time, and each is reduced to its crop before the next call. On a GPU,
    ``stream`` is the calling thread's own stream: every device operation here runs on it.
    """
    with on_stream(stream):
        batch = _decode_batch(datas, card, device, max_pixels, budget, stream)
        batch.ready = mark_ready(stream)
    return batch


def _decode_batch(datas, card, device, max_pixels, budget, stream) -> DeviceBatch:
    from worker.pipeline import UNBOUNDED

    budget = budget or UNBOUNDED
    failures: dict[int, DecodeFailed] = {}
    headers: dict[int, _Header] = {}
    for index, data in enumerate(datas):
        try:
            headers[index] = _read_header(data, max_pixels)
        except DecodeFailed as exc:
            failures[index] = exc
    crops, boxes, sizes = {}, {}, {}

    def keep(index: int, image: torch.Tensor) -> None:
        crops[index], boxes[index] = _resize_and_crop(image, card)
        sizes[index] = (image.shape[2], image.shape[1])

    jpegs = [i for i, h in headers.items() if h.for_device_decoder]
    for chunk in _chunks(jpegs, headers, budget.limit):
        with budget.hold(sum(headers[i].pixels for i in chunk)):
            for index, image in _decode_jpegs(datas, chunk, headers, device, stream).items():
                keep(index, image)
    fallbacks = [i for i in headers if i not in crops]
    for index in fallbacks:
        try:
            with budget.hold(headers[index].pixels):
                keep(index, _decode_on_cpu(datas[index], card, max_pixels).to(device, non_blocking=True))
        except DecodeFailed as exc:
            failures[index] = exc
    rows = sorted(crops)
    return DeviceBatch(
        tensor=_normalise([crops[i] for i in rows], card) if rows else None, rows=rows,
        crop_boxes=[boxes[i] for i in rows], sizes=[sizes[i] for i in rows], failures=failures,
        fallbacks=len(fallbacks))


def _chunks(indices: list[int], headers: dict[int, "_Header"], limit: int) -> list[list[int]]:
    """Split ``indices`` in order into runs of at most ``limit`` pixels (a bigger picture runs alone)."""
    chunks, pixels = [], limit + 1
    for index in indices:
        if pixels + headers[index].pixels > limit:
            chunks.append([])
            pixels = 0
        chunks[-1].append(index)
        pixels += headers[index].pixels
    return chunks


def _read_header(data: bytes, max_pixels: int) -> _Header:
    """The format, mode and EXIF orientation from the header alone; refuse what the CPU path refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            jpeg = image.format == "JPEG"
            orientation = image.getexif().get(_ORIENTATION, 1) if jpeg else 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        raise DecodeFailed(f"The image could not be decoded: {exc}") from exc
    if width * height > max_pixels:
        raise DecodeFailed(f"The image has {width * height} pixels; the limit is {max_pixels}.")
    return _Header(image.format, image.mode, orientation if orientation in range(1, 9) else 1, width * height,
                   progressive=jpeg and bool(image.info.get("progressive")),
                   complete=not jpeg or _ends_with_eoi(data))


def _ends_with_eoi(data: bytes) -> bool:
    """Whether a JPEG stream ends with its end-of-image marker (NUL or whitespace padding after it allowed)."""
    return data[-_TAIL:].rstrip(b"\x00\r\n ").endswith(_EOI)


def _decode_jpegs(datas: list[bytes], indices: list[int], headers: dict[int, _Header],
                  device: torch.device, stream=None) -> dict[int, torch.Tensor]:
    """Decode JPEGs in one batched call; on an error, one by one (the rest go to the CPU path)."""
    if not indices:
        return {}
    encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in indices]
    try:
        decoded = _decode_jpeg(encoded, device, stream)
    except RuntimeError as exc:  # the batched call gives nothing when one image is bad: find which
        _reraise_device_fault(exc)
        decoded = []
        for tensor in encoded:
            try:
                decoded.append(_decode_jpeg([tensor], device, stream)[0])
            except RuntimeError as one:
                _reraise_device_fault(one)
                decoded.append(None)
    return {i: _orient(image, headers[i].orientation) for i, image in zip(indices, decoded) if image is not None}


def _reraise_device_fault(exc: RuntimeError) -> None:
    """A bad stream is the image's fault; a broken device or no memory is not, and must not look like it."""
    from worker.devices import is_fatal

    if is_fatal(exc) or isinstance(exc, torch.OutOfMemoryError):
        raise exc


def _decode_jpeg(encoded: list[torch.Tensor], device: torch.device, stream=None) -> list[torch.Tensor]:
    # nvJPEG writes its outputs from a stream of its own, without waiting for ours: nothing this
    # thread queued (whose freed blocks the allocator may hand the decoder) may still be running.
    settle(stream)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which the pinned
        # stack does not ship yet; the decoder itself is unchanged.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a 3 x H x W tensor, as PIL.ImageOps.exif_transpose does."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 2)  # 5: transpose; 6, 7, 8 build on it
    if orientation in (2, 3, 6, 7):
        image = image.flip(2)  # horizontal: 2 mirrors; 6 = transpose + mirror (rotate 90 clockwise)
    if orientation in (3, 4, 7, 8):
        image = image.flip(1)  # vertical: 4 flips; 3 = both (180); 8 = transpose + flip (90 counter-clockwise)
    return image


def _decode_on_cpu(data: bytes, card: ModelCard, max_pixels: int) -> torch.Tensor:
    """The CPU path's upright RGB picture (EXIF, every mode, transparency) as a 3 x H x W uint8 tensor."""
    picture = decode(data, min_short_side=card.resize, max_pixels=max_pixels).image
    tensor = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def _resize_and_crop(image: torch.Tensor, card: ModelCard) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Resize the shorter side to ``card.resize`` and centre-crop ``card.input_size``, resampling
    only the crop, exactly as ``worker.imaging.preprocess`` does with Pillow (bilinear with a box
    and ``reducing_gap=3``): the same weights, as two matrix products on the device. Return the
    8-bit crop (S x S x 3) and where it sits as fractions of the image."""
    height, width = image.shape[1:]
    side = card.input_size * min(width, height) / card.resize  # the crop, in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    box = (left / width, top / height, (left + side) / width, (top + side) / height)
    factor = max(1, int(side / card.input_size / 3.0))  # Pillow's reducing_gap=3: box-average first
    left, top, side = left / factor, top / factor, side / factor
    across = _pillow_weights(-(-width // factor), card.input_size, left, left + side, image.device)
    # A band of rows at a time (a whole number of pooling windows): the full-size picture is never
    # held in float, which would take four times its 8-bit bytes.
    step = factor * max(1, BAND_PIXELS // (factor * width))
    rows = torch.cat([_rows_across(image[:, start:start + step], factor, across)
                      for start in range(0, height, step)], dim=1)
    down = _pillow_weights(rows.shape[1], card.input_size, top, top + side, image.device)
    crop = (down @ rows).round_().clamp_(0, 255)
    return crop.to(torch.uint8).permute(1, 2, 0), box


def _rows_across(band: torch.Tensor, factor: int, across: torch.Tensor) -> torch.Tensor:
    """Box-average a band of rows by ``factor``, then resample each row across (8-bit, as Pillow)."""
    pixels = band.float()
    if factor > 1:
        pixels = F.avg_pool2d(pixels[None], factor, ceil_mode=True, count_include_pad=False)[0]
    return (pixels @ across.T).round_().clamp_(0, 255)  # Pillow keeps an 8-bit image between passes


@functools.lru_cache(maxsize=256)
def _pillow_weights(in_size: int, out_size: int, start: float, end: float, device: torch.device) -> torch.Tensor:
    """Pillow's bilinear resampling weights (out_size x in_size) for the source span [start, end).

    Made where they are used (no copy from host memory, which would wait for the device), and
    kept: photos of one camera share their sizes. Only the stage thread's stream uses them.
    """
    scale = (end - start) / out_size
    support = max(scale, 1.0)  # the triangle filter widens when shrinking (antialiasing)
    centres = start + (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale
    sources = torch.arange(in_size, dtype=torch.float64, device=device)
    weights = (1 - ((sources[None, :] - centres[:, None] + 0.5) / support).abs()).clamp_min(0)
    low = (centres - support + 0.5).floor().clamp_min(0)
    high = (centres + support + 0.5).floor().clamp_max(in_size)
    weights *= (sources[None, :] >= low[:, None]) & (sources[None, :] < high[:, None])
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def _normalise(crops: list[torch.Tensor], card: ModelCard) -> torch.Tensor:
    """The batch as the model takes it, normalised like the CPU path's, where the crops are."""
    return normalise_on_device(torch.stack(crops).permute(0, 3, 1, 2), card)  # NHWC seen as NCHW: channels_last


def warm(card: ModelCard, device: torch.device, stream=None) -> None:
    """Decode one small JPEG as a batch would (nvJPEG's handles and buffers are made on first use)."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 80, 40)).save(out, "JPEG")
    decode_batch([out.getvalue()], card, device, max_pixels=1 << 20, stream=stream)
