"""Publish/subscribe over a ZeroMQ broker: the guarantees the notebook states, checked on real ranks."""

from collections import defaultdict

import pytest

import distlab as dl
from distlab.communication import pubsub

MESSAGES = 150


@pytest.fixture(scope="module")
def broker():
    with pubsub.Broker() as b:
        yield b


def by_publisher(got):
    seqs = defaultdict(list)
    for topic, publisher, seq, _ in got:
        seqs[(topic, publisher)].append(seq)
    return seqs


@pytest.mark.timeout(120)
def test_after_the_handshake_each_message_arrives_once_in_publish_order_on_subscribed_topics_only(broker):
    run = dl.launch(pubsub.exchange, world_size=3, publish_address=broker.publish_address,
                    subscribe_address=broker.subscribe_address, messages=MESSAGES, timeout=60)
    for rank, got in enumerate(run.results):
        seqs = by_publisher(got)
        left = (rank - 1) % 3
        assert set(seqs) == {("metrics", 0), ("metrics", 1), ("metrics", 2), (f"grad/{left}", left)}
        for key, received in seqs.items():  # a publisher numbers "metrics" and "grad" messages alternately
            offset = 0 if key[0] == "metrics" else 1
            assert received == list(range(offset, 2 * MESSAGES, 2)), key  # none lost, none twice, in order


@pytest.mark.timeout(120)
def test_without_the_handshake_messages_may_be_lost_but_never_duplicated_or_reordered(broker):
    run = dl.launch(pubsub.exchange, world_size=3, publish_address=broker.publish_address,
                    subscribe_address=broker.subscribe_address, messages=MESSAGES, greet=False, timeout=60)
    for got in run.results:
        for received in by_publisher(got).values():
            assert received == sorted(set(received))  # at most once, per-publisher FIFO
            assert len(received) <= MESSAGES


@pytest.mark.timeout(120)
def test_publishing_does_not_wait_for_a_late_rank_but_a_collective_does(broker):
    run = dl.launch(pubsub.coupling, world_size=3, publish_address=broker.publish_address,
                    subscribe_address=broker.subscribe_address, delay=1.0, late_rank=0, timeout=60)
    for rank, result in enumerate(run.results):
        assert result["publish_seconds"] < 0.3
        if rank != 0:
            assert result["all_reduce_seconds"] > 0.7  # waited for rank 0
