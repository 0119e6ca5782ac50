"""The admin API (``/api/v1/admin/``) and the live admin page (``/admin``).

Both exist only when ADMIN_TOKEN is set (404 otherwise); every API call needs
``Authorization: Bearer <ADMIN_TOKEN>`` (never ``?token=``; failures are rate limited: web/tokens.py).
Reads come from Redis (heartbeats, queues, statistics); actions on a worker go through Celery's remote
control, addressed to its node name.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from flask import Blueprint, current_app, jsonify, render_template, request
from kombu.exceptions import OperationalError

from shared import fleet, stats
from shared.apikeys import MAX_WEIGHT, MIN_WEIGHT
from shared.errors import AdminUnauthorized, InvalidOption, NotFound, Unavailable
from shared.keys import cached_prefixes, drain_key
from shared.tasks import inference_queue
from web.tokens import refuse_token_in_url, require_bearer

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__)
API = "/api/v1/admin"
CONTROL_TIMEOUT_S = 5.0
QUEUE_CHANGE_WAIT_S = 3.0  # a worker applies add/cancel_consumer just after it answers: wait to see it
MAX_POOL_STEP = 16
ADMIN_TOP_SHARES = 50  # senders listed by name on the queue view; the rest summed as "other"
WINDOWS_MIN = (1, 5, 60)
_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,200}$")


def services():
    return current_app.extensions["imgsvc"]


@bp.before_request
def require_admin_token():
    """Hide everything without ADMIN_TOKEN; ask the API's callers for it (web/tokens.py)."""
    token = services().settings.admin_token
    if not token:
        raise NotFound("No such resource.")
    refuse_token_in_url()  # the page too: it asks for the token and keeps it in sessionStorage
    if not request.path.startswith(API + "/"):
        return  # the page itself holds no data; it sends the token with each call
    missing = AdminUnauthorized("The admin API needs the header 'Authorization: Bearer <ADMIN_TOKEN>'.")
    require_bearer((token,), missing=missing, wrong=AdminUnauthorized("The admin token is not valid."))


@bp.after_request
def never_cache(response):
    response.headers["Cache-Control"] = "no-store"
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="imgsvc-admin"'
    return response


@bp.get("/admin")
def page():
    return render_template("admin.html")


@bp.get(f"{API}/workers")
def list_workers():
    """Every live worker node with its children (device, models, counters, latency, GPU memory), and
    every webhook worker with its delivery outcomes."""
    client, ttl_s = services().redis, services().settings.worker_ttl_s
    return jsonify({"workers": fleet.nodes(client, ttl_s), "webhook_workers": fleet.webhook_nodes(client, ttl_s)})


def _model_names() -> list[str]:
    """Models served by the catalogue or by any live worker."""
    svc = services()
    names = {card.name for card in svc.catalog}
    for child in fleet.live_children(svc.redis, svc.settings.worker_ttl_s):
        names.update(child.get("models", {}))
    return sorted(names)


@bp.get(f"{API}/queues")
def list_queues():
    """Depth (in all and per lane), oldest waiting job's age, live workers and backlog per worker of each
    model's queue and the webhooks queue; and each sender's computations in flight, largest first."""
    svc = services()
    return jsonify({"queues": fleet.queues(svc.redis, fleet.known_queues(_model_names()),
                                           ttl_s=svc.settings.worker_ttl_s),
                    "shares": fleet.shares(svc.redis, top=ADMIN_TOP_SHARES)})


@bp.get(f"{API}/keys")
def list_keys():
    """Every API key (never the key itself) with its fair-share weight and its computations in flight."""
    svc = services()
    in_flight = {entry["share"]: entry["in_flight"] for entry in fleet.shares(svc.redis)}
    return jsonify({"keys": [{**key.public(), "in_flight": in_flight.get(f"key:{key.id}", 0)}
                             for key in svc.keys.list()]})


