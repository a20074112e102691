"""lens-segment and lens-make-tiny, in process and as installed console scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from lens_ros.cli import make_tiny_main, segment_main

BIN = Path(sys.executable).parent


def test_lens_segment_writes_its_three_files(tiny_checkpoint, photo_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = segment_main(["--model", str(tiny_checkpoint), "--image", str(photo_file),
                         "--command", "the coffee cup", "--out", str(out), "--max-new-tokens", "8"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and ("found" in line) and str(out) in line
    mask = cv2.imread(str(out / "mask.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(out / "overlay.png"), cv2.IMREAD_UNCHANGED)
    source = cv2.imread(str(photo_file))
    assert mask.dtype == np.uint8 and mask.shape == source.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == source.shape and not np.array_equal(overlay, source)  # caption drawn at least
    result = json.loads((out / "result.json").read_text())
    for key in ("command", "reasoning", "found", "box", "score", "timings", "model"):
        assert key in result
    assert result["command"] == "the coffee cup" and result["model"] == str(tiny_checkpoint)
    assert result["found"] == (result["box"] is not None)


def test_lens_segment_reports_user_errors_without_traceback(tiny_checkpoint, photo_file, tmp_path, capsys):
    assert segment_main(["--model", str(tiny_checkpoint), "--image", str(tmp_path / "nope.png"),
                         "--command", "the cup"]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert segment_main(["--model", str(tiny_checkpoint), "--image", str(broken), "--command", "the cup"]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert segment_main(["--model", str(tiny_checkpoint), "--image", str(photo_file), "--command", "  "]) == 2
    assert "command is only whitespace" in capsys.readouterr().err


def test_console_script_offline_without_weights_exits_2(photo_file, tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(BIN / "lens-segment"), "--model", "OuyBin/LENS", "--offline", "--image",
                           str(photo_file), "--command", "the cup", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "OuyBin/LENS" in proc.stderr and "--model tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_lens_make_tiny_writes_a_loadable_checkpoint(tmp_path, capsys):
    from lens_ros.model.checkpoint import load_lens_model

    assert make_tiny_main([str(tmp_path / "tiny8"), "--queries", "8", "--seed", "3"]) == 0
    assert "meaningless" in capsys.readouterr().out
    config = json.loads((tmp_path / "tiny8" / "config.json").read_text())
    assert config["num_of_query"] == 8
    model, _ = load_lens_model(str(tmp_path / "tiny8"))
    assert tuple(model.learnable_query.shape) == (1, 8, 64)


def test_demo_falls_back_to_the_tiny_model_and_says_so(tmp_path, monkeypatch, capsys):
    from lens_ros import demo

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LENS_ROS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MODEL", raising=False)
    assert demo.main(["--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "LENS weights unavailable" in out and "OuyBin/LENS" in out and "meaningless" in out
    assert "latency" in out
    for name in ("overlay.png", "mask.png", "result.json"):
        assert (tmp_path / "demo" / name).is_file()
    assert json.loads((tmp_path / "demo" / "result.json").read_text())["model"] == "tiny"
