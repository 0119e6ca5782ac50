"""Webhook delivery at its edges: attempts that raise, attempts that stall, duplicate messages, and
events made in one step. Real redis-server, real webhook worker, real sockets on 127.0.0.1."""
import json
import secrets
import select
import socket
import threading
import time

import pytest
import redis

from shared.keys import WEBHOOK_DUE_KEY, webhook_event_key, webhook_events_key
from shared.webhooks import EventStore
from tests.receiver import Receiver

pytestmark = pytest.mark.integration


class RawServer:
    """A TCP server on loopback that plays one misbehaving receiver; it logs when each connection
    opened and when the sender hung up."""

    def __init__(self, behaviour):
        self.behaviour, self.connections, self.lock = behaviour, [], threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        entry = [time.time(), None]
        with self.lock:
            self.connections.append(entry)
        with conn:
            try:
                conn.recv(65536)  # the request, or the TLS ClientHello
                self.behaviour(conn, self.stopped)
            except OSError:
                pass
        entry[1] = time.time()

    def intervals(self) -> list[tuple[float, float | None]]:
        with self.lock:
            return [tuple(c) for c in self.connections]

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def close_mid_response(conn: socket.socket, stopped: threading.Event) -> None:
    conn.settimeout(0.3)
    try:
        while conn.recv(65536):  # the rest of the request, so that hanging up sends FIN, not RST
            pass
    except TimeoutError:
        pass
    conn.sendall(b"HTTP/1.1 20")  # and hang up inside the status line
    conn.shutdown(socket.SHUT_WR)


def stall_tls_handshake(conn: socket.socket, stopped: threading.Event) -> None:
    """Answer a ClientHello with a TLS record header announcing 16 KiB, then trickle one byte every
    half second: every read gets a byte, so no per-read timeout ever fires. Ends when the sender hangs up."""
    conn.sendall(b"\x16\x03\x03\x40\x00")
    deadline = time.monotonic() + 120
    while not stopped.is_set() and time.monotonic() < deadline:
        readable, _, _ = select.select([conn], [], [], 0.5)
        if readable and not conn.recv(4096):
            return  # the sender hung up
        conn.sendall(b"\x02")


@pytest.fixture
def receiver():
    with Receiver() as server:
        yield server


