#!/usr/bin/env bash
# Rebuild a compiled ROS 2 interface wheel (msg/srv/action only) against the ROS distro of another
# venv, and install it into that venv's prefix. The interface wheels beside the repository
# (../shared/wheels/ros2-cli: composition_interfaces, vision_msgs) are built against Kilted's
# libraries; in the Jazzy venv their typesupport fails to load (undefined Fast CDR symbols). Their
# definitions are in the wheel (share/<pkg>/{msg,srv,action}, package.xml), so this builds them
# again with the venv's rosidl, as `colcon build` would from the package's sources.
#
# Usage: scripts/build_interfaces_from_wheel.sh VENV WHEEL BUILD_DIR
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(cd "$1" && pwd)"
wheel="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
build="$3"
py="$venv/bin/python"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

# The package's files, as the wheel installs them: <dist>.data/data/share/<pkg>/.
rm -rf "$build" && mkdir -p "$build/src"
pkg="$("$py" - "$wheel" "$build/src" <<'PY'
import os, re, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    xmls = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.data/data/share/[^/]+/package\.xml", n)]
    if len(xmls) != 1:
        sys.exit(f"{wheel}: expected one share/<pkg>/package.xml, found {len(xmls)}")
    share = xmls[0][: -len("package.xml")]
    pkg = share.rstrip("/").rsplit("/", 1)[1]
    for name in zf.namelist():
        rel = name[len(share):]
        if name.startswith(share) and (rel == "package.xml" or re.fullmatch(r"(msg|srv|action)/\w+\.(msg|srv|action)", rel)):
            os.makedirs(os.path.dirname(f"{dest}/{pkg}/{rel}"), exist_ok=True)
            with open(f"{dest}/{pkg}/{rel}", "wb") as out:
                out.write(zf.read(name))
    print(pkg)
PY
)"
src="$build/src/$pkg"
interfaces="$(cd "$src" && shopt -s nullglob && echo msg/*.msg srv/*.srv action/*.action)"
[ -n "$interfaces" ] || { echo "build_interfaces_from_wheel: no msg/srv/action files in $wheel" >&2; exit 1; }
# Interface packages this one uses: its <depend> and <build_depend> entries.
deps="$(sed -n 's:.*<\(build_\)\{0,1\}depend>\(.*\)</\(build_\)\{0,1\}depend>.*:\2:p' "$src/package.xml" | tr '\n' ' ')"
cat > "$src/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.16)
project($pkg)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
foreach(_dep $deps)
  find_package(\${_dep} REQUIRED)
endforeach()
rosidl_generate_interfaces(\${PROJECT_NAME} $interfaces DEPENDENCIES $deps)
include("$repo/cmake/fix_wheel_include_dirs.cmake")
lens_ros_fix_wheel_include_dirs()
ament_export_dependencies(rosidl_default_runtime)
ament_package()
CMAKE

export CMAKE_PREFIX_PATH="$venv" AMENT_PREFIX_PATH="$venv"
unset PYTHONPATH PYTHONHOME
echo "    $pkg ($(echo $interfaces | wc -w) interfaces): cmake ($build)"
cmake -S "$src" -B "$build/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$venv" \
  -DPython3_EXECUTABLE="$py" -DPython3_FIND_VIRTUALENV=ONLY -DBUILD_TESTING=OFF \
  -DCMAKE_INSTALL_RPATH="$venv/lib" -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON \
  >"$build/configure.log" 2>&1 || { tail -n 40 "$build/configure.log" >&2; exit 1; }
cmake --build "$build/build" -j "$jobs" >"$build/build.log" 2>&1 || { tail -n 60 "$build/build.log" >&2; exit 1; }
cmake --install "$build/build" >"$build/install.log" 2>&1 || { tail -n 40 "$build/install.log" >&2; exit 1; }
"$py" -c "import $pkg.${interfaces%%/*}"
