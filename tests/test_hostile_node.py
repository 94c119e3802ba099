"""The model owner refuses what a hostile data owner's node could send, for that node only; the run goes on."""
from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fl_offsite.app import wire
from fl_offsite.app.profile import NodeProfile
from fl_offsite.testing.flower import of_type, rounds_of, run, tiny_config

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("record", [{"memory-budget-mb": float("nan")}, {"memory-budget-mb": -5.0},
                                    {"emulator-layers": "8"}, {"emulator-layers": 10**9}, {"emulator-layers": 2.5}])
def test_a_profile_of_the_wrong_type_or_range_is_refused(record):
    with pytest.raises(wire.BadMessage):
        NodeProfile.from_record(record)


def test_a_malformed_profile_leaves_that_node_out_and_the_run_goes_on(tiny_lm_dir, tmp_path):
    def malformed_profile(msg, node_index):
        if msg.metadata.message_type == "query.node_profile" and node_index == 0:
            return Message(RecordDict({"profile": ConfigRecord({"emulator-layers": "all of them"})}), reply_to=msg)
        return None

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    grid = run(config, num_nodes=3, fault=malformed_profile)
    trained = {m.metadata.dst_node_id for m in of_type(grid, "train")}
    assert trained == set(grid.node_ids[1:])  # node 0 got no model and no round
    assert len(rounds_of(tmp_path / "run")[-1]["clients"]) == 2
