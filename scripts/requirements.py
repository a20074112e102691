#!/usr/bin/env python3
"""Print lens_ros's Python requirements from setup.py (one source of truth), one per line.

    python3 scripts/requirements.py [EXTRA ...]      # e.g. train bags (the install_requires always)

Used by `make venv`, and on robots to install the dependencies into a venv while colcon builds
and installs the package itself:  pip install -r <(python3 scripts/requirements.py train bags)
"""

import runpy
import sys
from pathlib import Path

import setuptools


def requirements(extras: list[str]) -> list[str]:
    captured = {}
    setup, setuptools.setup = setuptools.setup, captured.update  # read the arguments, build nothing
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "setup.py"))
    finally:
        setuptools.setup = setup
    unknown = sorted(set(extras) - set(captured["extras_require"]))
    if unknown:
        raise SystemExit(f"requirements.py: unknown extra(s) {', '.join(unknown)}; "
                         f"known: {', '.join(captured['extras_require'])}")
    return [*captured["install_requires"], *(r for extra in extras for r in captured["extras_require"][extra])]


if __name__ == "__main__":
    print(*requirements(sys.argv[1:]), sep="\n")
