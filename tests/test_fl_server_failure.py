"""The federated server is a single point of failure (notebook 05): when it dies mid-round every client learns it
from a clear error within seconds, and a server that checkpoints each round resumes where it stopped."""
from __future__ import annotations

import pytest

import distlab as dl
from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.processes import train_federated
from distlab.architectures.federated.simulation import Config, largest_difference, simulate

FED = fd.digits(4, "iid")
CONFIG = Config(rounds=4, epochs=1, batch_size=32, lr=0.1, server="adam", server_lr=0.03)
DIES_IN = 2  # the server dies in round index 2 (the third round), after the round's first update arrived


@pytest.mark.timeout(120)
def test_a_dead_server_fails_every_client_and_a_checkpointed_run_resumes_from_the_last_round(no_ranks_left):
    run = dl.launch(train_federated, world_size=3, fed=FED, config=CONFIG, checkpoint=True, restarts=1,
                    faults={"kill_at": {0: DIES_IN}}, timeout=90, fresh=True)
    dl.shutdown()
    assert run.config["restarts"] == [{"attempt": 0, "failed_rank": 0}]  # the server died, nobody else first
    metrics = run.metrics
    lost = metrics[metrics.get("server_lost", 0) == 1]
    assert sorted(lost["rank"]) == [1, 2] and set(lost["step"]) == {DIES_IN + 1}  # each client, in that round
    for rank, row in lost.set_index("rank").iterrows():  # within seconds of its last round, not gloo's 30 minutes
        before = metrics[(metrics["rank"] == rank) & (metrics["step"] == DIES_IN) & (metrics["t"] < row["t"])]
        assert row["t"] - before["t"].max() < 20
    logs = "".join((run.dir / "logs" / f"rank{r}.log").read_text() for r in (1, 2))
    assert logs.count(f"lost the server (rank 0) in round {DIES_IN + 1}") == 2
    server = metrics[metrics["rank"] == 0].dropna(subset=["accuracy"])
    resumed = server[server["attempt"] == 1]
    assert resumed["step"].tolist() == list(range(DIES_IN + 1, CONFIG.rounds + 1))  # from the last checkpoint on
    assert largest_difference(run.results[0], simulate(FED, CONFIG).params) < 1e-5  # as if it had never died
