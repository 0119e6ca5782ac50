"""How big a batch to take: a start-up guess, then what throughput under real load says.

The start-up probe times forward + GradCAM on dummy images per batch size. It is only a first
guess: at start-up other children load their models on the same cores, so its figures are noisy
(seen: 1: 19.0, 2: 22.7, 4: 20.9, 8: 42.6 img/s -> 8, where 4 is best under load). ``BatchSizer``
then measures the child's real throughput, full batches only (a batch smaller than asked means
the queue ran dry, and says nothing about the size), and now and then tries the neighbouring
sizes, keeping whichever moves more images per second.
"""
from __future__ import annotations

import logging
import time

import torch

from worker.inference import predict
from worker.models import LoadedModel

log = logging.getLogger(__name__)


def best_batch_size(model: LoadedModel, amp_dtype: str, candidates: tuple[int, ...],
                    seconds_each: float = 0.3) -> int:
    """Measure throughput (forward + GradCAM) per batch size; return the smallest within 5% of the best."""
    size = model.card.input_size
    rates = {}
    for batch in candidates:
        tensors = [torch.zeros(3, size, size)] * batch
        predict(model, tensors, gradcam=True, amp_dtype=amp_dtype)  # shapes warm up (cudnn autotune)
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds_each:
            predict(model, tensors, gradcam=True, amp_dtype=amp_dtype)
            runs += 1
        rates[batch] = batch * runs / (time.perf_counter() - start)
    best = max(rates.values())
    chosen = min(b for b, rate in rates.items() if rate >= 0.95 * best)
    log.info("%s on %s: images/s by batch size %s -> max_batch %d", model.card.name, model.device,
             {b: round(r, 1) for b, r in rates.items()}, chosen)
    return chosen


class BatchSizer:
    """Chooses a child's batch size for one model from throughput measured under real load.

    Every ``explore_every`` full batches it runs ``trial_batches`` at a neighbouring size (twice or
    half the current one, in turn) and moves there when that measured at least ``gain`` better.
    Rates are averages over whole trials, so one noisy batch cannot move the choice. A trial that
    loses doubles the wait before the next (up to 8x), so a settled size costs little exploring.

    No trial starts within ``light_quiet_s`` of a batch that held a light sender's job
    (``saw_light_job``; ``shared.tasks.from_light_sender``): a trial batch twice the size holds up
    every job that arrives while it runs, and fair share promises such a sender about one batch of
    wait; a sender posting now and then has nothing in flight most of the time, so the worker goes
    by the jobs it took, not by what is waiting now. Smaller trials wait too: tried alone, a lucky
    one would move the size down with no way back up while light senders stay (seen: batches of 4
    where 8 moved 20% more). A trial put off for ``defer_limit`` batches runs anyway, so a service
    that always has light senders still adapts.
    """

    def __init__(self, initial: int, candidates: tuple[int, ...], *, fixed: bool = False,
                 explore_every: int = 30, trial_batches: int = 6, gain: float = 1.03,
                 defer_limit: int | None = None, light_quiet_s: float = 30.0):
        self.candidates = tuple(sorted(set(candidates) | {initial}))
        self.chosen, self.fixed = initial, fixed
        self.explore_every, self.trial_batches, self.gain = explore_every, trial_batches, gain
        self.defer_limit = 8 * explore_every if defer_limit is None else defer_limit
        self.light_quiet_s = light_quiet_s
        self._light_seen_at = float("-inf")  # time.monotonic() of the last light sender's job taken
        self.rates: dict[int, float] = {}  # size -> images/s over its last whole measurement
        self._trial: int | None = None  # the size on trial, or None
        self._direction = 1
        self._since_trial = explore_every - trial_batches  # the start-up guess is tried against early
        self._interval = explore_every
        self._window: list[tuple[int, float]] = []  # (images, seconds) of the size being measured

    @property
    def size(self) -> int:
        """The size to take next."""
        return self._trial or self.chosen

    @property
    def shapes(self) -> tuple[int, ...]:
        """Every batch size a batch may be run at: the powers of two up to the biggest candidate,
        and the candidates (a GPU child warms each and pads every batch to one)."""
        top = max(self.candidates)
        powers = {1 << i for i in range(top.bit_length()) if 1 << i <= top}
        return tuple(sorted(powers | set(self.candidates)))

    def padded(self, count: int) -> int:
        """The smallest shape that holds ``count`` images (``count`` itself past the biggest)."""
        return next((shape for shape in self.shapes if shape >= count), count)

    def forbid(self, size: int) -> None:
        """Never take or run batches of ``size`` or more again (they ran out of device memory)."""
        smaller = tuple(c for c in self.candidates if c < size) or (max(1, size // 2),)
        log.warning("batch size %d ran out of device memory: batches of at most %d from now on",
                    size, max(smaller))
        self.candidates = smaller
        self.chosen = min(self.chosen, max(smaller))
        if self._trial is not None and self._trial >= size:
            self._trial, self._window = None, []
        self.rates = {s: r for s, r in self.rates.items() if s < size}
        self._window = []

    @property
    def light_sender_about(self) -> bool:
        """Whether a light sender's job was taken within the last ``light_quiet_s``."""
        return time.monotonic() - self._light_seen_at < self.light_quiet_s

    def saw_light_job(self, at: float | None = None) -> None:
        """A batch just taken holds a light sender's job (``at``: its time.monotonic(); now if None)."""
        self._light_seen_at = time.monotonic() if at is None else at

    def record(self, size: int, images: int, seconds: float) -> None:
        """Note a batch's throughput: ``images`` moved in ``seconds`` of the child's loop at ``size``."""
        if self.fixed or size != self.size or images < size or seconds <= 0:
            return  # not full (the queue ran dry), or from before the size changed
        self._window.append((images, seconds))
        if len(self._window) < self.trial_batches:
            return
        self.rates[size] = sum(i for i, _ in self._window) / sum(s for _, s in self._window)
        self._window = []
        self._since_trial += self.trial_batches
        if self._trial is not None:
            self._end_trial()
        else:
            if self._since_trial >= self._interval:
                self._start_trial()

    def _start_trial(self) -> None:
        overdue = self._since_trial >= self._interval + self.defer_limit
        if not overdue and self.light_sender_about:
            return  # a light sender is about: asked again after the next measurement
        self._since_trial = 0
        index = self.candidates.index(self.chosen) + self._direction
        self._direction = -self._direction
        if 0 <= index < len(self.candidates):
            self._trial = self.candidates[index]

    def _end_trial(self) -> None:
        trial, self._trial = self._trial, None
        if self.rates[trial] >= self.gain * self.rates.get(self.chosen, 0.0):
            log.info("batch size %d -> %d (%.1f vs %.1f images/s under load)", self.chosen, trial,
                     self.rates[trial], self.rates.get(self.chosen, 0.0))
            self._direction = 1 if trial > self.chosen else -1  # keep going the way that paid
            self.chosen = trial
            self._interval = self._since_trial = self.explore_every  # and try the next step at once
        else:
            self._interval = min(2 * self._interval, 8 * self.explore_every)
