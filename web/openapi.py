"""The OpenAPI 3.1 document of the HTTP contract, served at ``GET /api/v1/openapi.json``.

The document is built from plain dicts: ``components()`` holds the shared schemas, responses and
security schemes, and each ``*_paths()`` function returns one group of paths. A new group of
endpoints adds a function and lists it in ``PATH_GROUPS``; tests/test_openapi.py fails when the app
registers a URL rule that no group documents.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from shared.settings import Settings

bp = Blueprint("openapi", __name__)

API_VERSION = "1.0.0"
MAX_TOP_K = 20  # web.api.MAX_TOP_K
MAX_WAIT_S = 30  # web.api.MAX_WAIT_S
IMAGE_TYPES = "image/*"  # JPEG, PNG, GIF, WebP, BMP or TIFF, recognised by their bytes
ISO_TIME = {"type": "string", "format": "date-time"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
JOB_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "32 lowercase hex digits"}
API_KEY = [{}, {"apiKey": []}]  # anonymous or with an API key (required when AUTH_REQUIRED is set)


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def param(name: str) -> dict:
    return {"$ref": f"#/components/parameters/{name}"}


def json_body(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def response(name: str) -> dict:
    return {"$ref": f"#/components/responses/{name}"}


def errors(*names: str) -> dict:
    """Return the shared error responses named by status code (``"404"``, ``"429"``...)."""
    return {status: response(ERROR_RESPONSES[status][0]) for status in names}


def header(description: str, schema: dict | None = None, required: bool = False) -> dict:
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


RETRY_AFTER = header("Seconds to wait before trying again.", {"type": "string", "pattern": "^[0-9]+$"},
                     required=True)
LOCATION = header("Where to read the created resource.", required=True)
REPLAYED = header("`true` when this is the stored answer to an earlier request with the same "
                  "Idempotency-Key.", {"const": "true"})
RATE_LIMIT_HEADERS = {  # sent by every rate-limited endpoint, per API key (or client address without one)
    "X-RateLimit-Limit": header("Requests allowed in the window.", {"type": "string", "pattern": "^[0-9]+$"}),
    "X-RateLimit-Remaining": header("Requests left in the window.",
                                    {"type": "string", "pattern": "^[0-9]+$"}),
    "X-RateLimit-Reset": header("When the window resets (Unix time).", {"type": "string"}),
}
PREFER_WAIT = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
               "examples": {"wait": {"value": "wait=10"}},
               "description": f"RFC 7240. `wait=N`: hold the answer until the job settles or N seconds pass "
                              f"(at most {MAX_WAIT_S}); other preferences are ignored."}
BATCH_ID = {"type": "string", "pattern": "^b[0-9a-f]{30}$", "description": "b and 30 lowercase hex digits"}

# status -> (component name, description listing the stable ``error.code`` values, extra headers)
ERROR_RESPONSES = {
    "400": ("BadRequest", "Malformed request. Codes: `bad_request`, `missing_image`, `empty_image`, "
                          "`corrupt_image`, `token_in_url` (an admin or metrics token sent as `?token=` or "
                          "`?access_token=`: send `Authorization: Bearer` instead).", {}),
    "401": ("Unauthorized", "Authentication failed. Codes: `unauthorized`, `auth_required` (AUTH_REQUIRED "
                            "is set and no API key was sent), `invalid_api_key`, `admin_unauthorized` "
                            "(admin API without `Authorization: Bearer <ADMIN_TOKEN>`), `metrics_unauthorized` "
                            "(/metrics without `Authorization: Bearer <METRICS_TOKEN or ADMIN_TOKEN>`).", {}),
    "404": ("NotFound", "No such resource. Codes: `not_found`, `expired` (a job this service issued that "
                        "is no longer kept: settled jobs are answered for JOB_RESULT_TTL_S, 24 h by default, "
                        "less only if the result store evicted them under memory pressure; the job's "
                        "webhook carried its result).", {}),
    "409": ("Conflict", "Conflict with the resource's state. Codes: `conflict`, `idempotency_in_progress` "
                        "(a request with this Idempotency-Key is still being processed), `not_settled` "
                        "(the job is not done or failed yet), `no_callback` (no callback URL), `already_settled` "
                        "(a cancel of a job already done or failed, or of a batch whose jobs all were: "
                        "nothing changes).",
            {"Retry-After": header("With `idempotency_in_progress`: seconds until the first request's claim "
                                   "lapses (IDEMPOTENCY_LEASE_S) at most; retry then.",
                                   {"type": "string", "pattern": "^[0-9]+$"})}),
    "413": ("PayloadTooLarge", "Upload too large. Codes: `payload_too_large` (bytes over MAX_UPLOAD_MB), "
                               "`too_many_pixels` (declared size over MAX_IMAGE_PIXELS); a `data:` image_url over 1 MiB.", {}),
    "415": ("UnsupportedImage", "Not an image in a supported format (JPEG, PNG, GIF, WebP, BMP, TIFF). "
                                "Code: `unsupported_image`.", {}),
    "422": ("UnprocessableEntity", "An option is invalid. Codes: `invalid_option`, `unknown_model`, "
                                   "`invalid_callback_url`, `invalid_image_url` (not an http(s) or data: URL, "
                                   "or its host resolves to a non-public address), `idempotency_key_reused` "
                                   "(the key was used before with a different request).", {}),
    "429": ("TooManyRequests", "Rate limit (RATE_LIMIT, or the API key's own) exceeded; on the admin API "
                               "and /metrics: more than 10 failed token attempts from this address this "
                               "minute (even the right token waits for Retry-After). Code: `rate_limited`; "
                               "`share_full` when this caller (API key, or address) already has "
                               "MAX_QUEUE_DEPTH_PER_KEY images waiting or being computed (others are still "
                               "served).",
            {"Retry-After": RETRY_AFTER, **RATE_LIMIT_HEADERS}),
    "503": ("ServiceUnavailable", "Try again later. Codes: `overloaded` (the model's queue is past "
                                  "MAX_QUEUE_DEPTH), `unavailable` (Redis or the job queue is down).",
            {"Retry-After": RETRY_AFTER}),
}


def error_responses() -> dict:
    return {name: {"description": description, "headers": headers, "content": json_body(ref("Error"))}
            for name, description, headers in ERROR_RESPONSES.values()}


def job_schemas() -> dict:
    """Schemas of a job and its parts."""
    return {
        "JobStatus": {"type": "string", "enum": ["queued", "running", "done", "failed", "canceled"],
                      "description": "canceled: by its owner (POST .../cancel); every status but queued "
                                     "and running is final"},
        "ImageInfo": {"type": "object", "required": ["sha256", "format", "width", "height"], "properties": {
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "format": {"type": "string", "enum": ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]},
            "width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1}}},
        "ModelRef": {"type": "object", "required": ["name", "version"],
                     "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
        "JobOptions": {"type": "object", "required": ["top_k", "gradcam"], "properties": {
            "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
            "gradcam": {"type": "boolean"}}},
        "Prediction": {"type": "object", "required": ["label", "index", "score"], "properties": {
            "label": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
            "score": {"type": "number", "minimum": 0, "maximum": 1}}},
        "Gradcam": {"type": "object", "required": ["class_index", "url"], "properties": {
            "class_index": {"type": "integer", "minimum": 0},
            "label": {"type": "string", "description": "The explained class's label (the top prediction's)."},
            "url": {"type": "string", "description": "GET it for the heatmap PNG (rendered on first request)."},
            "map": {"type": "array", "items": {"type": "array", "items": {"type": "number", "minimum": 0,
                                                                             "maximum": 1}},
                    "description": "The GradCAM map itself: h rows of w values in 0..1 (the model's target "
                                   "layer grid, e.g. 7x7), top row first. It covers crop_box; draw it "
                                   "stretched over that box."},
            "crop_box": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                         "minItems": 4, "maxItems": 4,
                         "description": "left, top, right, bottom of the square the model saw, as "
                                        "fractions of the upright image."}}},
        "Result": {"type": "object", "required": ["predictions", "gradcam", "device", "timings_ms"],
                   "properties": {
                       "predictions": {"type": "array", "items": ref("Prediction")},
                       "gradcam": {"oneOf": [ref("Gradcam"), {"type": "null"}],
                                   "description": "null when the job asked for gradcam=false"},
                       "device": {"type": "string", "examples": ["cpu", "cuda:0 (NVIDIA H100)"]},
                       "batch_size": {"type": "integer", "minimum": 1},
                       "timings_ms": {"type": "object", "additionalProperties": {"type": "number"},
                                      "description": "queue, decode, preprocess, inference, gradcam, total; "
                                                     "render is 0 (the heatmap is drawn on request)"}}},
        "Job": {"type": "object", "required": [
                    "id", "status", "cached", "created_at", "finished_at", "image", "model", "options",
                    "callback_url", "batch_id", "result", "error"],
                "properties": {
                    "id": JOB_ID, "status": ref("JobStatus"),
                    "cached": {"type": "boolean", "description": "answered from the result cache"},
                    "created_at": ISO_TIME, "finished_at": NULLABLE_TIME,
                    "image": {"oneOf": [ref("ImageInfo"), {"type": "null"}],
                              "description": "null while the image of an image_url job is being fetched"},
                    "model": ref("ModelRef"), "options": ref("JobOptions"),
                    "callback_url": {"type": ["string", "null"]},
                    "batch_id": {"oneOf": [BATCH_ID, {"type": "null"}]},
                    "result": {"oneOf": [ref("Result"), {"type": "null"}],
                               "description": "set when status is done"},
                    "error": {"oneOf": [ref("ErrorDetail"), {"type": "null"}],
                              "description": "set when status is failed; codes include decode_failed, "
                                             "inference_failed, worker_crashed, timeout, image_expired, "
                                             "model_version_unavailable, result_expired, fetch_failed "
                                             "(the image_url could not be fetched, or is not an image: "
                                             "the message says why), deadline_exceeded (not started by "
                                             "its deadline: never computed)"}}},
    }


def batch_and_delivery_schemas() -> dict:
    """Schemas of batches and webhook deliveries."""
    count = {"type": "integer", "minimum": 0}
    event = {"type": "object",
             "required": ["id", "type", "url", "state", "attempts", "next_attempt_at", "created_at"],
             "properties": {
                 "id": {"type": "string", "pattern": "^msg_"},
                 "type": {"type": "string", "enum": ["job.started", "job.completed", "job.failed",
                                                     "batch.completed"]},
                 "url": {"type": "string"},
                 "state": {"type": "string", "enum": ["pending", "delivered", "failed", "endpoint_gone"]},
                 "attempts": count, "next_attempt_at": NULLABLE_TIME, "created_at": ISO_TIME}}
    attempt = {"type": "object",
               "required": ["event_id", "attempt", "at", "url", "status_code", "duration_ms", "error", "ok"],
               "properties": {
                   "event_id": {"type": "string"}, "attempt": {"type": "integer", "minimum": 1},
                   "at": ISO_TIME, "url": {"type": "string"},
                   "status_code": {"type": ["integer", "null"]}, "duration_ms": {"type": "number"},
                   "error": {"type": ["string", "null"]}, "ok": {"type": "boolean"}}}
    return {
        "BatchCounts": {"type": "object", "required": ["total", "queued", "running", "done", "failed", "canceled"],
                        "properties": dict.fromkeys(("total", "queued", "running", "done", "failed", "canceled"),
                                                    count)},
        "Batch": {"type": "object",
                  "required": ["id", "status", "created_at", "finished_at", "callback_url", "counts", "jobs"],
                  "properties": {
                      "id": BATCH_ID, "status": {"type": "string", "enum": ["running", "done"]},
                      "created_at": ISO_TIME, "finished_at": NULLABLE_TIME,
                      "callback_url": {"type": ["string", "null"]}, "counts": ref("BatchCounts"),
                      "jobs": {"type": "array", "items": ref("Job")}}},
        "DeliveryEvent": event,
        "DeliveryAttempt": attempt,
        "Deliveries": {"type": "object", "required": ["job_id", "events", "attempts"], "properties": {
            "job_id": JOB_ID, "events": {"type": "array", "items": ref("DeliveryEvent")},
            "attempts": {"type": "array", "items": ref("DeliveryAttempt")}}},
        "Redelivery": {"type": "object", "required": ["event"],
                       "properties": {"event": ref("DeliveryEvent")}},
    }


def service_schemas() -> dict:
    """Schemas of errors, model cards and health answers."""
    triple = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
    return {
        "ErrorDetail": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "description": "stable, machine-readable"},
            "message": {"type": "string", "description": "a human sentence; may change"}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": ref("ErrorDetail")}},
        "Model": {"type": "object", "required": ["name", "version", "num_classes", "input_size"],
                  "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "description": {"type": "string"},
            "architecture": {"type": "string"}, "variant": {"type": "string"},
            "num_classes": {"type": "integer", "minimum": 1}, "input_size": {"type": "integer", "minimum": 1},
            "preprocess": {"type": "object", "properties": {
                "resize": {"type": "integer"}, "crop": {"type": "integer"}, "mean": triple, "std": triple}},
            "gradcam_layer": {"type": "string"}}},
        "ModelList": {"type": "object", "required": ["default", "models"], "properties": {
            "default": {"type": "string"}, "models": {"type": "array", "items": ref("Model")}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "Readiness": {"type": "object", "required": ["redis", "workers", "status"], "properties": {
            "redis": {"type": "boolean"}, "workers": {"type": "integer", "minimum": 0},
            "status": {"type": "string", "enum": ["ok", "no_workers"]}}},
    }


def components(settings: Settings) -> dict:
    return {
        "schemas": {**job_schemas(), **batch_and_delivery_schemas(), **service_schemas(), **admin_schemas()},
        "responses": error_responses(),
        "parameters": {
            "JobId": {"name": "job_id", "in": "path", "required": True, "schema": JOB_ID},
            "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "required": False,
                               "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                               "description": "Repeat a POST with the same key and body to get the first "
                                              f"answer again (kept {settings.idempotency_ttl_s} s)."},
        },
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "`Authorization: Bearer <API key>`. Optional unless AUTH_REQUIRED."},
            "adminToken": {"type": "http", "scheme": "bearer",
                           "description": "`Authorization: Bearer <ADMIN_TOKEN>` for /api/v1/admin/."},
            "metricsToken": {"type": "http", "scheme": "bearer",
                             "description": "`Authorization: Bearer <METRICS_TOKEN>` for /metrics."},
        },
    }


def option_fields() -> dict:
    """The option fields a submit accepts, as schema properties."""
    return {
        "model": {"type": "string",
                  "description": "a name from GET /api/v1/models; default: the default card"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 5},
        "gradcam": {"type": "boolean", "default": True},
        "callback_url": {"type": "string", "format": "uri", "description":
                         "https URL to POST signed job.completed / job.failed / job.canceled webhooks to "
                         "(Standard Webhooks)."},
        "webhook_events": {"type": "string", "pattern": "^(started|completed)(,(started|completed))?$",
                           "default": "completed", "description":
                           "which events call callback_url back: `started` (job.started, when a worker "
                           "claims the job), `completed` (job.completed, job.failed or job.canceled); "
                           "comma-separated. A job's events arrive in order. Needs a callback_url."},
        "deadline_s": {"type": "number", "minimum": 0, "maximum": 7 * 24 * 3600, "description":
                       "seconds from acceptance: a job not started by then ends `failed` with "
                       "`deadline_exceeded`, never computed (one already running finishes); 0: none, "
                       "even where the server sets JOB_DEADLINE_S. Or the Cancel-After header."},
        "priority": {"type": "string", "enum": ["interactive", "bulk"], "description":
                     "the lane: workers serve `interactive` work first, while `bulk` keeps a share (half a "
                     "batch in every BULK_SHARE); inside a lane, callers with less work waiting go first. Default: "
                     "`interactive` for a job, `bulk` for a batch's jobs."},
    }


CANCEL_AFTER = {"name": "Cancel-After", "in": "header", "required": False, "schema": {"type": "string"},
                "examples": {"seconds": {"value": "30s"}, "minutes": {"value": "5m"}},
                "description": "Replicate's convention: a duration (`30s`, `5m`, `1h30m`, or plain seconds) "
                               "used as deadline_s when the request has no deadline_s field."}


def image_url_field() -> dict:
    return {"type": "string", "maxLength": 2 * 1024 * 1024, "description":
            "the image's address instead of the image: an http(s) URL on the public internet (fetched by "
            "the service within FETCH_TIMEOUT_S, at most 3 redirects, at most MAX_UPLOAD_MB; the job is "
            "`queued` meanwhile, `failed` with `fetch_failed` if that fails) or a `data:` URL of at most 1 MiB"}


def job_paths(settings: Settings) -> dict:
    fields = option_fields()
    multipart = {"type": "object", "properties": {
        "image": {"type": "string", "contentMediaType": "application/octet-stream",
                  "description": f"the image, at most {settings.max_upload_bytes} bytes (or send image_url)"},
        "image_url": image_url_field(), **fields}}
    by_url = {"type": "object", "required": ["image_url"], "properties": {"image_url": image_url_field(), **fields}}
    raw = {"type": "string", "contentMediaType": "application/octet-stream"}
    query = [{"name": name, "in": "query", "required": False, "schema": schema,
              "description": "only with a raw image body (multipart sends it as a form field)"}
             for name, schema in fields.items()]
    waited_answer = {"content": json_body(ref("Job")), "headers": {
        "Location": LOCATION, "Idempotent-Replayed": REPLAYED,
        "Preference-Applied": header("`wait=N` when the request waited (N: the seconds asked for, at most "
                                     f"{MAX_WAIT_S}).", {"type": "string", "pattern": "^wait=[0-9.]+$"}),
        "Wait-Skipped": header("Sent when `Prefer: wait` was asked for but this web process already has "
                               "MAX_WAITERS requests waiting: the job is answered at once.",
                               {"const": "too-many-waiters"})}}
    return {
        "/api/v1/jobs": {"post": {
            "operationId": "submitJob", "tags": ["jobs"], "summary": "Submit an image",
            "security": API_KEY,
            "parameters": [param("IdempotencyKey"), PREFER_WAIT, CANCEL_AFTER, *query],
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": multipart,
                                        "encoding": {"image": {"contentType": IMAGE_TYPES}}},
                "application/json": {"schema": by_url},
                "application/x-www-form-urlencoded": {"schema": by_url},
                "image/*": {"schema": raw}, "application/octet-stream": {"schema": raw}}},
            "responses": {
                "200": {"description": "Cache hit: the job is already done (`cached: true`); with "
                                       "`Prefer: wait`, the job settled (done or failed) within the wait.",
                        **waited_answer},
                "202": {"description": "Accepted: queued (an image_url job while its image is fetched), or "
                                       "attached to identical work in flight; with `Prefer: wait`, not "
                                       "settled within the wait.", **waited_answer},
                **errors("400", "401", "409", "413", "415", "422", "429", "503")}}},
        "/api/v1/jobs/{job_id}": {"get": {
            "operationId": "getJob", "tags": ["jobs"], "summary": "Read a job (optionally long-poll)",
            "description": "A settled job is answered for at least JOB_RESULT_TTL_S (24 h by default) unless "
                           "the result store evicts it under memory pressure; then 404 `expired`.",
            "security": API_KEY,
            "parameters": [param("JobId"), {
                "name": "wait", "in": "query", "required": False,
                "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S, "default": 0},
                "description": "block up to this many seconds until the job is done or failed"}],
            "responses": {"200": {"description": "The job.", "content": json_body(ref("Job")), "headers": {
                "Wait-Skipped": header("Sent when `wait` was asked for but this web process already has "
                                       "MAX_WAITERS requests waiting: the job is answered at once, as it is.",
                                       {"const": "too-many-waiters"}),
                "Retry-After": header("With Wait-Skipped: seconds before polling again.",
                                      {"type": "string", "pattern": "^[0-9]+$"})}},
                          **errors("401", "404", "422", "429", "503")}}},
        "/api/v1/jobs/{job_id}/cancel": {"post": {
            "operationId": "cancelJob", "tags": ["jobs"], "summary": "Cancel a queued or running job",
            "description": "The job ends `canceled` at once and fires `job.canceled` where it has a callback; "
                           "a queued one is never computed for it (identical jobs sharing its computation "
                           "still get their result). Cancelling a canceled job answers the same again.",
            "security": API_KEY, "parameters": [param("JobId")],
            "responses": {"200": {"description": "The job, canceled.", "content": json_body(ref("Job"))},
                          **errors("401", "404", "409", "429", "503")}}},
        "/api/v1/jobs/{job_id}/gradcam.png": {"get": {
            "operationId": "getGradcam", "tags": ["jobs"], "summary": "The GradCAM heatmap over the image",
            "security": API_KEY, "parameters": [param("JobId")],
            "responses": {
                "200": {"description": "PNG at the image's upright aspect ratio; drawn alone, without the "
                                       "image, when the picture has left the cache (X-Heatmap-Base: none).",
                        "headers": {"X-Heatmap-Base": {"description": "`none` when the heatmap is drawn alone",
                                                       "schema": {"type": "string", "enum": ["none"]}}},
                        "content": {"image/png": {"schema": {"type": "string",
                                                             "contentMediaType": "image/png"}}}},
                **errors("401", "404", "429", "503")}}},
    }


def delivery_paths(settings: Settings) -> dict:
    return {
        "/api/v1/jobs/{job_id}/deliveries": {"get": {
            "operationId": "getDeliveries", "tags": ["webhooks"],
            "summary": "Webhook events and attempts of a job",
            "security": API_KEY, "parameters": [param("JobId")],
            "responses": {"200": {"description": "Events and delivery attempts.",
                                  "content": json_body(ref("Deliveries"))},
                          **errors("401", "404", "429", "503")}}},
        "/api/v1/jobs/{job_id}/deliveries/redeliver": {"post": {
            "operationId": "redeliver", "tags": ["webhooks"], "summary": "Send the job's webhook again",
            "security": API_KEY, "parameters": [param("JobId")],
            "responses": {"202": {"description": "A new event was queued.",
                                  "content": json_body(ref("Redelivery"))},
                          **errors("401", "404", "409", "429", "503")}}},
    }


def batch_paths(settings: Settings) -> dict:
    images = {"type": "array", "minItems": 1, "maxItems": settings.max_batch_images,
              "items": {"type": "string", "contentMediaType": "application/octet-stream"},
              "description": "repeat the field once per image (MAX_BATCH_IMAGES)"}
    form = {"type": "object", "required": ["image"],
            "properties": {"image": images, **option_fields()}}
    return {
        "/api/v1/batches": {"post": {
            "operationId": "submitBatch", "tags": ["batches"], "summary": "Submit several images at once",
            "description": "The options apply to every image. One refused image refuses the whole batch.",
            "security": API_KEY, "parameters": [param("IdempotencyKey"), CANCEL_AFTER],
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": form, "encoding": {"image": {"contentType": IMAGE_TYPES}}}}},
            "responses": {"202": {"description": "Accepted.", "content": json_body(ref("Batch")),
                                  "headers": {"Location": LOCATION, "Idempotent-Replayed": REPLAYED}},
                          **errors("400", "401", "409", "413", "415", "422", "429", "503")}}},
        "/api/v1/batches/{batch_id}/cancel": {"post": {
            "operationId": "cancelBatch", "tags": ["batches"], "summary": "Cancel a batch's unsettled jobs",
            "description": "Every job still queued or running ends `canceled`; `batch.completed` counts them.",
            "security": API_KEY,
            "parameters": [{"name": "batch_id", "in": "path", "required": True, "schema": BATCH_ID}],
            "responses": {"200": {"description": "The batch.", "content": json_body(ref("Batch"))},
                          **errors("401", "404", "409", "429", "503")}}},
        "/api/v1/batches/{batch_id}": {"get": {
            "operationId": "getBatch", "tags": ["batches"], "summary": "Read a batch and its jobs",
            "security": API_KEY,
            "parameters": [{"name": "batch_id", "in": "path", "required": True, "schema": BATCH_ID}],
            "responses": {"200": {"description": "The batch.", "content": json_body(ref("Batch"))},
                          **errors("401", "404", "429", "503")}}},
    }


def service_paths(settings: Settings) -> dict:
    return {
        "/api/v1/models": {"get": {
            "operationId": "listModels", "tags": ["models"], "summary": "Model cards served", "security": [],
            "responses": {"200": {"description": "The served cards.",
                                  "content": json_body(ref("ModelList"))}}}},
        "/api/v1/openapi.json": {"get": {
            "operationId": "getOpenapi", "tags": ["meta"], "summary": "This document", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {
                "schema": {"type": "object"}}}}}}},
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["health"], "summary": "The process is up", "security": [],
            "responses": {"200": {"description": "Up.", "content": json_body(ref("Health"))}}}},
        "/readyz": {"get": {
            "operationId": "readyz", "tags": ["health"], "security": [],
            "summary": "Redis answers and at least one worker is alive",
            "responses": {
                "200": {"description": "Ready.", "content": json_body(ref("Readiness"))},
                "503": {"description": "Not ready: no live worker (`status: no_workers`), or Redis is down "
                                       "(an error with code `unavailable`).",
                        "content": json_body({"anyOf": [ref("Readiness"), ref("Error")]})}}}},
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["health"], "summary": "Prometheus metrics",
            "description": "Off (404) unless METRICS_TOKEN or ADMIN_TOKEN is set; either one is accepted.",
            "security": [{"metricsToken": []}, {"adminToken": []}],
            "responses": {"200": {"description": "Prometheus text exposition format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **errors("400", "401", "404", "429")}}},
    }


def admin_schemas() -> dict:
    """Schemas of the admin API's answers (web/admin.py)."""
    nullable_ms = {"type": ["number", "null"]}
    p50_p95 = {"type": "object", "properties": {"p50": nullable_ms, "p95": nullable_ms}}
    counts = {"type": "integer", "minimum": 0}
    return {
        "WorkerChild": {"type": "object", "required": ["name", "node", "host", "pid", "device", "last_seen"],
                        "properties": {
            "name": {"type": "string", "description": "host:pid"}, "node": {"type": "string"},
            "host": {"type": "string"}, "pid": {"type": "integer"}, "child_index": {"type": "integer"},
            "device": {"type": "string", "description": "cpu or cuda:N"}, "device_name": {"type": "string"},
            "gpu_memory": {"type": "object", "description": "bytes; empty on CPU",
                           "properties": {"used": counts, "total": counts}},
            "models": {"type": "object", "additionalProperties": {"type": "string"}},
            "max_batch": {"type": "object", "additionalProperties": {"type": "integer"}},
            "jobs_done": counts, "jobs_failed": counts, "jobs_deadline_exceeded": counts,
            "computations_skipped": counts, "current_batch": counts,
            "latency_ms": p50_p95, "last_seen": {"type": "number"}}},
        "WorkerNode": {"type": "object", "required": ["name", "status", "pool_size", "children"], "properties": {
            "name": {"type": "string", "description": "Celery node name, e.g. worker1@host"},
            "host": {"type": ["string", "null"]}, "status": {"type": "string", "enum": ["active", "draining"]},
            "pool_size": counts, "devices": {"type": "array", "items": {"type": "string"}},
            "models": {"type": "object", "additionalProperties": {"type": "string"}},
            "jobs_done": counts, "jobs_failed": counts, "jobs_deadline_exceeded": counts,
            "computations_skipped": counts,
            "queues": {"type": "array", "items": {"type": "string"}},
            "children": {"type": "array", "items": ref("WorkerChild")}}},
        "WebhookWorker": {"type": "object", "required": ["name", "last_seen"], "properties": {
            "name": {"type": "string", "description": "Celery node name, e.g. webhooks@host"},
            "host": {"type": ["string", "null"]}, "pid": counts, "concurrency": counts,
            "last_seen": {"type": "number"},
            **{outcome: counts for outcome in ("delivered", "retrying", "failed", "endpoint_gone", "busy",
                                               "expired")}}},
        "WorkerList": {"type": "object", "required": ["workers", "webhook_workers"], "properties": {
            "workers": {"type": "array", "items": ref("WorkerNode")},
            "webhook_workers": {"type": "array", "items": ref("WebhookWorker")}}},
        "KeyList": {"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "items": {
            "type": "object", "required": ["id", "name", "weight", "in_flight"], "properties": {
                "id": {"type": "string"}, "name": {"type": "string"}, "created_at": {"type": "number"},
                "revoked_at": {"type": ["number", "null"]}, "webhook_url": {"type": ["string", "null"]},
                "rate_limit": {"type": ["string", "null"]},
                "weight": {"type": "number", "description": "fair-share weight (default 1)"},
                "in_flight": {**counts, "description": "the key's images waiting or being computed"}}}}}},
        "QueueList": {"type": "object", "required": ["queues"], "properties": {"shares": {
            "type": "array", "description": "computations in flight per caller (key:<id> or addr:<address>), "
                                            "largest first; past 50 the rest summed as `other`",
            "items": {"type": "object", "properties": {"share": {"type": "string"}, "in_flight": counts}}},
            "queues": {
            "type": "array", "items": {"type": "object", "required": ["name", "depth", "oldest_age_s", "workers",
                                                                      "backlog_per_worker"],
                                       "properties": {"name": {"type": "string"}, "depth": counts,
                                                      "oldest_age_s": nullable_ms,
                                                      "workers": {**counts, "description": (
                                                          "live workers consuming the queue: children of "
                                                          "nodes not draining (webhook nodes for webhooks)")},
                                                      "backlog_per_worker": {"type": "number", "description": (
                                                          "depth / workers; the whole depth with no worker")},
                                                      "lanes": {"type": "object", "description": (
                                                          "inference queues: depth per lane"), "properties": {
                                                          "interactive": counts, "bulk": counts}}}}}}},
        "WindowStats": {"type": "object", "required": ["models", "cache"], "properties": {
            "models": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "done": counts, "failed": counts, "per_second": {"type": "number"},
                "latency_ms": p50_p95, "inference_ms": p50_p95}}},
            "cache": {"type": "object", "properties": {"hits": counts, "misses": counts,
                                                       "hit_rate": nullable_ms}}}},
        "FleetStats": {"type": "object", "required": ["windows", "cache_size", "series"], "properties": {
            "windows": {"type": "object", "properties": {w: ref("WindowStats") for w in ("1m", "5m", "60m")}},
            "cache_size": {"type": "object", "properties": {
                "entries": counts, "bytes": counts, "exact": {"type": "boolean"},
                "measured_at": {"type": "number"}}},
            "series": {"type": "array", "items": {"type": "object", "properties": {
                "t": {"type": "integer"}, "done": counts, "p95_ms": nullable_ms,
                "queue_depth": {"type": "object", "additionalProperties": counts}}}}}},
        "WorkerAction": {"type": "object", "required": ["worker", "action"], "properties": {
            "worker": {"anyOf": [{"type": "string"}, ref("WorkerNode")]},
            "action": {"type": "string", "enum": ["grow", "shrink", "drain", "resume"]},
            "n": {"type": "integer"}, "reply": {"type": "object"},
            "pool": {"type": "object", "properties": {"processes": counts, "target": counts}},
            "stopped": {"type": "array", "items": {"type": "string"}},
            "started": {"type": "array", "items": {"type": "string"}}}},
        "PurgeResult": {"type": "object", "required": ["model", "version", "deleted"], "properties": {
            "model": {"type": "string"}, "version": {"type": "string"}, "deleted": counts}},
    }


