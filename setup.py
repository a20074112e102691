"""pip-installable lens_ros (for training/evaluation without ROS, and for the dev venv).

The ROS package (CMakeLists.txt + package.xml) installs the same Python package on a robot; this
file does not build the ROS interfaces (lens_ros.msg / lens_ros.action): see the Makefile.

Requirements are loose on purpose (Jetson or x86 + CUDA, ROS Humble/Jazzy/Kilted); exact versions
for development and CI live in constraints.txt (PIP_CONSTRAINT).

sam2 is NOT in install_requires: PyPI's sam2 is an sdist whose build step compiles a CUDA
extension and, with build isolation, installs its own torch. Install it after torch with
    SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0
(the CUDA extension only fills mask holes). The `sam2` extra below is for machines where a plain
`pip install sam2` is fine (a CUDA toolkit present and torch already installed).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "numpy>=1.24",
    "torch>=2.1",
    "torchvision>=0.16",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "huggingface_hub>=0.30",
    "pillow>=9",
    "opencv-python-headless>=4.8",
    "pyyaml",
    "tqdm",
    "hydra-core>=1.3",  # sam2's model configs
    "iopath>=0.1.10",  # sam2
]

EXTRAS_REQUIRE = {
    "train": ["trl>=1.0", "peft", "accelerate", "datasets"],
    "bags": ["rosbags", "mcap"],
    "test": ["pytest", "hypothesis", "pytest-timeout"],
    "sam2": ["sam2>=1.1.0"],  # see the module docstring for the dev/CPU way to install it
    # Acceleration (lens_ros.accel): ONNX export of the fixed-shape stages, and onnxruntime to run
    # them. A separate extra for onnxruntime because GPU machines install `onnxruntime-gpu` (the same
    # `onnxruntime` module) instead, and pip would put the CPU package beside it.
    "export": ["onnx>=1.16", "onnxscript>=0.2"],
    "onnxruntime": ["onnxruntime>=1.18"],
}

setup(
    name="lens_ros",
    version="0.1.0",
    description="LENS reasoning segmentation (Qwen2.5-VL + SAM2) for ROS 2 robots: "
    "language command -> mask -> grasp regions, with offline GRPO retraining",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lens_ros", "lens_ros.*"]),
    package_data={"lens_ros": ["data/*", "data/configs/*"]},
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "lens-segment=lens_ros.cli:segment_main",
            "lens-grasp=lens_ros.cli:grasp_main",
            "lens-make-tiny=lens_ros.cli:make_tiny_main",
            "lens-node=lens_ros.ros.node:main",
            "lens-make-synthetic=lens_ros.training.synthetic:main",
            "lens-train=lens_ros.training.cli:train_main",
            "lens-eval=lens_ros.training.evaluate:eval_main",
            "lens-episodes=lens_ros.episodes:main",
            "lens-export=lens_ros.accel.cli:export_main",
            "lens-track=lens_ros.tracking.cli:main",
        ],
    },
    zip_safe=False,
)
