"""Milliseconds per image for worker.device_decode.decode_batch against the Pillow path.

Run: python -m bench.device_decode [cpu|cuda]
"""
from __future__ import annotations

import io
import sys
import time

import torch
from PIL import Image
from skimage import data as skdata

from shared.cards import load_card
from shared.settings import REPO_ROOT
from worker import imaging
from worker.device_decode import decode_batch

MAX_PIXELS = 50_000_000


def _photo_jpegs(count: int) -> list[bytes]:
    """Return ``count`` real photos as JPEGs (chelsea, coffee, astronaut in turn)."""
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut()]
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(photos[i % len(photos)]).save(buffer, format="JPEG", quality=92)
        out.append(buffer.getvalue())
    return out


def _ms_per_image(run, datas: list[bytes], device: torch.device, repeats: int) -> float:
    """Time ``run(datas)`` after one warm-up call; return milliseconds per image."""
    run(datas)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run(datas)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / (repeats * len(datas))


def bench(device: torch.device, batches=(1, 8, 32), repeats: int = 5) -> list[tuple[int, float, float]]:
    """Return (batch, device path ms/img, Pillow path ms/img) for each batch size."""
    card = load_card(REPO_ROOT / "models/efficientnet-lite0.toml")

    def device_path(datas):
        return decode_batch(datas, card, device, max_pixels=MAX_PIXELS).tensor

    def pillow_path(datas):
        prepared = [imaging.preprocess(imaging.decode(d, min_short_side=card.resize, max_pixels=MAX_PIXELS).image,
                                       card).tensor for d in datas]
        return torch.stack(prepared).to(device)

    rows = []
    for batch in batches:
        datas = _photo_jpegs(batch)
        rows.append((batch, _ms_per_image(device_path, datas, device, repeats),
                     _ms_per_image(pillow_path, datas, device, repeats)))
    return rows


def main() -> None:
    """Print the table for the device named on the command line (default cpu)."""
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    print("batch  decode_batch ms/img  pillow ms/img")
    for batch, ours, pillow in bench(device):
        print(f"{batch:5d}  {ours:19.2f}  {pillow:13.2f}")


if __name__ == "__main__":
    main()
