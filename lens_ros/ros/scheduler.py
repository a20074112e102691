"""One worker thread that serves the node's requests one at a time (no rclpy here).

lens_node promises that every command and goal gets exactly one answer. This module keeps that
promise whatever happens:

- ``submit`` answers at once what it will not run: a request refused by ``busy_policy``
  ('reject'), the pending request another one supersedes ('queue_latest'), and anything that
  arrives while the scheduler is stopped or stopping (a goal accepted just before a deactivate);
- the worker answers what it runs. An exception while serving becomes an error answer
  ("internal error: ..."), an exception while answering is logged, and the loop goes on: one
  request that hits a bug must not leave the robot's perception deaf to every later command;
- ``stop(reason)`` cancels the running request with ``reason``, answers the pending one with
  it and returns once the worker is idle; ``start`` serves again. The worker thread itself lives
  until ``close``, and ``run_on_worker`` runs other model work (loading) on it: torch gives every
  thread that runs its operators a pool of OpenMP threads of its own, so model work spread over
  new or different threads made the process's thread count creep up with each lifecycle cycle;
- ``set_background(work)`` gives the worker something to do between requests (tracking a new
  camera frame): ``wake()`` says there is some, and the worker runs ``work()`` whenever no request
  or call is pending, so a command waits at most for the one frame in progress
  (``stats.last_waited_ms``: how long the last served request waited for the worker).

Requests are duck-typed: ``id``, ``cancel`` (threading.Event), ``cancel_reason`` (str) and
``done`` (threading.Event, set once the request's answer has been delivered or has failed).
"""

from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

QUEUE_LATEST, REJECT = "queue_latest", "reject"
BUSY_POLICIES = (QUEUE_LATEST, REJECT)


def throttled_progress(send: Callable[[str, str], None], period_s: float,
                       clock: Callable[[], float] = time.monotonic) -> Callable[[str, str], None]:
    """``send(stage, reasoning)`` at each stage change, and within a stage at most once every
    ``period_s``: the pipeline reports every generated token (hundreds per command), which an
    action client such as ``ros2 action send_goal --feedback`` would print in full each time."""
    last = {"stage": None, "time": float("-inf")}

    def progress(stage: str, reasoning: str) -> None:
        now = clock()
        if stage != last["stage"] or now - last["time"] >= period_s:
            last["stage"], last["time"] = stage, now
            send(stage, reasoning)

    return progress


@dataclass
class SchedulerStats:
    """What happened to the requests submitted so far (reported in /diagnostics)."""

    superseded: int = 0  # answered with an error: a newer request took their place
    rejected: int = 0  # answered with an error: busy_policy 'reject'
    refused: int = 0  # answered with an error: the scheduler was stopped (node not active)
    internal_errors: int = 0  # serving raised; answered with "internal error: ..."
    delivery_errors: int = 0  # answering raised (logged; the request is still marked done)
    background_errors: int = 0  # the background work raised (logged; it runs again at the next wake-up)
    last_waited_ms: float = 0.0  # how long the last served request waited for the worker


