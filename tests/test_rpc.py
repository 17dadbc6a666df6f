"""torch.distributed.rpc inside dl.launch: remote calls, async futures, an RRef passed around."""

import pytest

import distlab as dl
from distlab.communication import rpc

pytestmark = pytest.mark.skipif(not rpc.available(), reason="this torch build has no torch.distributed.rpc")


@pytest.mark.timeout(180)
def test_remote_calls_run_on_the_callee_and_an_rref_collects_every_ranks_update():
    run = dl.launch(rpc.demo, world_size=3, timeout=120, fresh=True)
    for rank, result in enumerate(run.results):
        assert result["callee"] == f"worker{(rank + 1) % 3}" and result["squared"] == (rank + 1) ** 2
        assert result["answers"] == ["worker0", "worker1", "worker2"]
    first = run.results[0]
    assert first["counter_owner"] == "worker2"
    assert first["total"] == first["here"] == 1 + 2 + 3 and first["calls"] == [0, 1, 2]

    with pytest.raises(dl.RankFailure, match="fresh=True"):  # the same warm processes cannot start RPC again
        dl.launch(rpc.demo, world_size=3, timeout=60)
