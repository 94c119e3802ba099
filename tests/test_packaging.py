"""The package as a user installs it: the package list, the Flower app an installed package lays out, and
(slow) a wheel installed in a fresh venv running a one-round simulation from outside the checkout."""
from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from fl_offsite.ops.flower_app import FLOWER_APP

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyprojects_flower_app_is_the_one_an_installed_package_lays_out():
    assert PYPROJECT["tool"]["flwr"]["app"] == FLOWER_APP


def test_every_package_folder_and_the_presets_ship():
    from setuptools import find_packages

    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert set(find_packages(str(ROOT), include=["fl_offsite*", "strategies*"])) | {"fl_offsite.simulations"} == listed
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"fl_offsite.simulations": "simulations"}


def _installed_copy(site: Path) -> None:
    """What a wheel installs: the two packages, the presets inside fl_offsite, no pyproject.toml beside them."""
    for package in ("fl_offsite", "strategies"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "simulations", site / "fl_offsite" / "simulations")


def _app_dir_of(site: Path, cache: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(site), "FL_OFFSITE_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", "from fl_offsite.ops.flower_app import app_dir; print(app_dir())"],
                            cwd=site, env=env, capture_output=True, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def test_an_installed_package_lays_out_a_flower_app_that_flower_builds(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    site, cache = tmp_path / "site", tmp_path / "cache"
    _installed_copy(site)
    app = _app_dir_of(site, cache)
    assert app.parent == cache / "flower-app" and app.name.startswith(importlib.metadata.version("fl-offsite"))
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    assert validate_config(pyproject, project_dir=app)[0]
    assert pyproject["tool"]["flwr"]["app"] == FLOWER_APP and pyproject["project"]["name"] == "fl-offsite"
    assert "Apache License" in (app / "LICENSE").read_text() and (app / "simulations" / "demo.toml").is_file()
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert "fl_offsite/app/client_app.py" in names and "LICENSE" in names
    assert not [n for n in names if n.startswith(("fl_offsite/cli/", "fl_offsite/simulations", "simulations/"))]

    assert _app_dir_of(site, cache) == app  # laid out once per version of the code
    with (site / "strategies" / "offsite.py").open("a") as changed:
        changed.write("\n# changed\n")
    assert _app_dir_of(site, cache) != app


def _console_scripts(bin_dir: Path, python: Path) -> None:
    """Flower's commands (the SuperLink starts its helpers by name) for the deps this venv borrows."""
    for entry in importlib.metadata.entry_points(group="console_scripts"):
        if entry.dist is not None and entry.dist.name in ("flwr", "ray") and not (bin_dir / entry.name).exists():
            module, _, attr = entry.value.partition(":")
            (bin_dir / entry.name).write_text(f"#!{python}\nimport sys\nfrom {module} import {attr} as main\n"
                                              "sys.exit(main())\n")
            (bin_dir / entry.name).chmod(0o755)


@pytest.mark.slow(seconds=50)
def test_a_wheel_in_a_fresh_venv_runs_a_one_round_simulation(tmp_path, tiny_lm_dir):
    """``pip install fl-offsite-*.whl`` (not editable), then ``fl-offsite simulate`` from another folder: the
    Flower app comes from the installed package. The dependencies are borrowed from this venv (a .pth file) to
    keep the test short; the closing note of the packaging issue has the full install with ``pip check``."""
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = dist.glob("fl_offsite-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _console_scripts(venv / "bin", python)

    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FL_OFFSITE_CACHE=str(tmp_path / "cache"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    where = subprocess.run([str(python), "-c", "import fl_offsite; print(fl_offsite.__file__)"], env=env, cwd=work,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where
    sets = {"model": tiny_lm_dir, "num-rounds": 1, "split.adapter-layers": "1,1", "split.emulator-layers": 2,
            "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64, "eval.limit": 6,
            "results.dir": "results"}
    result = subprocess.run([str(venv / "bin" / "fl-offsite"), "simulate", "--num-clients", "2",
                             "--cpus-per-client", str(os.cpu_count() or 1),  # one Ray actor for both nodes
                             *[item for key, value in sets.items() for item in ("--set", f"{key}={value}")]],
                            env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (work / "results" / "metrics.jsonl").is_file() and "results:" in result.stdout
    assert [p.name for p in (tmp_path / "cache" / "flower-app").iterdir() if p.is_dir()]
