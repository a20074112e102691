"""lens_node: language goals in, masks (and grasp regions) out.

A lifecycle node (yolo_ros style): parameters are declared in ``__init__``, read and turned into
publishers and subscriptions in configure, the model is loaded in activate and freed in
deactivate. The node is thin: it converts messages and publishes; sensor buffering
(``sensors``), scheduling (``scheduler``) and episode writing (``recording``) are ROS-free
modules beside it and inference is ``LensPipeline``. Image callbacks only keep the newest frame;
one worker thread serves one command at a time, so reception, parameters and lifecycle services
never block on the model. Every callback is short, so one executor thread receives everything
(action goals wait for their answer as coroutines, not on a thread).

Every command gets exactly one answer: a ``Segmentation`` on ``segmentation`` (topic commands)
or an action result (``segment`` goals), with ``error`` set when it could not be served. With a
``tracker_model``, ``track`` goals (and topic commands with ``track_commands``) go on to follow
their object on every frame: ``lens_ros.ros.tracking`` does that on the same worker. Commands,
goals and feedback are received over reliable QoS with a history of ``command_queue_depth``, so a
burst waits in DDS instead of being overwritten; what a policy drops is answered and counted.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import signal
import sys
import threading
import time
from concurrent.futures import wait as wait_futures
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_policy_name_from_kind, qos_profile_sensor_data
from rclpy.serialization import serialize_message
from rclpy.signals import SignalHandlerOptions

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String, UInt64

from lens_ros.action import Segment, Track
from lens_ros.images import InvalidInputError, check_command, parse_image_size
from lens_ros.model.checkpoint import ModelUnavailableError
from lens_ros.msg import Feedback, Segmentation, Tracks
from lens_ros.pipeline import Cancelled, SegmentationResult
from lens_ros.ros.conversions import (
    ImageConversionError,
    VISION_MSGS_MISSING,
    array_to_image,
    color_image_to_rgb,
    compressed_image_to_rgb,
    depth_image_to_metres,
    result_to_detections,
    result_to_segmentation,
    stamp_to_seconds,
    vision_msgs_available,
)
from lens_ros.ros.params import NodeConfig, parameter_descriptions
from lens_ros.ros.scheduler import RequestScheduler, throttled_progress
from lens_ros.ros.sensors import SensorBuffers, staleness
from lens_ros.ros.tracking import CANCELLED, STOPPED, NodeTracking, TrackGoal, load_tracker

NODE_NAME = "lens_node"
# Topic names, relative so that namespaces and remaps place them (one node per camera).
IMAGE_TOPIC, CAMERA_INFO_TOPIC, DEPTH_TOPIC = "image", "camera_info", "depth"
COMMAND_TOPIC, FEEDBACK_TOPIC, SEGMENT_ACTION = "command", "feedback", "segment"
SEGMENTATION_TOPIC, MASK_TOPIC, GRASP_POSE_TOPIC, OVERLAY_TOPIC = "segmentation", "mask", "grasp_pose", "overlay"
DETECTIONS_TOPIC = "detections"
TRACK_ACTION, TRACKS_TOPIC, STOP_TRACKING_TOPIC = "track", "tracks", "stop_tracking"
COMPRESSED_SUFFIX = "/compressed"  # image_transport's name for the compressed form of a topic
DIAGNOSTICS_TOPIC = "/diagnostics"
# Images published per answer (mask, overlay) and grasp poses: reliable, a short history.
IMAGE_RESULT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
SHUTDOWN_REASON = "the node is shutting down"
NODE_TINY_HINT = ("set the parameter model to 'tiny' (-p model:=tiny; model:=tiny with lens.launch.py) to run "
                  "the built-in tiny model (its masks are meaningless)")
# States whose lifecycle publishers still publish: topic commands are answered in them (while
# deactivating or shutting down, with that as the error); in the others they are logged and ignored.
ANSWERING_STATES = ("active", "deactivating", "shutting down")
LOGGED_TEXT_CHARS = 200  # user text (commands, notes) is logged up to this many characters


def request_qos(depth: int) -> QoSProfile:
    """Commands, feedback, the action's services and the Segmentation answers: reliable, with a
    history deep enough that a burst waits in DDS rather than overwriting itself."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def excerpt(text: str, limit: int = LOGGED_TEXT_CHARS) -> str:
    """``text`` quoted for a log line, cut to ``limit`` characters (user text is data, not log)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass
class _Request:
    """One command on its way through the node."""

    id: int
    command: str
    received: float  # time.monotonic() at arrival
    image: Image | None = None  # the action goal's own image
    progress: object = None  # callable(stage, reasoning) for action feedback
    from_action: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"  # what a cancelled request is answered with
    done: threading.Event = field(default_factory=threading.Event)
    answer: Segmentation | None = None
    frame: Image | None = None  # the colour image that answered it, for the episode record
    frame_seq: int = 0  # that frame's number (SensorBuffers), where tracking starts
    track: bool = False  # go on tracking the object found (track goals, track_commands)
    track_goal: TrackGoal | None = None  # a track goal's link to its track


class LensNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        descriptions = parameter_descriptions()
        for f in fields(NodeConfig):
            low, high = NodeConfig.RANGES.get(f.name, (None, None))
            # The bounds as text, not as a floating_point_range: rclpy would raise on an
            # out-of-range override at declaration, before configure could refuse it by name.
            self.declare_parameter(f.name, f.default, ParameterDescriptor(
                description=descriptions.get(f.name, ""), dynamic_typing=True,
                additional_constraints=f"between {low:g} and {high:g}" if low is not None else ""))
        self.config: NodeConfig | None = None
        self.pipeline = None
        self._ids = itertools.count(1)
        self._state = "unconfigured"
        self._sensors = SensorBuffers()
        self._scheduler = RequestScheduler(self._serve, lambda request, error: (self._failure(request, error), Header()),
                                           self._deliver, self.get_logger().error)
        self._counts: Counter = Counter()  # commands_received, goals_rejected, ... (see diagnostics)
        self._counts_lock = threading.Lock()
        self._last_error = ""
        self._warm_up = ""  # warm-up progress (warm_up_size), shown in /diagnostics
        self._warm_up_cancel = threading.Event()
        self._warm_up_future = None
        self._last_latency_ms: dict = {}
        self._goals_in_flight = 0
        self._entities: list = []
        self._action = self._track_action = None
        self._tracking: NodeTracking | None = None  # while active with a tracker_model
        self._segmentation_pub = self._mask_pub = self._grasp_pub = self._overlay_pub = self._detections_pub = None
        self._tracks_pub = None
        self._diagnostics_pub = None
        self._recording = None  # lens_ros.ros.recording.RecordingQueue while record_dir is set
        self._answer_ready = self.create_guard_condition(lambda: None)
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # -- parameters -------------------------------------------------------------------------------
    def _read_config(self) -> NodeConfig:
        return NodeConfig(**{f.name: self.get_parameter(f.name).value for f in fields(NodeConfig)})

    def _on_set_parameters(self, params) -> SetParametersResult:
        if self.config is None:  # not configured: values are checked at configure
            return SetParametersResult(successful=True)
        values = asdict(self.config)
        for param in params:
            if param.name not in values:
                continue
            if self._state == "active" and param.name not in NodeConfig.LIVE:
                return SetParametersResult(successful=False, reason=(
                    f"parameter {param.name!r} cannot change while active (deactivate and clean up first)"))
            values[param.name] = param.value
        try:
            updated = NodeConfig(**values)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.config = updated
        if self.pipeline is not None:  # the live pipeline options follow
            options = updated.pipeline_config()
            for name in ("cot", "max_new_tokens", "max_command_chars"):
                setattr(self.pipeline.config, name, getattr(options, name))
        return SetParametersResult(successful=True)

    # -- lifecycle --------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.config = self._read_config()
            self._create_entities(self.config)
        except Exception as exc:  # a failed configure leaves nothing behind: the next one starts clean
            self.get_logger().error(f"configure failed: {exc}")
            self._destroy_entities()
            self.config = None
            return TransitionCallbackReturn.FAILURE
        cfg = self.config
        self._state = "inactive"
        self.get_logger().info(f"configured: model {cfg.model}, device {cfg.device}, image QoS {cfg.image_qos}"
                               + (f", recording episodes to {cfg.record_dir}" if cfg.record_dir else ""))
        return TransitionCallbackReturn.SUCCESS

    def _create_entities(self, cfg: NodeConfig) -> None:
        image_qos = qos_profile_sensor_data if cfg.image_qos == "sensor_data" else IMAGE_RESULT_QOS
        requests = request_qos(cfg.command_queue_depth)
        self._segmentation_pub = self.create_lifecycle_publisher(Segmentation, SEGMENTATION_TOPIC, requests)
        self._mask_pub = self.create_lifecycle_publisher(Image, MASK_TOPIC, IMAGE_RESULT_QOS)
        self._grasp_pub = self.create_lifecycle_publisher(PoseStamped, GRASP_POSE_TOPIC, IMAGE_RESULT_QOS)
        self._overlay_pub = self.create_lifecycle_publisher(Image, OVERLAY_TOPIC, IMAGE_RESULT_QOS)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        if cfg.publish_detections:
            if not vision_msgs_available():
                raise RuntimeError(f"parameter 'publish_detections': {VISION_MSGS_MISSING}")
            from vision_msgs.msg import Detection2DArray

            self._detections_pub = self.create_lifecycle_publisher(Detection2DArray, DETECTIONS_TOPIC, requests)
        if cfg.image_transport == "compressed":  # image_transport's topic: the remapped image topic + /compressed
            frames = (CompressedImage, self.resolve_topic_name(IMAGE_TOPIC) + COMPRESSED_SUFFIX)
        else:
            frames = (Image, IMAGE_TOPIC)
        sensor_events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_sensor_qos)
        self._entities = [
            self.create_subscription(*frames, self._on_frame, image_qos, event_callbacks=sensor_events),
            self.create_subscription(Image, DEPTH_TOPIC, self._sensors.add_depth, image_qos,
                                     event_callbacks=sensor_events),
            self.create_subscription(CameraInfo, CAMERA_INFO_TOPIC, self._sensors.add_camera_info, image_qos,
                                     event_callbacks=sensor_events),
            self.create_subscription(String, COMMAND_TOPIC, self._on_command, requests),
            self.create_subscription(Feedback, FEEDBACK_TOPIC, self._on_feedback, requests),
        ]
        self._action = ActionServer(self, Segment, SEGMENT_ACTION, execute_callback=self._execute_goal,
                                    goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
                                    goal_service_qos_profile=requests,
                                    result_service_qos_profile=requests, cancel_service_qos_profile=requests)
        if cfg.tracker_model:
            self._tracks_pub = self.create_lifecycle_publisher(Tracks, TRACKS_TOPIC, IMAGE_RESULT_QOS)
            self._entities.append(self.create_subscription(UInt64, STOP_TRACKING_TOPIC, self._on_stop_tracking,
                                                           requests))
            self._track_action = ActionServer(
                self, Track, TRACK_ACTION, execute_callback=self._execute_track_goal, goal_callback=self._on_track_goal,
                cancel_callback=lambda _: CancelResponse.ACCEPT, goal_service_qos_profile=requests,
                result_service_qos_profile=requests, cancel_service_qos_profile=requests)
        if cfg.record_dir:
            from lens_ros.episodes import EpisodeRecorder
            from lens_ros.ros.recording import RecordingQueue

            try:  # an unwritable directory is not fatal: it shows in diagnostics and recording retries
                recorder = EpisodeRecorder(cfg.record_dir, max_bag_bytes=cfg.record_max_bag_mb * 1_000_000)
            except (OSError, ValueError) as exc:  # e.g. the interface definitions cannot be found
                raise RuntimeError(f"cannot record episodes: {exc}") from exc
            self._recording = RecordingQueue(recorder)
        # Last: the timer publishes diagnostics of what exists by now.
        self._entities.append(self.create_timer(cfg.diagnostics_period_s, self._publish_diagnostics))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        from lens_ros.pipeline import LensPipeline

        options = self.config.pipeline_config()
        self.get_logger().info(f"loading {options.model} on {options.device} ({options.dtype}, backend {options.backend})")
        start = time.monotonic()
        try:  # on the worker thread, where every later torch call runs too (see scheduler)
            self.pipeline = self._scheduler.run_on_worker(lambda: LensPipeline.from_config(options))
        except Exception as exc:  # an unavailable or broken model must not take the node down
            self._note_error(f"{exc.reason}; {NODE_TINY_HINT}" if isinstance(exc, ModelUnavailableError)
                             else f"model {options.model!r} failed to load: {exc}")
            self.get_logger().error(self._last_error)
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"model loaded in {time.monotonic() - start:.1f} s")
        if self.config.tracker_model and not self._start_tracking():
            self._release_model()
            return TransitionCallbackReturn.FAILURE
        self._scheduler.start()
        if self.config.warm_up_size:
            self._start_warm_up(parse_image_size(self.config.warm_up_size))
        self._state = "active"
        return super().on_activate(state)

    def _start_tracking(self) -> bool:
        """Load the tracker (on the worker) and track every new frame there between commands."""
        cfg, pipeline = self.config, self.pipeline
        try:
            tracker, not_shared = self._scheduler.run_on_worker(lambda: load_tracker(cfg, pipeline))
        except Exception as exc:  # e.g. not in the cache offline: the node stays up, inactive
            self._note_error(f"tracker_model {cfg.tracker_model!r} failed to load: {exc}")
            self.get_logger().error(self._last_error)
            return False
        from lens_ros.tracking.session import TrackingSession

        recording = self._recording
        self._tracking = NodeTracking(
            TrackingSession(pipeline, tracker, cfg.tracking_config()), not_shared, self._sensors, self._geometry_for,
            self._publish_tracks,
            (lambda track_id, tracks: recording.track(track_id, serialize_message(tracks))) if recording else None,
            self._answer_ready.trigger, lambda: self.config, self.get_logger().warning)
        self._scheduler.set_background(self._tracking.process)
        self.get_logger().info(f"tracking with {cfg.tracker_model}: " + (
            f"its own image encoder pass ({not_shared})" if not_shared else "one image encoder pass per frame with LENS"))
        return True

    def _start_warm_up(self, size: tuple[int, int]) -> None:
        """Every stage once at the camera's size, on the worker before any command (lens_ros.accel.warm_up):
        the lifecycle transition returns at once, /diagnostics and the log show the progress."""
        from lens_ros.accel.warm_up import warm_up

        def report(text: str) -> None:
            self._warm_up = text
            self.get_logger().info(text)

        def done(future) -> None:
            if future.exception() is None:
                return
            if isinstance(future.exception(), Cancelled):  # deactivated meanwhile
                self._warm_up = "cancelled"
                return
            self._warm_up = f"failed: {future.exception()}"
            self._note_error(f"warm-up failed: {future.exception()}")
            self.get_logger().error(self._last_error)

        self._warm_up_cancel.clear()
        self._warm_up = "queued"
        pipeline = self.pipeline
        self._warm_up_future = self._scheduler.run_on_worker(
            lambda: warm_up(pipeline, size, report=report, cancel=self._warm_up_cancel), wait=False)
        self._warm_up_future.add_done_callback(done)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._state = "deactivating"  # goals are rejected from now on; the scheduler refuses the rest
        self._stop_serving("the node was deactivated")
        self._state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_entities()
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._state = "shutting down"
        self._stop_serving(SHUTDOWN_REASON)
        self._scheduler.close(SHUTDOWN_REASON)
        self._destroy_entities()
        self._state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def shut_down(self, executor, grace_s: float = 2.0) -> None:
        """Answer what is in flight while the context still works (SIGINT, SIGTERM): the running
        and the pending request get an error answer, goals an aborted result their clients
        receive (the executor keeps spinning until they are out or ``grace_s`` passes)."""
        self._state = "shutting down"
        self._stop_serving(SHUTDOWN_REASON)
        deadline = time.monotonic() + grace_s
        while self._goals_in_flight and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        flush = time.monotonic() + min(0.3, grace_s)  # the result responses are executor tasks
        while time.monotonic() < flush:
            executor.spin_once(timeout_sec=0.1)
        self._destroy_entities()

    def _stop_serving(self, reason: str) -> None:
        self._scheduler.stop(reason)  # returns once the in-flight request (or tracked frame) is done
        if self._tracking is not None:  # track goals end with the reason; the tracker's memory goes
            self._scheduler.set_background(None)
            self._tracking.end_all(reason)
            self._tracking = None
        if self._warm_up_future is not None:  # a warm-up still running ends at its next token (an export in
            self._warm_up_cancel.set()  # progress cannot be interrupted: that one is waited for)
            wait_futures([self._warm_up_future])
            self._warm_up_future = None
        self._release_model()

    def _release_model(self) -> None:
        if self.pipeline is None:
            return
        device = str(self.pipeline.device)
        self.pipeline.close()  # its background SAM2 encoder thread, with any encoding in flight
        self.pipeline = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        _return_freed_memory()

    def _destroy_entities(self) -> None:
        for entity in self._entities:
            if hasattr(entity, "cancel"):  # timers
                entity.cancel()
                self.destroy_timer(entity)
            else:
                self.destroy_subscription(entity)
        self._entities = []
        for name in ("_action", "_track_action"):
            if getattr(self, name) is not None:
                getattr(self, name).destroy()
                setattr(self, name, None)
        for name in ("_segmentation_pub", "_mask_pub", "_grasp_pub", "_overlay_pub", "_detections_pub", "_tracks_pub"):
            if getattr(self, name) is not None:
                self.destroy_lifecycle_publisher(getattr(self, name))
                setattr(self, name, None)
        if self._diagnostics_pub is not None:
            self.destroy_publisher(self._diagnostics_pub)
            self._diagnostics_pub = None
        if self._recording is not None:
            self._recording.close()  # writes what is queued, then the bag's summary and metadata.yaml
            self._recording = None

    # -- inputs ---------------------------------------------------------------------------------
    def _on_incompatible_sensor_qos(self, event) -> None:
        """A camera whose QoS cannot match image_qos (typically: a best-effort driver and
        image_qos 'reliable') sends this node nothing; say so, and how to fix it."""
        self._count("image_qos_incompatible")
        self.get_logger().warning(
            f"a sensor publisher offers QoS incompatible with image_qos {self.config.image_qos!r} (policy "
            f"{qos_policy_name_from_kind(event.last_policy_kind)}): no message will arrive from it; a best-effort "
            f"camera needs image_qos 'sensor_data'")

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

    def _on_feedback(self, msg: Feedback) -> None:
        self._count("feedback_received")
        self.get_logger().info(f"feedback for request {msg.request_id}: success={msg.success} {excerpt(msg.note)}")
        if self._recording is not None:
            self._recording.feedback(msg.request_id, serialize_message(msg))

    def _on_frame(self, msg) -> None:
        self._sensors.add_frame(msg)
        self._scheduler.wake()  # a new frame to track (nothing happens without tracks)

    def _on_command(self, msg: String) -> None:
        self._count("commands_received")
        if self._state not in ANSWERING_STATES:
            self._count("commands_ignored")
            self.get_logger().warning(f"command {excerpt(msg.data, 80)} ignored: the node is {self._state}")
            return
        self._submit(_Request(id=next(self._ids), command=msg.data, received=time.monotonic(),
                              track=self.config.track_commands and self._tracking is not None))

    def _on_stop_tracking(self, msg: UInt64) -> None:
        tracking = self._tracking
        if tracking is not None:
            tracking.request_stop(msg.data)
            self._scheduler.wake()

    def _on_goal(self, goal) -> GoalResponse:
        self._count("goals_received")
        if self._state == "active":
            return GoalResponse.ACCEPT
        self._count("goals_rejected")
        return GoalResponse.REJECT

    def _on_track_goal(self, goal) -> GoalResponse:
        self._count("goals_received")
        if self._state == "active" and self._tracking is not None:
            return GoalResponse.ACCEPT
        self._count("goals_rejected")
        return GoalResponse.REJECT

    async def _execute_track_goal(self, goal_handle):
        """A track goal: answered like a segment goal, then one feedback per tracked frame until the track
        ends (cancel, stop_tracking, lost unless keep_when_lost, deactivate)."""
        goal = goal_handle.request
        track = TrackGoal(keep_when_lost=goal.keep_when_lost)
        request = _Request(id=next(self._ids), command=goal.command, received=time.monotonic(), from_action=True,
                           track=True, track_goal=track)
        self._goals_in_flight += 1
        try:
            answer = await self._answer_goal(goal_handle, request)
            if answer.error or not answer.found:
                track.ended = track.ended or answer.error or "not found"
            stop_asked = False
            while track.ended is None:
                self._send_track_feedback(goal_handle, track)
                tracking = self._tracking
                if goal_handle.is_cancel_requested and not stop_asked and tracking is not None:
                    tracking.request_stop(request.id, CANCELLED)
                    self._scheduler.wake()
                    stop_asked = True
                await _NextWakeUp()
            self._send_track_feedback(goal_handle, track)
            if goal_handle.is_cancel_requested and (track.ended == CANCELLED or request.cancel.is_set()):
                goal_handle.canceled()
            elif track.ended == STOPPED:
                goal_handle.succeed()
            else:
                goal_handle.abort()
            return Track.Result(segmentation=answer, reason=track.ended, frames_tracked=track.frames)
        finally:
            self._goals_in_flight -= 1

    async def _answer_goal(self, goal_handle, request: _Request) -> Segmentation:
        """Submit a goal's request and wait (as a coroutine) for its Segmentation; a cancel of the goal
        cancels the request."""
        self._submit(request)
        while request.answer is None and not request.done.is_set():
            if goal_handle.is_cancel_requested:
                request.cancel.set()
            await _NextWakeUp()
        return request.answer or result_to_segmentation(
            self._failure(request, "internal error: the answer could not be built"), Header(), request.id)

    @staticmethod
    def _send_track_feedback(goal_handle, track: TrackGoal) -> None:
        while track.updates:
            header, tracked = track.updates.popleft()
            goal_handle.publish_feedback(Track.Feedback(header=header, track=tracked))

    async def _execute_goal(self, goal_handle):
        """A coroutine, so that a goal waiting for its answer holds no executor thread: the executor
        resumes it at every wake-up (the worker wakes it when the answer is out)."""
        goal = goal_handle.request

        progress = throttled_progress(
            lambda stage, reasoning: goal_handle.publish_feedback(Segment.Feedback(stage=stage, reasoning=reasoning)),
            self.config.feedback_period_s)
        request = _Request(id=next(self._ids), command=goal.command, received=time.monotonic(),
                           image=goal.image if goal.image.width and goal.image.height else None,
                           progress=progress, from_action=True)
        self._goals_in_flight += 1
        try:
            answer = await self._answer_goal(goal_handle, request)
            if goal_handle.is_cancel_requested and request.cancel.is_set():
                goal_handle.canceled()
            elif answer.error:
                goal_handle.abort()
            else:
                goal_handle.succeed()
            return Segment.Result(segmentation=answer)
        finally:
            self._goals_in_flight -= 1

    # -- serving (on the scheduler's worker thread) --------------------------------------------------
    def _submit(self, request: _Request) -> None:
        pipeline = self.pipeline  # None once a deactivate has released it (the scheduler refuses then)
        try:  # bad commands (control tokens included) are answered at once and do not disturb the one running
            request.command = (pipeline.checked_command(request.command) if pipeline is not None
                               else check_command(request.command, self.config.max_command_chars))
        except InvalidInputError as exc:
            self._scheduler.answer_now(request, (self._failure(request, str(exc)), Header()))
            return
        self._scheduler.submit(request, self.config.busy_policy)

    def _serve(self, request: _Request) -> tuple[SegmentationResult, Header]:
        frame, problem = self._frame_for(request)
        if problem:
            return self._failure(request, problem), Header()
        header = frame.header
        request.frame = frame
        try:
            if isinstance(frame, CompressedImage):
                rgb = compressed_image_to_rgb(frame)
                if self._recording is not None:  # episodes hold raw images (what training reads)
                    request.frame = array_to_image(rgb, "rgb8", header)
            else:
                rgb = color_image_to_rgb(frame)
        except InvalidInputError as exc:  # conversion and size problems alike
            return self._failure(request, f"image: {exc}"), header
        cfg = self.config
        depth, intrinsics, depth_problem, grasp_note = None, None, "", ""
        if cfg.grasps:  # depth is only used for grasps
            depth, intrinsics, depth_problem, grasp_note = self._geometry_for(header, rgb.shape[:2])
        if depth_problem:
            return self._failure(request, depth_problem, rgb.shape[:2]), header
        try:
            result = self.pipeline.segment(rgb, request.command, progress=request.progress, cancel=request.cancel,
                                           grasp=cfg.grasp_config() if cfg.grasps else None, depth=depth,
                                           intrinsics=intrinsics)
        except InvalidInputError as exc:
            return self._failure(request, str(exc), rgb.shape[:2]), header
        except Cancelled:
            return self._failure(request, request.cancel_reason, rgb.shape[:2]), header
        if request.track and self._tracking is not None:
            not_started = self._tracking.start(request.id, rgb, request.frame_seq, result, goal=request.track_goal,
                                               requested=request.received)
            if not_started and request.track_goal is not None:
                request.track_goal.ended = not_started
            elif not_started and result.found:
                self.get_logger().warning(f"request {request.id}: no track started: {not_started}")
        if grasp_note:
            result.grasps = [replace(g, reason="; ".join(r for r in (grasp_note, g.reason) if r))
                             for g in result.grasps]
        if cfg.publish_overlay and not request.from_action:
            from lens_ros.visualize import draw_overlay

            self._overlay_pub.publish(array_to_image(draw_overlay(rgb, result), "rgb8", header))
        return result, header

    def _frame_for(self, request: _Request) -> tuple[Image | None, str]:
        """The colour image that answers ``request``, or a reason why there is none."""
        if request.cancel.is_set():
            return None, request.cancel_reason
        if request.image is not None:
            return request.image, ""
        cfg = self.config
        frame = self._sensors.wait_for_frame(
            lambda f: cfg.frame_policy == "newest" or f.received > request.received, cfg.image_wait_s,
            request.cancel.is_set)
        if request.cancel.is_set():
            return None, request.cancel_reason
        if frame is None:
            which = "no new image" if self._sensors.has_frame else "no image"
            return None, f"{which} received on '{self.resolve_topic_name(IMAGE_TOPIC)}' within {cfg.image_wait_s:g} s"
        problem = staleness(frame, self.get_clock().now().nanoseconds * 1e-9, cfg.max_image_age_s)
        request.frame_seq = frame.seq
        return (None, problem) if problem else (frame.msg, "")

    def _geometry_for(self, header: Header, size_hw: tuple[int, int]):
        """Depth (metres) and intrinsics matching the colour image by stamp, for 3-D grasps.

        Returns (depth, intrinsics, problem, note). A matching depth image must be usable
        (``problem`` fails the command: misaligned depth is a set-up error to fix, not to hide);
        no depth, or depth without a usable camera_info, gives 2-D grasps (``note`` says why).
        """
        from lens_ros.grasp import Intrinsics

        stamp, tolerance = stamp_to_seconds(header.stamp), self.config.sync_tolerance_s
        depth_msg = self._sensors.matching_depth(stamp, tolerance)
        if depth_msg is None:
            return None, None, "", ""
        if (depth_msg.height, depth_msg.width) != tuple(size_hw):
            return None, None, (f"depth image is {depth_msg.width}x{depth_msg.height} but the colour image is "
                                f"{size_hw[1]}x{size_hw[0]}; depth must be aligned to the colour image"), ""
        try:
            depth = depth_image_to_metres(depth_msg)
        except ImageConversionError as exc:
            return None, None, f"depth: {exc}", ""
        info = self._sensors.matching_camera_info(stamp, tolerance)
        topic = self.resolve_topic_name(CAMERA_INFO_TOPIC)
        if info is None:
            return None, None, "", f"no camera_info on '{topic}' matches the image: 3-D grasps need it"
        if info.width and info.height and (info.height, info.width) != tuple(size_hw):
            return None, None, "", (f"camera_info is for {info.width}x{info.height} images, not "
                                    f"{size_hw[1]}x{size_hw[0]}: 3-D grasps need the colour camera's intrinsics")
        try:
            intrinsics = Intrinsics.from_k(info.k)
        except ValueError as exc:  # an uncalibrated camera publishes K = 0
            return None, None, "", f"camera_info is unusable ({exc}): 3-D grasps need a calibrated camera"
        return depth, intrinsics, "", ""

    # -- outputs --------------------------------------------------------------------------------------
    def _failure(self, request: _Request, error: str, size_hw=(0, 0)) -> SegmentationResult:
        model = self.config.model if self.config is not None else ""
        return SegmentationResult.failure(request.command, error, tuple(size_hw), model=model)

    def _note_error(self, error: str) -> None:
        self._count("errors")
        self._last_error = error

    def _deliver(self, request: _Request, outcome: tuple[SegmentationResult, Header]) -> None:
        """Publish the answer to ``request`` (the scheduler calls this exactly once per request)."""
        result, header = outcome
        message = result_to_segmentation(result, header, request.id)
        self._count("answers")
        if result.error:
            self._note_error(result.error)
            self.get_logger().warning(f"request {request.id} ({excerpt(request.command, 60)}): "
                                      f"{excerpt(result.error, 500)}")
        else:
            self._last_latency_ms = {f.name: getattr(result.timings, f.name) for f in fields(result.timings)}
        self._record(request, message)  # queued before publishing: feedback on it can only come after
        request.answer = message
        if request.from_action:
            self._answer_ready.trigger()  # wake the executor: the goal's coroutine takes it from here
        if not request.from_action and self._segmentation_pub is not None:
            self._segmentation_pub.publish(message)
            if self._detections_pub is not None:
                self._detections_pub.publish(result_to_detections(result, header, request.id))
            if not result.error:
                self._mask_pub.publish(message.mask)
                best = next((g for g in message.grasps if g.has_3d), None)  # grasps come best first
                if best is not None:
                    self._grasp_pub.publish(PoseStamped(header=message.header, pose=best.pose))

    def _publish_tracks(self, tracks: Tracks, mask: Image, grasp: PoseStamped | None) -> None:
        """One tracked frame (on the worker): its Tracks, the mask of every tracked object, the best 3-D grasp."""
        if self._tracks_pub is None:
            return
        self._tracks_pub.publish(tracks)
        self._mask_pub.publish(mask)
        if grasp is not None:
            self._grasp_pub.publish(grasp)

    def _record(self, request: _Request, message: Segmentation) -> None:
        """Queue the episode of a served command (one that had a frame) for the recording thread."""
        if self._recording is None or request.frame is None:
            return
        stamp, tolerance = stamp_to_seconds(message.header.stamp), self.config.sync_tolerance_s
        depth = self._sensors.matching_depth(stamp, tolerance)
        info = self._sensors.matching_camera_info(stamp, tolerance)
        self._recording.episode(request.id, serialize_message(request.frame),
                                serialize_message(String(data=request.command)), serialize_message(message),
                                depth=serialize_message(depth) if depth else None,
                                camera_info=serialize_message(info) if info else None)

    def _publish_diagnostics(self) -> None:
        if self._diagnostics_pub is None:
            return
        cfg, counts, scheduled = self.config, self._counts, self._scheduler.stats
        level = DiagnosticStatus.OK if self._state == "active" else DiagnosticStatus.WARN
        message = self._state + (f"; last error: {self._last_error}" if self._state == "active" and self._last_error
                                 else "")
        values = {
            "model": cfg.model, "device": str(self.pipeline.device) if self.pipeline else cfg.device,
            "backend": (", ".join(f"{stage}={name}" for stage, name in self.pipeline.stages.describe().items())
                        if self.pipeline else cfg.backend),
            "state": self._state, "model_loaded": self.pipeline is not None, "busy": self._scheduler.busy,
            "warm_up": self._warm_up,
            "frames_received": self._sensors.frames_received, "frames_dropped": self._sensors.frames_dropped,
            "depth_received": self._sensors.depth_received,
            "camera_info_received": self._sensors.camera_info_received,
            **{key: counts[key] for key in ("commands_received", "commands_ignored", "goals_received",
                                            "goals_rejected", "feedback_received", "answers", "errors",
                                            "image_qos_incompatible")},
            "requests_superseded": scheduled.superseded, "requests_rejected": scheduled.rejected,
            "requests_refused": scheduled.refused, "internal_errors": scheduled.internal_errors + scheduled.delivery_errors,
            "last_error": self._last_error, "last_wait_ms": f"{scheduled.last_waited_ms:.1f}",
            **{f"last_{name}": f"{value:.1f}" for name, value in self._last_latency_ms.items()},
        }
        tracking = self._tracking
        if tracking is not None:
            values.update(tracker_model=cfg.tracker_model, tracks_active=tracking.active,
                          tracker_image_encoder=(f"its own: {tracking.not_shared}; frames that also answer a "
                                                 f"command are encoded twice" if tracking.not_shared
                                                 else "shared with LENS: one pass per frame"),
                          frames_tracked=tracking.frames_tracked, tracking_frames_skipped=tracking.frames_skipped,
                          tracking_bad_frames=tracking.bad_frames, last_track_ms=f"{tracking.last_frame_ms:.1f}",
                          **{f"last_track_{part}_ms": f"{ms:.2f}" for part, ms in tracking.last_split_ms.items()},
                          tracking_lens_calls=tracking.session.lens_calls, tracking_last_error=tracking.last_error,
                          tracking_errors=scheduled.background_errors)
        recording = self._recording
        if recording is not None:
            recorder = recording.recorder
            values.update(record_dir=cfg.record_dir, record_bag=str(recorder.bag_path or ""),
                          record_queue=recording.queued, episodes_recorded=recorder.episodes_written,
                          episodes_dropped=recorder.episodes_dropped + recording.episodes_dropped,
                          feedback_recorded=recorder.feedback_written,
                          feedback_dropped=recorder.feedback_dropped + recording.feedback_dropped,
                          track_states_recorded=recorder.track_written,
                          track_states_dropped=recorder.track_dropped + recording.track_dropped,
                          record_error=recorder.last_error or recording.last_write_error)
            if (recorder.failing or recording.write_errors) and level == DiagnosticStatus.OK:
                level = DiagnosticStatus.WARN
                message += f"; recording: {values['record_error']}"
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: lens", message=message,
                                  hardware_id=values["device"],
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(array)


class _NextWakeUp:
    """Awaiting it suspends a coroutine until the executor next wakes up (rclpy resumes pending
    tasks then: a message, a timer, a guard condition or its wait timeout)."""

    def __await__(self):
        yield


def _return_freed_memory() -> None:
    """Give the heap freed with the model back to the OS (glibc keeps it otherwise, so RSS grows
    by a model's worth over the first activate/deactivate cycles before it plateaus)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def main(args: list[str] | None = None) -> int:
    # rclpy's own SIGINT handler shuts the context down at once, before the node can answer what
    # is in flight; ours only asks the loop below to stop (a second signal stops at once).
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    node = LensNode()
    # One thread: every callback is short (the model runs on the scheduler's worker), and rclpy's
    # MultiThreadedExecutor falls behind at sensor rates (with a 90 Hz depth stream it handled a
    # fifth of the messages while its backlog of dispatched callbacks grew into the thousands).
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if node.get_parameter("autostart").value and not stop.is_set():
            node.trigger_configure()
            if node._state == "inactive" and not stop.is_set():
                node.trigger_activate()
        while not stop.is_set() and rclpy.ok():
            # Short: the signal handler runs between spins.
            executor.spin_once(timeout_sec=0.1)
        node.shut_down(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._scheduler.close(SHUTDOWN_REASON)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
