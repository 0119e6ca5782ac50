"""Redis Sentinel: the settings that name the sentinels, the clients built from them, and a real
failover in the middle of a stream of uploads.

The failover stack is one master, one replica and three sentinels (quorum 2) on loopback, a worker
and the web app under gunicorn configured with REDIS_SENTINELS and REDIS_SENTINEL_MASTER only: their
REDIS_URL names a port nobody listens on, so every client that reaches Redis found it through the
sentinels.
"""
import dataclasses
import io
import time

import pytest
import redis
import redis.sentinel
import requests

from shared import redisconn, sentinel
from shared.settings import Settings, SettingsError
from shared.tasks import celery_config
from tests import images
from tests.conftest import ARTIFACTS
from tests.receiver import Receiver
from tools import stack

MASTER = "imgsvc"
SENTINELS_ENV = {"REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380", "REDIS_SENTINEL_MASTER": MASTER}


# -- settings and the clients built from them (no servers) ------------------------------------------

def test_sentinel_settings_are_parsed_and_survive_the_trip_through_the_environment():
    settings = Settings.from_env({**SENTINELS_ENV, "REDIS_SENTINEL_PASSWORD": "s3cret", "CACHE_URL": "redis://c:1/0",
                                  "CACHE_SENTINELS": "[::1]:26381", "CACHE_SENTINEL_MASTER": "cache"})
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380))
    assert settings.redis_sentinel_master == MASTER and settings.redis_sentinel_password == "s3cret"
    assert settings.cache_sentinels == (("::1", 26381),) and settings.cache_sentinel_master == "cache"
    assert Settings.from_env(settings.to_env()) == settings
    plain = Settings.from_env({})
    assert plain.redis_sentinels == () and plain.redis_sentinel_master == "" and plain.cache_sentinels == ()


@pytest.mark.parametrize("env, fragment", [
    ({"REDIS_SENTINELS": "sentinel-a", "REDIS_SENTINEL_MASTER": MASTER},
     "REDIS_SENTINELS must be comma-separated host:port"),
    ({"REDIS_SENTINELS": "a:1,b:port", "REDIS_SENTINEL_MASTER": MASTER}, "got 'b:port'"),
    ({"REDIS_SENTINELS": "a:0", "REDIS_SENTINEL_MASTER": MASTER}, "got 'a:0'"),
    ({"REDIS_SENTINELS": "redis://a:26379", "REDIS_SENTINEL_MASTER": MASTER}, "host:port pairs"),
    ({"REDIS_SENTINELS": "a:26379"}, "REDIS_SENTINELS needs REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINEL_MASTER": MASTER}, "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is empty"),
    ({"CACHE_SENTINELS": ":26379", "CACHE_SENTINEL_MASTER": "c"}, "CACHE_SENTINELS must be"),
    ({"CACHE_SENTINELS": "a:26379"}, "CACHE_SENTINELS needs CACHE_SENTINEL_MASTER"),
])
def test_bad_sentinel_settings_are_refused_with_their_name(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_celery_follows_the_sentinels_and_keeps_its_visibility_timeout():
    from kombu import Connection

    settings = Settings.from_env({**SENTINELS_ENV, "REDIS_URL": "redis://:pw@ignored:6379/3",
                                  "REDIS_SENTINEL_PASSWORD": "s3cret", "VISIBILITY_TIMEOUT_S": "777"})
    config = celery_config(settings)
    assert config["broker_url"] == "sentinel://:pw@10.0.0.1:26379/3;sentinel://:pw@sentinel-b:26380/3"
    transport = config["broker_transport_options"]
    assert transport["master_name"] == MASTER and transport["sentinel_kwargs"]["password"] == "s3cret"
    assert transport["visibility_timeout"] == 777 == config["visibility_timeout"]
    assert config["result_backend_transport_options"]["visibility_timeout"] == 777
    connection = Connection(config["broker_url"], transport_options=transport)  # kombu's parse, no I/O
    assert connection.transport_cls == "sentinel" and len(connection.alt) == 2 and connection.virtual_host == "3"
    assert connection.password == "pw"


def test_without_sentinels_celery_and_the_limiter_use_redis_url_as_before():
    settings = Settings.from_env({"REDIS_URL": "redis://h:1/2", "VISIBILITY_TIMEOUT_S": "777"})
    config = celery_config(settings)
    assert config["broker_url"] == "redis://h:1/2"
    # no sentinel options: only the visibility timeout and the lanes' priority lists
    assert config["broker_transport_options"] == {"visibility_timeout": 777, "priority_steps": list(range(10))}
    assert sentinel.limiter_storage(settings) == ("redis://h:1/2", {})
    assert isinstance(redisconn.client(settings).connection_pool.connection_class(), redis.Connection)


def test_the_limiter_storage_asks_the_sentinels_for_the_master():
    from limits.storage import RedisSentinelStorage, storage_from_string

    settings = Settings.from_env({**SENTINELS_ENV, "REDIS_URL": "redis://:pw@ignored:6379/3",
                                  "REDIS_SENTINEL_PASSWORD": "s3cret"})
    uri, options = sentinel.limiter_storage(settings)
    assert uri == f"redis+sentinel://10.0.0.1:26379,sentinel-b:26380/{MASTER}"
    storage = storage_from_string(uri, **options)  # limits connects lazily: no server needed here
    assert isinstance(storage, RedisSentinelStorage) and storage.service_name == MASTER
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
            for c in storage.sentinel.sentinels] == list(settings.redis_sentinels)
    assert storage.sentinel.sentinels[0].connection_pool.connection_kwargs["password"] == "s3cret"
    master = storage.storage.connection_pool.connection_kwargs
    assert master["db"] == 3 and master["password"] == "pw" and not storage.use_replicas