@pytest.fixture(scope="module")
def sender(settings):
    from celery import Celery

    from shared.tasks import celery_config

    app = Celery("test-edges-sender", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def new_event(redis_client, settings, url: str) -> tuple[str, str]:
    """Store a pending job event for ``url`` as the announcer does (the URL is not checked again)."""
    subject = f"job:{secrets.token_hex(16)}"
    data = json.dumps({"id": subject.split(":")[1], "status": "done"})
    event_id = EventStore(redis_client, settings.job_ttl_s).create("job.completed", subject, url, "", data)
    return event_id, subject


def dispatch(sender, event_id: str) -> None:
    """Send the event's first attempt the way the announcer does."""
    from shared.tasks import send_webhook

    send_webhook(sender, event_id)


def wait_attempts(redis_client, settings, subject: str, count: int, timeout: float, check=None) -> list[dict]:
    """Poll the subject's attempt log (what GET .../deliveries lists) until it holds ``count`` attempts."""
    store = EventStore(redis_client, settings.job_ttl_s)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        attempts = store.attempts(subject)
        if len(attempts) >= count:
            return attempts
        time.sleep(0.1)
    raise TimeoutError(f"{subject}: {len(store.attempts(subject))} of {count} attempts logged in {timeout} s")


def gaps(attempts: list[dict]) -> list[float]:
    """Seconds between consecutive attempts' end times, as logged."""
    from datetime import datetime

    ends = [datetime.fromisoformat(a["at"].replace("Z", "+00:00")).timestamp() for a in attempts]
    return [b - a for a, b in zip(ends, ends[1:])]


def assert_no_overlap_and_spaced(intervals, least_gap: float) -> None:
    """Each connection closed before the next opened, at least ``least_gap`` seconds before it."""
    for (_, closed), (opened, _) in zip(intervals, intervals[1:]):
        assert closed is not None and opened >= closed, f"two attempts at once: {intervals}"
        assert opened - closed >= least_gap, f"an attempt came ahead of its schedule: {intervals}"


@pytest.mark.parametrize("case", ["non_ascii_path", "unresolvable_host", "closed_mid_response", "tls_to_plain_http"])
def test_an_attempt_that_raises_is_logged_and_retried_on_schedule(case, webhook_worker, redis_client, settings,
                                                                 sender, receiver):
    raw = RawServer(close_mid_response)
    url, expected = {
        # stored by a version before callback URLs were percent-encoded: http.client refuses to send it
        "non_ascii_path": (receiver.url + "/café", "UnicodeEncodeError"),
        "unresolvable_host": ("http://name.invalid/hook", "does not resolve"),
        "closed_mid_response": (f"http://127.0.0.1:{raw.port}/hook", "BadStatusLine"),
        "tls_to_plain_http": (receiver.url.replace("http:", "https:") + "/tls", "SSL"),
    }[case]
    try:
        event_id, subject = new_event(redis_client, settings, url)
        dispatch(sender, event_id)
        attempts = wait_attempts(redis_client, settings, subject, 2, timeout=20)
    finally:
        raw.close()
    first_delay = settings.webhook_retry_schedule[0]
    for number, attempt in enumerate(attempts[:2], start=1):
        assert (attempt["attempt"], attempt["ok"], attempt["status_code"]) == (number, False, None)
        assert expected in attempt["error"], attempt["error"]
        assert attempt["duration_ms"] > 0  # the attempt's time counts, name lookup included
    assert gaps(attempts[:2])[0] >= 0.85 * first_delay  # the retry waited for the schedule (-10% jitter)
    event = EventStore(redis_client, settings.job_ttl_s).get(event_id)
    assert event.attempts >= 2 and event.state in ("pending", "failed")


def test_an_attempt_stalled_in_the_tls_handshake_ends_at_the_time_budget_and_never_overlaps(
        webhook_worker, redis_client, settings, sender):
    stall = RawServer(stall_tls_handshake)
    schedule = settings.webhook_retry_schedule
    try:
        event_id, subject = new_event(redis_client, settings, f"https://127.0.0.1:{stall.port}/hook")
        dispatch(sender, event_id)

        def one_at_a_time():
            assert sum(1 for _, closed in stall.intervals() if closed is None) <= 1, stall.intervals()

        attempts = wait_attempts(redis_client, settings, subject, len(schedule) + 1, timeout=75, check=one_at_a_time)
        time.sleep(0.5)  # let the server see the last hang-up
        intervals = stall.intervals()
    finally:
        stall.close()
    budget_ms = settings.webhook_timeout_s * 1000
    assert all("timed out" in a["error"] and a["duration_ms"] <= 1.5 * budget_ms for a in attempts), attempts
    assert len(intervals) == len(schedule) + 1
    assert_no_overlap_and_spaced(intervals, 0.85 * min(schedule))
    assert EventStore(redis_client, settings.job_ttl_s).get(event_id).state == "failed"


def test_duplicate_messages_make_no_extra_early_or_overlapping_attempt(webhook_worker, redis_client, settings,
                                                                      sender, receiver):
    near_timeout = settings.webhook_timeout_s * 0.8
    receiver.answer(*[(500, {}, near_timeout)] * 3)  # three slow failures, then a slow-ish success
    receiver.answer((200, {}, near_timeout))
    event_id, subject = new_event(redis_client, settings, receiver.url + "/dup")
    store = EventStore(redis_client, settings.job_ttl_s)
    deadline = time.monotonic() + 60
    while store.get(event_id).state == "pending" and time.monotonic() < deadline:
        dispatch(sender, event_id)  # the same message again and again, as an at-least-once broker may
        time.sleep(0.3)
    calls = receiver.on("/dup")
    assert store.get(event_id).state == "delivered"
    assert len(calls) == 4, [(c.at, c.finished) for c in calls]
    assert_no_overlap_and_spaced([(c.at, c.finished) for c in calls], 0.85 * min(settings.webhook_retry_schedule))
    assert [a["status_code"] for a in store.attempts(subject)] == [500, 500, 500, 200]


def test_name_lookup_time_counts_inside_the_attempts_time_budget(redis_client, settings, receiver, monkeypatch):
    from webhooks.delivery import Deliverer

    lookup_s = settings.webhook_timeout_s * 0.7
    answer_s = settings.webhook_timeout_s * 0.7  # either alone fits the budget; together they do not
    receiver.answer((200, {}, answer_s))
    real = socket.getaddrinfo

    def slow_lookup(host, *args, **kwargs):  # a slow resolver, the one edge we cannot run for real here
        if host == "localhost":
            time.sleep(lookup_s)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    url = receiver.url.replace("127.0.0.1", "localhost") + "/lookup"
    event_id, subject = new_event(redis_client, settings, url)
    Deliverer(settings, redis_client).attempt(event_id)
    [attempt] = EventStore(redis_client, settings.job_ttl_s).attempts(subject)
    assert attempt["ok"] is False and "timed out" in attempt["error"], attempt
    assert attempt["duration_ms"] >= lookup_s * 1000
    assert attempt["duration_ms"] <= 1.5 * settings.webhook_timeout_s * 1000


def test_creating_an_event_is_one_step_a_refused_write_leaves_no_trace(redis_client, settings):
    user = "edges-no-zadd"
    redis_client.acl_setuser(user, enabled=True, nopass=True, keys=["~*"], channels=["*"],
                             commands=["+@all", "-zadd"])
    host, port = redis_client.connection_pool.connection_kwargs["host"], redis_client.connection_pool.connection_kwargs["port"]
    refused = redis.Redis(host=host, port=port, username=user)
    subject = f"job:{secrets.token_hex(16)}"
    event_id = "msg_" + subject.split(":")[1]
    try:
        with pytest.raises(redis.RedisError):
            EventStore(refused, settings.job_ttl_s).create("job.completed", subject, "http://example.com/", "", "{}")
    finally:
        refused.close()
        redis_client.acl_deluser(user)
    assert not redis_client.exists(webhook_event_key(event_id), webhook_events_key(subject))
    assert redis_client.zscore(WEBHOOK_DUE_KEY, event_id) is None
    store = EventStore(redis_client, settings.job_ttl_s)  # the catch-up's later try makes the whole event
    assert store.create("job.completed", subject, "http://example.com/", "", "{}") == event_id
    assert store.get(event_id).state == "pending" and [e.id for e in store.for_subject(subject)] == [event_id]
    assert redis_client.zscore(WEBHOOK_DUE_KEY, event_id) is not None


def test_a_batch_whose_announcer_died_after_counting_its_last_job_still_completes(redis_client, settings, sender):
    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobContext, JobStore
    from shared.keys import Computation, OutputOptions
    from shared.webhooks import Announcer

    jobs = JobStore.from_settings(redis_client, settings)  # settles, announces nothing
    batches = BatchStore(redis_client, jobs, settings.job_ttl_s)
    batch_id, comp = new_batch_id(), Computation("tiny-resnet18", "test-1", secrets.token_hex(32), OutputOptions())
    job = jobs.submit(comp, {"name": comp.model, "version": "test-1"}, b"bytes", {"format": "PNG"},
                      context=JobContext(batch_id=batch_id), job_id=secrets.token_hex(16))
    batches.create(batch_id, [job.job_id], "", "http://127.0.0.1:9/batch")
    batches.open(batch_id, [job.job_id])  # every job submitted: the batch is seen
    jobs.finish(comp, {"predictions": [], "gradcam": None}, None)
    assert batches.job_settled(batch_id, job.job_id)  # the announcer counted the last job, then died
    Announcer(JobStore.from_settings(redis_client, settings), sender, settings).jobs_settled([job.job_id])
    [event] = EventStore(redis_client, settings.job_ttl_s).for_subject(f"batch:{batch_id}")
    assert event.type == "batch.completed" and json.loads(event.body)["data"]["status"] == "done"


def test_an_attempt_whose_lease_ran_out_cannot_let_a_third_attempt_overlap_the_second(redis_client, settings,
                                                                                     receiver):
    from shared.keys import webhook_lock_key
    from webhooks.delivery import Deliverer

    receiver.answer((500, {}, 1.0), (500, {}, settings.webhook_timeout_s * 0.8))
    event_id, _ = new_event(redis_client, settings, receiver.url + "/lease")
    deliverer, store, outcomes = Deliverer(settings, redis_client), EventStore(redis_client, settings.job_ttl_s), {}

    def attempt(name: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: outcomes.__setitem__(name, deliverer.attempt(event_id)))
        thread.start()
        return thread

    def lease_runs_out_and_the_poller_claims_it() -> None:
        redis_client.zadd(WEBHOOK_DUE_KEY, {event_id: 0})
        assert event_id in store.claim_due()

    first = attempt("first")
    receiver.wait("/lease", 1, timeout=10)
    redis_client.pexpire(webhook_lock_key(event_id), 1)  # as if the first had overrun its lease
    time.sleep(0.05)
    lease_runs_out_and_the_poller_claims_it()
    second = attempt("second")
    receiver.wait("/lease", 2, timeout=10)
    first.join(10)  # the first ends while the second holds the event
    lease_runs_out_and_the_poller_claims_it()
    outcomes["third"] = deliverer.attempt(event_id)
    second.join(10)
    assert outcomes["third"] == "busy", outcomes
    assert len(receiver.on("/lease")) == 2
