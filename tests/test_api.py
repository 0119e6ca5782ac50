"""The whole job path with a real Redis and a real Celery worker, driven through the real app."""
import io
import threading

import pytest
from PIL import Image

from shared.keys import WORKERS_KEY
from tests import images
from tests.conftest import TINY_LABELS, WORKER_CHILDREN, submit, wait_done
from tools.stack import wait_for

pytestmark = pytest.mark.integration
CAT_LABELS = {"Egyptian cat", "tabby", "tiger cat", "lynx", "Persian cat", "Siamese cat"}


def test_a_cat_comes_back_as_a_cat_then_from_the_cache(worker, client):
    first = submit(client, images.chelsea_jpeg(), "chelsea.jpg")
    assert first.status_code == 202
    assert first.headers["Location"] == f"/api/v1/jobs/{first.get_json()['id']}"
    job = wait_done(client, first.get_json()["id"])
    assert job["status"] == "done", job["error"]
    result = job["result"]
    assert result["predictions"][0]["label"] in CAT_LABELS
    assert len(result["predictions"]) == 5
    assert result["device"] == "cpu"
    assert set(result["timings_ms"]) == {"queue", "decode", "preprocess", "inference", "gradcam",
                                         "render", "total"}
    assert job["image"] == {"sha256": job["image"]["sha256"], "format": "JPEG", "width": 451, "height": 300}

    png = client.get(result["gradcam"]["url"])
    assert png.status_code == 200 and png.mimetype == "image/png"
    overlay = Image.open(io.BytesIO(png.data))
    assert abs(overlay.width / overlay.height - 451 / 300) < 0.01

    again = submit(client, images.chelsea_jpeg(), "again.jpg")
    assert again.status_code == 200
    cached = again.get_json()
    assert cached["status"] == "done" and cached["cached"] is True
    assert cached["id"] != job["id"]
    assert cached["result"]["predictions"] == result["predictions"]
    assert client.get(cached["result"]["gradcam"]["url"]).data == png.data


def test_identical_concurrent_uploads_run_one_inference(worker, client, app):
    store = app.extensions["imgsvc"].store
    def ended():
        return sum(n for key, n in store.computations().items() if key.startswith(("done:", "failed:")))

    before = ended()
    data, answers = images.noise_png(seed=101, size=(400, 300)), []

    def upload():
        with app.test_client() as own:
            answers.append(submit(own, data, "same.png"))

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(a.status_code in (200, 202) for a in answers), [a.get_json() for a in answers]
    ids = {answer.get_json()["id"] for answer in answers}
    assert len(ids) == 8
    assert [a.status_code for a in answers].count(202) >= 2  # several attached while in flight
    jobs = [wait_done(client, job_id) for job_id in ids]
    assert {job["status"] for job in jobs} == {"done"}
    assert len({str(job["result"]["predictions"]) for job in jobs}) == 1
    assert ended() - before == 1


@pytest.mark.parametrize("fields, code", [
    ({"top_k": "0"}, "invalid_option"), ({"top_k": "21"}, "invalid_option"),
    ({"top_k": "five"}, "invalid_option"), ({"gradcam": "maybe"}, "invalid_option"),
    ({"model": "nope"}, "unknown_model"),
])
def test_bad_options_are_422(worker, client, fields, code):
    answer = submit(client, images.chelsea_jpeg(), **fields)
    assert answer.status_code == 422
    assert answer.get_json()["error"]["code"] == code


def test_missing_field_and_wrong_content_type(client):
    answer = client.post("/api/v1/jobs", data={"picture": "x"}, content_type="multipart/form-data")
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (400, "missing_image")
    answer = client.post("/api/v1/jobs", data=b"{}", content_type="application/json")
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (400, "missing_image")


def test_exif_rotation_reaches_the_prediction_and_the_overlay(worker, client):
    upright = wait_done(client, submit(client, images.encode(images.chelsea(), "JPEG", quality=92)).get_json()["id"])
    rotated = wait_done(client, submit(client, images.exif_rotated_jpeg(images.chelsea())).get_json()["id"])
    assert rotated["image"]["width"] == 451 and rotated["image"]["height"] == 300
    labels = [{p["label"] for p in job["result"]["predictions"][:3]} for job in (upright, rotated)]
    assert labels[0] == labels[1]  # the model saw the cat upright both times
    overlay = Image.open(io.BytesIO(client.get(rotated["result"]["gradcam"]["url"]).data))
    assert overlay.width > overlay.height


