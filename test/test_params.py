"""NodeConfig (the node's parameters), config/lens.yaml and the launch file."""

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from lens_ros.ros.params import NodeConfig, parameter_descriptions, render_params_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_every_parameter_is_documented():
    config = NodeConfig()
    docs = parameter_descriptions()
    assert set(docs) == {f.name for f in fields(NodeConfig)}
    assert all(len(text) > 10 for text in docs.values())
    assert set(NodeConfig.LIVE) < set(docs)
    assert config.pipeline_config().device in ("cpu", "cuda")


@pytest.mark.parametrize("name, value, message", [
    ("busy_policy", "drop", "parameter 'busy_policy' must be one of queue_latest, reject"),
    ("image_qos", "fast", "parameter 'image_qos' must be one of sensor_data, reliable"),
    ("frame_policy", "oldest", "parameter 'frame_policy' must be one of newest, next"),
    ("dtype", "float64", "parameter 'dtype' must be one of auto, float32"),
    ("device", "tpu", "parameter 'device' must be auto, cpu, cuda or cuda:N"),
    ("max_new_tokens", 0, "parameter 'max_new_tokens' must be between 1 and 32768, got 0"),
    ("max_new_tokens", 2.5, "parameter 'max_new_tokens' must be int"),
    ("max_image_age_s", -1.0, "parameter 'max_image_age_s' must be between 0.001 and 86400, got -1.0"),
    ("max_image_age_s", "1", "parameter 'max_image_age_s' must be float"),
    ("sync_tolerance_s", -0.1, "parameter 'sync_tolerance_s' must be between 0 and 10, got -0.1"),
    ("command_queue_depth", 0, "parameter 'command_queue_depth' must be between 1 and 100000, got 0"),
    ("publish_overlay", 1, "parameter 'publish_overlay' must be bool"),
    ("model", " ", "parameter 'model' is empty"),
])
def test_invalid_values_name_the_parameter(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        NodeConfig(**{name: value})


FLOAT_PARAMETERS = [f.name for f in fields(NodeConfig) if f.type == "float"]


def test_every_number_has_bounds():
    numbers = {f.name for f in fields(NodeConfig) if f.type in ("int", "float")}
    assert set(NodeConfig.RANGES) == numbers
    for name, (low, high) in NodeConfig.RANGES.items():
        assert low <= getattr(NodeConfig(), name) <= high, name


@pytest.mark.parametrize("name, value", [
    *((name, value) for name in FLOAT_PARAMETERS for value in (float("inf"), float("-inf"), float("nan"), 1e300, -1e300)),
    # negative durations, distances, IoUs (presence_threshold is a logit: negative is meaningful)
    *((name, -1.0) for name in FLOAT_PARAMETERS if NodeConfig.RANGES[name][0] >= 0)])
def test_no_float_parameter_takes_a_non_finite_or_absurd_value(name, value):
    """inf passed validation once and failed configure half-way. Every float parameter refuses
    these, naming itself."""
    with pytest.raises(ValueError, match=f"parameter '{name}' must be between"):
        NodeConfig(**{name: value})


@pytest.mark.parametrize("name", [n for n in FLOAT_PARAMETERS if NodeConfig.RANGES[n][0] > 0])
@pytest.mark.parametrize("value", [0.0, 1e-9])
def test_zero_and_tiny_values_are_refused_where_they_mean_nothing(name, value):
    """A 1e-9 s diagnostics period was accepted once and kept a core busy. (The two parameters
    whose lower bound is 0 take it as "none": no clearance, depth stamped exactly like the image.)"""
    with pytest.raises(ValueError, match=f"parameter '{name}' must be between"):
        NodeConfig(**{name: value})


def test_integers_are_accepted_for_seconds():
    config = NodeConfig(max_image_age_s=3)
    assert config.max_image_age_s == 3.0 and isinstance(config.max_image_age_s, float)


def test_pipeline_options_follow_the_parameters():
    options = NodeConfig(device="cpu", dtype="auto", cot=True, max_new_tokens=9, model="tiny").pipeline_config()
    assert (options.device, options.dtype, options.cot, options.max_new_tokens, options.model) == (
        "cpu", "float32", True, 9, "tiny")


def test_config_yaml_is_the_rendered_defaults():
    text = (ROOT / "config" / "lens.yaml").read_text()
    assert text == render_params_yaml(), "regenerate: python -m lens_ros.ros.params > config/lens.yaml"
    values = yaml.safe_load(text)["/**"]["ros__parameters"]
    assert values == {f.name: f.default for f in fields(NodeConfig)}


def test_launch_file_names_only_things_that_exist():
    source = (ROOT / "launch" / "lens.launch.py").read_text()
    tree = ast.parse(source)  # compiles
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {"lens_ros", "lens_node", "config", "lens.yaml"} <= strings
    assert (ROOT / "config" / "lens.yaml").is_file()
    assert "lens_node" in (ROOT / "CMakeLists.txt").read_text() and (ROOT / "scripts" / "lens_node").is_file()
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Node"]
    assert len(calls) == 1
    keywords = {k.arg: k.value for k in calls[0].keywords}
    parameter_names = {k.value for d in ast.walk(keywords["parameters"]) if isinstance(d, ast.Dict) for k in d.keys}
    assert parameter_names <= {f.name for f in fields(NodeConfig)}
    remapped = {t.elts[0].value for t in keywords["remappings"].elts}
    from lens_ros.ros import node  # the node's own topic names

    assert remapped <= {node.IMAGE_TOPIC, node.DEPTH_TOPIC, node.CAMERA_INFO_TOPIC, node.COMMAND_TOPIC}


def test_readme_lists_every_parameter_with_its_default():
    import json

    readme = (ROOT / "README.md").read_text()
    for f in fields(NodeConfig):
        assert f"| `{f.name}` | `{json.dumps(f.default)}` |" in readme, f.name
