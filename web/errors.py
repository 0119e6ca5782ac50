"""Turn every error into the contract's JSON body: ``{"error": {"code", "message"}}``."""
from __future__ import annotations

import logging
import re

import redis
from flask import Flask, jsonify
from flask_limiter.errors import RateLimitExceeded
from werkzeug.exceptions import HTTPException

from shared.errors import Overloaded, RateLimited, ServiceError, Unavailable

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def register(app: Flask) -> None:
    """Install the handlers that answer every failure as JSON (never an HTML page, never a bare 500)."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        retry_after = exc.retry_after_s or (RETRY_AFTER_S if exc.status in (429, 503) else None)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded):
        from web.auth import refusal_headers

        error = RateLimited(f"Rate limit of {exc.description} exceeded; retry after Retry-After seconds.")
        return error_response(error.status, error.code, error.message, refusal_headers())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = "payload_too_large" if exc.code == 413 else _snake(exc.name)
        message = exc.description or exc.name
        if exc.code == 413:
            message = "The upload is larger than the size limit."
        return error_response(exc.code or 500, code, message)

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError):
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM") or (
                isinstance(exc, redis.ResponseError) and "-OOM " in str(exc)):  # maxmemory reached (noeviction)
            log.warning("Redis is full: %s", exc)
            return service_error(Overloaded("The job store is full (Redis maxmemory); retry shortly."))
        log.warning("Redis unavailable: %s", exc)
        return service_error(Unavailable("The job store is unavailable; retry shortly."))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "An internal error occurred; it has been logged.")
