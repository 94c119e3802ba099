"""Per-round time of the same tiny job in Flower's deployment engine (loopback, TLS, node auth) and simulation.

Run by hand (about 3-4 minutes on 2 cores): ``.venv/bin/python scripts/round_time_deploy_vs_sim.py``.
Both runs: the tests' 6-block random Llama, 2 nodes, 2 rounds of 2 local steps x batch 4, server
evaluation on 6 examples. Deployment nodes train on their own 5-example JSONL files; simulated nodes
on their Dirichlet share of bbc-news (the same steps and batch size, so the same compute per round).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_deploy import federation, tiny_run_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fl_offsite.ops.deployment import run_app
from fl_offsite.ops.flower_app import app_dir
from fl_offsite.ops.simulation import run_simulation_app
from fl_offsite.testing.models import CORPUS, save_tiny_lm


def tiny_model(folder: Path) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    return save_tiny_lm(folder, fast)


def round_seconds(results: Path) -> list[float]:
    rounds = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    return [round(r["seconds"], 1) for r in rounds if r["round"] > 0]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="fl-offsite-round-time-"))
    os.environ["FL_OFFSITE_CACHE"] = str(root / "cache")
    model = tiny_model(root / "model")

    start = time.perf_counter()
    run_simulation_app(app_dir(), {**tiny_run_config(model, root / "sim"), "data.num-partitions": 2},
                       num_supernodes=2, stream=False)
    sim_wall = time.perf_counter() - start

    (root / "deploy").mkdir()
    with federation(root / "deploy", ["127.0.0.1", "localhost"], "--host", "127.0.0.1") as fed:
        for name in ("alice", "bob"):
            fed.owner(name)
        start = time.perf_counter()
        run_app(app_dir(), "fl-offsite-deploy", tiny_run_config(model, root / "deployed"), env=fed.env, stream=False)
        deploy_wall = time.perf_counter() - start

    print(f"simulation (Ray, 2 nodes):          run {sim_wall:5.1f} s, per round {round_seconds(root / 'sim')} s")
    print(f"deployment (TLS + auth, 2 nodes):   run {deploy_wall:5.1f} s, per round "
          f"{round_seconds(root / 'deployed')} s (SuperLink and SuperNodes already up)")
    print(f"load average at the end: {os.getloadavg()}; files in {root}")


if __name__ == "__main__":
    main()
