"""The GPU path: correct before it is fast (issue 19).

Every part the CPU can run is run here on the CPU: padding to warmed shapes, running out of
memory, telling a broken device from a bad image, routing broken and progressive JPEGs, the
numerics settings, the parent's driver and CUDA_VISIBLE_DEVICES checks, and a child whose device
breaks. The ``cuda`` tests prove the rest on a GPU (`make gpu-check` runs them): the decode/compute
race of pytorch/vision#9606, AMP against fp32, TF32 kept out of the resize, out of memory for real,
a sticky CUDA error, broken JPEGs on nvJPEG.
"""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from shared.cards import load_card
from shared.keys import OutputOptions
from shared.settings import REPO_ROOT
from tests import images
from tests.conftest import submit, wait_done
from worker import devices
from worker.batching import BatchSizer
from worker.device_decode import decode_batch
from worker.device_plan import DevicePlanError, check_visible_devices, driver_problem, parse_gpus
from worker.forward import CUDA_SIZER_BATCHES, forward
from worker.inference import predict_batch
from worker.models import load_model
from worker.pipeline import compute, results, stage_all

CARD = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")
CPU = torch.device("cpu")
ONE_LEVEL = 1 / (255 * min(CARD.std)) + 1e-4  # one 8-bit step, in normalised units


@pytest.fixture(scope="module")
def lite0():
    return load_model(CARD, CPU)


def photos() -> list[bytes]:
    shots = [images.chelsea_jpeg(), images.encode(images.coffee(), "JPEG", quality=90)]
    shots += [images.encode(Image.fromarray(p), "JPEG", quality=90) for p in load_sample_images().images]
    return shots


def _inputs(model, shots: list[bytes]) -> torch.Tensor:
    staged, failures = stage_all([(data, OutputOptions()) for data in shots], model, 10**8)
    assert not failures
    from worker.imaging import normalised_batch

    return normalised_batch([s.prepared.pixels for s in staged], model.card, model.device)


# -- padding to warmed shapes (cuDNN autotuning) ---------------------------------------------------

def test_a_padded_batch_gives_every_real_image_the_same_answer_and_map(lite0):
    batch = _inputs(lite0, photos()[:3])
    alone = predict_batch(lite0, batch, gradcam=True)
    padded = predict_batch(lite0, batch, gradcam=True, pad_to=8)
    assert padded.probabilities.shape[0] == 3 and padded.cams.shape[0] == 3
    assert torch.equal(padded.cam_classes, alone.cam_classes)
    assert torch.allclose(padded.probabilities, alone.probabilities, atol=1e-5)
    assert torch.allclose(padded.cams, alone.cams, atol=1e-4)
    assert padded.inference_ms > 0 and padded.gradcam_ms > 0


@pytest.mark.parametrize("candidates, fixed, count, shape", [
    (CUDA_SIZER_BATCHES, False, 33, 64), (CUDA_SIZER_BATCHES, False, 1, 1), (CUDA_SIZER_BATCHES, False, 256, 256),
    ((12,), True, 10, 12), ((12,), True, 3, 4), ((12,), True, 12, 12),
])
def test_every_batch_runs_at_a_shape_the_child_warmed(candidates, fixed, count, shape):
    sizer = BatchSizer(candidates[0], candidates, fixed=fixed)
    assert sizer.padded(count) == shape and shape in sizer.shapes


# -- out of device memory -----------------------------------------------------------------------------

class _SmallDevice(torch.nn.Module):
    """The real network on a device with room for at most ``room`` images a pass (an edge fake)."""

    def __init__(self, network: torch.nn.Module, room: int):
        super().__init__()
        self.network, self.room, self.passes = network, room, []

    def forward(self, x):
        self.passes.append(x.shape[0])
        if x.shape[0] > self.room:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)


