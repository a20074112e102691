"""lens_ros in a colcon workspace, built and launched as on a robot (the real colcon and ros2 launch)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node_clients import DEEP_QOS
from ros2_tools import BIN, NO_ROS2, ROBOT_LAUNCH, ROOT, ROS2, Camera, stop, wait_active

pytestmark = pytest.mark.skipif(not ROS2.exists() or not (BIN / "colcon").exists(),
                                reason=f"{NO_ROS2}; or colcon is not in this venv")


def _copy_repository(target: Path) -> None:
    """The files git tracks or would track (what a robot's checkout holds)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in names:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def test_a_colcon_workspace_builds_and_its_launch_file_answers(tmp_path):
    """`colcon build` of a copy of the repository, then the README's robot launch line (the tiny model
    on the CPU in place of the released weights on a GPU, and a parameters file) from
    `source install/setup.bash`: its remaps, parameters and executable are the workspace's."""
    import os

    from std_msgs.msg import String

    from lens_ros.model.tiny import ensure_tiny_checkpoint
    from lens_ros.msg import Segmentation

    workspace = tmp_path / "ws"
    _copy_repository(workspace / "src" / "lens_ros")
    env = {key: value for key, value in os.environ.items() if key not in ("AMENT_PREFIX_PATH", "PYTHONPATH")}
    built = subprocess.run([str(BIN / "colcon"), "build", "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}",
                            "-DBUILD_TESTING=OFF"], cwd=workspace, capture_output=True, text=True, timeout=900,
                           env=dict(env, CMAKE_PREFIX_PATH=sys.prefix, AMENT_PREFIX_PATH=sys.prefix))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (workspace / "install" / "setup.bash").is_file()

    tiny = ensure_tiny_checkpoint(cache_dir=tmp_path / "cache")
    # A parameters file of one's own, as a robot's launch would give (the shipped one, edited).
    params = tmp_path / "wrist.yaml"
    params.write_text((ROOT / "config" / "lens.yaml").read_text().replace("max_new_tokens: 256", "max_new_tokens: 3"))
    line = ROBOT_LAUNCH.replace("model:=OuyBin/LENS device:=cuda", f"model:={tiny} device:=cpu params_file:={params}")
    script = f"source {workspace}/install/setup.bash && exec {ROS2} {line.removeprefix('ros2 ')}"
    log = tmp_path / "launch.log"
    camera = Camera()
    launch = subprocess.Popen(["bash", "-c", script], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                              cwd=workspace, start_new_session=True)
    try:
        wait_active(camera, launch, log)
        # The node runs from the workspace's install, not from the development venv.
        pid = re.search(r"process started with pid \[(\d+)\]", log.read_text())
        assert pid, log.read_text()[-2000:]
        command_line = Path(f"/proc/{pid.group(1)}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert f"{workspace}/install/lens_ros/lib/lens_ros/lens_node" in command_line, command_line
        answers = camera.peer.subscribe(Segmentation, "/wrist/segmentation", DEEP_QOS)
        commands = camera.peer.node.create_publisher(String, "/wrist/command", DEEP_QOS)
        camera.peer.wait_matched(commands)
        commands.publish(String(data="the cup"))
        assert camera.peer.wait_for(lambda: answers, 60), log.read_text()[-3000:]
        assert answers[0].error == "" and answers[0].model == str(tiny)
        assert 1 <= answers[0].generated_tokens <= 3  # the parameters file's max_new_tokens
    finally:
        code = stop(launch)
        camera.close()
    assert code == 0, log.read_text()[-3000:]
