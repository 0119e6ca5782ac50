"""``gradcam.png`` on the web tier: drawn from a result's map over the picture the worker kept, or
without it, and that picture kept again when an upload brings its bytes back.

The picture lives on the cache server (CACHE_URL), which may lose it: `make run`'s cache starts empty
after a restart while the main server's copy of the result still answers the next upload, and an
evicting cache may drop a picture before its result. Two remedies:

- an upload answered from the cache holds the picture's bytes: ``PictureKeeper.keep`` stores them as
  the picture again when it is missing. On the cache-hit path of a job that asks for GradCAM this
  costs one EXISTS; the thumbnail of a big upload is made only when the picture is missing.
- a done job's heatmap is never refused while the job lives: with no picture, ``render_alone`` draws
  the map alone at the image's aspect ratio (the API marks it ``X-Heatmap-Base: none``).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import redis

from shared.errors import DecodeFailed
from shared.jobs import CACHE_BACKOFF_S, JobStore
from shared.keys import Computation
from shared.overlay import picture_for, render_alone, render_stored

log = logging.getLogger(__name__)
DEFAULT_RESIZE = 256  # a card no longer served: decode its kept picture as the usual cards would


class PictureKeeper:
    """Keeps an upload answered from the cache as its heatmap's picture, when the cache lost it."""

    def __init__(self, store: JobStore, max_pixels: int):
        self.store, self.max_pixels = store, max_pixels
        self._down_until = 0.0  # a cache server that failed is left alone for CACHE_BACKOFF_S

    def keep(self, comp: Computation, upload: bytes, resize: int) -> None:
        """Store ``upload`` (or its thumbnail) as ``comp``'s picture unless the cache holds one."""
        if not comp.options.gradcam or time.monotonic() < self._down_until:
            return
        cache = self.store.cache
        try:
            if cache.exists(comp.picture_key):
                return
            picture = picture_for(upload, min_short_side=resize, max_pixels=self.max_pixels)
            ttl_ms = cache.pttl(comp.result_key)  # as long as the result, or a result's whole life
            cache.set(comp.picture_key, picture, px=ttl_ms if ttl_ms > 0 else self.store.result_ttl_s * 1000, nx=True)
        except DecodeFailed as exc:
            log.warning("the upload of %s does not decode for its heatmap's picture: %s", comp.suffix, exc)
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + CACHE_BACKOFF_S
            log.warning("could not keep the heatmap's picture of %s: %s", comp.suffix, exc)


def render_on_picture(resize: int | None, result: dict, picture: bytes, max_pixels: int) -> bytes | None:
    """Draw a result's GradCAM map over the picture the worker kept; None without a map or a picture
    that decodes. ``resize`` is the model card's (None: a card no longer served)."""
    gradcam = result.get("gradcam") or {}
    if "map" not in gradcam:
        return None
    try:
        return render_stored(picture, gradcam["map"], gradcam["crop_box"],
                             min_short_side=resize or DEFAULT_RESIZE, max_pixels=max_pixels)
    except DecodeFailed:
        log.exception("the picture kept for a heatmap does not decode")
        return None


def draw_without_picture(job: dict) -> bytes | None:
    """Draw a done job's GradCAM map alone at its image's aspect ratio; None when it has none."""
    gradcam = (job.get("result") or {}).get("gradcam") or {}
    if job["status"] != "done" or "map" not in gradcam or "crop_box" not in gradcam:
        return None
    image = job.get("image") or {}
    cam = np.asarray(gradcam["map"], dtype=np.float32)
    return render_alone(cam, tuple(gradcam["crop_box"]), image.get("width") or 1, image.get("height") or 1)
