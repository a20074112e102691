"""lens_ros in a colcon workspace, built and launched as on a robot (the real colcon and ros2 launch),
and the README's robot install recipe run line by line over a stand-in of a system ROS 2."""

from __future__ import annotations

import os
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
CLI_WHEELS = ROOT.parent / "shared" / "wheels" / "ros2-cli"
# The distro the compiled wheels there are built for (the Makefile's ROS2_CLI_WHEELS_DISTRO); another
# distro's venv has them rebuilt with cmake, outside pip, and the stand-in below cannot be made of it.
CLI_WHEELS_DISTRO = re.search(r"^ROS2_CLI_WHEELS_DISTRO := (\w+)", (ROOT / "Makefile").read_text(), re.M).group(1)
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


def _copy_repository(target: Path) -> None:
    """The files git tracks or would track (what a robot's checkout holds)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in names:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def _launch_and_answer(setup: str, env: dict, workspace: Path, tmp_path: Path) -> Path:
    """The README's robot launch line (the tiny model on the CPU in place of the released weights on a
    GPU, and a parameters file of one's own) after `setup` (shell lines that source what a robot
    sources); one command answered from a camera stream. Returns the node process's command line and
    memory map (what it runs and which libraries it loaded)."""
    from std_msgs.msg import String

    from lens_ros.model.tiny import ensure_tiny_checkpoint
    from lens_ros.msg import Segmentation

    tiny = ensure_tiny_checkpoint(cache_dir=tmp_path / "cache")
    params = tmp_path / "wrist.yaml"
    params.write_text((ROOT / "config" / "lens.yaml").read_text().replace("max_new_tokens: 256", "max_new_tokens: 3"))
    line = ROBOT_LAUNCH.replace("model:=OuyBin/LENS device:=cuda", f"model:={tiny} device:=cpu params_file:={params}")
    log = tmp_path / "launch.log"
    camera = Camera()
    launch = subprocess.Popen(["bash", "-c", f"{setup} && exec {line}"], stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, env=env, cwd=workspace, start_new_session=True)
    try:
        wait_active(camera, launch, log)
        pid = re.search(r"process started with pid \[(\d+)\]", log.read_text())
        assert pid, log.read_text()[-2000:]
        process = Path(f"/proc/{pid.group(1)}")
        # The node runs from the workspace's install.
        command_line = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert f"{workspace}/install/lens_ros/lib/lens_ros/lens_node" in command_line, command_line
        maps = (process / "maps").read_text()
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
    return command_line, maps


def test_a_colcon_workspace_builds_and_its_launch_file_answers(tmp_path):
    """`colcon build` of a copy of the repository with this venv's ROS, then the robot launch line
    from `source install/setup.bash`: its remaps, parameters and executable are the workspace's."""
    workspace = tmp_path / "ws"
    _copy_repository(workspace / "src" / "lens_ros")
    env = {key: value for key, value in os.environ.items() if key not in ("AMENT_PREFIX_PATH", "PYTHONPATH")}
    built = subprocess.run([str(BIN / "colcon"), "build", "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}",
                            "-DBUILD_TESTING=OFF"], cwd=workspace, capture_output=True, text=True, timeout=900,
                           env=dict(env, CMAKE_PREFIX_PATH=sys.prefix, AMENT_PREFIX_PATH=sys.prefix))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (workspace / "install" / "setup.bash").is_file()
    _launch_and_answer(f"source {workspace}/install/setup.bash && PATH={BIN}:$PATH", env, workspace, tmp_path)


# --- The README's "Install on a robot", run as written over a stand-in of /opt/ros/$ROS_DISTRO -----------

