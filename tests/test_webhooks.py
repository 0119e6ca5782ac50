"""Signed webhook callbacks against a real receiver, real worker and real webhook worker."""
import dataclasses
import json
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests import images
from tests.conftest import WEBHOOK_SECRET, submit, wait_done
from tools.stack import wait_for
from tests.receiver import Receiver

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"  # small and fast: these tests are about the callbacks


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as server:
        yield server


@pytest.fixture
def stack(worker, webhook_worker, client):
    return client


def deliveries(client, job_id: str, until_state: str, timeout: float = 60) -> dict:
    """Poll the job's delivery log until its (only) event reaches ``until_state``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = client.get(f"/api/v1/jobs/{job_id}/deliveries").get_json()
        if log["events"] and log["events"][-1]["state"] == until_state:
            return log
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} deliveries never reached {until_state}: {log}")


def verify(received) -> dict:
    """Verify one delivery with the standardwebhooks package (not our code) and return its payload."""
    return Webhook(WEBHOOK_SECRET).verify(received.body, received.headers)


def test_a_finished_job_calls_back_signed(stack, receiver):
    answer = submit(stack, images.noise_png(seed=1001), model=MODEL, callback_url=receiver.url + "/done")
    assert answer.status_code == 202
    job = answer.get_json()
    assert job["callback_url"] == receiver.url + "/done"
    [call] = receiver.wait("/done", 1)
    payload = verify(call)
    assert payload["type"] == "job.completed"
    assert payload["data"]["id"] == job["id"]
    assert payload["data"]["status"] == "done"
    assert payload["data"]["result"]["predictions"]
    assert call.headers["webhook-id"].startswith("msg_")
    assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 60
    with pytest.raises(WebhookVerificationError):  # the check above could fail: another secret does
        Webhook("whsec_" + "b3RoZXItc2VjcmV0LW9mLTMyLWJ5dGVzLWxvbmchISE=").verify(call.body, call.headers)


def test_cache_hits_and_attached_jobs_are_called_back_too(stack, receiver):
    image = images.noise_png(seed=1002)
    first = submit(stack, image, model=MODEL, callback_url=receiver.url + "/first").get_json()
    attached = submit(stack, image, model=MODEL, callback_url=receiver.url + "/attached").get_json()
    wait_done(stack, first["id"])
    hit = submit(stack, image, model=MODEL, callback_url=receiver.url + "/hit")
    assert hit.status_code == 200
    for path, job_id in (("/first", first["id"]), ("/attached", attached["id"]), ("/hit", hit.get_json()["id"])):
        payload = verify(receiver.wait(path, 1)[0])
        assert (payload["type"], payload["data"]["id"]) == ("job.completed", job_id)
    assert verify(receiver.on("/hit")[0])["data"]["cached"] is True


def test_a_failed_job_sends_job_failed(stack, receiver):
    job = submit(stack, images.png_with_corrupt_pixels(), "broken.png", model=MODEL,
                 callback_url=receiver.url + "/failed").get_json()
    payload = verify(receiver.wait("/failed", 1)[0])
    assert payload["type"] == "job.failed"
    assert payload["data"]["id"] == job["id"]
    assert payload["data"]["error"]["code"] == "decode_failed"


def test_two_failures_then_success_is_one_event_attempted_three_times(stack, receiver):
    receiver.answer((500, {}), (502, {}))
    job = submit(stack, images.noise_png(seed=1003), model=MODEL, callback_url=receiver.url + "/flaky").get_json()
    calls = receiver.wait("/flaky", 3)
    assert len({c.headers["webhook-id"] for c in calls}) == 1
    assert all(verify(c)["data"]["id"] == job["id"] for c in calls)
    assert calls[1].at - calls[0].at >= 0.85  # backoff: 1 s -10% jitter in the test schedule
    log = deliveries(stack, job["id"], "delivered")
    assert [a["status_code"] for a in log["attempts"]] == [500, 502, 200]
    assert [a["attempt"] for a in log["attempts"]] == [1, 2, 3]
    assert [a["ok"] for a in log["attempts"]] == [False, False, True]
    assert all(a["duration_ms"] >= 0 and a["at"] for a in log["attempts"])
    assert log["events"][0]["attempts"] == 3 and log["events"][0]["id"] == calls[0].headers["webhook-id"]


def test_retry_after_on_429_is_honoured(stack, receiver):
    receiver.answer((429, {"Retry-After": "3"}))
    submit(stack, images.noise_png(seed=1004), model=MODEL, callback_url=receiver.url + "/busy")
    calls = receiver.wait("/busy", 2)
    assert calls[1].at - calls[0].at >= 2.8  # the schedule alone would have retried after ~1 s


def test_410_gone_stops_deliveries_to_that_endpoint(stack, receiver):
    receiver.answer((410, {}))
    first = submit(stack, images.noise_png(seed=1005), model=MODEL, callback_url=receiver.url + "/gone").get_json()
    assert deliveries(stack, first["id"], "endpoint_gone")["events"][0]["attempts"] == 1
    second = submit(stack, images.noise_png(seed=1006), model=MODEL, callback_url=receiver.url + "/gone").get_json()
    assert deliveries(stack, second["id"], "endpoint_gone")["attempts"] == []
    assert len(receiver.on("/gone")) == 1


def test_a_receiver_that_never_answers_in_time_is_retried_then_given_up(stack, receiver):
    receiver.answer(*[(200, {}, 5)] * 4)  # the test stack's total timeout is 3 s
    job = submit(stack, images.noise_png(seed=1007), model=MODEL, callback_url=receiver.url + "/slow").get_json()
    log = deliveries(stack, job["id"], "failed", timeout=90)
    assert len(log["attempts"]) == 4  # the first attempt and one per delay of the (1, 1, 1) schedule
    assert all(a["status_code"] is None and "timed out" in a["error"].lower() for a in log["attempts"])
    assert all(a["duration_ms"] < 4500 for a in log["attempts"])


def test_redeliver_sends_the_same_event_again(stack, receiver):
    job = submit(stack, images.noise_png(seed=1008), model=MODEL, callback_url=receiver.url + "/again").get_json()
    [first] = receiver.wait("/again", 1)
    deliveries(stack, job["id"], "delivered")
    answer = stack.post(f"/api/v1/jobs/{job['id']}/deliveries/redeliver")
    assert answer.status_code == 202
    second = receiver.wait("/again", 2)[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.body == first.body and verify(second)["data"]["id"] == job["id"]
    assert len(deliveries(stack, job["id"], "delivered")["attempts"]) == 2


def test_redeliver_refuses_what_it_cannot_send(stack):
    plain = submit(stack, images.noise_png(seed=1009), model=MODEL).get_json()
    wait_done(stack, plain["id"])
    answer = stack.post(f"/api/v1/jobs/{plain['id']}/deliveries/redeliver")
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (409, "no_callback")
    assert stack.post(f"/api/v1/jobs/{'0' * 32}/deliveries/redeliver").status_code == 404


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.0.0.7/hook", "http://169.254.169.254/latest",
    "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://100.64.0.1/hook", "http://0x7f000001/hook",
    "ftp://example.com/hook", "http://user:pw@example.com/hook", "not a url",
])
def test_private_or_bad_callbacks_are_refused_at_submit(settings, url):
    from web import create_app

    app = create_app(dataclasses.replace(settings, webhook_allow_private=False))
    answer = submit(app.test_client(), images.noise_png(seed=1010), model=MODEL, callback_url=url)
    assert answer.status_code == 422
    assert answer.get_json()["error"]["code"] == "invalid_callback_url"


def test_the_default_schedule_retries_for_more_than_a_day():
    from shared.settings import Settings
    from webhooks.delivery import JITTER

    assert sum(Settings().webhook_retry_schedule) * (1 - JITTER) >= 24 * 3600


def test_every_delivery_in_the_log_is_json_serialisable(stack, receiver):
    job = submit(stack, images.noise_png(seed=1011), model=MODEL, callback_url=receiver.url + "/log").get_json()
    receiver.wait("/log", 1)
    log = deliveries(stack, job["id"], "delivered")
    assert json.loads(json.dumps(log))["job_id"] == job["id"]


def test_a_redirect_is_a_failed_attempt_not_followed(stack, receiver):
    receiver.answer((307, {"Location": receiver.url + "/elsewhere"}))
    job = submit(stack, images.noise_png(seed=1012), model=MODEL, callback_url=receiver.url + "/moved").get_json()
    log = deliveries(stack, job["id"], "delivered")
    assert [(a["status_code"], a["ok"]) for a in log["attempts"]] == [(307, False), (200, True)]
    assert receiver.on("/elsewhere") == []


def test_a_job_settled_by_a_process_that_died_before_announcing_it_is_caught_up(stack, receiver, settings,
                                                                               redis_client):
    from celery import Celery

    from shared.jobs import JobContext, JobStore
    from shared.keys import ANNOUNCE_KEY, Computation, OutputOptions
    from shared.tasks import celery_config
    from shared.webhooks import Announcer

    bare = JobStore.from_settings(redis_client, settings)  # settles, announces nothing: "died" right after
    comp = Computation(MODEL, "test-1", "f" * 64, OutputOptions())
    context = JobContext(callback_url=receiver.url + "/orphan")
    job = bare.submit(comp, {"name": MODEL, "version": "test-1"}, b"bytes", {"format": "PNG"}, context=context)
    bare.finish(comp, {"predictions": [], "gradcam": None}, None)
    assert redis_client.zscore(ANNOUNCE_KEY, job.job_id) is not None
    sender = Celery("test-sender", set_as_current=False)
    sender.conf.update(celery_config(settings))
    catch_up = Announcer(JobStore.from_settings(redis_client, settings), sender, settings)
    assert catch_up.catch_up(older_than_s=0) >= 1
    assert catch_up.catch_up(older_than_s=0) == 0  # announced once
    payload = verify(receiver.wait("/orphan", 1)[0])
    assert (payload["type"], payload["data"]["id"]) == ("job.completed", job.job_id)
    catch_up.jobs_settled([job.job_id])  # a late original announcer makes no second event
    time.sleep(1)
    assert len(receiver.on("/orphan")) == 1


def test_the_admin_api_lists_the_webhook_worker_with_its_deliveries(stack, receiver, settings):
    from web import create_app

    submit(stack, images.noise_png(seed=1013), model=MODEL, callback_url=receiver.url + "/seen")
    receiver.wait("/seen", 1)
    token = "webhooks-test-admin-token-0123456789abcdef"  # ADMIN_TOKEN needs 32+ characters
    admin = create_app(dataclasses.replace(settings, admin_token=token)).test_client()

    def listed():
        answer = admin.get("/api/v1/admin/workers", headers={"Authorization": f"Bearer {token}"}).get_json()
        nodes = [n for n in answer["webhook_workers"] if n.get("delivered", 0) >= 1]
        return nodes if nodes else None

    [node] = wait_for(listed, 15, "the webhook worker's heartbeat")
    assert node["name"].startswith("webhooks@") and node["concurrency"] == settings.webhook_concurrency
    assert node["name"] not in {n["name"] for n in admin.get(
        "/api/v1/admin/workers", headers={"Authorization": f"Bearer {token}"}).get_json()["workers"]}


def test_started_and_completed_events_arrive_in_order_signed(stack, receiver):
    job = submit(stack, images.noise_png(seed=1101), model=MODEL, callback_url=receiver.url + "/both",
                 webhook_events="started,completed").get_json()
    calls = receiver.wait("/both", 2)
    payloads = [verify(call) for call in calls]
    assert [p["type"] for p in payloads] == ["job.started", "job.completed"]
    assert [p["data"]["status"] for p in payloads] == ["running", "done"]
    assert [c.headers["webhook-id"] for c in calls] == [f"msg_{job['id']}_started", f"msg_{job['id']}"]
    log = deliveries(stack, job["id"], "delivered")
    assert [(e["type"], e["state"]) for e in log["events"]] == [("job.started", "delivered"),
                                                               ("job.completed", "delivered")]


def test_a_completed_event_waits_for_its_started_event_to_be_delivered(stack, receiver):
    receiver.answer((503, {}), (503, {}))  # the started event fails twice, retried a second apart each time
    job = submit(stack, images.noise_png(seed=1102), model=MODEL, callback_url=receiver.url + "/ordered",
                 webhook_events="completed,started").get_json()
    wait_done(stack, job["id"])
    calls = receiver.wait("/ordered", 4)
    assert [verify(c)["type"] for c in calls] == ["job.started"] * 3 + ["job.completed"]
    assert calls[3].at >= calls[2].finished, "the completed event was sent before its started event was delivered"
    log = deliveries(stack, job["id"], "delivered")
    assert [e["attempts"] for e in log["events"]] == [3, 1]  # waiting for its turn is not an attempt


def test_only_the_events_asked_for_are_sent(stack, receiver):
    job = submit(stack, images.noise_png(seed=1103), model=MODEL, callback_url=receiver.url + "/started-only",
                 webhook_events="started").get_json()
    wait_done(stack, job["id"])
    [call] = receiver.wait("/started-only", 1)
    assert verify(call)["type"] == "job.started"
    time.sleep(2)  # a completed event would have been sent by now
    assert len(receiver.on("/started-only")) == 1


@pytest.mark.parametrize("fields, message", [
    ({"webhook_events": "started,finished"}, "finished"),
    ({"webhook_events": "started", "callback_url": ""}, "needs a callback_url"),
])
def test_webhook_events_are_checked_at_submit(stack, receiver, fields, message):
    answer = submit(stack, images.noise_png(seed=1104), model=MODEL,
                    **{"callback_url": receiver.url + "/never", **fields})
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (422, "invalid_option")
    assert message in answer.get_json()["error"]["message"]