def test_out_of_memory_forbids_that_size_and_runs_the_images_in_halves(lite0):
    small = _SmallDevice(lite0.network, room=2)
    model = dataclasses.replace(lite0, network=small)
    shots = (photos() * 2)[:8]
    staged, _ = stage_all([(data, OutputOptions()) for data in shots], model, 10**8)
    sizer = BatchSizer(8, (1, 2, 4, 8, 16))
    parts = forward(model, staged, None, "float16", sizer)
    assert [len(part) for part, _ in parts] == [2, 2, 2, 2]  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    assert small.passes[:3] == [8, 4, 2]
    assert sizer.size == 2 and max(sizer.candidates) == 2  # never 4 or 8 again
    expected = results(lite0, staged, compute(lite0, staged, "float16"))
    got = [output for _, outputs in parts for output in outputs]
    for mine, theirs in zip(got, expected):
        assert mine.result["predictions"][0]["index"] == theirs.result["predictions"][0]["index"]
        assert mine.result["predictions"][0]["score"] == pytest.approx(theirs.result["predictions"][0]["score"], abs=1e-5)


def test_a_single_image_that_runs_out_of_memory_is_an_error_not_a_loop(lite0):
    model = dataclasses.replace(lite0, network=_SmallDevice(lite0.network, room=0))
    staged, _ = stage_all([(images.chelsea_jpeg(), OutputOptions())], model, 10**8)
    with pytest.raises(torch.OutOfMemoryError):
        forward(model, staged, None, "float16", BatchSizer(1, (1, 2)))


# -- a broken device ------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, fatal", [
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), False),
    (RuntimeError("Given groups=1, weight of size [32, 3, 3, 3], expected input to have 3 channels"), False),
    (RuntimeError("Not a JPEG file: starts with 0x89 0x50"), False),
    (ValueError("bad"), False),
])
def test_a_broken_device_is_told_from_a_bad_batch(exc, fatal):
    assert devices.is_fatal(exc) is fatal


@pytest.mark.integration
def test_a_child_whose_device_breaks_is_replaced_and_the_job_that_broke_it_fails_alone(worker, client):
    green = images.encode(Image.new("RGB", (80, 60), (0, 255, 0)), "PNG")
    breaker = submit(client, green, model="misbehaving")
    assert breaker.status_code == 202
    others = [submit(client, images.noise_png(seed=97_100 + i)).get_json()["id"] for i in range(4)]
    for job_id in others:
        job = wait_done(client, job_id)
        assert job["status"] == "done"  # other jobs keep flowing
    job = wait_done(client, breaker.get_json()["id"], timeout=240)
    # The child exited at each try (a broken device fails every later call), so the job that broke
    # it ends as a poison pill does: after MAX_ATTEMPTS, never as a plain inference failure.
    assert job["status"] == "failed" and job["error"]["code"] == "worker_crashed", job
    assert worker.poll() is None
    from tests.conftest import ARTIFACTS

    assert "fatal device error, this child exits" in (ARTIFACTS / "worker.log").read_text()
    fine = wait_done(client, submit(client, images.noise_png(seed=97_200), model="misbehaving").get_json()["id"])
    assert fine["status"] == "done"


# -- the device decode path's routing -------------------------------------------------------------

