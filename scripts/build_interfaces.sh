#!/usr/bin/env bash
# Build the lens_ros ROS interfaces (msg/, action/) with cmake and the rosidl/ament wheels, and
# install them into a Python venv's own prefix:
#   <venv>/lib/python3.X/site-packages/lens_ros/{msg,action,*.so}   generated Python modules
#   <venv>/lib/liblens_ros__rosidl_*.so, <venv>/share/lens_ros/...    C libraries, ament index
# The Python sources are NOT installed (LENS_ROS_INSTALL_PYTHON_SOURCES=OFF): the venv has the
# repository's lens_ros/ through an editable install, and lens_ros/__init__.py joins the two.
# After this, <venv>/bin/python can `import lens_ros.msg` with no environment variables set.
#
# Usage: scripts/build_interfaces.sh [VENV [BUILD_DIR]]    (defaults: .venv build/interfaces)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(cd "${1:-$repo/.venv}" && pwd)"
build="${2:-$repo/build/interfaces}"
py="$venv/bin/python"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

[ -x "$py" ] || { echo "build_interfaces: no python at $py (run 'make venv')" >&2; exit 1; }
command -v cmake >/dev/null || { echo "build_interfaces: cmake not found (apt-get install cmake g++)" >&2; exit 1; }

# The ROS wheels install their cmake configs and ament index under the venv prefix.
export CMAKE_PREFIX_PATH="$venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export AMENT_PREFIX_PATH="$venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
# The generators run as "$py -m ..." (and the ROS wheels' bootstrap .pth re-execs python with
# LD_LIBRARY_PATH set); make sure nothing from the caller's environment leaks in.
unset PYTHONPATH PYTHONHOME

py_include="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
[ -f "$py_include/Python.h" ] || {
  echo "build_interfaces: Python headers missing ($py_include/Python.h); install python3-dev" >&2
  exit 1
}

mkdir -p "$build"
echo "    cmake configure ($build)"
# Libraries are installed with an RPATH to the venv's lib/ and to the ROS wheels' library
# directories, so the typesupport extension modules load without LD_LIBRARY_PATH.
cmake -S "$repo" -B "$build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$venv" \
  -DPython3_EXECUTABLE="$py" \
  -DPython3_FIND_VIRTUALENV=ONLY \
  -DLENS_ROS_INSTALL_PYTHON_SOURCES=OFF \
  -DBUILD_TESTING=OFF \
  -DCMAKE_INSTALL_RPATH="$venv/lib" \
  -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON \
  >"$build/configure.log" 2>&1 || { cat "$build/configure.log" >&2; exit 1; }
echo "    cmake build (-j$jobs)"
cmake --build "$build" -j "$jobs" >"$build/build.log" 2>&1 || { tail -n 80 "$build/build.log" >&2; exit 1; }
echo "    cmake install -> $venv"
cmake --install "$build" >"$build/install.log" 2>&1 || { tail -n 40 "$build/install.log" >&2; exit 1; }

# Check: the generated package must not carry its own __init__.py (it would shadow the sources).
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -e "$site/lens_ros/__init__.py" ]; then
  echo "build_interfaces: $site/lens_ros/__init__.py exists and would shadow the sources" >&2
  exit 1
fi
