"""Following the current Redis master through Redis Sentinel (REDIS_SENTINELS, REDIS_SENTINEL_MASTER).

With sentinels configured for a role, its server is whichever master the sentinels name now; the
role's URL still gives the database number and the master's own credentials (its host and port are
not used). Three kinds of client follow the master, each in the form its library knows:

- redis-py (``master_client``): ``Sentinel(...).master_for(name)``, whose connections ask the
  sentinels for the master each time they connect, so a client reconnects to the new master by itself;
- Celery's broker (``broker``): kombu's ``sentinel://`` transport;
- Flask-Limiter (``limiter_storage``): limits' ``redis+sentinel://`` storage.
"""
from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from shared.settings import Settings

SENTINEL_TIMEOUT_S = 1.0  # a sentinel answers from memory; a slow one is skipped for the next


class SentinelTarget(NamedTuple):
    """The sentinels that watch a role's master, the master's name, and the sentinels' own password."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    password: str


def target(settings: Settings, role: str, url: str) -> SentinelTarget | None:
    """The sentinels to ask for the master of ``role`` (whose URL is ``url``), or None: use the URL.

    The cache role has its own sentinels (CACHE_SENTINELS), or shares the main role's with its server.
    """
    addresses, master = settings.redis_sentinels, settings.redis_sentinel_master
    if role == "cache" and (settings.cache_sentinels or url != settings.redis_url):
        addresses, master = settings.cache_sentinels, settings.cache_sentinel_master
    return SentinelTarget(addresses, master, settings.redis_sentinel_password) if addresses else None


def _master_options(url: str) -> dict:
    """The database and credentials of the role's URL (its host and port are the sentinels' to say)."""
    return {k: v for k, v in parse_url(url).items() if k in ("db", "username", "password")}


def _sentinel_options(found: SentinelTarget) -> dict:
    """How to talk to a sentinel: briefly, and once. redis-py's default retries each one ten times
    with backoff (seconds per request with none up); the next sentinel in the list is the retry."""
    options = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
               "retry": Retry(NoBackoff(), 0)}
    if found.password:
        options["password"] = found.password
    return options


def master_client(found: SentinelTarget, url: str, **options) -> redis.Redis:
    """A redis-py client on the current master; ``options`` are the connections' (timeouts...)."""
    sentinels = Sentinel(list(found.addresses), sentinel_kwargs=_sentinel_options(found))
    return sentinels.master_for(found.master, redis_class=redis.Redis, **_master_options(url), **options)


def broker(settings: Settings) -> tuple[str, dict]:
    """Celery's broker URL and the transport options it needs beyond the visibility timeout."""
    found = target(settings, "main", settings.redis_url)
    if found is None:
        return settings.redis_url, {}
    return _broker_url(found, settings.redis_url), _broker_transport_options(found)


def limiter_storage(settings: Settings) -> tuple[str, dict]:
    """Flask-Limiter's storage URI and storage options (the main role's server)."""
    found = target(settings, "main", settings.redis_url)
    return (settings.redis_url, {}) if found is None else _limiter_storage(found, settings.redis_url)


def _broker_url(found: SentinelTarget, url: str) -> str:
    """kombu's form: ``sentinel://[:password@]host:port/db`` for each sentinel, joined by ``;``."""
    master = _master_options(url)
    auth = ""
    if master.get("password"):
        auth = f"{quote(master.get('username') or '', safe='')}:{quote(master['password'], safe='')}@"
    return ";".join(f"sentinel://{auth}{_hostport(host, port)}/{master.get('db', 0)}" for host, port in found.addresses)


def _broker_transport_options(found: SentinelTarget) -> dict:
    return {"master_name": found.master, "sentinel_kwargs": _sentinel_options(found)}


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _limiter_storage(found: SentinelTarget, url: str) -> tuple[str, dict]:
    """limits' ``redis+sentinel://host:port,host:port/master`` and the options for its connections.

    Credentials travel as options, not in the URI, where limits would give the master's password to
    the sentinels too. Every read goes to the master: a replica may lag the counts.
    """
    uri = "redis+sentinel://" + ",".join(_hostport(host, port) for host, port in found.addresses) + f"/{found.master}"
    return uri, {**_master_options(url), "socket_timeout": 5, "socket_connect_timeout": 2, "use_replicas": False,
                 "sentinel_kwargs": _sentinel_options(found)}
