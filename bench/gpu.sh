#!/usr/bin/env bash
# The one prepared GPU run (issue 15): at most ~8 minutes on a lent GPU machine.
#
# That machine has python3 with torch/torchvision but not pydantic (nor Ray: its wheel is
# over the 64 MiB that may travel, so bench/gpu.py measures the evaluator without Ray).
# Prepare the wheels here once, then run this script there with `.whl` carried:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic pydantic-core annotated-types typing-inspection
#   # device run (carry [".whl"]):  bash bench/gpu.sh
#
# It prints the card, then candidates/s of the CPU evaluator and of the GPU evaluator at
# float32 / bfloat16 / float16 (with how far each precision's accuracies move), on 32x32
# inputs and on 224x224 ones.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 200 python3 bench/gpu.py --ingredients 16 --val 4096 --candidates 32 --cpu-candidates 2
timeout 240 python3 bench/gpu.py --ingredients 16 --val 1024 --candidates 16 --cpu-candidates 1 --image-size 224 --batch-size 256 --shard-size 256