@bp.post(f"{API}/keys/<key_id>/weight")
def set_key_weight(key_id: str):
    """Set a key's fair-share weight from the JSON body {"weight": w}."""
    body = request.get_json(silent=True)
    weight = body.get("weight") if isinstance(body, dict) else None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise InvalidOption(f'Send {{"weight": w}} with w a number from {MIN_WEIGHT} to {MAX_WEIGHT:g}.')
    key = services().keys.set_weight(key_id, float(weight)) if _NAME.match(key_id) else None
    if key is None:
        raise NotFound(f"No API key with id {key_id!r}; GET {API}/keys lists them.")
    return jsonify(key.public())


@bp.get(f"{API}/stats")
def fleet_stats():
    """Throughput, latency p50/p95 by model and cache hit rate for the last 1/5/60 minutes; chart points."""
    client, models = services().redis, _model_names()
    buckets = stats.read_minutes(client, max(WINDOWS_MIN), models)
    windows = {f"{m}m": stats.summarise(buckets[-m:], models) for m in WINDOWS_MIN}
    return jsonify({"windows": windows, "cache_size": fleet.cache_size(services().store.cache),
                    "series": stats.chart_series(buckets, models)})


def _node(name: str) -> dict:
    """Return the live node called ``name`` or raise NotFound."""
    svc = services()
    for node in fleet.nodes(svc.redis, svc.settings.worker_ttl_s):
        if node["name"] == name:
            return node
    raise NotFound(f"No live worker is called {name!r}; GET {API}/workers lists them.")


def _control(command: str, name: str, arguments: dict) -> dict:
    """Run one Celery remote-control command on node ``name``; return its reply or raise."""
    try:
        replies = services().celery.control.broadcast(command, arguments=arguments, destination=[name],
                                                       reply=True, timeout=CONTROL_TIMEOUT_S, limit=1)
    except OperationalError as exc:
        raise Unavailable(f"The broker is unreachable: {exc}") from None
    answer = next((reply[name] for reply in replies or [] if name in reply), None)
    if answer is None:
        raise Unavailable(f"Worker {name} did not answer {command} within {CONTROL_TIMEOUT_S:g} s.")
    if "error" in answer:
        raise InvalidOption(f"Worker {name} refused {command}: {answer['error']}")
    return answer


def _pool(name: str) -> dict:
    """Ask the node how many children its pool has now (a change shows up within a second or so)."""
    replies = services().celery.control.inspect(destination=[name], timeout=CONTROL_TIMEOUT_S, limit=1).stats()
    if not replies or name not in replies:
        raise Unavailable(f"Worker {name} did not report its pool within {CONTROL_TIMEOUT_S:g} s.")
    pool = replies[name].get("pool", {})
    return {"processes": len(pool.get("processes", []))}


def _step() -> int:
    """Read ``n`` (children to add or remove) from the JSON body; default 1."""
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise InvalidOption("The body must be a JSON object such as {\"n\": 1}.")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_POOL_STEP:
        raise InvalidOption(f"n must be a whole number from 1 to {MAX_POOL_STEP}, got {n!r}.")
    return n


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidOption(f"{name!r} is not a worker name (like worker1@host).")
    return name


@bp.post(f"{API}/workers/<name>/grow")
def grow_pool(name: str):
    """Add ``n`` children to a worker's pool (each loads the models before it takes jobs)."""
    node, n = _node(_checked_name(name)), _step()
    before = _pool(node["name"])["processes"]
    reply = _control("pool_grow", node["name"], {"n": n})
    return jsonify({"worker": node["name"], "action": "grow", "n": n, "reply": reply,
                    "pool": {"processes": before, "target": before + n}})


