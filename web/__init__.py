"""The web tier: Flask app factory. Never imports torch; starts in well under a second."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import redis
from celery import Celery
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from shared import redisconn, sentinel, tracing
from shared.apikeys import KeyStore
from shared.cards import ModelCatalog
from shared.jobs import JobStore
from shared.settings import Settings
from shared.tasks import celery_config
from shared.webhooks import Announcer
from web.heatmaps import PictureKeeper
from web.idempotency import IdempotencyStore

# Multipart envelopes add a little to the body; the image itself is capped at max_upload_bytes.
MULTIPART_SLACK = 64 * 1024
CALLBACK_LOOKUP_THREADS = 4  # per process: callback hosts resolved at submit, each bounded in time


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web app: JSON API, upload page and health checks."""
    settings = settings or Settings.from_env()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    if tracing.configure(settings, "imgsvc-web"):  # off unless OTEL_* ask for traces
        tracing.instrument_flask(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_SLACK
    # Werkzeug applies this limit to each parsed chunk (the test client sends one chunk), not only
    # to text fields, so it would refuse big files; MAX_CONTENT_LENGTH already bounds every part.
    app.config["MAX_FORM_MEMORY_SIZE"] = None
    app.json.sort_keys = False
    if settings.trusted_proxies:  # the client's address (rate limit, token lockout) and scheme, as forwarded
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)

    client = redisconn.client(settings, socket_timeout=5, socket_connect_timeout=2,
                              health_check_interval=30)
    sender = Celery("imgsvc-web", set_as_current=False)
    sender.conf.update(celery_config(settings))
    app.extensions["imgsvc"] = Services(
        settings=settings,
        catalog=ModelCatalog.load(settings.model_cards_dir, settings.models, settings.default_model),
        redis=client,
        # Long-poll reads (?wait=) block in BLMOVE: they need a socket timeout above the longest wait.
        blocking_redis=redisconn.client(settings, socket_timeout=40, socket_connect_timeout=2),
        store=JobStore.from_settings(client, settings),
        celery=sender,
    )

    from web import api, auth, batches, cli, deliveries, durability, errors, openapi, site

    errors.register(app)
    durability.install(app, settings, client)
    app.register_blueprint(api.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(deliveries.bp)
    storage_uri, storage_options = sentinel.limiter_storage(settings)
    auth.install_limiter(app, storage_uri, [api.bp, batches.bp, deliveries.bp],
                         exempt=[api.healthz, api.readyz, api.list_models], storage_options=storage_options)
    app.cli.add_command(cli.keys)
    app.register_blueprint(site.bp)
    from web import admin, metrics

    app.register_blueprint(admin.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(openapi.bp)
    return app


class Services:
    """What the views need, built once by the factory."""

    def __init__(self, *, settings: Settings, catalog: ModelCatalog, redis: redis.Redis,
                 blocking_redis: redis.Redis, store: JobStore, celery: Celery):
        self.settings, self.catalog, self.redis, self.store, self.celery = (
            settings, catalog, redis, store, celery)
        self.blocking_redis = blocking_redis
        self.announcer = Announcer(store, celery, settings).install()
        self.events, self.batches = self.announcer.events, self.announcer.batches
        self.keys = KeyStore(redis)
        self.idempotency = IdempotencyStore(redis, settings.idempotency_ttl_s, settings.idempotency_lease_s)
        # A long-poll holds a request thread: at most MAX_WAITERS of this process's threads wait at once.
        self.waiters = threading.BoundedSemaphore(settings.max_waiters) if settings.max_waiters else None
        self.lookups = ThreadPoolExecutor(CALLBACK_LOOKUP_THREADS, thread_name_prefix="callback-lookup")
        self.max_queued_bytes = max_queued_bytes(settings, redis)
        self.pictures = PictureKeeper(store, settings.max_image_pixels)


DEFAULT_QUEUED_MB = 2048


def max_queued_bytes(settings: Settings, client: redis.Redis) -> int:
    """MAX_QUEUED_MB in bytes; unset: half the main Redis's maxmemory (the rest is for jobs, results
    and the broker), or 2 GiB where Redis has no maxmemory or will not say; 0: no limit."""
    if settings.max_queued_mb is not None:
        return settings.max_queued_mb * 1024 * 1024
    try:
        maxmemory = int(client.config_get("maxmemory").get("maxmemory", 0))
    except redis.RedisError:  # CONFIG refused (managed Redis) or Redis not up yet
        maxmemory = 0
    return maxmemory // 2 if maxmemory else DEFAULT_QUEUED_MB * 1024 * 1024
