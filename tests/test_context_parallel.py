"""Context parallelism on real gloo ranks: ring attention (contiguous and zig-zag) and Ulysses equal full
attention in output and gradients; bytes sent equal the formulas; zig-zag balances the causal work."""

import pytest
import torch

import distlab as dl
from distlab.parallel import context_parallel as cp


def test_merging_two_blocks_equals_attention_over_both():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator) for _ in range(3))
    k2, v2 = 30 * torch.randn(2, 3, 7, 8, generator=generator), torch.randn(2, 3, 7, 8, generator=generator)
    merged, lse = cp.merge(*cp.block_attention(q, k, v, False), *cp.block_attention(q, k2, v2, False))
    whole, whole_lse = cp.block_attention(q, torch.cat([k, k2], -2), torch.cat([v, v2], -2), False)
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=1e-5)


def test_zigzag_positions_cover_the_sequence_once():
    held = torch.cat([cp.positions(r, 4, 32, "zigzag") for r in range(4)])
    assert sorted(held.tolist()) == list(range(32))
    assert cp.positions(1, 4, 32, "zigzag").tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
    assert cp.positions(1, 4, 32).tolist() == list(range(8, 16))


def assert_equals_full_attention(results, seq_len=64):
    full = cp.full_step(seq_len=seq_len)
    for r in results:
        torch.testing.assert_close(r["out"], full["out"][:, r["positions"]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r["dx"], full["dx"][:, r["positions"]], atol=1e-4, rtol=1e-4)
        for name, g in full["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [4, 2])
def test_ring_and_ulysses_equal_full_attention_and_send_the_predicted_bytes(world_size):
    for method, layout in [("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous")]:
        run = dl.launch(cp.attention_step, world_size=world_size, method=method, layout=layout, timeout=60)
        assert_equals_full_attention(run.results)
        for r in run.results:
            assert r["sent"] == cp.predicted_bytes(method, world_size, r["local_bytes"]), (method, layout)


@pytest.mark.timeout(60)
def test_causal_work_grows_with_the_rank_unless_the_split_is_zigzag():
    contiguous = dl.launch(cp.attention_step, world_size=4, layout="contiguous", timeout=60).results
    zigzag = dl.launch(cp.attention_step, world_size=4, layout="zigzag", timeout=60).results
    block = 2 * 4 * 8 * 8  # batch x heads x (t/2N)^2: one block of scores
    assert [r["work"]["forward"] for r in contiguous] == [(4 * rank + 3) * block for rank in range(4)]
    assert [r["work"]["forward"] for r in zigzag] == [(2 * 4 + 1) * block] * 4
    assert all(r["work"]["backward"] == r["work"]["forward"] for r in contiguous + zigzag)


def test_bad_layout_and_method_are_named():
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.chunks_of(0, 2, "spiral")
    with pytest.raises(ValueError, match="method must be one of"):
        cp.SequenceParallelAttention(cp.attention_setup()[0], cp.Ring(0, 2), "star")
