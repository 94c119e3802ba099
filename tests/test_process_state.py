"""No hidden process state: seeds stay local, the client's cache is explicit and bounded, resume saves what is learned."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fl_offsite.app import node_cache
from fl_offsite.config.sections import LoraSpec, Tuning
from fl_offsite.config.settings import Settings
from fl_offsite.surgery.split import plan_split
from fl_offsite.surgery.tuning import apply_tuning
from fl_offsite.testing.flower import NoOwner
from fl_offsite.testing.models import tiny_model
from strategies.aggregation import aggregation_strategy
from strategies.offsite import LEARNED, OffsiteStrategy
from strategies.policy import Exchange, RoundPolicy
from strategies.sampling import seeded_global_random


@pytest.mark.parametrize("tuning", [Tuning("lora", LoraSpec()), Tuning("bottleneck", bottleneck_size=4)],
                         ids=["lora", "bottleneck"])
def test_adding_adapters_draws_the_same_weights_and_leaves_the_callers_generator_alone(tuning):
    full = tiny_model("gpt2")
    plan = plan_split(full, 1, 1, emulator_layers=2)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    first = {k: v.clone() for k, v in apply_tuning(tuning, full, plan, seed=3).state_dict().items()}
    assert torch.equal(torch.random.get_rng_state(), before)
    again = apply_tuning(tuning, tiny_model("gpt2"), plan, seed=3).state_dict()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_node_sampling_is_seeded_without_touching_the_global_random_stream():
    random.seed(3)
    expected = [random.random() for _ in range(2)]
    random.seed(3)
    with seeded_global_random(7):
        drawn = random.random()
    with seeded_global_random(7):
        assert random.random() == drawn
    assert [random.random() for _ in range(2)] == expected


def _strategy(name: str) -> OffsiteStrategy:
    settings = Settings.from_config({"strategy.name": name})
    return OffsiteStrategy(aggregation_strategy(settings.strategy, settings.dp, 4), NoOwner(), run=None,
                           policy=RoundPolicy(min_replies=1, seed=0, lr_at=lambda rnd: 1.0), exchange=Exchange({}))


@pytest.mark.parametrize("name, learned", [("fedadam", {"m_t", "v_t"}), ("fedavgm", {"momentum_vector"}),
                                           ("fedavg", set())])
def test_resume_state_is_what_the_strategy_learned_and_restores_exactly(name, learned):
    strategy = _strategy(name)
    for attribute in learned:
        setattr(strategy.inner, attribute, {"w": np.arange(3.0)})
    state = strategy.state()
    assert set(state) == learned and learned <= set(LEARNED)
    resumed = _strategy(name)
    resumed.restore({**state, "fraction_train": 0.5})  # other keys of an older checkpoint are ignored
    assert resumed.inner.fraction_train == 1.0
    for attribute in learned:
        assert getattr(resumed.inner, attribute) is state[attribute]


def test_the_node_cache_keeps_the_most_recent_example_sources_only(monkeypatch):
    calls = []
    monkeypatch.setattr(node_cache.NodeCache, "_partition", lambda self, source: calls.append(source.partition_id)
                        or [source])
    monkeypatch.setattr(node_cache, "_tokenized", lambda examples, tokenizer, max_length: examples)
    cache = node_cache.NodeCache(max_sources=2)
    data = Settings.from_config({}).data
    source = lambda pid: node_cache.ExampleSource(None, "bbc-news", 1, data, 4, pid, "digest")
    for pid in (0, 1, 0, 2, 1):
        assert cache.features(source(pid), tokenizer=None) == [source(pid)]
    assert calls == [0, 1, 2, 1]  # 0 was used again before 2 came, so 1 went first
