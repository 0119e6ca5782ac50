"""Redis key builders: the one place that knows the key layout (see docs/internals.md, "Redis layout")."""
from __future__ import annotations

import dataclasses
import hashlib

WORKERS_KEY = "workers"  # sorted set: worker name -> last heartbeat (unix seconds)
WEBHOOK_WORKERS_KEY = "webhook_workers"  # sorted set: webhook worker node -> last heartbeat (not in readyz)
COMPUTATIONS_KEY = "computations"  # sorted set: suffix of each computation in flight -> deadline
ANNOUNCE_KEY = "announce:pending"  # sorted set: settled job awaiting its events -> settle time
STARTED_KEY = "announce:started"  # sorted set: claimed job awaiting its job.started event -> claim time
TAKEN_BY_KEY = "taken_by"  # hash: broker delivery tag a worker child took into a batch -> that child
QUEUED_BYTES_KEY = "queued:bytes"  # bytes of uploads waiting for a worker (MAX_QUEUED_MB bounds it)
QUEUED_SIZES_KEY = "queued:sizes"  # hash: suffix of each computation waiting -> its upload's bytes
QUEUED_KEYS_KEY = "queued:keys"  # hash: suffix of each computation in flight -> its sender (key:<id>, addr:<address>)
QUEUED_SHARES_KEY = "queued:shares"  # hash: sender -> its computations in flight (lane steps, per-key bound)
TAKES_KEY = "takes"  # hash: inference queue -> batch takes so far (BULK_SHARE counts them)
STATS_KEY = "stats:computations"  # hash: "<status>:<model>" -> computations ended (no TTL, tiny)


def image_digest(data: bytes) -> str:
    """Return the sha256 hex digest that identifies uploaded bytes."""
    return hashlib.sha256(data).hexdigest()


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def notify_key(job_id: str) -> str:
    """A list the worker pushes to when the job settles; ``?wait=`` readers block on it."""
    return f"notify:{job_id}"


def worker_key(name: str) -> str:
    return f"worker:{name}"


def webhook_worker_key(node: str) -> str:
    return f"webhook_worker:{node}"


def drain_key(node: str) -> str:
    """Set while an admin drains Celery node ``node``: its children stop taking extra messages."""
    return f"drain:{node}"


def tokenfail_key(address: str) -> str:
    """Failed admin or metrics token attempts from one client address in the current minute."""
    return f"tokenfail:{address}"


def cached_prefixes(model: str, version: str) -> tuple[str, ...]:
    """Return the key prefixes of everything cached for one model version (results, heatmaps, meta)."""
    return tuple(f"{kind}:{model}:{version}:" for kind in ("result", "overlay", "picture", "meta"))


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What a job asks of the computation; part of the cache key."""

    top_k: int = 5
    gradcam: bool = True

    @property
    def token(self) -> str:
        return f"k{self.top_k}-g{int(self.gradcam)}"

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "gradcam": self.gradcam}


@dataclasses.dataclass(frozen=True)
class Computation:
    """One unit of work: an image, a model version and output options. Identical uploads share it."""

    model: str
    version: str
    sha256: str
    options: OutputOptions

    @property
    def suffix(self) -> str:
        return f"{self.model}:{self.version}:{self.sha256}:{self.options.token}"

    @property
    def result_key(self) -> str:
        return f"result:{self.suffix}"

    @property
    def overlay_key(self) -> str:
        return f"overlay:{self.suffix}"

    @property
    def picture_key(self) -> str:
        """The small picture ``gradcam.png`` is drawn on: the upload itself, or a thumbnail of it."""
        return f"picture:{self.suffix}"

    @property
    def inflight_key(self) -> str:
        return f"inflight:{self.suffix}"

    @property
    def attached_key(self) -> str:
        return f"attached:{self.suffix}"

    @property
    def owner_key(self) -> str:
        """The worker child computing this right now (the sweeper leaves it alone while that lives)."""
        return f"owner:{self.suffix}"

    @property
    def attempts_key(self) -> str:
        """How many deliveries of this computation a worker has started (poison-pill guard)."""
        return f"attempts:{self.suffix}"

    @property
    def meta_key(self) -> str:
        """The upload's header facts (format, upright size), kept as long as its result."""
        return f"meta:{self.suffix}"

    @property
    def image_key(self) -> str:
        # Per computation rather than per sha256, so that finishing one computation can delete
        # the bytes without pulling them from under another (same image, other options) still queued.
        return f"image:{self.suffix}"

    def to_message(self) -> dict:
        """Return the JSON-safe task payload that names this computation."""
        return {"model": self.model, "version": self.version, "sha256": self.sha256,
                "options": self.options.to_dict()}

    @classmethod
    def from_suffix(cls, suffix: str) -> "Computation":
        """Rebuild a computation from its key suffix ``model:version:sha256:k<top_k>-g<0|1>``."""
        model, version, sha, token = suffix.rsplit(":", 3)
        top_k, gradcam = token.split("-")
        return cls(model, version, sha, OutputOptions(top_k=int(top_k[1:]), gradcam=gradcam == "g1"))

    @classmethod
    def from_message(cls, payload: dict) -> "Computation":
        options = OutputOptions(top_k=int(payload["options"]["top_k"]),
                                gradcam=bool(payload["options"]["gradcam"]))
        return cls(payload["model"], payload["version"], payload["sha256"], options)


def overlay_key_for_result(result_key: str) -> str:
    """Return the overlay key that belongs to a result key."""
    return "overlay:" + result_key.removeprefix("result:")


def picture_key_for_result(result_key: str) -> str:
    """Return the key of the picture an overlay is drawn on, for a result key."""
    return "picture:" + result_key.removeprefix("result:")


BATCH_PREFIX = "batch:"
WEBHOOK_DUE_KEY = "webhook:due"  # sorted set: event id -> when its next attempt is due (unix seconds)


def batch_key(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}"


def batch_settled_key(batch_id: str) -> str:
    """The set of a batch's jobs already counted as settled (so a job is counted once)."""
    return f"{BATCH_PREFIX}{batch_id}:settled"


def webhook_event_key(event_id: str) -> str:
    return f"webhook:event:{event_id}"


def webhook_events_key(subject: str) -> str:
    """The list of event ids about one job or batch (``subject`` is ``job:<id>`` or ``batch:<id>``)."""
    return f"webhook:events:{subject}"


def webhook_attempts_key(subject: str) -> str:
    """The log of delivery attempts about one job or batch, oldest first."""
    return f"webhook:attempts:{subject}"


def webhook_lock_key(event_id: str) -> str:
    """Held while one attempt of the event is in progress, so two attempts never overlap."""
    return f"webhook:lock:{event_id}"


def webhook_gone_key(url: str) -> str:
    """Set when an endpoint answered 410 Gone: nothing more is sent there."""
    return f"webhook:gone:{hashlib.sha256(url.encode()).hexdigest()}"


def idempotency_key(owner: str, key: str) -> str:
    return f"idem:{owner or '-'}:{hashlib.sha256(key.encode()).hexdigest()}"


def apikey_key(key_id: str) -> str:
    return f"apikey:{key_id}"
