#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md and a check of the CUDA training path, in one call of about 9 minutes on one
# H100-class GPU. Two steps:
#
#   bash scripts/gpu_check.sh prepare   here, with network access: writes .whl/ (the Python packages a GPU image may
#                                       lack or hold too old, for Python 3.12) and, when
#                                       PCAA_ORIGINAL_REPO names a checkout of lsa1997/PCAA, copies its code to
#                                       .original/ (both git-ignored; carry them to the GPU machine)
#   bash scripts/gpu_check.sh run       on the GPU machine, from the checkout (python3 with a CUDA build of torch):
#                                       installs .whl/ into a private folder (pcaa_hf itself is imported from the
#                                       checkout), then measures and checks; figures and logs go to $OUT (default
#                                       gpu_results/)
#
# `run` measures, each step under its own time limit so that one slow step cannot eat the others' time:
#   1. inference and training steps of R50 and R101 at 512x512 and 768x768 (the paper's ADE20K and Cityscapes crops),
#      2 images, float32 (TF32 convolutions, torch's default) and bfloat16 autocast, peak memory, the authors' model
#      beside ours when .original/ is there;
#   2. torch.compile off and on for the Cityscapes size under bfloat16;
#   3. the CUDA training path: bfloat16 autocast, checkpoints and an exact-enough resume; SyncBatchNorm across two
#      processes where the machine has two GPUs (tests/test_training.py -k cuda).
# The limits below (240 + 180 + 120 s) keep the whole call within 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=3.12
# Versions of this project's environment (scripts/setup_env.sh) that GPU images are likely to lack: transformers 5.2x
# and its Hub client, the data and metric libraries, and their pure-Python needs.
WHEELS=(
    transformers==5.25.0 huggingface_hub==2.5.0 httpx2==2.17.0 httpcore2==2.17.0 truststore idna==3.21 hf-xet==1.8.0
    click==8.5.1 kernels==0.19.1 tomlkit tokenizers==0.23.3 regex==2026.12.2 accelerate==1.16.0 datasets==5.2.0
    evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 safetensors==0.8.0
)

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    rm -rf .whl && mkdir -p .whl
    $python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || return 1
    if [ -n "${PCAA_ORIGINAL_REPO:-}" ]; then
        rm -rf .original && mkdir -p .original
        cp -r "$PCAA_ORIGINAL_REPO"/{networks,loss,utils} .original/
    fi
    du -sh .whl .original 2>/dev/null
    echo "Carry .whl (and .original) to the GPU machine and run: bash scripts/gpu_check.sh run"
}

run() {
    local python=${PYTHON:-python3} out=${OUT:-gpu_results} status=0
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" > /dev/null; then
        $python -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/pcaa_site .whl/*.whl || return 1
    fi
    export PYTHONPATH="$PWD:/tmp/pcaa_site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    local original=()
    [ -f .original/networks/caanet.py ] && original=(--original .original)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    $python -c "import torch, transformers, accelerate, datasets, evaluate, pcaa_hf; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt" || return 1
    local models=(--sections limit model --device cuda --depths 50 101 --batch_sizes 2 --channels_last off
                  --checkpointing off)
    timeout 240 $python scripts/benchmark.py "${models[@]}" --tasks inference training --sizes 512 768 \
        --dtypes float32 bfloat16 --compile off "${original[@]}" --output "$out/eager.json" 2>&1 \
        | tee "$out/eager.log" || status=1
    timeout 180 $python scripts/benchmark.py "${models[@]}" --tasks inference training --sizes 768 \
        --dtypes bfloat16 --compile on --output "$out/compiled.json" 2>&1 | tee "$out/compiled.log" || status=1
    # SIGINT: pytest stops its test, whose runs (in sessions of their own) are stopped with it.
    timeout -s INT 120 $python -m pytest -q -p no:cacheprovider tests/test_training.py -k cuda -rs 2>&1 \
        | tee "$out/training.log" || status=1
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash scripts/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
