"""The error tree both tiers raise; the web tier turns each into ``{"error": {"code", "message"}}``.

    ServiceError (500 internal_error)
    ├── BadRequest (400 bad_request)
    │   ├── MissingImage (400 missing_image)
    │   ├── EmptyImage (400 empty_image)
    │   ├── CorruptImage (400 corrupt_image)
    │   └── TokenInUrl (400 token_in_url)
    ├── Unauthorized (401 unauthorized)
    │   ├── AuthRequired (401 auth_required)
    │   ├── InvalidApiKey (401 invalid_api_key)
    │   ├── AdminUnauthorized (401 admin_unauthorized)
    │   └── MetricsUnauthorized (401 metrics_unauthorized)
    ├── NotFound (404 not_found)
    │   └── Expired (404 expired)
    ├── Conflict (409 conflict)
    │   ├── IdempotencyInProgress (409 idempotency_in_progress)
    │   ├── NotSettled (409 not_settled)
    │   ├── AlreadySettled (409 already_settled)
    │   └── NoCallback (409 no_callback)
    ├── PayloadTooLarge (413 payload_too_large)
    │   └── TooManyPixels (413 too_many_pixels)
    ├── UnsupportedImage (415 unsupported_image)
    ├── InvalidOption (422 invalid_option)
    │   ├── UnknownModel (422 unknown_model)
    │   ├── InvalidCallbackUrl (422 invalid_callback_url)
    │   ├── InvalidImageUrl (422 invalid_image_url)
    │   └── IdempotencyKeyReused (422 idempotency_key_reused)
    ├── RateLimited (429 rate_limited)
    │   └── ShareFull (429 share_full)
    ├── Unavailable (503 unavailable)
    │   └── Overloaded (503 overloaded)
    └── JobFailed (job-level, stored on a failed job; never an HTTP answer)
        ├── DecodeFailed (decode_failed)
        ├── InferenceFailed (inference_failed)
        ├── WorkerCrashed (worker_crashed)
        ├── JobTimeout (timeout)
        ├── ImageExpired (image_expired)
        ├── FetchFailed (fetch_failed)
        ├── DeadlineExceeded (deadline_exceeded)
        └── ModelVersionUnavailable (model_version_unavailable)

``code`` is stable: integrators match on it. ``message`` is a human sentence and may change.
"""
from __future__ import annotations


class ServiceError(Exception):
    """Base of every error we answer or store; carries an HTTP status and a stable code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # answered as Retry-After (429 and 503 have a default)

    def to_dict(self) -> dict:
        """Return the JSON error object of the HTTP contract."""
        return {"code": self.code, "message": self.message}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class MissingImage(BadRequest):
    code = "missing_image"


class EmptyImage(BadRequest):
    code = "empty_image"


class CorruptImage(BadRequest):
    code = "corrupt_image"


class TokenInUrl(BadRequest):
    """An admin or metrics token sent as ``?token=``: URLs land in logs and browser history."""

    code = "token_in_url"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class AuthRequired(Unauthorized):
    code = "auth_required"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class AdminUnauthorized(Unauthorized):
    """The admin API needs ``Authorization: Bearer <ADMIN_TOKEN>``, and this was not it."""

    code = "admin_unauthorized"


class MetricsUnauthorized(Unauthorized):
    """``GET /metrics`` needs ``Authorization: Bearer <METRICS_TOKEN or ADMIN_TOKEN>``."""

    code = "metrics_unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Expired(NotFound):
    """A job this service issued is no longer kept (JOB_RESULT_TTL_S passed, or the cache evicted it)."""

    code = "expired"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class IdempotencyInProgress(Conflict):
    """The first request with this key is still being accepted; ``retry_after_s`` says when its claim lapses."""

    code = "idempotency_in_progress"


class NotSettled(Conflict):
    code = "not_settled"


class AlreadySettled(Conflict):
    """A cancel of a job (or batch) that is already done or failed: nothing changes."""

    code = "already_settled"


class NoCallback(Conflict):
    code = "no_callback"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class TooManyPixels(PayloadTooLarge):
    code = "too_many_pixels"


class UnsupportedImage(ServiceError):
    status, code = 415, "unsupported_image"


class InvalidOption(ServiceError):
    status, code = 422, "invalid_option"


class UnknownModel(InvalidOption):
    code = "unknown_model"


class InvalidCallbackUrl(InvalidOption):
    code = "invalid_callback_url"


class InvalidImageUrl(InvalidOption):
    """An ``image_url`` that is not an http(s) or data: URL we may fetch (or decode)."""

    code = "invalid_image_url"


class IdempotencyKeyReused(InvalidOption):
    code = "idempotency_key_reused"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"


class ShareFull(RateLimited):
    """One caller (API key, or address) has MAX_QUEUE_DEPTH_PER_KEY computations in flight."""

    code = "share_full"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class Overloaded(Unavailable):
    code = "overloaded"


class JobFailed(ServiceError):
    """A job's computation failed in the worker; stored on the job, not raised over HTTP."""

    code = "job_failed"


class DecodeFailed(JobFailed):
    code = "decode_failed"


class InferenceFailed(JobFailed):
    code = "inference_failed"


class WorkerCrashed(JobFailed):
    code = "worker_crashed"


class JobTimeout(JobFailed):
    code = "timeout"


class ImageExpired(JobFailed):
    code = "image_expired"


class FetchFailed(JobFailed):
    """The job's ``image_url`` could not be fetched, or what came back is not an image we accept."""

    code = "fetch_failed"


class DeadlineExceeded(JobFailed):
    """The job was not started by its deadline (deadline_s, Cancel-After or JOB_DEADLINE_S): never computed."""

    code = "deadline_exceeded"


class ModelVersionUnavailable(JobFailed):
    code = "model_version_unavailable"
