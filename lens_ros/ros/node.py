"""lens_node: language goals in, masks (and grasp regions) out.

A lifecycle node (yolo_ros style): parameters are declared in ``__init__``, read and turned into
publishers and subscriptions in configure, the model is loaded in activate and freed in
deactivate. The node is thin: it converts messages, schedules work and publishes; inference is
``LensPipeline``. Image callbacks only keep the newest frame; one worker thread serves one
command at a time, so reception, parameters and lifecycle services never block on the model.
Every command gets exactly one answer: a ``Segmentation`` on ``segmentation`` (topic commands)
or an action result (``segment`` goals), with ``error`` set when it could not be served.
"""

from __future__ import annotations

import collections
import gc
import itertools
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String

from lens_ros.action import Segment
from lens_ros.images import InvalidInputError, check_command
from lens_ros.msg import Feedback, Segmentation
from lens_ros.pipeline import Cancelled, SegmentationResult
from lens_ros.ros.conversions import (
    ImageConversionError,
    array_to_image,
    color_image_to_rgb,
    depth_image_to_metres,
    result_to_segmentation,
    stamp_to_seconds,
)
from lens_ros.ros.params import NodeConfig, parameter_descriptions

NODE_NAME = "lens_node"
# Topic names, relative so that namespaces and remaps place them (one node per camera).
IMAGE_TOPIC, CAMERA_INFO_TOPIC, DEPTH_TOPIC = "image", "camera_info", "depth"
COMMAND_TOPIC, FEEDBACK_TOPIC, SEGMENT_ACTION = "command", "feedback", "segment"
SEGMENTATION_TOPIC, MASK_TOPIC, GRASP_POSE_TOPIC, OVERLAY_TOPIC = "segmentation", "mask", "grasp_pose", "overlay"
DIAGNOSTICS_TOPIC = "/diagnostics"
SYNC_BUFFER = 30  # depth / camera_info messages kept for matching by stamp
RESULT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class _Request:
    """One command on its way through the node."""

    id: int
    command: str
    received: float  # time.monotonic() at arrival
    image: Image | None = None  # the action goal's own image
    progress: object = None  # callable(stage, reasoning) for action feedback
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    answer: Segmentation | None = None
    from_action: bool = False
    frame: Image | None = None  # the colour image that answered it, for the episode record


@dataclass
class _Frame:
    msg: Image
    received: float  # time.monotonic()
    used: bool = False


@dataclass
class _Stats:
    frames_received: int = 0
    frames_dropped: int = 0  # overwritten before any command used them
    commands: int = 0
    errors: int = 0
    last_error: str = ""
    last_latency_ms: dict = field(default_factory=dict)


class LensNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        descriptions = parameter_descriptions()
        for f in fields(NodeConfig):
            self.declare_parameter(f.name, f.default, ParameterDescriptor(
                description=descriptions.get(f.name, ""), dynamic_typing=True))
        self.config: NodeConfig | None = None
        self.pipeline = None
        self._ids = itertools.count(1)
        self._state = "unconfigured"
        self._stats = _Stats()
        self._frames = threading.Condition()
        self._newest: _Frame | None = None
        self._depth: collections.deque = collections.deque(maxlen=SYNC_BUFFER)
        self._camera_info: collections.deque = collections.deque(maxlen=SYNC_BUFFER)
        self._work = threading.Condition()
        self._pending: _Request | None = None
        self._running: _Request | None = None
        self._worker: threading.Thread | None = None
        self._stop = False
        self._entities: list = []
        self._action = None
        self._segmentation_pub = self._mask_pub = self._grasp_pub = self._overlay_pub = None
        self._diagnostics_pub = None
        self._recorder = None  # lens_ros.episodes.EpisodeRecorder while record_dir is set
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
        except ValueError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        cfg = self.config
        image_qos = qos_profile_sensor_data if cfg.image_qos == "sensor_data" else RESULT_QOS
        self._segmentation_pub = self.create_lifecycle_publisher(Segmentation, SEGMENTATION_TOPIC, RESULT_QOS)
        self._mask_pub = self.create_lifecycle_publisher(Image, MASK_TOPIC, RESULT_QOS)
        self._grasp_pub = self.create_lifecycle_publisher(PoseStamped, GRASP_POSE_TOPIC, RESULT_QOS)
        self._overlay_pub = self.create_lifecycle_publisher(Image, OVERLAY_TOPIC, RESULT_QOS)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        sensors = MutuallyExclusiveCallbackGroup()
        self._entities = [
            self.create_subscription(Image, IMAGE_TOPIC, self._on_image, image_qos, callback_group=sensors),
            self.create_subscription(Image, DEPTH_TOPIC, self._on_depth, image_qos, callback_group=sensors),
            self.create_subscription(CameraInfo, CAMERA_INFO_TOPIC, self._on_camera_info, image_qos,
                                     callback_group=sensors),
            self.create_subscription(String, COMMAND_TOPIC, self._on_command, RESULT_QOS),
            self.create_subscription(Feedback, FEEDBACK_TOPIC, self._on_feedback, RESULT_QOS),
            self.create_timer(cfg.diagnostics_period_s, self._publish_diagnostics),
        ]
        self._action = ActionServer(self, Segment, SEGMENT_ACTION, execute_callback=self._execute_goal,
                                    goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
                                    callback_group=ReentrantCallbackGroup())
        if cfg.record_dir:
            from lens_ros.episodes import EpisodeRecorder

            try:  # an unwritable directory is not fatal: it shows in diagnostics and recording retries
                self._recorder = EpisodeRecorder(cfg.record_dir, max_bag_bytes=cfg.record_max_bag_mb * 1_000_000)
            except (OSError, ValueError) as exc:  # e.g. the interface definitions cannot be found
                self.get_logger().error(f"configure failed: cannot record episodes: {exc}")
                self._destroy_entities()
                return TransitionCallbackReturn.FAILURE
        self._state = "inactive"
        self.get_logger().info(f"configured: model {cfg.model}, device {cfg.device}, image QoS {cfg.image_qos}"
                               + (f", recording episodes to {cfg.record_dir}" if cfg.record_dir else ""))
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        from lens_ros.pipeline import LensPipeline

        options = self.config.pipeline_config()
        self.get_logger().info(f"loading {options.model} on {options.device} ({options.dtype})")
        start = time.monotonic()
        try:
            self.pipeline = LensPipeline.from_config(options)
        except Exception as exc:  # an unavailable or broken model must not take the node down
            self._note_error(f"model {options.model!r} failed to load: {exc}")
            self.get_logger().error(self._stats.last_error)
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"model loaded in {time.monotonic() - start:.1f} s")
        self._stop = False
        self._worker = threading.Thread(target=self._serve_forever, name="lens_worker", daemon=True)
        self._worker.start()
        self._state = "active"
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker("the node was deactivated")
        self._release_model()
        self._state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_entities()
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker("the node is shutting down")
        self._release_model()
        self._destroy_entities()
        self._state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def _release_model(self) -> None:
        if self.pipeline is None:
            return
        device = str(self.pipeline.device)
        self.pipeline = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _destroy_entities(self) -> None:
        for entity in self._entities:
            if hasattr(entity, "cancel"):  # timers
                entity.cancel()
                self.destroy_timer(entity)
            else:
                self.destroy_subscription(entity)
        self._entities = []
        if getattr(self, "_action", None) is not None:
            self._action.destroy()
            self._action = None
        for name in ("_segmentation_pub", "_mask_pub", "_grasp_pub", "_overlay_pub"):
            if getattr(self, name, None) is not None:
                self.destroy_lifecycle_publisher(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "_diagnostics_pub", None) is not None:
            self.destroy_publisher(self._diagnostics_pub)
            self._diagnostics_pub = None
        self._close_recorder()

    def _close_recorder(self) -> None:
        if getattr(self, "_recorder", None) is not None:
            self._recorder.close()  # the bag's summary and metadata.yaml (episodes are durable anyway)
            self._recorder = None

    # -- inputs ---------------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        with self._frames:
            if self._newest is not None and not self._newest.used:
                self._stats.frames_dropped += 1
            self._newest = _Frame(msg, time.monotonic())
            self._stats.frames_received += 1
            self._frames.notify_all()

    def _on_depth(self, msg: Image) -> None:
        self._depth.append(msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info.append(msg)

    def _on_feedback(self, msg: Feedback) -> None:
        self.get_logger().info(f"feedback for request {msg.request_id}: success={msg.success} {msg.note!r}")
        if self._recorder is not None:
            self._recorder.record_feedback(msg.request_id, serialize_message(msg))

    def _on_command(self, msg: String) -> None:
        if self._state != "active":
            self.get_logger().warning(f"command {msg.data[:80]!r} ignored: the node is {self._state}")
            return
        request = _Request(id=next(self._ids), command=msg.data, received=time.monotonic())
        self._submit(request)

    def _on_goal(self, goal) -> GoalResponse:
        return GoalResponse.ACCEPT if self._state == "active" else GoalResponse.REJECT

    def _execute_goal(self, goal_handle):
        goal = goal_handle.request

        def progress(stage: str, reasoning: str) -> None:
            goal_handle.publish_feedback(Segment.Feedback(stage=stage, reasoning=reasoning))

        request = _Request(id=next(self._ids), command=goal.command, received=time.monotonic(),
                           image=goal.image if goal.image.width and goal.image.height else None,
                           progress=progress, from_action=True)
        self._submit(request)
        while not request.done.wait(0.05):
            if goal_handle.is_cancel_requested:
                request.cancel.set()
        result = Segment.Result(segmentation=request.answer)
        if goal_handle.is_cancel_requested and request.cancel.is_set():
            goal_handle.canceled()
        elif request.answer.error:
            goal_handle.abort()
        else:
            goal_handle.succeed()
        return result

    # -- scheduling ---------------------------------------------------------------------------------
    def _submit(self, request: _Request) -> None:
        try:  # bad commands are answered at once and do not disturb the one running
            request.command = check_command(request.command, self.config.max_command_chars)
        except InvalidInputError as exc:
            self._answer(request, self._failure(request, str(exc)), Header())
            return
        superseded = None
        with self._work:
            busy = self._running is not None or self._pending is not None
            if busy and self.config.busy_policy == "reject":
                running = self._running or self._pending
                reject = f"busy with request {running.id} (busy_policy 'reject')"
            else:
                reject = None
                superseded, self._pending = self._pending, request
                self._work.notify_all()
        if reject:
            self._answer(request, self._failure(request, reject), Header())
        if superseded is not None:
            self._answer(superseded, self._failure(superseded, f"superseded by request {request.id} "
                                                               "(busy_policy 'queue_latest')"), Header())

    def _stop_worker(self, reason: str) -> None:
        with self._work:
            self._stop = True
            pending, self._pending = self._pending, None
            if self._running is not None:
                self._running.cancel.set()
            self._work.notify_all()
        with self._frames:
            self._frames.notify_all()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if pending is not None:
            self._answer(pending, self._failure(pending, reason), Header())

    def _serve_forever(self) -> None:
        while True:
            with self._work:
                while self._pending is None and not self._stop:
                    self._work.wait()
                if self._stop:
                    return
                request, self._pending = self._pending, None
                self._running = request
            try:
                result, header = self._serve(request)
            except Exception as exc:  # keep serving whatever happens in one request
                self.get_logger().error(f"request {request.id} failed: {exc!r}")
                result, header = self._failure(request, f"internal error: {exc}"), Header()
            with self._work:
                self._running = None
            self._answer(request, result, header)

    def _serve(self, request: _Request) -> tuple[SegmentationResult, Header]:
        if request.cancel.is_set():
            return self._failure(request, "cancelled"), Header()
        frame, problem = self._frame_for(request)
        if problem:
            return self._failure(request, problem), Header()
        header = frame.header
        request.frame = frame
        try:
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
            return self._failure(request, "cancelled", rgb.shape[:2]), header
        if grasp_note:
            result.grasps = [replace(g, reason="; ".join(r for r in (grasp_note, g.reason) if r))
                             for g in result.grasps]
        if self.config.publish_overlay and not request.from_action:
            from lens_ros.visualize import draw_overlay

            self._overlay_pub.publish(array_to_image(draw_overlay(rgb, result), "rgb8", header))
        return result, header

    def _frame_for(self, request: _Request) -> tuple[Image | None, str]:
        """The colour image that answers ``request``, or a reason why there is none."""
        if request.image is not None:
            return request.image, ""
        cfg = self.config
        deadline = time.monotonic() + cfg.image_wait_s
        with self._frames:
            def usable():
                if self._newest is None:
                    return False
                return cfg.frame_policy == "newest" or self._newest.received > request.received

            while not usable() and not self._stop and not request.cancel.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._frames.wait(min(left, 0.05))  # short slices: a cancel sets no condition
            if request.cancel.is_set():
                return None, "cancelled"
            if not usable():
                which = "no image" if self._newest is None else "no new image"
                return None, (f"{which} received on '{self.resolve_topic_name(IMAGE_TOPIC)}' within "
                              f"{cfg.image_wait_s:g} s")
            frame = self._newest
            frame.used = True
        age = self._age_s(frame)
        if age > cfg.max_image_age_s:
            return None, f"the newest image is {age:.2f} s old (max_image_age_s {cfg.max_image_age_s:g})"
        return frame.msg, ""

    def _age_s(self, frame: _Frame) -> float:
        stamp = stamp_to_seconds(frame.msg.header.stamp)
        if stamp <= 0:  # unstamped images: judge by arrival
            return time.monotonic() - frame.received
        return self.get_clock().now().nanoseconds * 1e-9 - stamp

    def _geometry_for(self, header: Header, size_hw: tuple[int, int]):
        """Depth (metres) and intrinsics matching the colour image by stamp, for 3-D grasps.

        Returns (depth, intrinsics, problem, note). A matching depth image must be usable
        (``problem`` fails the command: misaligned depth is a set-up error to fix, not to hide);
        no depth, or depth without a usable camera_info, gives 2-D grasps (``note`` says why).
        """
        from lens_ros.grasp import Intrinsics

        depth_msg = self._matching(self._depth, header)
        if depth_msg is None:
            return None, None, "", ""
        if (depth_msg.height, depth_msg.width) != tuple(size_hw):
            return None, None, (f"depth image is {depth_msg.width}x{depth_msg.height} but the colour image is "
                                f"{size_hw[1]}x{size_hw[0]}; depth must be aligned to the colour image"), ""
        try:
            depth = depth_image_to_metres(depth_msg)
        except ImageConversionError as exc:
            return None, None, f"depth: {exc}", ""
        info = self._matching(self._camera_info, header)
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

    def _matching(self, buffer: collections.deque, header: Header):
        target = stamp_to_seconds(header.stamp)
        best = min(buffer, key=lambda m: abs(stamp_to_seconds(m.header.stamp) - target), default=None)
        if best is None or abs(stamp_to_seconds(best.header.stamp) - target) > self.config.sync_tolerance_s:
            return None
        return best

    # -- outputs --------------------------------------------------------------------------------------
    def _failure(self, request: _Request, error: str, size_hw=(0, 0)) -> SegmentationResult:
        return SegmentationResult.failure(request.command, error, tuple(size_hw), model=self.config.model)

    def _note_error(self, error: str) -> None:
        self._stats.errors += 1
        self._stats.last_error = error

    def _answer(self, request: _Request, result: SegmentationResult, header: Header) -> None:
        message = result_to_segmentation(result, header, request.id)
        self._stats.commands += 1
        if result.error:
            self._note_error(result.error)
            self.get_logger().warning(f"request {request.id} ({request.command[:60]!r}): {result.error}")
        else:
            self._stats.last_latency_ms = {f.name: getattr(result.timings, f.name) for f in fields(result.timings)}
        request.answer = message
        if not request.from_action and self._segmentation_pub is not None:
            self._segmentation_pub.publish(message)
            if not result.error:
                self._mask_pub.publish(message.mask)
                best = next((g for g in message.grasps if g.has_3d), None)  # grasps come best first
                if best is not None:
                    self._grasp_pub.publish(PoseStamped(header=message.header, pose=best.pose))
        request.done.set()
        self._record(request, message)

    def _record(self, request: _Request, message: Segmentation) -> None:
        """The episode of a served command (one that had a frame), after the answer is out: the
        fsync per episode must not delay it. Failures are kept in the recorder for diagnostics."""
        if self._recorder is None or request.frame is None:
            return
        header = message.header
        depth, info = self._matching(self._depth, header), self._matching(self._camera_info, header)
        command = String(data=request.command)
        self._recorder.record(request.id, serialize_message(request.frame), serialize_message(command),
                              serialize_message(message), depth=serialize_message(depth) if depth else None,
                              camera_info=serialize_message(info) if info else None)

    def _publish_diagnostics(self) -> None:
        if self._diagnostics_pub is None:
            return
        stats, cfg = self._stats, self.config
        level = DiagnosticStatus.OK
        message = f"{self._state}"
        if self._state != "active":
            level = DiagnosticStatus.WARN
        elif stats.last_error:
            message += f"; last error: {stats.last_error}"
        values = {
            "model": cfg.model, "device": str(self.pipeline.device) if self.pipeline else cfg.device,
            "state": self._state, "frames_received": stats.frames_received, "frames_dropped": stats.frames_dropped,
            "commands": stats.commands, "errors": stats.errors, "last_error": stats.last_error,
            "busy": self._running is not None, "model_loaded": self.pipeline is not None,
            **{f"last_{name}": f"{value:.1f}" for name, value in stats.last_latency_ms.items()},
        }
        recorder = self._recorder
        if recorder is not None:
            values.update(record_dir=cfg.record_dir, record_bag=str(recorder.bag_path or ""),
                          episodes_recorded=recorder.episodes_written, episodes_dropped=recorder.episodes_dropped,
                          feedback_recorded=recorder.feedback_written, record_error=recorder.last_error)
            if recorder.failing and level == DiagnosticStatus.OK:
                level = DiagnosticStatus.WARN
                message += f"; recording: {recorder.last_error}"
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: lens", message=message,
                                  hardware_id=values["device"],
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(array)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = LensNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        if node.get_parameter("autostart").value:
            node.trigger_configure()
            if node._state == "inactive":
                node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._stop_worker("the node is shutting down")
        node._release_model()
        node._close_recorder()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
