"""lens_ros: LENS reasoning segmentation (Qwen2.5-VL + SAM2) for ROS 2 robots.

Importing this package is cheap and needs no ROS install: nothing heavy (torch, rclpy) is
imported here. The ROS interfaces are the subpackages lens_ros.msg and lens_ros.action.
"""

import pkgutil

# One package, possibly from two directories. In the development venv the ROS interfaces
# generated from msg/ and action/ (lens_ros/msg, lens_ros/action, the rosidl typesupport .so
# files) are installed into the venv's site-packages/lens_ros/, while these sources are the
# repository's lens_ros/ (editable install), much like a catkin devel space. extend_path adds
# every other lens_ros/ directory on sys.path to __path__ so that lens_ros.msg is found there.
# In an installed package (colcon/ament on a robot, or a wheel) both are one directory and this
# is a no-op. Only the repository copy may have an __init__.py (CMake option
# LENS_ROS_INSTALL_PYTHON_SOURCES=OFF removes the generated empty one), or it would shadow this.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"
