#!/usr/bin/env bash
# The GPU table of the README's Acceleration section, in one command (about 5 minutes on an H100/H200);
# or, with `learning`, the learning evidence of training/README.md (about 9 minutes).
#
#   bash bench/gpu.sh --prepare           # on a machine with pip and a network: the wheels a GPU machine lacks, into .whl/
#   bash bench/gpu.sh [OUT_DIR]           # on the GPU machine, from the repository root, .whl/ beside it
#   bash bench/gpu.sh learning [OUT_DIR]  # the same machine: lens_ros.bench.learning on the GPU, 8 minutes of budget
#
# It runs on the GPU machine's own PyTorch (CUDA; 2.11 + CUDA 13 on the lent H200, not our pin:
# too big to carry) with only small pure-Python wheels added: sam2 (built without its CUDA
# extension, which only fills mask holes), hydra-core, omegaconf, antlr4, iopath, and transformers
# at constraints.txt's version. The model is real size with random weights (Qwen2.5-VL-3B + SAM2
# Hiera-L, lens_ros.model.real_size) in bfloat16, answers forced to 25 tokens (box-only) and 200
# (chain of thought): what a command costs does not depend on the weights. Printed per stage for
# eager and compiled decoding, beside LENS's own two-pass path on the same frames; TensorRT is
# added where `import tensorrt` works. Then the tracker's time per frame (SAM2 Hiera-L, bf16).
# `learning` trains the benchmark's small random model through the format warm-up and LENS's two stages
# (trl's GRPOTrainer; trl, datasets, dill and multiprocess are carried too, and peft and accelerate at our
# pins) on the synthetic data set, and prints before/after box and mask IoU beside the expression-blind
# references.
# Everything is built from the repository alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.whl
pin() { grep -E "^$1==" constraints.txt; }

if [[ "${1:-}" == "--prepare" ]]; then
    PIP="${PIP:-.venv/bin/pip}"
    mkdir -p "$WHEELS" .git/info
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    SAM2_BUILD_CUDA=0 "$PIP" wheel -q --no-build-isolation --no-deps -w "$WHEELS" "$(pin sam2)"
    "$PIP" wheel -q --no-deps -w "$WHEELS" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin antlr4-python3-runtime)" \
        "$(pin iopath)" "$(pin transformers)" "$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin peft)" "$(pin accelerate)"
    # multiprocess has a wheel per Python version: the GPU machine's (3.12 on the lent ones).
    "$PIP" download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" -d "$WHEELS" "$(pin multiprocess)"
    ls -l "$WHEELS"
    exit 0
fi

MODE=pipeline
if [[ "${1:-}" == "learning" ]]; then MODE=learning; shift; fi
OUT="${1:-${OUT:-bench_gpu_out}}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lens_site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/lens_site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, sam2; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"
if [[ "$MODE" == learning ]]; then  # 8 minutes of budget, evaluations included; 4000 images for more data
    TQDM_DISABLE=1 timeout 560 python3 -m lens_ros.bench.learning --device cuda --minutes 8 --images 4000 \
        --out "$OUT/learning" 2>&1 | tee "$OUT/learning.txt"
    echo "==> before/after in $OUT/learning.txt, the curve in $OUT/learning/learning_curve.png"
    exit 0
fi
backends=torch
if python3 -c "import tensorrt" 2>/dev/null; then backends=torch,tensorrt; fi

bench() {  # real size, bf16, eager and compiled decoding, LENS's two-pass path beside
    python3 -m lens_ros.bench.pipeline --model real-size --device cuda --dtype bfloat16 --backend "$backends" \
        --compile --lens-two-pass --export-dir /tmp/lens_engines "$@"
}
timeout 200 bench --force-tokens 25 --runs 5 --warmup 2 2>&1 | tee "$OUT/box_only.txt"
timeout 200 bench --force-tokens 200 --runs 3 --warmup 1 2>&1 | tee "$OUT/cot.txt"
# Tracking at camera rate (lens_ros.tracking): SAM2 Hiera-L per frame, 1 and 4 objects, two camera sizes.
timeout 150 python3 -m lens_ros.bench.tracking --model real-size --device cuda --dtype bfloat16 --frames 40 2>&1 \
    | tee "$OUT/tracking.txt"
echo "==> tables in $OUT/box_only.txt, $OUT/cot.txt and $OUT/tracking.txt"