def test_redis_clients_of_each_role_follow_their_sentinels():
    settings = Settings.from_env({**SENTINELS_ENV, "REDIS_URL": "redis://ignored:6379/4"})
    for role in ("main", "cache"):  # the cache shares the main role's server, so its sentinels too
        pool = redisconn.client(settings, role, socket_timeout=7).connection_pool
        assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.service_name == MASTER
        assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["socket_timeout"] == 7
    own = dataclasses.replace(settings, cache_sentinels=(("c", 1),), cache_sentinel_master="cache")
    assert sentinel.target(own, "cache", own.redis_url).addresses == (("c", 1),)
    assert sentinel.target(own, "cache", "redis://a-cache-server:6379/0").master == "cache"
    assert sentinel.target(settings, "cache", "redis://a-cache-server:6379/0") is None


# -- a real failover ------------------------------------------------------------------------------

DOWN_AFTER_MS = 1000
STREAM_AFTER_FAILOVER_S = 4  # uploads keep coming this long after the new master is named
KILL_AT_S, STREAM_MAX_S = 3.0, 30.0
# Replication is asynchronous: what the master acknowledged in its last moments may never reach the
# replica. On loopback the replica trails by well under a millisecond; a job the web tier answered
# 202 more than LOSS_WINDOW_S before the kill must survive the failover.
LOSS_WINDOW_S = 0.5


def _master_addr(port: int):
    try:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
    except redis.RedisError:
        return None


def _replica_in_sync(url: str) -> bool:
    info = redis.Redis.from_url(url).info("replication")
    return info.get("master_link_status") == "up"


def _replication_delay_s(master_url: str, replica_url: str, samples: int = 20) -> float:
    """The longest a write took to show on the replica, of ``samples`` (bounded by a 1 s wait each)."""
    master, replica, worst = redis.Redis.from_url(master_url), redis.Redis.from_url(replica_url), 0.0
    for i in range(samples):
        written = time.perf_counter()
        master.set("lag-probe", i)
        stack.wait_for(lambda: replica.get("lag-probe") == str(i).encode(), 1, "the replica", interval=0.0001)
        worst = max(worst, time.perf_counter() - written)
    master.delete("lag-probe")
    return worst


def _sentinels_agree(ports: list[int]) -> bool:
    """Every sentinel knows the replica and the two other sentinels (found through the master's hellos)."""
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        master = client.sentinel_master(MASTER)
        if master["num-slaves"] < 1 or master["num-other-sentinels"] < len(ports) - 1:
            return False
    return True


@pytest.fixture(scope="module")
def failover_stack(tmp_path_factory, settings):
    """Master, replica, three sentinels, then a worker, the webhook worker and gunicorn that know only
    the sentinels, and a receiver for the callbacks."""
    root = tmp_path_factory.mktemp("sentinel")
    (root / "master").mkdir(), (root / "replica").mkdir()
    procs = {}
    try:
        yield from _failover_stack(root, settings, procs)
    finally:
        for proc in reversed(procs.values()):
            stack.stop(proc)


