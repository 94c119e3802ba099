"""Nothing a user produced is lost: atomic writes, a cut replacement recovered, folders fl-offsite did not write."""
from __future__ import annotations

import os

import pytest

from fl_offsite.cli.main import main
from fl_offsite.errors import UserError
from fl_offsite.files import MARKER, atomic_dir, check_replaceable, recover, write_atomic


def test_a_replacement_cut_between_its_renames_is_recovered(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic_dir(final) as tmp:
        (tmp / "state.json").write_text("round 3")
    os.replace(final, tmp_path / f".checkpoint.old-{os.getpid()}")  # what a kill after the first rename leaves
    recover(final)
    assert (final / "state.json").read_text() == "round 3"
    with atomic_dir(final) as tmp:  # a writer recovers it too, then replaces it
        (tmp / "state.json").write_text("round 4")
    assert (final / "state.json").read_text() == "round 4" and (final / MARKER).exists()
    assert not list(tmp_path.glob(".checkpoint.*"))


def test_written_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750


def test_a_folder_fl_offsite_did_not_write_is_not_replaced_without_overwrite(tmp_path, tiny_lm_dir, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(UserError, match="not written by fl-offsite"):
        check_replaceable(mine, overwrite=False)
    code = main(["split", str(tiny_lm_dir), "--adapter-layers", "1,1", "--emulator-layers", "2", "--out", str(mine)])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (mine / "chapter1.tex").read_text() == "years of work"
    out = tmp_path / "split"
    for _ in range(2):  # fl-offsite's own folder is replaced without asking
        assert main(["split", str(tiny_lm_dir), "--adapter-layers", "1,1", "--emulator-layers", "2",
                     "--out", str(out)]) == 0
    check_replaceable(tmp_path / "absent", overwrite=False)
    check_replaceable(mine, overwrite=True)


def test_strategy_state_is_stored_without_pickle_and_read_back(tmp_path):
    import numpy as np
    import torch
    from flwr.app import ArrayRecord

    from fl_offsite.run.folder import Checkpoint, RunFolder

    state = {"current_arrays": ArrayRecord({"w": torch.ones(3)}), "m_t": {"w": np.full(3, 0.5)},
             "momentum_vector": [np.arange(4.0)], "__privacy_accountant__": {"orders": [1.5, 2.0], "steps": 3},
             "__realignment__": {2: {"0.q.lora_A.weight": torch.zeros(2, 2)}}}
    run = RunFolder(tmp_path / "run")
    run.save_checkpoint(Checkpoint(4, {"a": torch.ones(2)}, state))
    assert not list((tmp_path / "run" / "checkpoint").glob("*.pkl"))
    back = run.load_checkpoint()
    assert back.round == 4 and back.strategy_state["__privacy_accountant__"] == state["__privacy_accountant__"]
    assert torch.equal(back.strategy_state["current_arrays"].to_torch_state_dict()["w"], torch.ones(3))
    assert np.array_equal(back.strategy_state["m_t"]["w"], np.full(3, 0.5))
    assert np.array_equal(back.strategy_state["momentum_vector"][0], np.arange(4.0))
    assert torch.equal(back.strategy_state["__realignment__"][2]["0.q.lora_A.weight"], torch.zeros(2, 2))
    (tmp_path / "run" / "checkpoint" / "strategy.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(UserError, match="pickled its strategy state"):
        run.load_checkpoint()


def test_a_results_dir_that_holds_other_files_or_another_run_in_progress_is_refused(tiny_lm_dir, tmp_path):
    from fl_offsite.files import locked
    from fl_offsite.testing.flower import run, tiny_config

    home = tmp_path / "home"
    home.mkdir()
    (home / "README.md").write_text("my notes")  # a name a run folder also uses
    with pytest.raises(UserError, match="not empty and holds no fl-offsite run"):
        run(tiny_config(tiny_lm_dir, home, **{"num-rounds": 1}), num_nodes=2)
    assert (home / "README.md").read_text() == "my notes"
    busy = tmp_path / "busy"
    with locked(busy, "a test"), pytest.raises(UserError, match="in use by another run"):
        run(tiny_config(tiny_lm_dir, busy, **{"num-rounds": 1}), num_nodes=2)
