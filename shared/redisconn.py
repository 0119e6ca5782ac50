"""The one place that makes Redis clients, so every process reaches the same servers the same way.

Two roles: ``main`` (``REDIS_URL``: queues, jobs, uploads, bookkeeping) and ``cache``
(``CACHE_URL``, which defaults to ``REDIS_URL``). Callers name the role and their timeouts;
how the server is found (its URL, or the master that Redis Sentinel names: shared/sentinel.py)
stays here.
"""
from __future__ import annotations

from typing import Literal

import redis

from shared import sentinel
from shared.settings import Settings

Role = Literal["main", "cache"]


def url_for(settings: Settings, role: Role = "main") -> str:
    if role == "cache" and settings.cache_url:
        return settings.cache_url
    return settings.redis_url


def split(settings: Settings) -> bool:
    """Whether the cache role is a server of its own (CACHE_URL, or CACHE_SENTINELS, names another)."""
    if settings.cache_sentinels and (settings.cache_sentinels, settings.cache_sentinel_master) != (
            settings.redis_sentinels, settings.redis_sentinel_master):
        return True
    return url_for(settings, "cache") != url_for(settings, "main")


def client(settings: Settings, role: Role = "main", *, socket_timeout: float = 5,
           socket_connect_timeout: float = 2, **options) -> redis.Redis:
    """A redis-py client for ``role``; ``options`` go to redis-py (``health_check_interval``...)."""
    url = url_for(settings, role)
    if found := sentinel.target(settings, role, url):
        return sentinel.master_client(found, url, socket_timeout=socket_timeout,
                                      socket_connect_timeout=socket_connect_timeout, **options)
    return redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_connect_timeout, **options)