def test_raw_body_upload_and_no_gradcam(worker, client):
    answer = client.post("/api/v1/jobs?gradcam=false&top_k=2", data=images.noise_png(seed=5),
                         content_type="image/png")
    assert answer.status_code == 202
    job = wait_done(client, answer.get_json()["id"])
    assert job["status"] == "done" and job["result"]["gradcam"] is None
    assert len(job["result"]["predictions"]) == 2
    missing = client.get(f"/api/v1/jobs/{job['id']}/gradcam.png")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"


def test_a_failure_inside_the_worker_fails_the_job_not_the_worker(worker, client):
    answer = submit(client, images.png_with_corrupt_pixels(), "broken.png")
    assert answer.status_code == 202
    job = wait_done(client, answer.get_json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "decode_failed"
    assert worker.poll() is None
    follow_up = wait_done(client, submit(client, images.noise_png(seed=77)).get_json()["id"])
    assert follow_up["status"] == "done"


def test_second_card_serves_through_the_whole_path(worker, client):
    models = client.get("/api/v1/models").get_json()
    assert {m["name"] for m in models["models"]} == {"efficientnet-lite0", "tiny-resnet18", "misbehaving"}
    assert models["default"] == "efficientnet-lite0"
    answer = submit(client, images.chelsea_jpeg(), model="tiny-resnet18")
    assert answer.status_code == 202
    job = wait_done(client, answer.get_json()["id"])
    assert job["status"] == "done", job["error"]
    assert job["model"] == {"name": "tiny-resnet18", "version": "test-1"}
    assert job["result"]["predictions"][0]["label"] in TINY_LABELS
    assert client.get(job["result"]["gradcam"]["url"]).status_code == 200


def child_records(redis_client) -> list[dict]:
    """Every worker child's heartbeat record (its info and counters)."""
    names = [n.decode() for n in redis_client.zrange(WORKERS_KEY, 0, -1)]
    return [{k.decode(): v.decode() for k, v in redis_client.hgetall(f"worker:{n}").items()} for n in names]


def test_each_child_loaded_each_model_exactly_once(worker, client, redis_client):
    ids = [submit(client, images.noise_png(seed=200 + i)).get_json()["id"] for i in range(6)]
    for job_id in ids:
        assert wait_done(client, job_id)["status"] == "done"

    def beats_counted_the_jobs():  # heartbeats publish counters once a second
        found = child_records(redis_client)
        return found if len(found) == WORKER_CHILDREN and sum(int(c["jobs_done"]) for c in found) >= 6 else None

    for child in wait_for(beats_counted_the_jobs, 10, "both children to report the jobs"):
        assert child["model_loads"] == "3"  # each served card once, not once per task


def test_cpu_children_spin_briefly_in_openmp(worker, redis_client):
    """Set before torch loaded OpenMP: a CPU child's idle threads spin 10,000 turns, not libgomp's
    300,000, on cores the web tier and Redis share (an operator's own setting would win)."""
    def both_children():
        found = child_records(redis_client)
        return found if len(found) == WORKER_CHILDREN else None

    found = wait_for(both_children, 10, "both children's heartbeats")
    assert [(c["device"], c["openmp_wait"]) for c in found] == [("cpu", "spin 10000")] * WORKER_CHILDREN


def test_an_operators_openmp_setting_wins_and_gpu_children_wait_passively():
    """On environments of their own: the test process's is left as it was (its workers inherit it)."""
    from worker import openmp

    gpu_child: dict = {}
    openmp.limit_spinning(gpu=True, environ=gpu_child)
    assert openmp.waits(gpu_child) == "passive"
    operators = {"GOMP_SPINCOUNT": "500"}
    openmp.limit_spinning(gpu=False, environ=operators)
    assert openmp.waits(operators) == "spin 500"


def test_unknown_job_is_404_json(client):
    for path in ("/api/v1/jobs/" + "0" * 32, "/api/v1/jobs/not-an-id", "/api/v1/jobs/x/gradcam.png",
                 "/no/such/page"):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "not_found"


def test_health_and_readiness(worker, client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["workers"] == WORKER_CHILDREN


def test_upload_page_renders_the_served_models(client):
    page = client.get("/")
    assert page.status_code == 200
    assert b"tiny-resnet18" in page.data and b'id="file-input"' in page.data


def test_wait_parameter_returns_once_the_job_settles(worker, client):
    answer = submit(client, images.noise_png(seed=4242))
    assert answer.status_code == 202
    job = client.get(f"/api/v1/jobs/{answer.get_json()['id']}?wait=30").get_json()
    assert job["status"] == "done"
    for bad in ("-1", "31", "soon"):
        refused = client.get(f"/api/v1/jobs/{job['id']}?wait={bad}")
        assert refused.status_code == 422 and refused.get_json()["error"]["code"] == "invalid_option"
