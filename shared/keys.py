"""Redis key builders: the one place that knows the key layout (see README, "Redis layout")."""
from __future__ import annotations

import dataclasses
import hashlib

WORKERS_KEY = "workers"  # sorted set: worker name -> last heartbeat (unix seconds)
COMPUTATIONS_KEY = "computations"  # sorted set: suffix of each computation in flight -> deadline
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
