"""make's installer hands uv the pip settings that choose packages, with pip's precedence, and falls back to
pip where the venv has no uv."""
from __future__ import annotations

from pathlib import Path

from fl_offsite.ops import install

LISTED = """global.cert='/etc/ssl/certs/ca.crt'
global.find-links='/opt/wheels'
global.index-url='https://mirror.example/simple'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.timeout='60'
download.find-links='/elsewhere'
install.constraint='/etc/pip/constraints.txt'
:env:.find-links='/env/wheels'
"""


def fake_venv(tmp_path: Path, with_uv: bool) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    names = ["pip", "uv"] if with_uv else ["pip"]
    for name in names:  # each prints its arguments; pip config list prints LISTED
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\nif [ \"$1 $2\" = 'config list' ]; then cat <<'X'\n{LISTED}X\n"
                          f"else echo {name} \"$@\" > {tmp_path}/called; fi\n")
        script.chmod(0o755)
    return tmp_path / "venv"


def test_uv_gets_pips_indexes_links_constraints_and_certificate(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, with_uv=True)
    command, env = install.uv_command(venv, ["-e", "."])
    assert command[:3] == [str(venv / "bin" / "uv"), "pip", "install"] and command[-2:] == ["-e", "."]
    pairs = list(zip(command, command[1:], strict=False))
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert {("--extra-index-url", f"file:///opt/{x}/simple") for x in "ab"} <= set(pairs)
    assert ("--find-links", "/env/wheels") in pairs and "/opt/wheels" not in command  # the environment wins
    assert "/elsewhere" not in command  # pip download's own setting
    assert ("--constraint", "/etc/pip/constraints.txt") in pairs
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip's choice: the best match over all indexes
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca.crt"


def test_without_uv_pip_installs(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, with_uv=False)
    assert install.main([str(venv), "-e", "."]) == 0
    called = (tmp_path / "called").read_text().split()
    assert called[:2] == ["pip", "install"] and called[-2:] == ["-e", "."] and "--no-compile" in called
