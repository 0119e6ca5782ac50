"""DURABLE_ACCEPT confirms a job on the server that holds it, or answers 503 (issue 20, item 7).

The web follows the master through Redis Sentinel. The job's submit and its confirmation (marker,
``WAIT``) used to be separate round trips, and the fsync setting was read once at start-up, so a
failover between them could confirm a job on a server that lacks it, or trust an fsync the new master
does not do. Each test runs a real master, replicas and three sentinels on loopback, and the app
through its factory; a hook the test adds runs after the job is written and before it is confirmed.
"""
import dataclasses
import io

import pytest
import redis

from tests import images
from tools import stack

pytestmark = pytest.mark.integration
MASTER = "durable"
MODEL = "tiny-resnet18"


def _master_port(sentinel_port: int) -> int | None:
    with redis.Redis(port=sentinel_port, socket_timeout=1) as sentinel:
        try:
            found = sentinel.sentinel_get_master_addr_by_name(MASTER)
        except redis.RedisError:
            return None
    return int(found[1]) if found else None


def _replication(port: int) -> dict:
    with redis.Redis(port=port, socket_timeout=2) as client:
        return client.info("replication")


def _sentinels_ready(ports: list[int], replicas: int) -> bool:
    for port in ports:
        with redis.Redis(port=port, socket_timeout=1) as sentinel:
            master = sentinel.sentinel_master(MASTER)
        if master["num-slaves"] != replicas or master["num-other-sentinels"] != len(ports) - 1:
            return False
    return True


@pytest.fixture
def sentinel_stack(tmp_path, settings):
    """Start a master (with ``master_args``), replicas, three sentinels and the app (DURABLE_ACCEPT,
    following the sentinels); return the app, the master and the port of a sentinel."""
    from web import create_app

    procs, apps = [], []

    def start(master_args: tuple[str, ...], replicas: int):
        (tmp_path / "master").mkdir()
        master_port = stack.free_port()
        master, master_url = stack.start_redis(tmp_path / "master", port=master_port, extra=master_args)
        procs.append(master)
        replica_ports = []
        for i in range(replicas):
            (tmp_path / f"replica{i}").mkdir()
            replica_ports.append(stack.free_port())
            procs.append(stack.start_redis(tmp_path / f"replica{i}", port=replica_ports[-1], replica_of=master_port)[0])
        stack.wait_for(lambda: all(_replication(p).get("master_link_status") == "up" for p in replica_ports), 15,
                       "the replicas to sync")
        ports = []
        for _ in range(3):
            proc, port = stack.start_sentinel(tmp_path, master_port, MASTER, down_after_ms=1000)
            procs.append(proc)
            ports.append(port)
        stack.wait_for(lambda: _sentinels_ready(ports, replicas), 30, "the sentinels to know each other and the replicas")
        own = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
                                  redis_sentinels=tuple(("127.0.0.1", p) for p in ports), redis_sentinel_master=MASTER,
                                  models=(MODEL,), default_model=MODEL, durable_accept=True)
        apps.append(create_app(own))
        return apps[-1], master, master_port, ports[0]

    yield start
    for app in apps:  # close its connections to the servers stopped next
        svc = app.extensions["imgsvc"]
        svc.redis.close()
        svc.blocking_redis.close()
        svc.celery.close()
    for proc in reversed(procs):
        stack.stop(proc)


def _fail_over(master, master_port: int, sentinel_port: int, replicas_after: int) -> int:
    """SIGKILL the master; return the port of the replica the sentinels promote, once it has
    ``replicas_after`` replicas of its own."""
    master.kill()
    master.wait(5)
    new_port = stack.wait_for(lambda: (p := _master_port(sentinel_port)) != master_port and p, 30, "a new master")
    stack.wait_for(lambda: (info := _replication(new_port))["role"] == "master"
                   and info["connected_slaves"] >= replicas_after, 30, "the new master")
    return new_port


def _post(client, seed: int):
    return client.post("/api/v1/jobs", data={"image": (io.BytesIO(images.noise_png(seed=seed)), "u.png")},
                       content_type="multipart/form-data")


def _follow(svc) -> None:
    """Let the web's connections find the new master (as its other requests would), bounded."""
    stack.wait_for(lambda: _pings(svc.redis), 30, "the web to reach the new master")


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


def test_a_job_the_promoted_replica_lacks_is_not_confirmed(sentinel_stack):
    app, master, master_port, sentinel_port = sentinel_stack((), replicas=2)  # everysec: a replica's WAIT
    svc, client, armed = app.extensions["imgsvc"], app.test_client(), {}

    @app.after_request  # runs before DURABLE_ACCEPT's own hook (Flask runs them in reverse order)
    def fail_over_before_the_confirmation(response):
        if not armed:
            return response
        promoted = _fail_over(master, master_port, sentinel_port, replicas_after=1)
        # Replication is asynchronous: the write the old master acknowledged may never have left it.
        # On loopback it always arrives, so the test takes it away from the promoted replica.
        with redis.Redis(port=promoted) as client:
            client.delete(f"job:{response.get_json()['id']}")
        _follow(svc)
        armed["done"] = True
        return response

    assert _post(client, 85_000).status_code == 202
    armed["on"] = True
    answer = _post(client, 85_001)
    assert armed.get("done"), "the failover hook did not run"
    assert answer.status_code == 503, answer.get_json()
    assert answer.get_json()["error"]["code"] == "unavailable" and "Retry-After" in answer.headers


def test_the_fsync_of_the_server_that_holds_the_job_decides_not_the_one_read_at_start_up(sentinel_stack):
    app, master, master_port, sentinel_port = sentinel_stack(  # the master fsyncs every write, its replica no
        ("--appendonly", "yes", "--appendfsync", "always"), replicas=1)
    svc, client = app.extensions["imgsvc"], app.test_client()
    assert _post(client, 85_100).status_code == 202
    _fail_over(master, master_port, sentinel_port, replicas_after=0)
    _follow(svc)
    answer = _post(client, 85_101)  # the new master neither fsyncs every write nor has a replica
    assert answer.status_code == 503, answer.get_json()
    assert answer.get_json()["error"]["code"] == "unavailable"
