"""Start lens_node next to a camera driver.

    ros2 launch lens_ros lens.launch.py namespace:=wrist_camera \
        image:=/camera/color/image_raw depth:=/camera/aligned_depth_to_color/image_raw \
        camera_info:=/camera/color/camera_info model:=OuyBin/LENS device:=cuda

Every other parameter comes from params_file (default: the installed config/lens.yaml).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("lens_ros"), "config", "lens.yaml")
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        DeclareLaunchArgument("image", default_value="image", description="colour image topic"),
        DeclareLaunchArgument("depth", default_value="depth", description="depth image topic, aligned to the colour image"),
        DeclareLaunchArgument("camera_info", default_value="camera_info", description="camera_info of the colour image"),
        DeclareLaunchArgument("command", default_value="command", description="std_msgs/String language goals"),
        DeclareLaunchArgument("model", default_value="OuyBin/LENS", description="Hugging Face id, directory or 'tiny'"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="parameters YAML"),
    ]
    node = Node(
        package="lens_ros",
        executable="lens_node",
        name="lens_node",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[LaunchConfiguration("params_file"),
                    {"model": LaunchConfiguration("model"), "device": LaunchConfiguration("device")}],
        remappings=[
            ("image", LaunchConfiguration("image")),
            ("depth", LaunchConfiguration("depth")),
            ("camera_info", LaunchConfiguration("camera_info")),
            ("command", LaunchConfiguration("command")),
        ],
    )
    return LaunchDescription([*arguments, node])