def _failover_stack(root, settings, procs):
    try:
        master_port = stack.free_port()
        procs["master"], master_url = stack.start_redis(root / "master", port=master_port)
        procs["replica"], replica_url = stack.start_redis(root / "replica", replica_of=master_port)
        stack.wait_for(lambda: _replica_in_sync(replica_url), 15, "the replica to sync")
        ports = []
        for i in range(3):
            procs[f"sentinel{i}"], port = stack.start_sentinel(root, master_port, MASTER, quorum=2,
                                                              down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=5000)
            ports.append(port)
        stack.wait_for(lambda: _sentinels_agree(ports), 20, "the sentinels to find each other and the replica")
    except (OSError, RuntimeError, TimeoutError, redis.RedisError) as exc:
        pytest.skip(f"Redis Sentinel mode could not start here: {exc}")
    nobody = stack.free_port()  # REDIS_URL names a port nobody listens on: only its db number is used
    own = dataclasses.replace(
        settings, redis_url=f"redis://127.0.0.1:{nobody}/0",
        redis_sentinels=tuple(("127.0.0.1", p) for p in ports), redis_sentinel_master=MASTER,
        models=("tiny-resnet18",), default_model="tiny-resnet18", worker_concurrency=1,
        stuck_after_s=5, sweep_interval_s=1)
    ARTIFACTS.mkdir(exist_ok=True)
    procs["worker"] = stack.start_worker(own, ARTIFACTS / "sentinel-worker.log", name="sentinel")
    procs["webhooks"] = stack.start_webhook_worker(own, ARTIFACTS / "sentinel-webhooks.log", name="sentinel-hooks")
    procs["web"], base_url = stack.start_web(own)
    with Receiver() as receiver:
        yield own, base_url, procs, (master_url, replica_url), ports, receiver


def _submit(base_url: str, seed: int, callback_url: str) -> tuple[int | str, dict | None]:
    """POST one fresh image; return its status and JSON body (or the name of the connection error)."""
    image = images.noise_png(seed=seed, size=(48, 32))
    try:
        answer = requests.post(f"{base_url}/api/v1/jobs", files={"image": ("u.png", image, "image/png")},
                               data={"callback_url": callback_url}, timeout=15)
    except requests.RequestException as exc:
        return type(exc).__name__, None
    return answer.status_code, answer.json()


@pytest.mark.integration
def test_a_master_killed_mid_stream_fails_over_without_losing_acknowledged_jobs(failover_stack):
    settings, base_url, procs, (master_url, replica_url), sentinel_ports, receiver = failover_stack
    master_port = redis.Redis.from_url(master_url).connection_pool.connection_kwargs["port"]
    lag_s = _replication_delay_s(master_url, replica_url)
    answers, killed_at, failover_at = _stream_through_a_kill(base_url, procs["master"], master_port,
                                                             sentinel_ports[0], receiver.url + "/done")
    assert killed_at is not None and failover_at is not None, "the sentinels never promoted the replica"
    slowest = max(answered - sent for sent, answered, _, _ in answers)
    assert slowest < 5, f"a request took {slowest:.1f} s during the switch"
    assert lag_s < LOSS_WINDOW_S, f"the replica trailed by {lag_s:.3f} s: the loss window assumes less"

    unexpected = [(round(sent, 2), status, body) for sent, _, status, body in answers
                  if status not in (200, 202, 503)]
    assert not unexpected, f"answers other than 202/200/503 JSON during the switch: {unexpected[:5]}"
    refused = [(sent, body) for sent, _, status, body in answers if status == 503]
    assert all(body["error"]["code"] == "unavailable" for _, body in refused)
    assert all(killed_at <= sent <= failover_at + 2 for sent, _ in refused), \
        f"503s outside the switch ({killed_at:.1f}-{failover_at:.1f} s): {[round(s, 1) for s, _ in refused]}"
    after = [status for sent, _, status, _ in answers if sent > failover_at + 2]
    assert after and all(status == 202 for status in after), f"submits after the failover: {after}"

    accepted = {body["id"]: answered for _, answered, status, body in answers if status == 202}
    outcomes = _final_states(base_url, list(accepted))
    lost = [job_id for job_id, outcome in outcomes.items() if outcome == 404]
    print(f"replica lag {lag_s * 1000:.2f} ms; failover {failover_at - killed_at:.1f} s after the kill; "
          f"{len(refused)} answered 503; {len(accepted)} accepted, {len(lost)} lost in the {LOSS_WINDOW_S} s window")
    for job_id, answered in accepted.items():
        in_window = killed_at - LOSS_WINDOW_S <= answered <= killed_at
        allowed = ("done", 404) if in_window else ("done",)
        assert outcomes[job_id] in allowed, \
            f"job {job_id} answered 202 at {answered - killed_at:+.3f} s from the kill ended {outcomes[job_id]}"
    # The webhook worker followed the master too: every job done is called back (at least once).
    done = {job_id for job_id, outcome in outcomes.items() if outcome == "done"}
    stack.wait_for(lambda: done <= {call.json()["data"]["id"] for call in receiver.on("/done")}, 30,
                   "a callback for every job done")
    _assert_batches_are_taken_on_the_new_master(settings, master_port)