# A system ROS 2 stand-in: the ROS wheels of this venv unpacked into ROOT/opt/ros/<distro> (the layout
# of apt's install: bin/, lib/, share/, lib/pythonX.Y/site-packages) with a setup.bash that sets what
# a ROS install's does. apt's ROS has no Python packaging metadata and its scripts run /usr/bin/python3
# with apt's python3-* packages; here the scripts run the `python3` on PATH (the activated venv, where
# the stand-ins for apt's python3-* packages go: see _SUBSTITUTES).
_SETUP_BASH = """\
# Stand-in for /opt/ros/{distro}/setup.bash (what a ROS 2 install's setup file sets).
export ROS_DISTRO={distro} ROS_VERSION=2 ROS_PYTHON_VERSION=3
export AMENT_PREFIX_PATH={prefix}${{AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}}
export CMAKE_PREFIX_PATH={prefix}${{CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}}
export PYTHONPATH={prefix}/{site}${{PYTHONPATH:+:$PYTHONPATH}}
export LD_LIBRARY_PATH={libraries}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}
export PATH={prefix}/bin:$PATH
"""
# What apt's python3-* packages give ROS's Python on a robot (rosidl, launch, ros2cli, colcon), and
# colcon itself (python3-colcon-common-extensions): not in this machine's system Python.
_APT_PYTHON = ("numpy pyyaml lark-parser typing-extensions empy catkin-pkg osrf-pycommon argcomplete psutil packaging "
               "colcon-core colcon-ros colcon-cmake colcon-bash colcon-recursive-crawl colcon-package-selection "
               "colcon-parallel-executor colcon-library-path")
# The recipe's lines that cannot run here, each with what runs in its place and why. Every other
# line runs as written (with HOME a temporary directory and /opt/ros the stand-in).
_SUBSTITUTES = {
    "sudo apt install ros-$ROS_DISTRO-ros-base ros-$ROS_DISTRO-vision-msgs python3-colcon-common-extensions python3-venv":
        (":", "no apt here: the stand-in of /opt/ros/$ROS_DISTRO is built from the PyPI ROS wheels"),
    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu128":
        (f"pip install torch torchvision && pip install {_APT_PYTHON}",
         "this machine's index (CPU builds, constraints.txt's versions); and the stand-ins for apt's python3-*"),
    "pip install torch torchvision --index-url https://pypi.jetson-ai-lab.io/jp6/cu126":
        (":", "not a Jetson"),
    "mkdir -p ~/lens_ws/src && git clone <this repository> ~/lens_ws/src/lens_ros":
        ("mkdir -p ~/lens_ws/src && test -f ~/lens_ws/src/lens_ros/package.xml",
         "the test copies the working tree there (what git would check out, uncommitted changes included)"),
    'pip install "numpy<2" -r <(python3 ~/lens_ws/src/lens_ros/scripts/requirements.py train bags)':
        ("pip install -r <(python3 ~/lens_ws/src/lens_ros/scripts/requirements.py train bags)",
         "the stand-in's messages are built against NumPy 2 (apt's against 1.x, hence the pin there)"),
}


def _readme_robot_install() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Install on a robot", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in re.sub(r"\\\n\s*", "", block).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _system_ros_stand_in(root: Path) -> Path:
    """ROOT/opt/ros/<distro> from this venv's ROS distributions (the PyPI ROS wheels, the CLI wheels)."""
    prefix = root / "opt" / "ros" / CLI_WHEELS_DISTRO
    freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    # The PyPI ROS wheels at this venv's versions, and the wheels beside the repository (by path: PyPI's
    # `launch` is an unrelated package).
    wheels = sorted(CLI_WHEELS.glob("*.whl"))
    local = {wheel.name.split("-")[0].replace("_", "-").lower() for wheel in wheels}
    ros = [line for line in freeze if line.lower().startswith("ros-") and line.split("==")[0].lower() not in local]
    (root / "ros.txt").write_text("\n".join(ros) + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--ignore-installed", "--no-deps", "--no-compile",
         "--prefix", str(prefix), "-r", str(root / "ros.txt"), *map(str, wheels)],
        capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PIP_CONSTRAINT=str(ROOT / "constraints.txt"), PIP_NO_INPUT="1"))
    assert installed.returncode == 0, installed.stderr[-3000:]
    for script in (prefix / "bin").iterdir():  # apt's scripts name their interpreter; pip wrote ours
        text = script.read_bytes()
        if text.startswith(b"#!") and b"python" in text.split(b"\n", 1)[0]:
            script.write_bytes(b"#!/usr/bin/env python3\n" + text.split(b"\n", 1)[1])
    # apt's libraries all lie in lib/; the wheels keep theirs in <dist>.libs beside the Python modules.
    libraries = ":".join([str(prefix / "lib"), *map(str, sorted((prefix / SITE).glob("ros_*.libs")))])
    for name in ("setup.bash", "local_setup.bash"):  # colcon looks for local_setup.* in AMENT_PREFIX_PATH
        (prefix / name).write_text(_SETUP_BASH.format(distro=CLI_WHEELS_DISTRO, prefix=prefix, site=SITE,
                                                      libraries=libraries))
    return prefix


