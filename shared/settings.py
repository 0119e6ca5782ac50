"""Read the environment once, at start-up, into one typed settings object.

Every other module is handed a ``Settings``; nothing else reads ``os.environ``.
docs/operations.md's configuration table lists each variable with its default.
"""
from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_TOKEN_CHARS = 32  # ADMIN_TOKEN, METRICS_TOKEN: too long to guess at 10 tries a minute


class SettingsError(ValueError):
    """An environment variable holds a value we cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise SettingsError(f"{name} must be above 0, got {value}")
    return value


def _seconds_list(env: Mapping[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise SettingsError(f"{name} must be comma-separated whole seconds, got {raw!r}") from None
    if any(v < 0 for v in values):
        raise SettingsError(f"{name} must not hold negative delays, got {raw!r}")
    return values


def _webhook_secret(raw: str) -> str:
    """A Standard Webhooks secret: ``whsec_`` and the base64 of 24 to 64 random bytes."""
    if not raw:
        return raw
    try:
        key = base64.b64decode(raw.removeprefix("whsec_"), validate=True) if raw.startswith("whsec_") else b""
    except ValueError:
        key = b""
    if not 24 <= len(key) <= 64:
        raise SettingsError("WEBHOOK_SECRET must be whsec_ followed by the base64 of 24 to 64 random bytes, "
                            "as Standard Webhooks secrets are (make run makes one in var/webhook_secret)")
    return raw


def _token(env: Mapping[str, str], name: str) -> str:
    """A bearer token of an admin surface: empty (the surface is off) or at least MIN_TOKEN_CHARS long."""
    token = env.get(name, "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        raise SettingsError(f"{name} must be at least {MIN_TOKEN_CHARS} characters (it has {len(token)}); "
                            "make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\" "
                            "(or leave it empty to turn the surface off)")
    return token


def _bind_address(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise SettingsError(f"{name} must be an IP address of this host such as 127.0.0.1 or 0.0.0.0, "
                            f"got {raw!r}") from None


def _devices(raw: str) -> str:
    """Normalise WORKER_DEVICES: ``auto``, ``cpu`` or comma-separated GPU indices (``0,1``)."""
    if raw in ("auto", "cpu"):
        return raw
    parts = [part.strip().removeprefix("cuda:") for part in raw.split(",")]
    if not parts or not all(part.isdigit() for part in parts):
        raise SettingsError(f"WORKER_DEVICES must be auto, cpu or GPU indices like 0,1, got {raw!r}")
    return ",".join(str(int(part)) for part in parts)


def _sentinels(env: Mapping[str, str], name: str) -> tuple[tuple[str, int], ...]:
    """Parse ``host:port,host:port``: the sentinels of a Redis master, in the order to ask them."""
    addresses = []
    for part in (p.strip() for p in env.get(name, "").split(",")):
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        host = host.strip("[]")  # [::1]:26379
        if not colon or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"{name} must be comma-separated host:port pairs (sentinels), got {part!r}")
        addresses.append((host, int(port)))
    return tuple(addresses)


def _sentinel_master(env: Mapping[str, str], name: str, sentinels: tuple, sentinels_name: str) -> str:
    master = env.get(name, "").strip()
    if sentinels and not master:
        raise SettingsError(f"{sentinels_name} needs {name}: the name the sentinels monitor the master under")
    if master and not sentinels:
        raise SettingsError(f"{name} is set but {sentinels_name} is empty: name the sentinels as host:port,...")
    return master


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable, with defaults that work on a laptop."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_url: str = ""  # results, heatmaps, their pictures; may evict (allkeys-lru); empty: REDIS_URL
    # Redis Sentinel (shared/sentinel.py): with sentinels, a role's server is the master they name now,
    # and its URL gives only the database and the master's credentials. Empty: the URL as it is.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = ""
    cache_sentinels: tuple[tuple[str, int], ...] = ()  # empty: the cache role shares the main role's server
    cache_sentinel_master: str = ""
    redis_sentinel_password: str = ""  # the sentinels' own (requirepass in sentinel.conf)
    model_cards_dir: Path = REPO_ROOT / "models"
    models: tuple[str, ...] = ()  # served card names; empty means every card in model_cards_dir
    default_model: str = "efficientnet-lite0"
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    # Decoded pixels a worker child holds at once, across the images of its batches: 4 bytes each
    # while decoded, so a child's decode memory stays under ~0.9 GB by default (docs/operations.md).
    max_batch_pixels: int = 200_000_000
    result_ttl_s: int = 7 * 24 * 3600
    job_ttl_s: int = 7 * 24 * 3600  # the longest a job in flight (or an event or batch) is kept
    # How long a settled job (its answer included) is answered, from the cache role: at least this,
    # unless that server evicts it under memory pressure (shared/retention.py, docs/guarantees.md).
    job_result_ttl_s: int = 24 * 3600
    image_ttl_s: int = 3600
    job_deadline_s: int = 0  # a job not started this long after acceptance fails deadline_exceeded; 0: none
    inflight_ttl_s: int = 3600
    visibility_timeout_s: int = 600  # a dead worker's unacked messages come back after this
    worker_devices: str = "auto"  # auto | cpu | 0,1,... (GPU indices): one child per device
    amp_dtype: str = "float16"  # float16 | bfloat16 (CUDA only)
    device_decode: str = "auto"  # auto: GPU children decode JPEGs on the GPU (nvJPEG) | on | off
    torch_threads: int = 0  # 0: the machine's cores shared among the pool's children
    worker_concurrency: int = 1
    max_batch: int = 0  # images per forward pass; 0 measures the best size per model at start-up
    max_wait_ms: int = 5  # how long a busy child waits to fill a batch; an idle one never waits
    max_attempts: int = 3  # deliveries that crashed a worker before a job fails with worker_crashed
    job_soft_time_limit_s: int = 120  # a computation past this fails with code timeout
    job_time_limit_s: int = 180  # past this the child is killed and replaced
    stuck_after_s: int = 900  # a computation with no live owner this long is re-enqueued by the sweeper
    sweep_interval_s: int = 30
    max_queue_depth: int = 1000  # waiting tasks per model queue before new work gets 503; 0: no limit
    max_queue_depth_per_key: int = 800  # computations in flight per key (or address) before its new work gets 429; 0: off
    bulk_share: int = 4  # one take in BULK_SHARE fills half its batch from the bulk lane first; 0: interactive first
    max_queued_mb: int | None = None  # MiB of uploads waiting for workers; None: half the Redis maxmemory, or 2048; 0: no limit
    worker_proc_alive_timeout_s: int = 120
    heartbeat_interval_s: int = 5
    worker_ttl_s: int = 20
    log_level: str = "INFO"
    # Integrators: API keys, rate limits, idempotency, batches, webhooks.
    auth_required: bool = False  # true: POST needs an API key (anonymous reads of anonymous jobs still work)
    secret_key: str = ""  # derives each API key's webhook secret; must be the same on web and webhook workers
    rate_limit: str = "600/minute"  # per API key (or per client address without one); a key may override
    idempotency_ttl_s: int = 24 * 3600
    idempotency_lease_s: int = 30  # a first request that died frees its Idempotency-Key after this
    max_waiters: int = 4  # ?wait= long-polls blocking at once per web process; 0: never wait
    callback_resolve_timeout_s: float = 2.0  # a callback host not resolved within this at submit: 422
    max_batch_images: int = 64
    webhook_secret: str = ""  # whsec_... signing secret for jobs submitted without an API key
    webhook_allow_private: bool = False  # DEVELOPMENT ONLY: lets callbacks reach loopback/private addresses
    webhook_retry_schedule: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)  # ~27.6 h in all
    webhook_connect_timeout_s: float = 5.0
    webhook_timeout_s: float = 15.0
    webhook_concurrency: int = 16  # deliveries in flight per webhook worker
    # Images by URL (image_url): fetched by the webhook worker under the callbacks' SSRF rules.
    fetch_timeout_s: float = 15.0  # the whole fetch (name lookups, redirects, body) of one image_url
    fetch_allow_private: bool = False  # DEVELOPMENT ONLY: lets image_url reach loopback/private addresses
    # Admins: admin API and page, worker metrics endpoint.
    admin_token: str = ""  # Bearer token for /api/v1/admin/ and /admin (and /metrics); empty disables both (404)
    metrics_token: str = ""  # Bearer token for the web tier's /metrics; without it or ADMIN_TOKEN: 404
    worker_metrics_port: int = 9808  # each worker's main process serves /metrics here; 0: off
    worker_metrics_bind: str = "127.0.0.1"  # address of that port: 0.0.0.0 where Prometheus is elsewhere
    task_events: bool = False  # Celery task events (for Flower); each costs a Redis PUBLISH per task
    durable_accept: bool = False  # 202 only once the job is fsynced (appendfsync always) or on a replica (WAIT)
    trusted_proxies: int = 0  # reverse proxies in front of the web tier whose X-Forwarded-For/-Proto are believed
    # OpenTelemetry traces: on when the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT or OTEL_TRACES_EXPORTER
    # asks for them; the SDK reads every other OTEL_* variable (sampler, service name) itself.
    tracing: bool = False

    def to_env(self) -> dict[str, str]:
        """Return the environment that makes ``from_env`` rebuild these settings (for child processes)."""
        env = {field.name.upper(): str(getattr(self, field.name)) for field in dataclasses.fields(self)}
        env["MODELS"] = ",".join(self.models)
        env["WEBHOOK_RETRY_SCHEDULE"] = ",".join(str(s) for s in self.webhook_retry_schedule)
        env["MAX_UPLOAD_MB"] = str(self.max_upload_bytes // (1024 * 1024))
        del env["MAX_UPLOAD_BYTES"]
        env["MAX_QUEUED_MB"] = "" if self.max_queued_mb is None else str(self.max_queued_mb)
        for name in ("redis_sentinels", "cache_sentinels"):
            env[name.upper()] = ",".join(f"{host}:{port}" for host, port in getattr(self, name))
        del env["TRACING"]  # the OTEL_* variables themselves travel to child processes
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables (``os.environ`` by default)."""
        env = os.environ if env is None else env
        d = cls()
        redis_sentinels, cache_sentinels = _sentinels(env, "REDIS_SENTINELS"), _sentinels(env, "CACHE_SENTINELS")
        return _workable(cls(
            redis_url=env.get("REDIS_URL", "").strip() or d.redis_url,
            cache_url=env.get("CACHE_URL", "").strip(),
            redis_sentinels=redis_sentinels,
            redis_sentinel_master=_sentinel_master(env, "REDIS_SENTINEL_MASTER", redis_sentinels, "REDIS_SENTINELS"),
            cache_sentinels=cache_sentinels,
            cache_sentinel_master=_sentinel_master(env, "CACHE_SENTINEL_MASTER", cache_sentinels, "CACHE_SENTINELS"),
            redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD", "").strip(),
            model_cards_dir=Path(env.get("MODEL_CARDS_DIR", "").strip() or d.model_cards_dir),
            models=_names(env, "MODELS"),
            default_model=env.get("DEFAULT_MODEL", "").strip() or d.default_model,
            max_upload_bytes=_int(env, "MAX_UPLOAD_MB", 20, minimum=1) * 1024 * 1024,
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", d.max_image_pixels, minimum=1),
            max_batch_pixels=_int(env, "MAX_BATCH_PIXELS", d.max_batch_pixels, minimum=1),
            result_ttl_s=_int(env, "RESULT_TTL_S", d.result_ttl_s, minimum=1),
            job_ttl_s=_int(env, "JOB_TTL_S", d.job_ttl_s, minimum=1),
            job_result_ttl_s=_int(env, "JOB_RESULT_TTL_S", d.job_result_ttl_s, minimum=60),
            image_ttl_s=_int(env, "IMAGE_TTL_S", d.image_ttl_s, minimum=1),
            job_deadline_s=_int(env, "JOB_DEADLINE_S", d.job_deadline_s),
            inflight_ttl_s=_int(env, "INFLIGHT_TTL_S", d.inflight_ttl_s, minimum=1),
            visibility_timeout_s=_int(env, "VISIBILITY_TIMEOUT_S", d.visibility_timeout_s, minimum=1),
            worker_devices=_devices(env.get("WORKER_DEVICES", "").strip().lower() or d.worker_devices),
            amp_dtype=_choice(env, "AMP_DTYPE", d.amp_dtype, ("float16", "bfloat16")),
            device_decode=_choice(env, "DEVICE_DECODE", d.device_decode, ("auto", "on", "off")),
            torch_threads=_int(env, "TORCH_THREADS", d.torch_threads),
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", d.worker_concurrency, minimum=1),
            max_batch=_int(env, "MAX_BATCH", d.max_batch),
            max_wait_ms=_int(env, "MAX_WAIT_MS", d.max_wait_ms),
            max_queue_depth=_int(env, "MAX_QUEUE_DEPTH", d.max_queue_depth),
            max_queue_depth_per_key=_int(env, "MAX_QUEUE_DEPTH_PER_KEY", d.max_queue_depth_per_key),
            bulk_share=_int(env, "BULK_SHARE", d.bulk_share),
            max_queued_mb=_int(env, "MAX_QUEUED_MB", 0) if env.get("MAX_QUEUED_MB", "").strip() else None,
            max_attempts=_int(env, "MAX_ATTEMPTS", d.max_attempts, minimum=1),
            stuck_after_s=_int(env, "STUCK_AFTER_S", d.stuck_after_s, minimum=1),
            sweep_interval_s=_int(env, "SWEEP_INTERVAL_S", d.sweep_interval_s, minimum=1),
            job_soft_time_limit_s=_int(env, "JOB_SOFT_TIME_LIMIT_S", d.job_soft_time_limit_s, minimum=1),
            job_time_limit_s=_int(env, "JOB_TIME_LIMIT_S", d.job_time_limit_s, minimum=1),
            worker_proc_alive_timeout_s=_int(
                env, "WORKER_PROC_ALIVE_TIMEOUT_S", d.worker_proc_alive_timeout_s, minimum=1
            ),
            heartbeat_interval_s=_int(env, "HEARTBEAT_INTERVAL_S", d.heartbeat_interval_s, minimum=1),
            worker_ttl_s=_int(env, "WORKER_TTL_S", d.worker_ttl_s, minimum=2),
            log_level=env.get("LOG_LEVEL", "").strip().upper() or d.log_level,
            auth_required=_bool(env, "AUTH_REQUIRED", d.auth_required),
            secret_key=env.get("SECRET_KEY", "").strip(),
            rate_limit=env.get("RATE_LIMIT", "").strip() or d.rate_limit,
            idempotency_ttl_s=_int(env, "IDEMPOTENCY_TTL_S", d.idempotency_ttl_s, minimum=1),
            idempotency_lease_s=_int(env, "IDEMPOTENCY_LEASE_S", d.idempotency_lease_s, minimum=1),
            max_waiters=_int(env, "MAX_WAITERS", d.max_waiters),
            callback_resolve_timeout_s=_float(env, "CALLBACK_RESOLVE_TIMEOUT_S", d.callback_resolve_timeout_s),
            max_batch_images=_int(env, "MAX_BATCH_IMAGES", d.max_batch_images, minimum=1),
            webhook_secret=_webhook_secret(env.get("WEBHOOK_SECRET", "").strip()),
            webhook_allow_private=_bool(env, "WEBHOOK_ALLOW_PRIVATE", d.webhook_allow_private),
            webhook_retry_schedule=_seconds_list(env, "WEBHOOK_RETRY_SCHEDULE", d.webhook_retry_schedule),
            webhook_connect_timeout_s=_float(env, "WEBHOOK_CONNECT_TIMEOUT_S", d.webhook_connect_timeout_s),
            webhook_timeout_s=_float(env, "WEBHOOK_TIMEOUT_S", d.webhook_timeout_s),
            webhook_concurrency=_int(env, "WEBHOOK_CONCURRENCY", d.webhook_concurrency, minimum=1),
            fetch_timeout_s=_float(env, "FETCH_TIMEOUT_S", d.fetch_timeout_s),
            fetch_allow_private=_bool(env, "FETCH_ALLOW_PRIVATE", d.fetch_allow_private),
            admin_token=_token(env, "ADMIN_TOKEN"),
            metrics_token=_token(env, "METRICS_TOKEN"),
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", d.worker_metrics_port),
            worker_metrics_bind=_bind_address(env, "WORKER_METRICS_BIND", d.worker_metrics_bind),
            task_events=_bool(env, "TASK_EVENTS", d.task_events),
            durable_accept=_bool(env, "DURABLE_ACCEPT", d.durable_accept),
            trusted_proxies=_int(env, "TRUSTED_PROXIES", d.trusted_proxies),
            tracing=_tracing(env),
        ))


