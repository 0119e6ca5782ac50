"""A small client of the imgsvc HTTP API (v1): submit images, long-poll jobs and batches, fetch heatmaps.

Every request that the service answers 429 or 503 is retried after its ``Retry-After`` (a bounded
number of times), as are connection failures and a 409 ``idempotency_in_progress`` (the first try of
a retried upload is still being accepted). Submissions carry an ``Idempotency-Key`` that stays the
same across those retries, so a retried upload never creates a second job.
"""
from __future__ import annotations

import threading
import time
import uuid

import requests

USER_AGENT = "imgsvc-client/0.1"
SETTLED = ("done", "failed", "canceled")
RETRY_STATUSES = (429, 503)
MAX_LONG_POLL_S = 20  # the API's own cap is 30 s


def _retryable(response: requests.Response) -> bool:
    """429 and 503; and 409 while an earlier try with the same Idempotency-Key is being accepted."""
    if response.status_code in RETRY_STATUSES:
        return True
    if response.status_code != 409:
        return False
    try:
        return response.json()["error"]["code"] == "idempotency_in_progress"
    except (ValueError, KeyError, TypeError):
        return False


class ApiError(Exception):
    """A request the API refused (or could not be reached for): HTTP status, stable code, message."""

    def __init__(self, status: int | None, code: str, message: str):
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_response(cls, response: requests.Response) -> "ApiError":
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["code"]), str(error["message"]))
        except (ValueError, KeyError, TypeError):  # not the contract's error body (a proxy's page, say)
            return cls(response.status_code, "http_error", f"HTTP {response.status_code} {response.reason}")


class ApiClient:
    """Talk to one imgsvc server; safe to share between threads (one HTTP session per thread)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, max_retries: int = 5,
                 max_retry_wait_s: float = 30.0, request_timeout_s: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries, self.max_retry_wait_s = max_retries, max_retry_wait_s
        self.request_timeout_s = request_timeout_s
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
        return session

    def request(self, method: str, path: str, *, timeout: float | None = None, **kwargs) -> requests.Response:
        """Send one request, retrying 429/503 and connection failures; raise ApiError for any 4xx/5xx."""
        url = path if path.startswith("http") else self.base_url + path
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._session().request(method, url, timeout=timeout or self.request_timeout_s,
                                                   **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    raise ApiError(None, "connection_error", f"{method} {url}: {exc}") from exc
                time.sleep(self._backoff(attempt))
                continue
            if not _retryable(response) or last:
                break
            time.sleep(self._retry_after(response, attempt))
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    def _backoff(self, attempt: int) -> float:
        return min(2.0 ** attempt, self.max_retry_wait_s)

    def _retry_after(self, response: requests.Response, attempt: int) -> float:
        try:
            return min(max(float(response.headers["Retry-After"]), 0.0), self.max_retry_wait_s)
        except (KeyError, ValueError):  # absent, or an HTTP date: fall back to exponential backoff
            return self._backoff(attempt)

    def submit(self, data: bytes, filename: str, options: dict, wait_s: float = 0) -> dict:
        """Upload one image (multipart field ``image``) with its options; return the job JSON. With
        ``wait_s`` (``Prefer: wait``) the server answers once the job settles or that many seconds pass."""
        fields = {name: str(value) for name, value in options.items() if value is not None}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        wait_s = min(MAX_LONG_POLL_S, wait_s)
        if wait_s > 0:
            headers["Prefer"] = f"wait={wait_s:g}"
        response = self.request("POST", "/api/v1/jobs", files={"image": (filename, data)}, data=fields,
                                headers=headers, timeout=max(0, wait_s) + self.request_timeout_s)
        return response.json()

    def submit_batch(self, images: list[tuple[str, bytes]], options: dict) -> dict:
        """Upload several images as one batch; return the batch JSON."""
        fields = {name: str(value) for name, value in options.items() if value is not None}
        files = [("image", (name, data)) for name, data in images]
        response = self.request("POST", "/api/v1/batches", files=files, data=fields,
                                headers={"Idempotency-Key": uuid.uuid4().hex})
        return response.json()

    def job(self, job_id: str, wait_s: float = 0) -> dict:
        """Read a job; with ``wait_s`` the server holds the answer until the job settles or time passes."""
        return self._read_job(job_id, wait_s).json()

    def _read_job(self, job_id: str, wait_s: float) -> requests.Response:
        params = {"wait": f"{wait_s:g}"} if wait_s > 0 else None
        return self.request("GET", f"/api/v1/jobs/{job_id}", params=params, timeout=wait_s + self.request_timeout_s)

    def wait_job(self, job: dict, timeout_s: float) -> dict:
        """Long-poll until the job settles (done, failed or canceled), or ``timeout_s`` passes; return
        its latest JSON."""
        deadline = time.monotonic() + timeout_s
        while job["status"] not in SETTLED:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            response = self._read_job(job["id"], min(MAX_LONG_POLL_S, max(1, int(remaining))))
            job = response.json()
            if "Wait-Skipped" in response.headers:  # the server had no waiter free: poll again after Retry-After
                time.sleep(min(self._retry_after(response, 0), max(0.0, deadline - time.monotonic())))
        return job

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job; return it (``canceled``). A job already done or failed
        raises ApiError 409 ``already_settled``."""
        return self.request("POST", f"/api/v1/jobs/{job_id}/cancel").json()

    def batch(self, batch_id: str) -> dict:
        return self.request("GET", f"/api/v1/batches/{batch_id}").json()

    def wait_batch(self, batch: dict, timeout_s: float, interval_s: float = 1.0) -> dict:
        """Poll a batch until it is done or ``timeout_s`` passes; return its latest JSON."""
        deadline = time.monotonic() + timeout_s
        while batch["status"] != "done" and time.monotonic() < deadline:
            time.sleep(interval_s)
            batch = self.batch(batch["id"])
        return batch

    def heatmap(self, job: dict) -> bytes | None:
        """Return the job's GradCAM PNG, or None when the job has none."""
        gradcam = (job.get("result") or {}).get("gradcam")
        return self.request("GET", gradcam["url"]).content if gradcam else None
