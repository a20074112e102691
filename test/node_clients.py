"""A lens_node process and a test peer talking to it over real DDS (shared by the node tests)."""

from __future__ import annotations

import time

import numpy as np
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from lens_ros.msg import Segmentation
from lens_ros.ros.harness import NodeProcess, Peer, diagnostics_watch, image_msg

# What a client that must not lose requests or answers uses: reliable, and deep enough for its bursts.
DEEP_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
NODE_PARAMS = {"max_new_tokens": 8, "device": "cpu", "image_wait_s": 1.0, "max_image_age_s": 2.0,
               "diagnostics_period_s": 0.2}


def camera_info_msg(stamp, fx: float, width: int = 160, height: int = 120):
    """A CameraInfo for the test images: focal length ``fx`` (= fy), principal point at the centre."""
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo(width=width, height=height)
    info.header.stamp, info.header.frame_id = stamp, "camera_optical"
    info.k = [fx, 0.0, (width - 1) / 2, 0.0, fx, (height - 1) / 2, 0.0, 0.0, 1.0]
    return info


class Harness:
    """One node process + one peer with publishers and recorders in the node's namespace."""

    def __init__(self, tiny_checkpoint, namespace, **params):
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        self.namespace = namespace
        self.expected_exit = 0  # what close() expects of the node process (a test that kills it changes it)
        self.node = NodeProcess({"model": str(tiny_checkpoint), **NODE_PARAMS, **params},
                                name="lens_node", namespace=namespace)
        self.peer = Peer()
        n = self.peer.node
        self.image_pub = n.create_publisher(Image, f"{namespace}/image", qos_profile_sensor_data)
        self.depth_pub = n.create_publisher(Image, f"{namespace}/depth", qos_profile_sensor_data)
        self.command_pub = n.create_publisher(String, f"{namespace}/command", DEEP_QOS)
        self.segmentations = self.peer.subscribe(Segmentation, f"{namespace}/segmentation", DEEP_QOS)
        self.masks = self.peer.subscribe(Image, f"{namespace}/mask")
        self.state = diagnostics_watch(self.peer, f"{namespace}/lens_node")
        self.rgb = np.ascontiguousarray((np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8))

    def wait_state(self, state, timeout=120.0):
        assert self.peer.wait_for(lambda: (self.state() or {}).get("state") == state, timeout), (
            f"node never reached {state}; log:\n{self.node.output()[-3000:]}")

    def send_image(self, rgb=None, stamp=None, encoding="rgb8", **fields):
        msg = image_msg(self.rgb if rgb is None else rgb, (stamp or self.peer.now()).to_msg(), encoding)
        for key, value in fields.items():
            setattr(msg, key, value)
        self.image_pub.publish(msg)
        return msg

    def command(self, text, timeout=60.0) -> Segmentation:
        from std_msgs.msg import String

        count = len(self.segmentations)
        self.peer.wait_matched(self.command_pub)
        self.command_pub.publish(String(data=text))
        assert self.peer.wait_for(lambda: len(self.segmentations) > count, timeout), (
            f"no answer to {text[:40]!r}; log:\n{self.node.output()[-3000:]}")
        return self.segmentations[count]

    def fresh_frame(self):
        """Publish frames until the node has surely received one (best-effort QoS may drop some)."""
        self.peer.wait_matched(self.image_pub)
        for _ in range(3):
            self.send_image()
            time.sleep(0.05)

    def set_parameter(self, name, value):
        """Set one of the node's parameters through its service; returns the SetParametersResult."""
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        client = self.peer.node.create_client(SetParameters, f"{self.namespace}/lens_node/set_parameters")
        assert client.wait_for_service(timeout_sec=30)
        kind, field = {int: (ParameterType.PARAMETER_INTEGER, "integer_value"),
                       float: (ParameterType.PARAMETER_DOUBLE, "double_value"),
                       str: (ParameterType.PARAMETER_STRING, "string_value")}[type(value)]
        request = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(type=kind, **{field: value}))])
        future = client.call_async(request)
        assert self.peer.wait_for(future.done, 30)
        self.peer.node.destroy_client(client)
        return future.result().results[0]

    def transition(self, transition_id, timeout=120.0) -> bool:
        """Request a lifecycle transition (lifecycle_msgs/Transition id); True when it succeeded."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        client = self.peer.node.create_client(ChangeState, f"{self.namespace}/lens_node/change_state")
        assert client.wait_for_service(timeout_sec=60), self.node.output()[-3000:]
        future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        assert self.peer.wait_for(future.done, timeout), self.node.output()[-3000:]
        self.peer.node.destroy_client(client)
        return future.result().success

    def close(self):
        self.peer.close()
        code = self.node.stop()
        assert code == self.expected_exit, self.node.output()[-3000:]