def _tracing(env: Mapping[str, str]) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces (off unless an exporter is named)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())


def _workable(settings: Settings) -> Settings:
    """Return ``settings``, or raise SettingsError naming every pair of values that cannot work together."""
    s = settings
    problems = [message for broken, message in (
        (s.worker_ttl_s <= s.heartbeat_interval_s,
         f"WORKER_TTL_S ({s.worker_ttl_s}) must be above HEARTBEAT_INTERVAL_S ({s.heartbeat_interval_s}): "
         "a live worker would count as gone between two of its heartbeats"),
        (s.job_soft_time_limit_s >= s.job_time_limit_s,
         f"JOB_SOFT_TIME_LIMIT_S ({s.job_soft_time_limit_s}) must be below JOB_TIME_LIMIT_S "
         f"({s.job_time_limit_s}): the soft limit fails a batch cleanly, the hard one kills its child"),
        (s.visibility_timeout_s <= s.job_time_limit_s,
         f"VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s}) must be above JOB_TIME_LIMIT_S ({s.job_time_limit_s}): "
         "the broker would deliver a batch that is still running to another worker"),
        (s.idempotency_lease_s >= s.idempotency_ttl_s,
         f"IDEMPOTENCY_LEASE_S ({s.idempotency_lease_s}) must be below IDEMPOTENCY_TTL_S ({s.idempotency_ttl_s}): "
         "a first request's claim would outlive the record of its answer"),
    ) if broken]
    if problems:
        raise SettingsError("Settings that cannot work together: " + "; ".join(problems) + ".")
    return settings
