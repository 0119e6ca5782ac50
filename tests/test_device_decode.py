"""The GPU decode path (nvJPEG + tensor resize on the device), run here on the CPU: it must give the
model what the Pillow path gives it, keep each image in its row, and fail bad images alone."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from shared.cards import load_card
from shared.keys import OutputOptions
from shared.settings import REPO_ROOT
from tests import images
from worker.device_decode import decode_batch
from worker.imaging import decode, normalised_batch, preprocess
from worker.models import load_model
from worker.pipeline import compute, results, run_batch, stage_on_device

CARD = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")
CPU = torch.device("cpu")
ONE_LEVEL = 1 / (255 * min(CARD.std)) + 1e-4  # one 8-bit step, in normalised units


def photos() -> dict[str, bytes]:
    shots = {"chelsea": images.chelsea_jpeg(), "coffee": images.encode(images.coffee(), "JPEG", quality=90)}
    for i, picture in enumerate(load_sample_images().images):
        shots[f"sklearn-{i}"] = images.encode(Image.fromarray(picture), "JPEG", quality=90)
    return shots


ODD = {
    "exif-6": images.exif_rotated_jpeg(images.chelsea(), 6),
    "exif-8": images.exif_rotated_jpeg(images.coffee(), 8),
    "exif-3": images.exif_rotated_jpeg(images.chelsea(), 3),
    "greyscale-jpeg": images.encode(images.chelsea().convert("L"), "JPEG"),
    "cmyk-jpeg": images.cmyk_jpeg(),
    "png-with-alpha": images.encode(images.chelsea().convert("RGBA"), "PNG"),
}


def pillow_input(data: bytes) -> tuple[torch.Tensor, tuple]:
    prepared = preprocess(decode(data, min_short_side=CARD.resize, max_pixels=10**8).image, CARD)
    return normalised_batch([prepared.pixels], CARD, CPU)[0], prepared.crop_box


@pytest.fixture(scope="module")
def lite0():
    return load_model(CARD, CPU)


@pytest.mark.parametrize("name", [*photos(), *ODD])
def test_the_device_path_gives_the_model_what_the_pillow_path_gives_it(name):
    data = {**photos(), **ODD}[name]
    batch = decode_batch([data], CARD, CPU, max_pixels=10**8)
    expected, box = pillow_input(data)
    assert batch.rows == [0] and batch.failures == {}
    assert batch.tensor.is_contiguous(memory_format=torch.channels_last)
    # The same resampling weights as Pillow: at most one 8-bit level apart anywhere.
    assert (batch.tensor[0] - expected).abs().max() <= ONE_LEVEL
    assert batch.crop_boxes[0] == pytest.approx(box)
    assert batch.fallbacks == (1 if name in ("cmyk-jpeg", "png-with-alpha") else 0)


def test_a_big_jpeg_decoded_in_full_stays_close_to_pillows_reduced_decode():
    data = images.encode(images.coffee().resize((3000, 2000)), "JPEG", quality=90)
    expected, _ = pillow_input(data)  # Pillow decodes it at 1/4 scale (draft); the device path in full
    difference = (decode_batch([data], CARD, CPU, max_pixels=10**8).tensor[0] - expected).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.3


def test_the_device_path_and_the_pillow_path_agree_on_the_top_class(lite0):
    shots = list(photos().values()) + [ODD["exif-6"], ODD["exif-8"]]
    options = OutputOptions(top_k=1, gradcam=True)
    staged, failures, inputs = stage_on_device([(data, options) for data in shots], lite0, 10**8)
    assert failures == {} and [s.index for s in staged] == list(range(len(shots)))
    on_device = results(lite0, staged, compute(lite0, staged, "float16", inputs))
    on_cpu = run_batch(lite0, [(data, options) for data in shots], max_pixels=10**8, amp_dtype="float16")
    for mine, theirs in zip(on_device, on_cpu):
        assert mine.result["predictions"][0]["index"] == theirs.result["predictions"][0]["index"]
        assert mine.result["gradcam"]["crop_box"] == theirs.result["gradcam"]["crop_box"]
        assert np.corrcoef(np.ravel(mine.result["gradcam"]["map"]), np.ravel(theirs.result["gradcam"]["map"]))[0, 1] > 0.99


def test_a_mixed_batch_keeps_each_image_in_its_row_and_fails_bad_ones_alone():
    cat, coffee = images.chelsea_jpeg(), images.encode(images.coffee(), "PNG")
    truncated = cat[: len(cat) // 2]
    bomb = images.png_declaring(20_000, 20_000)
    batch = decode_batch([cat, truncated, coffee, b"\x00" * 100, bomb, cat], CARD, CPU, max_pixels=10**8)
    assert batch.rows == [0, 2, 5]
    assert sorted(batch.failures) == [1, 3, 4] and all(e.code == "decode_failed" for e in batch.failures.values())
    assert "limit" in batch.failures[4].message  # over max_pixels: refused before decoding
    assert torch.equal(batch.tensor[0], batch.tensor[2])  # the same cat in rows 0 and 2
    assert (batch.tensor[1] - pillow_input(coffee)[0]).abs().max() <= ONE_LEVEL
    assert batch.sizes == [(451, 300), (600, 400), (451, 300)]


def test_a_batch_of_nothing_decodable_is_all_failures():
    batch = decode_batch([b"not an image", b""], CARD, CPU, max_pixels=10**8)
    assert batch.tensor is None and batch.rows == [] and sorted(batch.failures) == [0, 1]


@pytest.mark.cuda
def test_nvjpeg_on_the_gpu_gives_what_the_cpu_gives():
    shots = list(photos().values()) + list(ODD.values())
    gpu = decode_batch(shots, CARD, torch.device("cuda", 0), max_pixels=10**8)
    cpu = decode_batch(shots, CARD, CPU, max_pixels=10**8)
    assert gpu.rows == cpu.rows and gpu.tensor.is_cuda
    # nvJPEG's IDCT and colour conversion may differ from libjpeg-turbo's by a level or two.
    difference = (gpu.tensor.cpu() - cpu.tensor).abs()
    assert difference.mean() < 0.01 and difference.max() < 4 * ONE_LEVEL


@pytest.mark.integration
def test_a_worker_decoding_on_its_device_answers_as_the_cpu_path_does(tmp_path, settings, lite0):
    import dataclasses

    from tests.conftest import ARTIFACTS, submit, wait_done
    from tools import stack
    from web import create_app

    redis_proc, url = stack.start_redis(tmp_path)
    own = dataclasses.replace(settings, redis_url=url, worker_concurrency=1, device_decode="on",
                              models=("efficientnet-lite0",), default_model="efficientnet-lite0")
    log = ARTIFACTS / "device-decode-worker.log"
    worker = stack.start_worker(own, log, name="device-decode")
    try:
        client = create_app(own).test_client()
        uploads = [images.chelsea_jpeg(), images.exif_rotated_jpeg(images.coffee(), 6),
                   images.encode(images.coffee(), "PNG"), images.png_with_corrupt_pixels()]
        jobs = [wait_done(client, submit(client, data, f"f{i}").get_json()["id"]) for i, data in enumerate(uploads)]
        options = OutputOptions()
        for data, job in zip(uploads[:3], jobs):
            alone = run_batch(lite0, [(data, options)], max_pixels=10**8, amp_dtype="float16")[0]
            assert job["status"] == "done"
            assert job["result"]["predictions"][0]["index"] == alone.result["predictions"][0]["index"]
            assert job["result"]["gradcam"]["crop_box"] == alone.result["gradcam"]["crop_box"]
        assert jobs[3]["status"] == "failed" and jobs[3]["error"]["code"] == "decode_failed"  # fails alone
        assert "on the CPU" not in log.read_text()  # the device path ran; no fallback was needed
    finally:
        stack.stop(worker)
        stack.stop(redis_proc)
