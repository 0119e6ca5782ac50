"""API keys, isolation, AUTH_REQUIRED, rate limits, idempotency and batches, against real Redis and workers."""
import dataclasses
import io
import json
import time

import pytest
from standardwebhooks import Webhook

from tests import images
from tests.receiver import Receiver

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"


def create_key(app, name: str, *options: str) -> dict:
    """Create a key with the real CLI command; return what it printed (key and secret, once)."""
    result = app.test_cli_runner().invoke(args=["keys", "create", name, *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def bearer(key: dict) -> dict:
    return {"Authorization": f"Bearer {key['api_key']}"}


def post_job(client, image: bytes, headers=None, **fields):
    form = {"image": (io.BytesIO(image), "upload.png"), "model": MODEL, **{k: str(v) for k, v in fields.items()}}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data", headers=headers or {})


def test_keys_are_printed_once_and_stored_only_hashed(app, redis_client):
    key = create_key(app, "acme", "--rate-limit", "50/minute")
    assert key["api_key"].startswith("imgsvc_") and key["webhook_secret"].startswith("whsec_")
    stored = b"".join(k + v for k, v in redis_client.hgetall(f"apikey:{key['id']}").items())
    assert key["api_key"].encode() not in stored and key["webhook_secret"].encode() not in stored
    listed = app.test_cli_runner().invoke(args=["keys", "list"]).stdout
    assert key["id"] in listed and key["api_key"] not in listed and "50/minute" in listed


def test_a_revoked_key_stops_working(app, client):
    key = create_key(app, "short-lived")
    assert post_job(client, images.noise_png(seed=2001), bearer(key)).status_code == 202
    assert app.test_cli_runner().invoke(args=["keys", "revoke", key["id"]]).exit_code == 0
    refused = post_job(client, images.noise_png(seed=2002), bearer(key))
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (401, "invalid_api_key")
    assert app.test_cli_runner().invoke(args=["keys", "revoke", "nosuchkey"]).exit_code != 0


def test_a_job_is_invisible_to_other_keys(worker, app, client):
    alice, bob = create_key(app, "alice"), create_key(app, "bob")
    job = post_job(client, images.noise_png(seed=2003), bearer(alice)).get_json()
    assert client.get(f"/api/v1/jobs/{job['id']}?wait=20", headers=bearer(alice)).get_json()["status"] == "done"
    for headers in (bearer(bob), {}):
        for path in ("", "/gradcam.png", "/deliveries"):
            answer = client.get(f"/api/v1/jobs/{job['id']}{path}", headers=headers)
            assert (answer.status_code, answer.get_json()["error"]["code"]) == (404, "not_found")
    assert client.get(f"/api/v1/jobs/{job['id']}/gradcam.png", headers=bearer(alice)).status_code == 200
    # The same image from bob is a cache hit, but his own job.
    hit = post_job(client, images.noise_png(seed=2003), bearer(bob))
    assert hit.status_code == 200 and hit.get_json()["id"] != job["id"]


@pytest.mark.parametrize("header, code", [
    (None, "auth_required"), ("Bearer imgsvc_nope_nope", "invalid_api_key"), ("Basic Zm9vOmJhcg==", "invalid_api_key"),
    ("Bearer", "invalid_api_key"),
])
def test_auth_required_refuses_anonymous_and_bad_keys(settings, header, code):
    from web import create_app

    app = create_app(dataclasses.replace(settings, auth_required=True))
    answer = post_job(app.test_client(), images.noise_png(seed=2004), {"Authorization": header} if header else {})
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (401, code)
    assert app.test_client().get("/api/v1/models").status_code == 200  # public reads stay public


def test_auth_required_lets_a_key_in(settings, worker):
    from web import create_app

    app = create_app(dataclasses.replace(settings, auth_required=True))
    answer = post_job(app.test_client(), images.noise_png(seed=2005), bearer(create_key(app, "ok")))
    assert answer.status_code == 202


def test_rate_limit_answers_429_with_retry_after_per_key(app, client):
    slow, other = create_key(app, "slow", "--rate-limit", "3/minute"), create_key(app, "other")
    answers = [client.get(f"/api/v1/jobs/{'0' * 32}", headers=bearer(slow)) for _ in range(4)]
    assert [a.status_code for a in answers] == [404, 404, 404, 429]
    refused = answers[-1]
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3" and refused.headers["X-RateLimit-Remaining"] == "0"
    assert "Retry-After" not in answers[0].headers  # only a refusal says when to come back
    assert client.get(f"/api/v1/jobs/{'0' * 32}", headers=bearer(other)).status_code == 404


def test_an_idempotent_replay_returns_the_original_job(worker, app, client):
    key = create_key(app, "idem")
    headers = {**bearer(key), "Idempotency-Key": "order-17"}
    first = post_job(client, images.noise_png(seed=2006), headers)
    again = post_job(client, images.noise_png(seed=2006), headers)
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    changed = post_job(client, images.noise_png(seed=2007), headers)
    assert (changed.status_code, changed.get_json()["error"]["code"]) == (422, "idempotency_key_reused")
    other_owner = post_job(client, images.noise_png(seed=2007), {"Idempotency-Key": "order-17"})
    assert other_owner.status_code == 202  # keys are scoped to their caller


def test_an_idempotency_key_still_being_accepted_answers_409(app, client):
    from shared.keys import OutputOptions, image_digest
    from web.intake import Order

    image = images.noise_png(seed=2008)
    with app.app_context():  # another web process has claimed this key for the same request
        card = app.extensions["imgsvc"].catalog.get(MODEL)
        print_ = Order(card, OutputOptions(), None).fingerprint(image_digest(image))
        app.extensions["imgsvc"].idempotency.begin("", "in-flight-1", print_)
    answer = post_job(client, image, {"Idempotency-Key": "in-flight-1"})
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (409, "idempotency_in_progress")


def test_a_refused_request_releases_its_idempotency_key(app, client):
    bad = post_job(client, b"not an image", {"Idempotency-Key": "retry-me"})
    assert bad.status_code == 415
    assert post_job(client, images.noise_png(seed=2009), {"Idempotency-Key": "retry-me"}).status_code == 202


def post_batch(client, files: list[bytes], headers=None, **fields):
    form = {"image": [(io.BytesIO(data), f"img{i}.png") for i, data in enumerate(files)], "model": MODEL,
            **{k: str(v) for k, v in fields.items()}}
    return client.post("/api/v1/batches", data=form, content_type="multipart/form-data", headers=headers or {})


def test_a_batch_finishes_with_one_signed_batch_completed_event(worker, webhook_worker, app, client):
    key = create_key(app, "batcher")
    files = [images.noise_png(seed=2010), images.noise_png(seed=2011), images.png_with_corrupt_pixels()]
    with Receiver() as receiver:
        answer = post_batch(client, files, bearer(key), callback_url=receiver.url + "/batch")
        assert answer.status_code == 202, answer.get_json()
        batch = answer.get_json()
        assert answer.headers["Location"] == f"/api/v1/batches/{batch['id']}"
        assert len(batch["jobs"]) == 3 and batch["counts"]["total"] == 3
        [call] = receiver.wait("/batch", 1)
        payload = Webhook(key["webhook_secret"]).verify(call.body, call.headers)  # the key's own secret
        assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch["id"]
        assert payload["data"]["status"] == "done"
        assert payload["data"]["counts"] == {"total": 3, "queued": 0, "running": 0, "done": 2, "failed": 1,
                                              "canceled": 0}
        time.sleep(1.5)
        assert len(receiver.received) == 1  # the batch calls back once, not once per job
    final = client.get(f"/api/v1/batches/{batch['id']}", headers=bearer(key)).get_json()
    assert [j["batch_id"] for j in final["jobs"]] == [batch["id"]] * 3
    assert client.get(f"/api/v1/batches/{batch['id']}").status_code == 404  # not anonymous's batch


def test_a_bad_image_anywhere_refuses_the_whole_batch(client):
    answer = post_batch(client, [images.noise_png(seed=2012), b"<html></html>"])
    assert answer.status_code == 415
    assert answer.get_json()["error"]["message"].startswith("Image 2:")


def test_a_batch_replays_under_its_idempotency_key(worker, client):
    files = [images.noise_png(seed=2013), images.noise_png(seed=2014)]
    first = post_batch(client, files, {"Idempotency-Key": "batch-1"})
    again = post_batch(client, files, {"Idempotency-Key": "batch-1"})
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]


def test_a_replay_must_ask_for_the_same_lane(worker, app, client):
    """Asking for the endpoint's own lane is the same request; asking for the other one is not."""
    job_key = {**bearer(create_key(app, "lanes")), "Idempotency-Key": "lane-1"}
    first = post_job(client, images.noise_png(seed=2018), job_key)
    same = post_job(client, images.noise_png(seed=2018), job_key, priority="interactive")
    other = post_job(client, images.noise_png(seed=2018), job_key, priority="bulk")
    assert same.get_json()["id"] == first.get_json()["id"] and same.headers["Idempotent-Replayed"] == "true"
    assert (other.status_code, other.get_json()["error"]["code"]) == (422, "idempotency_key_reused")
    files, batch_key = [images.noise_png(seed=2019)], {"Idempotency-Key": "lane-2"}
    batch = post_batch(client, files, batch_key)
    assert post_batch(client, files, batch_key, priority="bulk").get_json()["id"] == batch.get_json()["id"]
    changed = post_batch(client, files, batch_key, priority="interactive")
    assert (changed.status_code, changed.get_json()["error"]["code"]) == (422, "idempotency_key_reused")


def test_a_batch_of_cache_hits_still_sends_its_batch_completed_event(worker, webhook_worker, client):
    """Every job settles while the batch is still opening (invisible): opening it must announce it."""
    from tests.conftest import wait_done

    files = [images.noise_png(seed=2016), images.noise_png(seed=2017)]
    for data in files:
        wait_done(client, post_job(client, data).get_json()["id"])
    with Receiver() as receiver:
        answer = post_batch(client, files, callback_url=receiver.url + "/cached-batch")
        assert answer.status_code == 202 and answer.get_json()["status"] == "done"
        [call] = receiver.wait("/cached-batch", 1, timeout=15)  # not the catch-up, 30 s on
        payload = json.loads(call.body)
        assert payload["type"] == "batch.completed" and payload["data"]["id"] == answer.get_json()["id"]


def test_a_key_default_endpoint_receives_its_jobs(worker, webhook_worker, app, client):
    with Receiver() as receiver:
        key = create_key(app, "defaulted", "--webhook-url", receiver.url + "/default")
        job = post_job(client, images.noise_png(seed=2015), bearer(key)).get_json()
        assert job["callback_url"] == receiver.url + "/default"
        [call] = receiver.wait("/default", 1)
        assert Webhook(key["webhook_secret"]).verify(call.body, call.headers)["data"]["id"] == job["id"]


def test_a_key_default_endpoint_meets_the_ssrf_guard_at_creation(settings):
    from web import create_app

    app = create_app(dataclasses.replace(settings, webhook_allow_private=False))
    result = app.test_cli_runner().invoke(args=["keys", "create", "sneaky", "--webhook-url",
                                                "http://169.254.169.254/latest/meta-data"])
    assert result.exit_code != 0 and "non-public address" in result.output


def test_an_international_callback_url_is_kept_encoded_as_browsers_send_it(client):
    from tests.conftest import submit

    answer = submit(client, images.noise_png(seed=72_000), callback_url="http://localhost:9/café?ü=1")
    assert answer.status_code == 202
    assert answer.get_json()["callback_url"] == "http://localhost:9/caf%C3%A9?%C3%BC=1"