def test_a_jpeg_without_its_end_marker_never_reaches_the_device_decoder():
    cat = images.chelsea_jpeg()
    truncated = cat[: len(cat) * 3 // 4]
    padded = cat + b"\x00" * 300  # padding after the marker is fine
    batch = decode_batch([cat, truncated, padded], CARD, CPU, max_pixels=10**8)
    assert batch.rows == [0, 2] and batch.failures[1].code == "decode_failed"
    assert batch.fallbacks == 1  # only the truncated one went to the CPU path (which refuses it)


def test_a_progressive_jpeg_takes_the_cpu_path_and_gives_the_same_input():
    progressive = images.encode(images.coffee(), "JPEG", quality=90, progressive=True)
    baseline = images.encode(images.coffee(), "JPEG", quality=90)
    batch = decode_batch([progressive, baseline], CARD, CPU, max_pixels=10**8)
    assert batch.rows == [0, 1] and batch.fallbacks == 1
    assert (batch.tensor[0] - batch.tensor[1]).abs().max() <= 2 * ONE_LEVEL


def test_products_stay_full_fp32_on_every_device():
    devices.configure(CPU, torch.get_num_threads())
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


# -- the worker's main process: driver and CUDA_VISIBLE_DEVICES -----------------------------------

LISTING = "0, GPU-8f2a1c33-0000-1111-2222-333344445555, 535.104.05\n"


def test_a_driver_older_than_torchs_cuda_is_named_with_what_it_needs():
    assert "535.104.05 is older than CUDA 13.0" in driver_problem("535.104.05", "13.0")
    assert "580.65.06 or newer" in driver_problem("535.104.05", "13.0")
    assert driver_problem("580.82.07", "13.0") is None and driver_problem("550.54.15", "12.4") is None
    assert driver_problem("535.104.05", None) is None  # a CPU build of torch


@pytest.mark.parametrize("value, ok", [("0", True), ("GPU-8f2a", True), ("1", False), ("0,3", False),
                                       ("GPU-ffff", False), ("-1", True), (None, True)])
def test_cuda_visible_devices_naming_gpus_the_host_lacks_is_refused(value, ok):
    gpus = parse_gpus(LISTING)
    if ok:
        check_visible_devices(value, gpus)
    else:
        with pytest.raises(DevicePlanError, match="which this host does not have; it has 1: 0 "):
            check_visible_devices(value, gpus)


@pytest.mark.parametrize("visible, message", [
    (None, "the NVIDIA driver 535.104.05 is older than CUDA"),
    ("3", "CUDA_VISIBLE_DEVICES=3 names GPU 3, which this host does not have"),
])
def test_the_worker_refuses_to_start_on_a_gpu_host_it_cannot_use_and_says_why(tmp_path, visible, message):
    tool = tmp_path / "nvidia-smi"  # the host's nvidia-smi, as an old-driver host answers
    tool.write_text(f"#!/bin/sh\nprintf '{LISTING}'\n")
    tool.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "WORKER_DEVICES": "auto", "HOME": str(tmp_path)}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    out = subprocess.run([sys.executable, "-c", "import worker.celery_app"], capture_output=True, text=True,
                         timeout=60, env=env, cwd=REPO_ROOT)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


# -- on a GPU ---------------------------------------------------------------------------------------

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def lite0_cuda():
    devices.configure(CUDA, 1)
    return load_model(CARD, CUDA)


@pytest.mark.cuda
def test_decoding_on_the_stage_stream_never_corrupts_the_batch_being_computed(lite0_cuda):
    """pytorch/vision#9606: nvJPEG must not write into blocks the forward pass still reads."""
    from worker.streams import new_stream

    shots = photos() * 6
    reference_input = decode_batch(shots, CARD, CUDA, max_pixels=10**8).tensor.clone()
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.float16), torch.inference_mode():
        reference = lite0_cuda.network(reference_input).float().cpu()
    stop, decoded, errors = threading.Event(), [0], []
    stream = new_stream(CUDA)

    def decode_loop():
        try:
            while not stop.is_set():
                batch = decode_batch(shots, CARD, CUDA, max_pixels=10**8, stream=stream)
                batch.handover()
                decoded[0] += 1
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=decode_loop)
    thread.start()
    mismatches = 0
    try:
        for _ in range(300):
            batch = reference_input.clone()
            with torch.autocast("cuda", dtype=torch.float16), torch.inference_mode():
                logits = lite0_cuda.network(batch).float()
            del batch  # its block goes back to the compute stream's pool while kernels may still queue
            mismatches += int(not torch.allclose(logits.cpu(), reference, atol=1e-2))
    finally:
        stop.set()
        thread.join()
    assert not errors and decoded[0] > 10
    assert mismatches == 0