class RequestScheduler:
    """Serves requests on one worker thread, the newest pending one first.

    ``serve(request) -> outcome`` does the work (it should watch ``request.cancel``);
    ``failure(request, error) -> outcome`` builds an error answer; ``deliver(request, outcome)``
    publishes it; ``log_error(text)`` reports what went wrong inside.
    """

    def __init__(self, serve: Callable, failure: Callable, deliver: Callable, log_error: Callable[[str], None],
                 name: str = "lens_worker") -> None:
        self._serve, self._failure, self._deliver, self._log_error = serve, failure, deliver, log_error
        self._name = name
        self._cond = threading.Condition()
        self._pending = None
        self._running = None
        self._in_worker = None  # the request being served or answered (stop waits for it)
        self._calls: list = []  # (function, Future) for run_on_worker
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop_reason: str | None = "the node is not active"  # None while serving
        self._background: Callable[[], None] | None = None
        self._background_wanted = False
        self._submitted: dict[int, float] = {}  # id(request) -> time.monotonic() at submit
        self.stats = SchedulerStats()

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        with self._cond:
            self._ensure_thread()
            self._stop_reason = None
            self._cond.notify_all()

    def run_on_worker(self, function, wait: bool = True):
        """``function()`` run on the worker thread (between requests, before any pending one); its
        result, or its exception; with ``wait=False`` a Future of it, at once."""
        future: Future = Future()
        with self._cond:
            self._ensure_thread()
            self._calls.append((function, future))
            self._cond.notify_all()
        return future.result() if wait else future

    def set_background(self, work: Callable[[], None] | None) -> None:
        """Run ``work()`` on the worker after each ``wake()`` while no request or call is pending (None: none)."""
        with self._cond:
            self._background, self._background_wanted = work, False

    def wake(self) -> None:
        """There is background work (e.g. a new frame to track); cheap, from any thread."""
        with self._cond:
            if self._background is not None and not self._background_wanted:
                self._background_wanted = True
                self._cond.notify_all()

    def _ensure_thread(self) -> None:  # called with the lock held
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def submit(self, request, busy_policy: str = QUEUE_LATEST) -> None:
        refusal = superseded = None
        with self._cond:
            if self._stop_reason is not None:
                self.stats.refused += 1
                refusal = self._stop_reason
            elif busy_policy == REJECT and (self._running or self._pending) is not None:
                self.stats.rejected += 1
                refusal = f"busy with request {(self._running or self._pending).id} (busy_policy 'reject')"
            else:
                superseded, self._pending = self._pending, request
                self._submitted[id(request)] = time.monotonic()
                if superseded is not None:
                    self._submitted.pop(id(superseded), None)
                    self.stats.superseded += 1
                self._cond.notify_all()
        if refusal is not None:
            self._answer(request, self._failure(request, refusal))
        if superseded is not None:
            self._answer(superseded, self._failure(
                superseded, f"superseded by request {request.id} (busy_policy 'queue_latest')"))

    def stop(self, reason: str) -> None:
        """Stop serving: the running request is cancelled with ``reason`` (its answer says so),
        the pending one is answered with ``reason``, later submissions too. Returns once the
        worker has delivered its last answer."""
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            pending, self._pending = self._pending, None
            if pending is not None:
                self._submitted.pop(id(pending), None)
            if self._running is not None:
                self._running.cancel_reason = reason
                self._running.cancel.set()
            self._cond.notify_all()
        if pending is not None:
            self._answer(pending, self._failure(pending, reason))
        with self._cond:
            while self._in_worker is not None and threading.current_thread() is not self._thread:
                self._cond.wait()

    def close(self, reason: str) -> None:
        """``stop(reason)`` and end the worker thread for good."""
        self.stop(reason)
        with self._cond:
            self._closed = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def answer_now(self, request, outcome) -> None:
        """Deliver ``outcome`` for a request that is not scheduled (refused before it was
        submitted), with the same guarantees: a failing delivery is logged, ``done`` is set."""
        self._answer(request, outcome)

    def _run(self) -> None:
        while True:
            with self._cond:
                while (self._pending is None or self._stop_reason is not None) and not self._calls \
                        and not self._closed and not self._background_due():
                    self._cond.wait()  # stop() answers a pending request itself
                background = None
                if self._calls:
                    call = self._calls.pop(0)
                elif self._closed:
                    return
                elif self._pending is not None and self._stop_reason is None:
                    call, (request, self._pending) = None, (self._pending, None)
                    self._running = self._in_worker = request
                    submitted = self._submitted.pop(id(request), None)
                    if submitted is not None:
                        self.stats.last_waited_ms = (time.monotonic() - submitted) * 1000
                else:  # background work: stop() waits for it like for a request
                    call, background, self._background_wanted = None, self._background, False
                    self._in_worker = background
            if call is not None:
                self._call(*call)
            elif background is not None:
                self._run_background(background)
            else:
                self._serve_one(request)

    def _background_due(self) -> bool:  # called with the lock held
        return self._background is not None and self._background_wanted and self._stop_reason is None

    def _run_background(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a failing frame must not end the worker
            self.stats.background_errors += 1
            self._log_error(f"background work failed: {exc!r}\n{traceback.format_exc()}")
        with self._cond:
            self._in_worker = None
            self._cond.notify_all()

    @staticmethod
    def _call(function, future: Future) -> None:
        try:
            future.set_result(function())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _serve_one(self, request) -> None:
        try:
            outcome = self._serve(request)
        except Exception as exc:  # noqa: BLE001 - whatever it is, this request gets an answer
            self.stats.internal_errors += 1
            self._log_error(f"request {request.id} failed: {exc!r}\n{traceback.format_exc()}")
            outcome = self._failure(request, f"internal error: {exc}")
        with self._cond:
            self._running = None
        self._answer(request, outcome)
        with self._cond:
            self._in_worker = None
            self._cond.notify_all()

    def _answer(self, request, outcome) -> None:
        try:
            self._deliver(request, outcome)
        except Exception as exc:  # noqa: BLE001 - a failed publish must not end the worker
            self.stats.delivery_errors += 1
            self._log_error(f"answering request {request.id} failed: {exc!r}\n{traceback.format_exc()}")
        finally:
            request.done.set()
