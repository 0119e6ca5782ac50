"""The contract's job JSON, assembled from a job hash (shared/jobs.py) without decoding what it stores."""
from __future__ import annotations

import json

GRADCAM_URL_SLOT = "{job-gradcam-url}"  # stored in results; each job's own URL replaces it when read
_SLOT_JSON = json.dumps(GRADCAM_URL_SLOT)
_EXPIRED = json.dumps({"code": "result_expired", "message": "The result has expired from the cache."})


def job_json(fields: dict[str, str], raw_result: bytes | str | None) -> str:
    """Assemble the contract's job JSON from a job hash and its stored result.

    Stored JSON (image, model, options, result) is spliced in as text, never decoded and encoded again.
    """
    job_id, status, error = fields["id"], fields["status"], fields.get("error") or "null"
    result = "null"
    if raw_result is not None:
        result = raw_result.decode() if isinstance(raw_result, bytes) else raw_result
        result = result.replace(_SLOT_JSON, json.dumps(f"/api/v1/jobs/{job_id}/gradcam.png"))
    elif status == "done":
        status, error = "failed", _EXPIRED  # the result expired before the job record did
    head = json.dumps({"id": job_id, "status": status, "cached": fields.get("cached") == "1",
                       "created_at": fields.get("created_at"), "finished_at": fields.get("finished_at")})
    context = json.dumps({"callback_url": fields.get("callback_url"), "batch_id": fields.get("batch_id")})
    return (f'{head[:-1]}, "image": {fields["image"]}, "model": {fields["model"]}, '
            f'"options": {fields["options"]}, {context[1:-1]}, "result": {result}, "error": {error}}}')