def _has_distribution(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return bool(distribution(name))
    except PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has_distribution("ros-composition-interfaces"),
                    reason=f"the ROS 2 command-line wheels ({CLI_WHEELS}) are absent, or this venv is not "
                           f"{CLI_WHEELS_DISTRO}'s (the one their compiled wheels are built for)")
def test_the_readme_robot_install_layers_a_venv_over_the_system_ros(tmp_path):
    """The README's robot recipe, line by line: a venv with --system-site-packages over a system ROS 2
    (sourced), PyTorch and the requirements in the venv, colcon with the venv's Python; then the
    launch file answers a command, and its node runs the venv's Python with the system's rclpy."""
    lines = _readme_robot_install()
    missing = [line for line in _SUBSTITUTES if line not in lines]
    assert not missing, f"the README's robot install no longer has these lines (update _SUBSTITUTES): {missing}"
    try:
        _install_by_the_readme_and_launch(lines, tmp_path)
    finally:
        # About 6 GB (a third ML venv and the stand-in ROS), freed now even when the test fails (its
        # logs stay), so that a CI machine's disk still holds the Jazzy venv built after this run.
        for heavy in (tmp_path / "home" / "lens_venv", tmp_path / "home" / ".cache", tmp_path / "opt"):
            shutil.rmtree(heavy, ignore_errors=True)


def _install_by_the_readme_and_launch(lines: list[str], tmp_path: Path) -> None:
    prefix = _system_ros_stand_in(tmp_path)
    home = tmp_path / "home"
    _copy_repository(home / "lens_ws" / "src" / "lens_ros")
    script = [line.replace("/opt/ros/", f"{tmp_path}/opt/ros/") for line in
              (_SUBSTITUTES.get(line, (line,))[0] for line in lines)]
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "ROS_DISTRO": prefix.name, "PIP_CONSTRAINT": str(ROOT / "constraints.txt"), "PIP_NO_INPUT": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    # Passed through: this run's ROS isolation and offline flags, and how pip reaches this machine's index.
    env.update({key: value for key, value in os.environ.items() if key not in env and (
        key.startswith(("ROS_DOMAIN_ID", "ROS_AUTOMATIC", "ROS_LOG_DIR", "HF_", "PIP_", "SSL_CERT", "REQUESTS_CA"))
        or key.lower().endswith("_proxy"))})
    recipe = tmp_path / "recipe.bash"
    # No `set -u`: colcon's setup.bash reads variables that may be unset, as robots' shells allow.
    recipe.write_text("set -eo pipefail\n" + "\n".join(script) + "\n")
    done = subprocess.run(["bash", str(recipe)], capture_output=True, text=True, timeout=1800, env=env, cwd=home)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    venv = home / "lens_venv"
    # The venv holds PyTorch and the requirements, not ROS: rclpy comes from the system's prefix.
    assert not list((venv / SITE).glob("rclpy*")) and (venv / SITE / "torch").is_dir()
    setup = (f"source {prefix}/setup.bash && source {venv}/bin/activate && "
             f"source {home}/lens_ws/install/setup.bash")
    command_line, maps = _launch_and_answer(setup, env, home / "lens_ws", tmp_path)
    assert command_line.startswith(f"{venv}/bin/python"), command_line  # colcon's -DPython3_EXECUTABLE
    assert f"{prefix}/{SITE}/rclpy/_rclpy_pybind11" in maps, "the node did not load the system's rclpy"
    assert f"{venv}/{SITE}/torch/lib/libtorch" in maps, "the node did not load the venv's PyTorch"
