"""A job and its Idempotency-Key's answer are written together or not at all (issue 20, item 6).

Before, the job was written first and the key's answer in a second round trip; when Redis refused the
second, the client got 503 while the job ran, and its retry after the lease made a second job (two
`job.completed` webhooks for one request). Here Redis refuses every round trip but the job's own:
the web's Redis user may not load scripts (SCRIPT), and the only ones loaded are those of a job
submitted before without a key. A real Redis of this test's own; no worker (the jobs wait queued).
"""
import dataclasses
import io

import pytest
import redis
from werkzeug.datastructures import MultiDict

from shared.keys import idempotency_key
from tests import images
from tools import stack

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"
KEY = "order-4711"


@pytest.fixture
def own_stack(tmp_path, settings):
    """A Redis whose user ``web`` the app uses (its rights set by the test), and the app (a 1 s lease)."""
    from web import create_app

    redis_proc, url = stack.start_redis(tmp_path)
    admin = redis.Redis.from_url(url)
    admin.execute_command("ACL", "SETUSER", "web", "on", ">web-password", "allkeys", "allchannels", "+@all")
    own = dataclasses.replace(settings, redis_url=url.replace("redis://", "redis://web:web-password@"),
                              models=(MODEL,), default_model=MODEL, idempotency_lease_s=1)
    yield admin, create_app(own).test_client()
    stack.stop(redis_proc)


def _post(client, image: bytes, key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/api/v1/jobs", data={"image": (io.BytesIO(image), "u.png")},
                       content_type="multipart/form-data", headers=headers)


def _jobs(admin) -> set[str]:
    return {key.decode().removeprefix("job:") for key in admin.scan_iter("job:*")}


def test_a_refused_answer_record_leaves_no_job_behind_and_the_retry_makes_exactly_one(own_stack):
    admin, client = own_stack
    assert _post(client, images.noise_png(seed=84_000)).status_code == 202  # loads the job's own scripts
    before = _jobs(admin)
    admin.execute_command("ACL", "SETUSER", "web", "-script")  # nothing else can be loaded now
    upload = images.noise_png(seed=84_001)
    first = _post(client, upload, KEY)
    made_by_first = _jobs(admin) - before
    admin.execute_command("ACL", "SETUSER", "web", "+@all")
    record = idempotency_key("", KEY)
    stack.wait_for(lambda: b'"pending"' not in (admin.get(record) or b""), 10, "the first request's lease to end")
    retry, replay = _post(client, upload, KEY), _post(client, upload, KEY)
    print(f"first answer {first.status_code}, jobs it made {len(made_by_first)}; retry {retry.status_code}")
    assert retry.status_code == 202 and replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.get_json()["id"] == retry.get_json()["id"]
    assert _jobs(admin) - before == {retry.get_json()["id"]}, "more than one job for one Idempotency-Key"
    if first.status_code == 202:
        assert first.get_json()["id"] == retry.get_json()["id"]
    else:
        assert not made_by_first, "a request answered with an error left a job running"


def _post_batch(client, uploads: list[bytes], key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    form = MultiDict([("image", (io.BytesIO(data), f"{i}.png")) for i, data in enumerate(uploads)])
    return client.post("/api/v1/batches", data=form, content_type="multipart/form-data", headers=headers)


def _batches(admin) -> set[str]:
    return {key.decode().removeprefix("batch:") for key in admin.scan_iter("batch:*") if b":settled" not in key}


def test_a_batch_and_its_keys_answer_appear_in_one_step(own_stack):
    """The same for a batch: before, its answer was stored after the batch was shown, and when Redis
    refused that, the client got 503 while the batch ran and a retry made a second batch."""
    admin, client = own_stack
    assert _post_batch(client, [images.noise_png(seed=84_100)]).status_code == 202  # loads the batch's scripts
    before = _batches(admin)
    admin.execute_command("ACL", "SETUSER", "web", "-script")
    uploads = [images.noise_png(seed=84_101 + i) for i in range(2)]
    first = _post_batch(client, uploads, "batch-0815")
    made_by_first = _batches(admin) - before
    admin.execute_command("ACL", "SETUSER", "web", "+@all")
    record = idempotency_key("", "batch-0815")
    stack.wait_for(lambda: b'"pending"' not in (admin.get(record) or b""), 10, "the first request's lease to end")
    retry = _post_batch(client, uploads, "batch-0815")
    assert first.status_code == 202, first.get_json()
    assert retry.status_code == 202 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.get_json()["id"] == first.get_json()["id"]
    assert _batches(admin) - before == made_by_first == {first.get_json()["id"]}
