"""Shared test setup: an isolated, offline environment, and fixtures for real rclpy tests.

The environment defaults are set at import time, i.e. before any test module (or rclpy) is
imported. `make test` sets the same variables itself (with a per-run ROS_DOMAIN_ID); these
defaults cover a plain `pytest` run.
"""

import atexit
import os
import shutil
import tempfile
import time

import pytest

# ROS 2: discover only on this host, in a domain of our own, logs out of $HOME.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 1))
if "ROS_LOG_DIR" not in os.environ:
    _ros_log_dir = tempfile.mkdtemp(prefix="lens_ros_test_ros_log_")
    os.environ["ROS_LOG_DIR"] = _ros_log_dir
    atexit.register(shutil.rmtree, _ros_log_dir, ignore_errors=True)
# Never download anything in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Model, pipeline and CLI fixtures (tiny checkpoint, demo photo) live in test/fixtures_lens.py.
pytest_plugins = ["fixtures_lens"]


@pytest.fixture
def ros_context():
    """A fresh rclpy Context, initialised, and shut down after the test.

    Create nodes with `rclpy.create_node(name, context=ros_context)` and executors with
    `SingleThreadedExecutor(context=ros_context)`; destroy them before the test ends.
    """
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)


@pytest.fixture
def spin_until():
    """spin_until(executor, predicate, timeout=10.0) -> bool: spin until predicate() is true.

    Returns False when the deadline passes first. Use it instead of fixed sleeps.
    """

    def _spin_until(executor, predicate, timeout=10.0, period=0.05):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return bool(predicate())
            executor.spin_once(timeout_sec=period)
        return True

    return _spin_until
