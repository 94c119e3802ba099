"""A data owner answers the owner's profile and status queries without importing torch or transformers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_client_app_loads_no_torch():
    code = ("import sys, fl_offsite.app.client_app; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_both_queries_answer_in_a_fresh_process_without_torch(tmp_path, monkeypatch):
    from benchmarks import query_cost

    monkeypatch.setenv("FL_OFFSITE_CACHE", str(tmp_path / "cache"))
    query_cost.main(["--source", str(ROOT), "--repeats", "1", "--json", str(tmp_path / "q.json")])
    results = json.loads((tmp_path / "q.json").read_text())[str(ROOT)]
    assert set(results) == {"query.node_profile", "query.model_status"}
    assert all(row["heavy_imports"] == "" and row["median_cpu_s"] > 0 for row in results.values())
