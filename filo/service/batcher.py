"""A bounded queue that groups concurrent requests into batches for one model worker.

Requests are :meth:`MicroBatcher.submit`-ted from any thread and get a
:class:`concurrent.futures.Future`. One worker thread takes the oldest waiting job, then waits at
most ``max_wait_s`` for more (up to ``max_batch``), and calls ``run_batch`` with them; results are
handed back in order. At most ``queue_size`` jobs wait: one more raises :class:`QueueFull`
(the service answers 503 with a Retry-After estimated from the recent batch times).

The model is used by this one thread only, so per-request settings can be applied to it between
batches without locks.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs; ``retry_after`` seconds is a fair wait."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Job:
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    """Counters for ``/healthz`` and the load test."""

    batches: int = 0
    jobs: int = 0
    rejected: int = 0
    largest_batch: int = 0
    mean_batch_s: float = 0.0  # moving average of one batch's run time

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "jobs": self.jobs, "rejected": self.rejected,
                "largest_batch": self.largest_batch, "mean_batch_s": round(self.mean_batch_s, 4)}


class MicroBatcher:
    """``run_batch(payloads) -> results`` (same length, same order) on one worker thread.

    ``run_batch`` may return an ``Exception`` instance in place of a result: that job's future
    fails with it and the others succeed. An exception raised by ``run_batch`` fails every job of
    the batch.
    """

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 8,
                 max_wait_s: float = 0.01, queue_size: int = 64, name: str = "filo-batcher",
                 on_idle: Callable[[], Any] | None = None, idle_s: float = 1.0) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_s >= 0")
        self._run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.queue_size = int(queue_size)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._stopping = threading.Event()
        self.stats = BatcherStats()
        self._busy = threading.Event()
        # called once when the queue has stayed empty for idle_s after some work (the service
        # hands freed memory back to the system there)
        self._on_idle = on_idle
        self._idle_s = float(idle_s)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail the waiting jobs, end the worker."""
        self._stopping.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(RuntimeError("the service is shutting down"))
        try:
            self._queue.put_nowait(None)  # wake the worker
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    # ---- submitting ----------------------------------------------------------------------------
    def submit(self, payload: Any) -> Future:
        if self._stopping.is_set():
            raise RuntimeError("the service is shutting down")
        job = _Job(payload)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected += 1
            raise QueueFull(self.retry_after()) from None
        return job.future

    def retry_after(self) -> int:
        """Seconds until the waiting jobs are likely done (at least 1)."""
        batches = math.ceil((self._queue.qsize() + 1) / self.max_batch)
        return max(1, math.ceil(batches * max(self.stats.mean_batch_s, 0.0)))

    # ---- worker --------------------------------------------------------------------------------
    def _collect(self, first: _Job) -> list[_Job]:
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = (self._queue.get(timeout=remaining) if remaining > 0
                       else self._queue.get_nowait())
            except queue.Empty:
                break
            if job is None:  # stop signal
                self._stopping.set()
                break
            jobs.append(job)
        return jobs

    def _next(self, worked: bool) -> _Job | None:
        """The next job; while waiting, ``on_idle`` once after ``idle_s`` without work."""
        if not worked or self._on_idle is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=self._idle_s)
        except queue.Empty:
            try:
                self._on_idle()
            except Exception:  # noqa: BLE001 - housekeeping never stops the worker
                pass
            return self._queue.get()

    def _loop(self) -> None:
        worked = False
        while not self._stopping.is_set():
            first = self._next(worked)
            worked = True
            if first is None:
                break
            jobs = [j for j in self._collect(first) if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                results = self._run_batch([j.payload for j in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"run_batch returned {len(results)} results for "
                                       f"{len(jobs)} jobs")
            except BaseException as err:  # noqa: BLE001 - handed to the waiting requests
                for j in jobs:
                    j.future.set_exception(err)
            else:
                for j, r in zip(jobs, results, strict=True):
                    if isinstance(r, BaseException):
                        j.future.set_exception(r)
                    else:
                        j.future.set_result(r)
            took = time.perf_counter() - start
            s = self.stats
            s.batches += 1
            s.jobs += len(jobs)
            s.largest_batch = max(s.largest_batch, len(jobs))
            s.mean_batch_s = took if s.batches == 1 else 0.8 * s.mean_batch_s + 0.2 * took
            jobs = first = results = j = r = None  # no batch stays referenced while waiting