def admin_paths(settings: Settings) -> dict:
    """The admin API: 404 when ADMIN_TOKEN is unset, 401 without it, 400 with it in the URL, 429 after
    10 failed attempts a minute from one address."""
    admin = [{"adminToken": []}]
    node = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "the worker's Celery node name, as GET /api/v1/admin/workers lists it"}
    step = {"required": False, "content": json_body({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1}}})}

    def read(operation: str, summary: str, schema: str) -> dict:
        return {"get": {"operationId": operation, "tags": ["admin"], "summary": summary, "security": admin,
                        "responses": {"200": {"description": summary + ".", "content": json_body(ref(schema))},
                                      **errors("400", "401", "404", "429", "503")}}}

    def action(operation: str, summary: str, body: dict | None = None) -> dict:
        return {"post": {"operationId": operation, "tags": ["admin"], "summary": summary, "security": admin,
                         "parameters": [node], **({"requestBody": body} if body else {}),
                         "responses": {"200": {"description": "Done; the worker's new state.",
                                               "content": json_body(ref("WorkerAction"))},
                                       **errors("400", "401", "404", "422", "429", "503")}}}

    return {
        "/api/v1/admin/workers": read("adminWorkers", "Live workers with their children's heartbeats",
                                      "WorkerList"),
        "/api/v1/admin/queues": read("adminQueues", "Queue depths, oldest waiting job ages, backlog per worker",
                                     "QueueList"),
        "/api/v1/admin/stats": read("adminStats", "Throughput, latency and cache for 1/5/60 minutes",
                                    "FleetStats"),
        "/api/v1/admin/workers/{name}/grow": action("adminGrow", "Add children to a worker's pool", step),
        "/api/v1/admin/workers/{name}/shrink": action("adminShrink", "Remove idle children (one stays)", step),
        "/api/v1/admin/workers/{name}/drain": action("adminDrain", "Stop consuming; in-flight jobs finish"),
        "/api/v1/admin/workers/{name}/resume": action("adminResume", "Consume the worker's queues again"),
        "/api/v1/admin/keys": read("adminKeys", "API keys with their fair-share weights and work in flight",
                                   "KeyList"),
        "/api/v1/admin/keys/{key_id}/weight": {"post": {
            "operationId": "adminKeyWeight", "tags": ["admin"], "summary": "Set an API key's fair-share weight",
            "security": admin, "parameters": [{"name": "key_id", "in": "path", "required": True,
                                               "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": json_body({
                "type": "object", "required": ["weight"], "properties": {
                    "weight": {"type": "number", "minimum": 0.01, "maximum": 100}}})},
            "responses": {"200": {"description": "The key with its new weight.", "content": json_body({
                "type": "object", "properties": {"id": {"type": "string"}, "weight": {"type": "number"}}})},
                          **errors("400", "401", "404", "422", "429", "503")}}},
        "/api/v1/admin/cache/purge": {"post": {
            "operationId": "adminPurge", "tags": ["admin"], "summary": "Purge one model version's cache",
            "security": admin, "requestBody": {"required": True, "content": json_body({
                "type": "object", "required": ["model", "version"],
                "properties": {"model": {"type": "string"}, "version": {"type": "string"}}})},
            "responses": {"200": {"description": "Deleted keys (results, heatmaps, header facts).",
                                  "content": json_body(ref("PurgeResult"))},
                          **errors("400", "401", "404", "422", "429", "503")}}},
    }


PATH_GROUPS = [job_paths, delivery_paths, batch_paths, service_paths, admin_paths]


def build_spec(settings: Settings) -> dict:
    """Return the OpenAPI 3.1 document for an app running with ``settings``."""
    paths: dict = {}
    for group in PATH_GROUPS:
        paths.update(group(settings))
    return {
        "openapi": "3.1.0",
        "info": {"title": "imgsvc", "version": API_VERSION,
                 "description": "Asynchronous image inference with GradCAM. Every error is "
                                "`{\"error\": {\"code\", \"message\"}}`; `code` is stable."},
        "servers": [{"url": "/"}],
        "tags": [{"name": name} for name in ("jobs", "batches", "webhooks", "models", "health", "meta",
                                             "admin")],
        "paths": paths,
        "components": components(settings),
    }


@bp.get("/api/v1/openapi.json")
def openapi_json():
    response = jsonify(build_spec(current_app.extensions["imgsvc"].settings))
    response.headers["Cache-Control"] = "no-cache"
    return response