@pytest.mark.cuda
def test_amp_agrees_with_fp32_and_gradcam_holds_under_autocast(lite0_cuda):
    shots = photos() + [images.encode(images.chelsea().rotate(r, expand=True), "JPEG") for r in (90, 180)]
    inputs = _inputs(lite0_cuda, shots)
    fp32 = _fp32(lite0_cuda, inputs)
    for amp in ("float16", "bfloat16"):
        out = predict_batch(lite0_cuda, inputs, gradcam=True, amp_dtype=amp)
        agree = (out.probabilities.argmax(1) == fp32.probabilities.argmax(1)).float().mean().item()
        assert agree >= 0.99, (amp, agree)
        for mine, theirs in zip(out.cams, fp32.cams):
            assert np.corrcoef(mine.ravel(), theirs.ravel())[0, 1] >= 0.99


def _fp32(model, inputs):
    from worker.gradcam import forward_with_cam
    from worker.inference import BatchOutput, unit_range

    cam = forward_with_cam(model.network, model.target_layer, inputs)
    return BatchOutput(cam.logits.softmax(1).cpu(), unit_range(cam.cams).cpu(), cam.class_index.cpu(), 0, 0)


@pytest.mark.cuda
def test_the_resize_on_the_gpu_is_within_one_level_of_the_cpu(lite0_cuda):
    from worker.device_decode import _resize_and_crop

    for data in photos():
        picture = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
        on_cpu, _ = _resize_and_crop(picture, CARD)
        on_gpu, _ = _resize_and_crop(picture.to(CUDA), CARD)
        assert (on_gpu.cpu().int() - on_cpu.int()).abs().max() <= 1


@pytest.mark.cuda
def test_broken_jpegs_on_the_gpu_fail_alone_and_leave_the_decoder_working(lite0_cuda):
    cat = images.chelsea_jpeg()
    truncated = cat[: len(cat) // 2]
    corrupt = bytearray(cat)
    for at in range(len(cat) // 3, len(cat) - 100, 97):
        corrupt[at] ^= 0x5A
    batch = decode_batch([truncated, bytes(corrupt), cat], CARD, CUDA, max_pixels=10**8)
    assert 0 in batch.failures and 2 in batch.rows  # truncated: refused on the CPU path, not grey
    good = decode_batch(photos(), CARD, CUDA, max_pixels=10**8)
    cpu = decode_batch(photos(), CARD, CPU, max_pixels=10**8)
    assert (good.tensor.cpu() - cpu.tensor).abs().max() < 4 * ONE_LEVEL


@pytest.mark.cuda
def test_running_out_of_gpu_memory_splits_the_batch_and_forbids_the_size(lite0_cuda):
    staged, _ = stage_all([(data, OutputOptions()) for data in (photos() * 43)[:256]], lite0_cuda, 10**8)
    sizer = BatchSizer(256, CUDA_SIZER_BATCHES)
    torch.cuda.empty_cache()  # what stays reserved is what is in use: the model and its constants
    _, total = torch.cuda.mem_get_info(CUDA)
    room = torch.cuda.memory_reserved(CUDA) + 300 * 2**20  # a batch of 256 needs more, one of 16 less
    torch.cuda.set_per_process_memory_fraction(min(1.0, room / total), CUDA)
    try:
        parts = forward(lite0_cuda, staged, None, "float16", sizer)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert sum(len(part) for part, _ in parts) == 256 and len(parts) > 1
    assert max(sizer.candidates) < 256


@pytest.mark.cuda
def test_a_sticky_cuda_error_is_fatal_and_every_later_call_fails():
    code = ("import torch; from worker.devices import is_fatal\n"
            "x = torch.zeros(4, device='cuda'); i = torch.tensor([10**9], device='cuda')\n"
            "try:\n    x[i] = 1; torch.cuda.synchronize(); print('no error')\n"
            "except Exception as exc:\n    print('fatal' if is_fatal(exc) else 'not fatal', type(exc).__name__)\n"
            "try:\n    torch.ones(1, device='cuda').sum().item(); print('device still works')\n"
            "except Exception as exc:\n    print('later call fails:', is_fatal(exc))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
    assert "fatal" in out.stdout.splitlines()[0], out.stdout + out.stderr
    assert "later call fails: True" in out.stdout, out.stdout
