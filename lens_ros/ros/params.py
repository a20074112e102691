"""The node's parameters: one dataclass, mapped one to one onto ROS parameters and config/lens.yaml.

Pure Python (no rclpy) so that defaults and validation are tested without ROS. Every field's
docstring becomes the ROS parameter description.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from dataclasses import dataclass, fields

from lens_ros.accel import BACKENDS, parse_stage_backends
from lens_ros.accel.decode import COMPILE_BACKENDS
from lens_ros.grasp import APPROACHES, GraspConfig
from lens_ros.images import DEFAULT_MAX_COMMAND_CHARS, parse_image_size
from lens_ros.model.checkpoint import DEFAULT_MODEL, DTYPES
from lens_ros.ros.scheduler import BUSY_POLICIES
from lens_ros.tracking.models import PROPAGATION_DECODERS
from lens_ros.tracking.session import TrackingConfig

IMAGE_QOS = ("sensor_data", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")
FRAME_POLICIES = ("newest", "next")


@dataclass
class NodeConfig:
    """Parameters of lens_node."""

    model: str = DEFAULT_MODEL
    """Model: a Hugging Face id (OuyBin/LENS, ...), a checkpoint directory, or 'tiny' (random, for tests)."""
    allow_download: bool = False
    """Fetch the model from the Hugging Face hub when it is not in the local cache (off: never touch the network)."""
    device: str = "auto"
    """Torch device: 'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """'auto' (bfloat16 on cuda, float32 on cpu), 'float32', 'bfloat16' or 'float16'."""
    backend: str = "torch"
    """What runs the stages (SAM2's image encoder and mask decoder, the vision tower, the mask pass): 'torch',
    'onnxruntime' (ONNX graphs, exported on the first frame of each image size or beforehand with lens-export) or
    'tensorrt' (engines built from those graphs, CUDA only); see the README's Acceleration section."""
    stage_backends: str = ""
    """Per-stage overrides of backend: '<stage>=<backend>,...' with the stages sam_image_encoder, vision_tower,
    mask_pass, sam_mask_decoder (e.g. 'mask_pass=torch'); '' = every stage on backend."""
    export_dir: str = ""
    """Where the onnxruntime and tensorrt backends keep graphs and engines ('' = ~/.cache/lens_ros/onnx; lens-export
    --out)."""
    compile: bool = False
    """Generate with the compiled decode loop (static KV cache + torch.compile; CUDA graphs on a GPU): the same
    tokens as eager decoding, less overhead per token; the first command compiles it (tens of seconds)."""
    compile_backend: str = "auto"
    """torch.compile backend of the decode loop: 'auto' (torch_tensorrt on a GPU where installed, else 'inductor'),
    'inductor', 'tensorrt' or 'eager'."""
    warm_up_size: str = ""
    """The camera's WIDTHxHEIGHT (e.g. '640x480'): right after activation every stage runs once at that size (graphs
    exported, TensorRT engines built, the decode loop compiled), with progress in /diagnostics ('warm_up') and the
    log; commands wait for it. '' = the first frame of each size pays for that instead."""
    overlap_sam_encoder: bool = True
    """Run SAM2's image encoder beside the vision tower and generation (its own CUDA stream) instead of before them."""
    cot: bool = False
    """Chain-of-thought prompt (for OuyBin/LENS_ReasonSeg_CoT)."""
    max_new_tokens: int = 256
    """Upper bound on generated reasoning tokens."""
    max_command_chars: int = DEFAULT_MAX_COMMAND_CHARS
    """Longer commands are answered with an error."""
    command_queue_depth: int = 1000
    """History depth of the reliable command and feedback subscriptions, the action's goal, cancel and result
    services and the segmentation answers: a burst up to this size waits in DDS instead of being lost."""
    image_transport: str = "raw"
    """How the colour image arrives: 'raw' (sensor_msgs/Image on 'image') or 'compressed' (sensor_msgs/CompressedImage
    on 'image/compressed', JPEG/PNG/TIFF as image_transport's compressed plugin publishes it)."""
    image_qos: str = "sensor_data"
    """QoS of the image, depth and camera_info subscriptions: 'sensor_data' (best effort) or 'reliable'."""
    max_image_age_s: float = 1.0
    """A command is refused when the newest frame is older than this (seconds, by header stamp and since its
    arrival); a frame stamped more than this ahead of the node's clock is refused too."""
    image_wait_s: float = 2.0
    """How long a command waits for a frame when none (or, with frame_policy 'next', no new one) has arrived."""
    sync_tolerance_s: float = 0.05
    """Depth and camera_info match the colour image when their stamps differ by at most this (seconds)."""
    frame_policy: str = "newest"
    """Which frame answers a command: 'newest' (the newest at command time) or 'next' (the first after it)."""
    busy_policy: str = "queue_latest"
    """A command arriving while one runs: 'queue_latest' (keep the newest pending, answer older ones with an
    error) or 'reject' (answer it at once with an error)."""
    grasps: bool = True
    """Compute grasp regions of found masks (3-D with matching depth and camera_info) and publish the best 3-D one
    on 'grasp_pose'."""
    grasp_approach: str = GraspConfig.approach
    """Grasp approach direction: 'top_down' (against the support plane's normal) or 'camera' (along the camera ray)."""
    grasp_max_opening_m: float = GraspConfig.max_opening_m
    """Widest opening of the gripper (metres); wider parts of an object get no 3-D grasp."""
    grasp_finger_length_m: float = GraspConfig.finger_length_m
    """How far the jaws reach down from the object's top (metres)."""
    grasp_finger_width_m: float = GraspConfig.finger_width_m
    """Width of a jaw pad (metres): the strip of the object whose extent sets the opening."""
    grasp_margin_m: float = GraspConfig.margin_m
    """Clearance added on each side of the object's width (metres)."""
    grasp_num_candidates: int = GraspConfig.num_candidates
    """Most grasp regions per result (best first)."""
    grasp_min_valid_points: int = GraspConfig.min_valid_points
    """Fewest object pixels with valid depth for a 3-D grasp (lower it for low-resolution depth)."""
    grasp_min_depth_m: float = GraspConfig.min_depth_m
    """Nearest plausible depth reading (metres); nearer readings count as invalid, like 0 and NaN."""
    grasp_max_depth_m: float = GraspConfig.max_depth_m
    """Farthest plausible depth reading (metres); farther readings count as invalid (raise it for long-range
    stereo cameras)."""
    record_dir: str = ""
    """Record every served command as an episode (image, depth, camera_info, command, Segmentation, later Feedback) in
    rosbag2/MCAP bags under this directory, for retraining; empty: off."""
    record_max_bag_mb: int = 1000
    """Start a new bag when the current one reaches this size (MB)."""
    publish_detections: bool = False
    """Also publish every answer as vision_msgs/Detection2DArray on 'detections' (box, score, the command as the
    class id), for tools and nodes that know vision_msgs; needs vision_msgs installed."""
    tracker_model: str = ""
    """The SAM2 that tracks goals on every frame ('' = tracking off): 'facebook/sam2-hiera-large' (SAM 2.0, the
    release LENS started from), 'facebook/sam2.1-hiera-large', a .pt or .safetensors file, or 'tiny' (random, for
    tests); loaded at activation, from the hub only with allow_download."""
    track_commands: bool = False
    """Topic commands also start a track of the object they find (the 'track' action always does)."""
    propagation_decoder: str = "stock"
    """Which mask decoder carries a track from frame to frame: 'stock' (the tracker's: SAM2's video training tuned
    it with memories and object scores) or 'lens' (LENS's fine-tuned decoder; its object scores are untrained)."""
    max_tracks: int = 4
    """Most tracks at once (each costs a SAM2 step per frame); a goal beyond them is refused."""
    lost_frames: int = TrackingConfig.lost_frames
    """Frames in a row without the object (SAM2's object score) before a track is lost."""
    presence_threshold: float = TrackingConfig.presence_threshold
    """SAM2's object score logit above which a tracked object is present (SAM2's own rule: 0)."""
    reacquire: bool = TrackingConfig.reacquire
    """Answer a lost track's command again on new frames and restart the track when LENS finds the object (off: a
    lost track ends)."""
    reacquire_interval_s: float = TrackingConfig.reacquire_interval_s
    """At most one re-acquisition attempt per lost track in this time (each is a full LENS command)."""
    reground_s: float = TrackingConfig.reground_s
    """Answer a tracked command again every this many seconds and report the drift IoU (0 = off)."""
    drift_iou: float = TrackingConfig.drift_iou
    """A re-grounded track restarts from LENS's fresh mask when the drift IoU falls below this."""
    track_thumbnail_frames: int = 30
    """While episodes are recorded: a tracked object's state, with a quarter-size mask, every this many tracked
    frames (besides every lost, reacquired, drift and stopped event); 0 = at events only."""
    publish_overlay: bool = False
    """Publish an rgb8 debug image with the mask, box and grasps drawn on 'overlay'."""
    diagnostics_period_s: float = 1.0
    """Period of the /diagnostics status."""
    feedback_period_s: float = 0.1
    """Action feedback: sent at each stage change and, while the reasoning is generated, at most this often
    (seconds)."""
    autostart: bool = True
    """Configure and activate at start; false: wait for lifecycle transitions."""

    # Inclusive bounds of every number: values outside them (and inf, NaN) are refused. The lower
    # bounds are what still makes sense physically or computationally, not 0 + epsilon: a 1e-9 s
    # diagnostics period was accepted once and kept a core busy. 0 is allowed where it means
    # "none": no clearance around the object, depth stamped exactly like the image.
    RANGES = {"max_new_tokens": (1, 32768), "max_command_chars": (1, 100_000), "command_queue_depth": (1, 100_000),
              "max_image_age_s": (0.001, 86400.0), "image_wait_s": (0.001, 3600.0), "sync_tolerance_s": (0.0, 10.0),
              "grasp_max_opening_m": (0.001, 2.0), "grasp_finger_length_m": (0.001, 2.0),
              "grasp_finger_width_m": (0.001, 1.0), "grasp_margin_m": (0.0, 0.5), "grasp_num_candidates": (1, 100),
              "grasp_min_valid_points": (3, 100_000_000), "grasp_min_depth_m": (0.001, 100.0),
              "grasp_max_depth_m": (0.01, 1000.0), "record_max_bag_mb": (1, 10_000_000),
              "diagnostics_period_s": (0.01, 3600.0), "feedback_period_s": (0.0, 60.0), "max_tracks": (1, 254),
              "lost_frames": (1, 1_000_000), "presence_threshold": (-1000.0, 1000.0),
              "reacquire_interval_s": (0.0, 3600.0), "reground_s": (0.0, 86400.0), "drift_iou": (0.0, 1.0),
              "track_thumbnail_frames": (0, 1_000_000)}

    # Parameters that may change while active (the rest need a deactivate/cleanup cycle).
    LIVE = ("cot", "max_new_tokens", "max_command_chars", "max_image_age_s", "image_wait_s", "sync_tolerance_s",
            "frame_policy", "busy_policy", "publish_overlay", "grasps", "grasp_approach", "grasp_max_opening_m",
            "grasp_finger_length_m", "grasp_finger_width_m", "grasp_margin_m", "grasp_num_candidates",
            "grasp_min_valid_points", "grasp_min_depth_m", "grasp_max_depth_m", "feedback_period_s",
            "track_commands", "lost_frames", "presence_threshold", "reacquire", "reacquire_interval_s", "reground_s",
            "drift_iou", "track_thumbnail_frames")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid parameter."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"parameter {f.name!r} must be {expected.__name__}, got {value!r}")
        _one_of("image_qos", self.image_qos, IMAGE_QOS)
        _one_of("image_transport", self.image_transport, IMAGE_TRANSPORTS)
        _one_of("busy_policy", self.busy_policy, BUSY_POLICIES)
        _one_of("frame_policy", self.frame_policy, FRAME_POLICIES)
        _one_of("dtype", self.dtype, ("auto", *DTYPES))
        _one_of("backend", self.backend, BACKENDS)
        parse_stage_backends(self.stage_backends, what="parameter 'stage_backends'")
        if self.warm_up_size:
            parse_image_size(self.warm_up_size, what="parameter 'warm_up_size'")
        _one_of("compile_backend", self.compile_backend, COMPILE_BACKENDS)
        _one_of("propagation_decoder", self.propagation_decoder, PROPAGATION_DECODERS)
        if self.track_commands and not self.tracker_model:
            raise ValueError("parameter 'track_commands' needs a tracker_model (e.g. 'facebook/sam2-hiera-large')")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"parameter 'device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.model.strip():
            raise ValueError("parameter 'model' is empty")
        for name, (low, high) in self.RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):  # NaN fails every comparison
                raise ValueError(f"parameter {name!r} must be between {low:g} and {high:g}, got {value!r}")
        _one_of("grasp_approach", self.grasp_approach, APPROACHES)
        try:
            self.grasp_config()
        except ValueError as exc:  # GraspConfig.<field> -> the parameter grasp_<field>
            raise ValueError(re.sub(r"GraspConfig\.(\w+)", r"parameter 'grasp_\1'", str(exc))) from None

    def grasp_config(self) -> GraspConfig:
        """The GraspConfig the grasp_* parameters describe. The node grasps the mask part under
        LENS's box: that is the object the answer named, whatever else SAM2 picked up."""
        return GraspConfig(approach=self.grasp_approach, max_opening_m=self.grasp_max_opening_m,
                           finger_length_m=self.grasp_finger_length_m, finger_width_m=self.grasp_finger_width_m,
                           margin_m=self.grasp_margin_m, num_candidates=self.grasp_num_candidates,
                           min_valid_points=self.grasp_min_valid_points, min_depth_m=self.grasp_min_depth_m,
                           max_depth_m=self.grasp_max_depth_m, component="box")

    def tracking_config(self) -> TrackingConfig:
        """The TrackingConfig the tracking parameters describe."""
        return TrackingConfig(lost_frames=self.lost_frames, presence_threshold=self.presence_threshold,
                              reacquire=self.reacquire, reacquire_interval_s=self.reacquire_interval_s,
                              reground_s=self.reground_s, drift_iou=self.drift_iou)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def pipeline_config(self):
        from lens_ros.pipeline import PipelineConfig

        device = self.resolved_device()
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        return PipelineConfig(model=self.model, device=device, dtype=dtype, allow_download=self.allow_download,
                              cot=self.cot, max_new_tokens=self.max_new_tokens,
                              max_command_chars=self.max_command_chars, backend=self.backend,
                              stage_backends=self.stage_backends, export_dir=self.export_dir, compile=self.compile,
                              compile_backend=self.compile_backend,
                              overlap_sam_encoder=self.overlap_sam_encoder)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"parameter {name!r} must be one of {', '.join(allowed)}; got {value!r}")


_TYPES = {"str": str, "bool": bool, "int": int, "float": float}
_TYPES = {f.name: _TYPES[f.type] for f in fields(NodeConfig)}


def parameter_descriptions() -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    tree = ast.parse(inspect.getsource(NodeConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def render_params_yaml(node_name: str = "/**") -> str:
    """config/lens.yaml: every parameter with its default and description (regenerate with
    ``python -m lens_ros.ros.params > config/lens.yaml``; a test keeps the two equal)."""
    import json
    import textwrap

    docs = parameter_descriptions()
    lines = ["# lens_node parameters, with their defaults (for any namespace). Generated from lens_ros/ros/params.py (NodeConfig):",
             "#   python -m lens_ros.ros.params > config/lens.yaml",
             "# Use with: ros2 launch lens_ros lens.launch.py params_file:=<copy of this file>",
             f"{node_name}:", "  ros__parameters:"]
    for f in fields(NodeConfig):
        for line in textwrap.wrap(docs[f.name], 96):
            lines.append(f"    # {line}")
        lines.append(f"    {f.name}: {json.dumps(f.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_params_yaml(), end="")