@bp.post(f"{API}/workers/<name>/shrink")
def shrink_pool(name: str):
    """Remove ``n`` idle children from a worker's pool (at least one stays; drain to stop it all)."""
    node, n = _node(_checked_name(name)), _step()
    pool = _pool(node["name"])
    if pool["processes"] - n < 1:
        raise InvalidOption(f"Worker {name} has {pool['processes']} child(ren); shrinking by {n} would leave "
                            "none. Drain it and stop it instead.")
    reply = _control("pool_shrink", node["name"], {"n": n})
    return jsonify({"worker": node["name"], "action": "shrink", "n": n, "reply": reply,
                    "pool": {"processes": pool["processes"], "target": pool["processes"] - n}})


@bp.post(f"{API}/workers/<name>/drain")
def drain(name: str):
    """Stop a worker consuming (its in-flight jobs finish); new jobs go to the others."""
    node = _node(_checked_name(name))
    services().redis.set(drain_key(node["name"]), "1")  # first: its children stop batching extra messages
    queues, cancelled = [], []
    try:
        queues = _active_queues(node["name"])
        for queue in queues:
            _control("cancel_consumer", node["name"], {"queue": queue})
            cancelled.append(queue)
    except Unavailable:
        _undo_drain(node["name"], cancelled)  # a half-drained worker would consume without batching
        raise
    now = _queues_once(node["name"], lambda active: not set(active) & set(queues))
    return jsonify({"worker": {**_node(node["name"]), "queues": now}, "action": "drain", "stopped": queues})


@bp.post(f"{API}/workers/<name>/resume")
def resume(name: str):
    """Make a drained worker consume its models' queues again."""
    node = _node(_checked_name(name))
    queues = sorted(inference_queue(model) for model in node["models"])
    for queue in queues:
        _control("add_consumer", node["name"], {"queue": queue})
    services().redis.delete(drain_key(node["name"]))
    now = _queues_once(node["name"], lambda active: set(queues) <= set(active))
    return jsonify({"worker": {**_node(node["name"]), "queues": now}, "action": "resume", "started": queues})


def _undo_drain(name: str, cancelled: list[str]) -> None:
    """Put a worker whose drain failed part-way back as it was (as far as it still answers)."""
    services().redis.delete(drain_key(name))
    for queue in cancelled:
        try:
            _control("add_consumer", name, {"queue": queue})
        except Unavailable:
            log.warning("worker %s did not take back queue %s after a failed drain", name, queue)


def _queues_once(name: str, applied: Callable[[list[str]], bool]) -> list[str]:
    """Return the queues ``name`` consumes once ``applied`` holds of them (Celery answers add_consumer
    and cancel_consumer before it acts on them), or as they are after QUEUE_CHANGE_WAIT_S."""
    deadline = time.monotonic() + QUEUE_CHANGE_WAIT_S
    while not applied(queues := _active_queues(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return queues


def _active_queues(name: str) -> list[str]:
    replies = services().celery.control.inspect(destination=[name], timeout=CONTROL_TIMEOUT_S,
                                                limit=1).active_queues()
    if not replies or name not in replies:
        raise Unavailable(f"Worker {name} did not say which queues it consumes.")
    return sorted(queue["name"] for queue in replies[name])


@bp.post(f"{API}/cache/purge")
def purge_cache():
    """Delete the cached results, heatmaps and header facts of one model version."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidOption('Send a JSON object: {"model": "...", "version": "..."}.')
    model, version = body.get("model"), body.get("version")
    for field, value in (("model", model), ("version", version)):
        if not isinstance(value, str) or not _NAME.match(value) or ":" in value:
            raise InvalidOption(f"{field} must be a model {field} as GET /api/v1/models shows it.")
    store = services().store
    deleted = fleet.purge_model_version(store.cache, cached_prefixes(model, version))
    if store.split:  # the short copies of just-finished results on the main server
        deleted += fleet.purge_model_version(store.redis, cached_prefixes(model, version))
    log.info("purged %d cached keys of %s %s", deleted, model, version)
    return jsonify({"model": model, "version": version, "deleted": deleted})