def _stream_through_a_kill(base_url: str, master, master_port: int, sentinel_port: int, callback_url: str):
    """Upload at a steady pace, SIGKILL the master at KILL_AT_S, go on until STREAM_AFTER_FAILOVER_S
    after a sentinel names a new master; return the answers (sent at, answered at, status, body) and
    when the kill and the promotion were seen, in seconds from the start."""
    answers, start, killed_at, failover_at, seed = [], time.monotonic(), None, None, 70_000
    while time.monotonic() - start < STREAM_MAX_S:  # bounded in time and, by the pace, in count
        now = time.monotonic() - start
        if killed_at is None and now >= KILL_AT_S:
            master.kill()  # SIGKILL: no goodbye to clients, replicas or sentinels
            master.wait(5)
            killed_at = time.monotonic() - start
        if killed_at is not None and failover_at is None:
            addr = _master_addr(sentinel_port)
            if addr and int(addr[1]) != master_port:
                failover_at = time.monotonic() - start
        if failover_at is not None and now > failover_at + STREAM_AFTER_FAILOVER_S:
            break
        sent = time.monotonic() - start
        status, body = _submit(base_url, seed, callback_url)
        answers.append((sent, time.monotonic() - start, status, body))
        seed += 1
        time.sleep(0.05)
    return answers, killed_at, failover_at


def _assert_batches_are_taken_on_the_new_master(settings: Settings, old_master_port: int) -> None:
    """The workers take their batches with a script on the broker connection: the master's, found anew."""
    from kombu import Connection

    from shared.tasks import inference_queue
    from worker.broker import BatchReceiver

    config = celery_config(settings)
    with Connection(config["broker_url"], transport_options=config["broker_transport_options"]) as connection:
        taker = BatchReceiver.for_connection(connection, owner="test")
        pool = taker.client.connection_pool
        assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.is_master
        assert taker.take(inference_queue("tiny-resnet18"), 4) == []
        assert pool.get_master_address()[1] != old_master_port


def _final_states(base_url: str, job_ids: list[str], timeout_s: float = 45) -> dict[str, str | int]:
    """Poll each job until it is done (or failed, or unknown: 404); what it is at the deadline otherwise."""
    outcomes, give_up = {}, time.monotonic() + timeout_s
    pending = list(job_ids)
    while pending and time.monotonic() < give_up:
        for job_id in list(pending):
            answer = requests.get(f"{base_url}/api/v1/jobs/{job_id}", timeout=10)
            outcomes[job_id] = 404 if answer.status_code == 404 else answer.json().get("status", answer.status_code)
            if outcomes[job_id] in ("done", "failed", 404):
                pending.remove(job_id)
        time.sleep(0.5)
    return outcomes


def test_no_master_to_be_found_is_a_prompt_503_not_a_500():
    """With no sentinel answering (MasterNotFoundError), every Redis-backed answer is 503 JSON, at once."""
    from web import create_app

    own = Settings(redis_sentinels=(("127.0.0.1", stack.free_port()), ("127.0.0.1", stack.free_port())),
                   redis_sentinel_master=MASTER)
    client = create_app(own).test_client()
    started = time.monotonic()
    answers = [client.post("/api/v1/jobs", data={"image": (io.BytesIO(images.noise_png(seed=70_999)), "u.png")},
                           content_type="multipart/form-data"),
               client.get("/api/v1/jobs/0123456789abcdef0123456789abcdef"), client.get("/readyz")]
    # Each sentinel is asked once: redis-py's default retries made these 25 s, 3 Redis-less requests.
    assert time.monotonic() - started < 5
    for answer in answers:
        assert answer.status_code == 503, answer.get_data(as_text=True)
        assert answer.get_json()["error"]["code"] == "unavailable" and "Retry-After" in answer.headers
