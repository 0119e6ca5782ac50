"""In-process measurements: raw model limit, GradCAM cost, decode + preprocess."""
from __future__ import annotations

import copy
import io
import time

import numpy as np
import torch
from PIL import Image

from worker.gradcam import forward_with_cam
from worker.imaging import decode, preprocess
from worker.models import LoadedModel


def timed(fn, min_seconds: float = 1.0, min_runs: int = 5, warmup: int = 2) -> list[float]:
    """Run ``fn`` until both bounds are met; return each run's seconds."""
    for _ in range(warmup):
        fn()
    runs, start = [], time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
        if len(runs) >= 500:
            break
    return runs


def model_limit(model: LoadedModel, batches=(1, 2, 4, 8, 16)) -> dict:
    """Raw forward throughput (images/s) by memory format and batch size, plain torch loop."""
    size = model.card.input_size
    table = {}
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model.network.to(memory_format=fmt)
        for batch in batches:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)

            def forward():
                with torch.inference_mode():
                    model.network(x)

            runs = timed(forward, min_seconds=0.8)
            table[f"{name}/b{batch}"] = batch / float(np.median(runs))
    model.network.to(memory_format=torch.channels_last)
    best = max(table, key=table.get)
    return {"images_per_s": table, "best": best, "limit_images_per_s": table[best]}


def gradcam_cost(model: LoadedModel) -> dict:
    """Forward+GradCAM time over forward time at batch 1: ours and pytorch-grad-cam's."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    size = model.card.input_size
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            model.network(x)

    forward_s = float(np.median(timed(forward)))
    ours_s = float(np.median(timed(lambda: forward_with_cam(model.network, model.target_layer, x))))
    reference = copy.deepcopy(model.network).requires_grad_(True)
    cam = GradCAM(model=reference, target_layers=[reference.get_submodule(model.card.gradcam_layer)])
    theirs_s = float(np.median(timed(lambda: cam(input_tensor=x, targets=[ClassifierOutputTarget(1)]))))
    cam.activations_and_grads.release()
    return {"forward_ms": forward_s * 1000, "ours_ms": ours_s * 1000, "pytorch_grad_cam_ms": theirs_s * 1000,
            "ours_ratio": ours_s / forward_s, "pytorch_grad_cam_ratio": theirs_s / forward_s,
            "single_image_ms": ours_s * 1000}


def decode_cost(model: LoadedModel, photo: Image.Image) -> dict:
    """Decode + preprocess of a 12 MP JPEG: ours (draft, reducing gap) vs full decode + resize."""
    big = photo.resize((4000, 3000), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    big.save(out, "JPEG", quality=90)
    data = out.getvalue()
    card = model.card

    def ours():
        preprocess(decode(data, min_short_side=card.resize, max_pixels=10**9).image, card)

    def plain():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = image.size
        scale = card.resize / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - card.input_size) // 2, (image.height - card.input_size) // 2
        np.asarray(image.crop((left, top, left + card.input_size, top + card.input_size)), dtype=np.float32)

    ours_ms = float(np.median(timed(ours, min_runs=10))) * 1000
    plain_ms = float(np.median(timed(plain, min_runs=5))) * 1000
    return {"jpeg_bytes": len(data), "ours_ms": ours_ms, "plain_ms": plain_ms, "speedup": plain_ms / ours_ms}


def gpu_precision(model: LoadedModel, batches=(1, 8, 32, 64, 128, 256)) -> dict:
    """On CUDA: forward throughput in fp32 and under autocast fp16/bf16 at several batch sizes."""
    from worker.inference import AMP_DTYPES

    size = model.card.input_size
    table = {}
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=model.device).contiguous(memory_format=torch.channels_last)
        for name in ("fp32", *AMP_DTYPES):
            def forward():
                with torch.inference_mode(), torch.autocast("cuda", dtype=AMP_DTYPES.get(name, torch.float16),
                                                            enabled=name != "fp32"):
                    model.network(x)
                torch.cuda.synchronize(model.device)

            table[f"{name}/b{batch}"] = batch / float(np.median(timed(forward, min_seconds=0.5)))
    return {"images_per_s": table, "device": torch.cuda.get_device_name(model.device)}
