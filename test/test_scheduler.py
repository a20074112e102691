"""The node's ROS-free parts: the request scheduler, the sensor buffers and the recording queue."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from lens_ros.ros.recording import RecordingQueue
from lens_ros.ros.scheduler import RequestScheduler, throttled_progress
from lens_ros.ros.sensors import Frame, SensorBuffers, staleness


@dataclass
class Request:
    id: int
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    done: threading.Event = field(default_factory=threading.Event)


class Served:
    """A scheduler whose serve/deliver are test functions; records every answer."""

    def __init__(self, serve=None, deliver=None):
        self.answers: dict[int, list] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.serve = serve or (lambda request: f"served {request.id}")
        self._deliver_hook = deliver
        self.scheduler = RequestScheduler(lambda r: self.serve(r), lambda r, error: f"error: {error}",
                                          self.deliver, self.errors.append)

    def deliver(self, request, outcome):
        if self._deliver_hook:
            self._deliver_hook(request, outcome)
        with self.lock:
            self.answers.setdefault(request.id, []).append(outcome)

    def wait(self, *requests, timeout=10):
        for request in requests:
            assert request.done.wait(timeout), f"request {request.id} never answered"


def test_an_exception_while_serving_answers_that_request_and_the_worker_goes_on():
    def serve(request):
        if request.id == 1:
            raise RuntimeError("deque mutated during iteration")
        return f"served {request.id}"

    served = Served(serve)
    served.scheduler.start()
    first, second = Request(1), Request(2)
    served.scheduler.submit(first)
    served.wait(first)
    served.scheduler.submit(second)
    served.wait(second)
    assert served.answers == {1: ["error: internal error: deque mutated during iteration"], 2: ["served 2"]}
    assert served.scheduler.stats.internal_errors == 1
    assert "request 1 failed: RuntimeError('deque mutated during iteration')" in served.errors[0]
    served.scheduler.close("bye")


def test_an_exception_while_answering_is_logged_and_the_worker_goes_on():
    def deliver(request, outcome):
        if request.id == 1:
            raise RuntimeError("publisher's context is invalid")

    served = Served(deliver=deliver)
    served.scheduler.start()
    first, second = Request(1), Request(2)
    served.scheduler.submit(first)
    served.wait(first)  # done is set even though the delivery failed
    served.scheduler.submit(second)
    served.wait(second)
    assert served.answers == {2: ["served 2"]}
    assert served.scheduler.stats.delivery_errors == 1 and "answering request 1 failed" in served.errors[0]
    served.scheduler.close("bye")


def _blocking_serve(started: threading.Event):
    def serve(request):
        started.set()
        while not request.cancel.wait(0.01):
            pass
        return f"error: {request.cancel_reason}"

    return serve


def test_queue_latest_answers_the_superseded_request_at_once():
    started = threading.Event()
    served = Served(_blocking_serve(started))
    served.scheduler.start()
    running, pending, newest = Request(1), Request(2), Request(3)
    served.scheduler.submit(running)
    assert started.wait(5)
    served.scheduler.submit(pending)
    served.scheduler.submit(newest)
    served.wait(pending)
    assert served.answers[2] == ["error: superseded by request 3 (busy_policy 'queue_latest')"]
    served.scheduler.stop("the node was deactivated")
    served.wait(running, newest)
    assert served.answers[1] == ["error: the node was deactivated"]  # cancelled with the reason
    assert served.answers[3] == ["error: the node was deactivated"]  # pending, answered by stop
    assert served.scheduler.stats.superseded == 1


def test_reject_answers_while_busy():
    started = threading.Event()
    served = Served(_blocking_serve(started))
    served.scheduler.start()
    running, refused = Request(1), Request(2)
    served.scheduler.submit(running, "reject")
    assert started.wait(5)
    served.scheduler.submit(refused, "reject")
    served.wait(refused)
    assert served.answers[2] == ["error: busy with request 1 (busy_policy 'reject')"]
    served.scheduler.close("bye")
    assert served.scheduler.stats.rejected == 1


def test_requests_after_stop_are_answered_with_the_reason_and_the_same_worker_serves_again():
    served = Served()
    served.scheduler.start()
    served.scheduler.stop("the node was deactivated")
    late = Request(1)
    served.scheduler.submit(late)  # e.g. a goal accepted just before the deactivate
    served.wait(late)
    assert served.answers[1] == ["error: the node was deactivated"] and served.scheduler.stats.refused == 1
    threads = threading.active_count()
    served.scheduler.start()  # the same worker thread serves again: no thread per activation
    assert threading.active_count() == threads
    again = Request(2)
    served.scheduler.submit(again)
    served.wait(again)
    assert served.answers[2] == ["served 2"]
    served.scheduler.close("bye")
    assert threading.active_count() == threads - 1
    with pytest.raises(RuntimeError, match="closed"):
        served.scheduler.start()


def test_run_on_worker_runs_on_the_serving_thread_and_hands_back_results_and_errors():
    served = Served(lambda r: threading.current_thread().name)
    worker = served.scheduler.run_on_worker(lambda: threading.current_thread().name)  # before start
    assert worker == "lens_worker" != threading.current_thread().name
    with pytest.raises(ZeroDivisionError):
        served.scheduler.run_on_worker(lambda: 1 / 0)
    served.scheduler.start()
    request = Request(1)
    served.scheduler.submit(request)
    served.wait(request)
    assert served.answers[1] == ["lens_worker"]
    served.scheduler.close("bye")


def test_a_burst_from_many_threads_gets_exactly_one_answer_each():
    served = Served(lambda r: time.sleep(0.001) or f"served {r.id}")
    served.scheduler.start()
    requests = [Request(i) for i in range(400)]

    def submit(chunk):
        for request in chunk:
            served.scheduler.submit(request)

    threads = [threading.Thread(target=submit, args=(requests[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    served.wait(*requests)
    served.scheduler.close("bye")
    assert sorted(served.answers) == list(range(400)) and all(len(a) == 1 for a in served.answers.values())


def test_progress_is_sent_at_each_stage_change_and_at_most_once_a_period_within_one():
    sent, now = [], [0.0]
    progress = throttled_progress(lambda stage, text: sent.append((stage, text)), 0.1, clock=lambda: now[0])
    progress("preparing", "")
    for token in range(1, 101):  # 100 tokens over 0.5 s
        now[0] = token * 0.005
        progress("reasoning", "x" * token)
    progress("mask", "x" * 100)
    assert sent[0] == ("preparing", "") and sent[-1] == ("mask", "x" * 100)
    reasoning = [text for stage, text in sent if stage == "reasoning"]
    assert reasoning[0] == "x" and 5 <= len(reasoning) <= 6  # the first token, then every 0.1 s


# -- sensor buffers --------------------------------------------------------------------------------
def _msg(sec: float):
    stamp = SimpleNamespace(sec=int(sec), nanosec=int(round((sec - int(sec)) * 1e9)))
    return SimpleNamespace(header=SimpleNamespace(stamp=stamp))


def test_depth_lookups_are_safe_while_callbacks_add_depth():
    """The worker's depth/camera_info lookup iterates the buffer while executor callbacks append
    to it; with the thread switch interval at 1 us, an unlocked iteration fails within a second."""
    buffers, stop, errors = SensorBuffers(), threading.Event(), []

    def feed():
        i = 0
        while not stop.is_set():
            buffers.add_depth(_msg(100 + (i % 100) * 1e-3))
            buffers.add_camera_info(_msg(100 + (i % 100) * 1e-3))
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                buffers.matching_depth(100.05, 0.05)
                buffers.matching_camera_info(100.05, 0.05)
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        feeder.join()
        sys.setswitchinterval(interval)
    assert errors == []


def test_matching_picks_the_nearest_stamp_within_tolerance():
    buffers = SensorBuffers()
    for sec in (10.0, 10.1, 10.2):
        buffers.add_depth(_msg(sec))
    assert buffers.matching_depth(10.12, 0.05).header.stamp.nanosec == 100_000_000
    assert buffers.matching_depth(10.5, 0.05) is None and buffers.matching_camera_info(10.1, 1.0) is None
    assert (buffers.depth_received, buffers.camera_info_received) == (3, 0)


def test_wait_for_frame_returns_the_newest_marks_it_used_and_counts_drops():
    buffers = SensorBuffers()
    assert buffers.wait_for_frame(lambda f: True, 0.05, lambda: False) is None
    buffers.add_frame(_msg(1.0))
    buffers.add_frame(_msg(2.0))  # the first was never used: dropped
    frame = buffers.wait_for_frame(lambda f: True, 1.0, lambda: False)
    assert frame.msg.header.stamp.sec == 2 and frame.used
    assert (buffers.frames_received, buffers.frames_dropped) == (2, 1)
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    start = time.monotonic()
    assert buffers.wait_for_frame(lambda f: False, 30.0, cancel.is_set) is None
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("stamp, now, waited, expected", [
    (100.0, 100.5, 0.5, ""),
    (100.0, 103.0, 0.1, "the newest image is 3.00 s old (max_image_age_s 2)"),
    # a camera clock 30 s ahead (or a simulated clock that jumped back 900 s)
    (130.0, 100.0, 0.1, "the newest image is stamped 30.00 s in the future of this node's clock"),
    (1000.0, 100.0, 0.1, "the newest image is stamped 900.00 s in the future"),
    # a stamp that looks fresh, from a camera that went silent 3 s ago
    (101.5, 100.0, 3.0, "the newest image was received 3.00 s ago (max_image_age_s 2)"),
    (0.0, 100.0, 0.5, ""),  # unstamped: judged by arrival
    (0.0, 100.0, 2.5, "the newest image was received 2.50 s ago"),
])
def test_staleness_counts_from_the_stamp_and_from_arrival(stamp, now, waited, expected):
    frame = Frame(_msg(stamp), received=50.0)
    problem = staleness(frame, now_s=now, max_age_s=2.0, now_monotonic=50.0 + waited)
    assert problem.startswith(expected) if expected else problem == ""


# -- recording queue ----------------------------------------------------------------------------------
class SlowRecorder:
    """Stands in for EpisodeRecorder's interface with a slow disk (the real one is tested with
    real bags in test_node and test_episodes)."""

    def __init__(self, delay_s=0.002):
        self.written, self.delay_s, self.closed = [], delay_s, False

    def record(self, request_id, *parts, **kwargs):
        time.sleep(self.delay_s)
        self.written.append(("episode", request_id))

    def record_feedback(self, request_id, feedback, stamp_ns=None):
        time.sleep(self.delay_s)
        if feedback == b"boom":
            raise ValueError("cannot serialize")
        self.written.append(("feedback", request_id))

    def close(self):
        self.closed = True


def test_the_recording_queue_writes_everything_in_order_and_close_drains_it():
    recorder = SlowRecorder()
    queue = RecordingQueue(recorder)
    start = time.monotonic()
    assert queue.episode(1, b"image", b"command", b"segmentation")
    for _ in range(200):
        assert queue.feedback(1, b"feedback")
    assert time.monotonic() - start < 0.2  # enqueuing does not wait for the disk
    queue.close()
    assert recorder.closed and recorder.written == [("episode", 1)] + [("feedback", 1)] * 200


def test_the_recording_queue_is_bounded_by_bytes_and_survives_a_failing_write():
    recorder = SlowRecorder(delay_s=0.05)
    queue = RecordingQueue(recorder, max_queued_bytes=100)
    assert queue.feedback(1, b"boom")
    assert queue.episode(2, b"x" * 60, b"", b"")
    assert not queue.episode(3, b"x" * 60, b"", b"")  # would exceed 100 bytes queued
    assert queue.feedback(4, b"ok")
    queue.close()
    assert queue.episodes_dropped == 1 and queue.write_errors == 1 and "cannot serialize" in queue.last_write_error
    assert recorder.written == [("episode", 2), ("feedback", 4)]
    assert not queue.feedback(5, b"late")  # closed


def test_background_work_runs_between_requests_and_a_request_goes_first():
    """Tracking frames run on the worker when nothing is pending; a command waits at most for the
    frame in progress, and stop() waits for that frame too."""
    order, frame_started, release = [], threading.Event(), threading.Event()

    def frame():
        order.append("frame")
        frame_started.set()
        release.wait(5)

    errors = []
    scheduler = RequestScheduler(lambda request: order.append(f"request {request.id}") or "ok",
                                 lambda request, error: error, lambda request, outcome: None, errors.append)
    scheduler.start()
    scheduler.set_background(frame)
    scheduler.wake()
    assert frame_started.wait(5)
    request = Request(1)
    scheduler.submit(request)
    scheduler.wake()  # a frame arrived meanwhile: the request still goes first
    time.sleep(0.1)
    assert order == ["frame"] and not request.done.is_set()  # the frame in progress finishes first
    release.set()
    assert request.done.wait(5)
    deadline = time.monotonic() + 5
    while len(order) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["frame", "request 1", "frame"]
    assert scheduler.stats.last_waited_ms >= 100
    scheduler.set_background(lambda: 1 / 0)
    scheduler.wake()
    deadline = time.monotonic() + 5
    while scheduler.stats.background_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.stats.background_errors == 1 and "ZeroDivisionError" in errors[0]  # logged; the worker goes on
    second = Request(2)
    scheduler.submit(second)
    assert second.done.wait(5) and order[-1] == "request 2"
    scheduler.close("done")
