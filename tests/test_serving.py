"""Serving: the KV cache, continuous batching, the paged cache and tensor-parallel decoding give exactly the
tokens of plain greedy decoding, and each does the work its design says (positions per step, joins and
leaves, blocks held, all-reduces per step)."""

import pytest
import torch

import distlab as dl
from distlab.parallel import serving as sv


@pytest.fixture(scope="module")
def model():
    return sv.serving_model()


@pytest.fixture(scope="module")
def stream():
    return sv.request_stream(10, prompt_lengths=(4, 40), new_tokens=(1, 30), seed=3)


def no_cache_tokens(model, stream):
    return {r.id: sv.greedy_no_cache(model, r.prompt, r.new_tokens).tokens.tolist() for r in stream}


@pytest.fixture(scope="module")
def expected(model, stream):
    """Each request's tokens from plain greedy decoding, one request at a time: what every server must give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return no_cache_tokens(model, stream)
    finally:
        torch.set_num_threads(threads)


def test_cached_decoding_gives_the_tokens_and_logits_of_decoding_without_a_cache(model, one_torch_thread):
    for r in sv.request_stream(3, seed=1):
        plain, cached = sv.greedy_no_cache(model, r.prompt, 40), sv.greedy_cached(model, r.prompt, 40)
        assert cached.tokens.tolist() == plain.tokens.tolist()
        assert len(cached.seconds) == 40 and cached.prefill_s > 0
    cache, ids = sv.cache_for(model), sv.request_stream(1)[0].prompt[None]
    with torch.no_grad():  # prefill, then one decode step: the logits of the full forward at those positions
        full = model(torch.cat([ids, torch.tensor([[7]])], dim=1))
        torch.testing.assert_close(sv.extend(model, cache, [0], ids), full[:, -2], atol=1e-5, rtol=0)
        torch.testing.assert_close(sv.extend(model, cache, [0], torch.tensor([[7]])), full[:, -1], atol=1e-5, rtol=0)
    assert cache.lengths == [ids.size(1) + 1]


def positions_per_call(model, generate, prompt, new_tokens):
    """How many positions each forward ran (the embedding sees every one): the work of each token."""
    seen = []
    hook = model[0].tok.register_forward_hook(lambda module, args, out: seen.append(args[0].size(1)))
    try:
        generate(model, prompt, new_tokens)
    finally:
        hook.remove()
    return seen


def test_with_the_cache_a_decode_step_runs_one_position_without_it_the_whole_sequence(model):
    prompt = torch.arange(5, 17)
    assert positions_per_call(model, sv.greedy_no_cache, prompt, 6) == [12, 13, 14, 15, 16, 17]
    assert positions_per_call(model, sv.greedy_cached, prompt, 6) == [12, 1, 1, 1, 1, 1]  # prefill, then decode


def test_the_paged_cache_reads_back_what_the_contiguous_cache_holds(model, one_torch_thread):
    contiguous, paged = sv.cache_for(model, slots=3), sv.cache_for(model, slots=3, paged=True, block=4)
    g = torch.Generator().manual_seed(0)
    for slot, length in [(0, 9), (2, 3), (1, 14), (0, 1)]:
        k, v = (torch.randn(1, 4, length, 16, generator=g) for _ in range(2))
        start = contiguous.lengths[slot]
        positions = torch.arange(start, start + length)[None]
        for cache in (contiguous, paged):
            cache.reserve(slot, start + length)
            cache.write(0, torch.tensor([slot]), positions, k, v)
            cache.lengths[slot] += length
    slots = torch.tensor([0, 1, 2])
    for a, b in zip(contiguous.read(0, slots, 14), paged.read(0, slots, 14)):
        for s, length in enumerate([10, 14, 3]):
            torch.testing.assert_close(a[s, :, :length], b[s, :, :length], atol=0, rtol=0)
    assert [len(t) for t in paged.tables] == [3, 4, 1]  # ceil(10/4), ceil(14/4), ceil(3/4) blocks
    assert paged.reserved_positions() == 32 and contiguous.reserved_positions() == 3 * 128
    paged.free(1)
    assert paged.tables[1] == [] and len(paged.free_blocks) == paged.k.shape[1] - 4


def test_a_paged_cache_out_of_blocks_says_so(model):
    cache = sv.cache_for(model, slots=2, paged=True, block=4, blocks=3)
    cache.reserve(0, 8)
    with pytest.raises(RuntimeError, match="out of KV blocks: all 3"):
        cache.reserve(1, 5)
    with pytest.raises(ValueError, match="block_size=128"):
        cache.reserve(0, 129)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_continuous_batching_gives_every_request_its_one_at_a_time_tokens(model, stream, expected, paged,
                                                                         one_torch_thread):
    result = sv.serve_batched(model, stream, max_batch=4, paged=paged)
    assert {s.id: s.tokens for s in result["served"]} == expected
    steps = result["steps"]
    assert sum(s["joined"] for s in steps) == sum(s["left"] for s in steps) == len(stream)
    assert max(s["batch"] for s in steps) == 4  # the batch fills up to max_batch ...
    assert any(s["joined"] and s["step"] > 0 for s in steps)  # ... and requests join as others leave
    assert all(s["reserved"] >= s["used"] for s in steps)
    if paged:  # a block of 8 positions at most is held beyond what each running sequence uses
        assert all(s["reserved"] - s["used"] < 8 * 4 for s in steps)


def test_requests_arriving_later_join_a_running_batch(model, one_torch_thread):
    stream = sv.request_stream(6, rate=40.0, prompt_lengths=(4, 8), new_tokens=(20, 30), seed=2)
    assert stream[0].arrival == 0 and all(a.arrival < b.arrival for a, b in zip(stream, stream[1:]))
    result = sv.serve_batched(model, stream, max_batch=6)
    assert {s.id: s.tokens for s in result["served"]} == no_cache_tokens(model, stream)
    assert all(s.first_token >= s.arrival for s in result["served"])


@pytest.mark.parametrize("mode", sv.MODES)
def test_every_mode_serves_the_same_tokens(model, stream, expected, mode, one_torch_thread):
    result = sv.serve(model, stream, mode, max_batch=3)
    assert {s.id: s.tokens for s in result["served"]} == expected
    m = sv.metrics(result["served"])
    assert m["ttft_p50_ms"] <= m["latency_p50_ms"] and m["latency_p50_ms"] <= m["latency_p95_ms"]
    assert m["tokens_per_s"] > 0


def test_metrics_from_known_records():
    served = [sv.Served(i, arrival=0.0, first_token=0.1 * (i + 1), finished=1.0 * (i + 1), prefill_s=0.01,
                        tokens=[0] * 5) for i in range(4)]
    m = sv.metrics(served)
    assert m["tokens_per_s"] == 20 / 4.0  # 20 tokens from the first arrival (0 s) to the last finish (4 s)
    assert m["latency_p50_ms"] == pytest.approx(2500.0) and m["latency_p95_ms"] == pytest.approx(3850.0)
    assert m["ttft_p50_ms"] == pytest.approx(250.0) and m["prefill_ms"] == pytest.approx(10.0)


def test_bad_arguments_are_refused_by_name(model, stream):
    with pytest.raises(ValueError, match="mode='beam'"):
        sv.serve(model, stream, "beam")
    with pytest.raises(ValueError, match="rate=0"):
        sv.request_stream(3, rate=0)
    with pytest.raises(ValueError, match="max_batch=0"):
        sv.serve_batched(model, stream, max_batch=0)


@pytest.mark.timeout(120)
def test_tensor_parallel_decoding_on_two_ranks_gives_one_process_tokens(stream, expected):
    n = len(stream)
    results = dl.launch(sv.serve_tensor_parallel, world_size=2, timeout=90, stream=stream, max_batch=4).results
    cfg = sv.SERVING_CFG
    for r in results:
        assert {s.id: s.tokens for s in r["served"]} == expected
        assert r["heads"] == cfg.n_head // 2
        decode_steps = sum(1 for s in r["steps"] if s["batch"])
        assert r["all_reduces"] == 2 * cfg.n_layer * (n + decode_steps)  # attention + MLP, per block, per forward
    batches = [[(s["batch"], s["joined"], s["left"]) for s in r["steps"]] for r in results]
    assert batches[0] == batches[1]  # rank 0's admissions, broadcast: both ranks ran the same batches


def test_tensor_parallel_decoding_on_ranks_that_split_no_heads_evenly_is_refused_before_launching(tmp_path):
    with pytest.raises(dl.WorldSizeError, match=r"serve_tensor_parallel cannot run on 3 rank\(s\).* on: 1, 2, 4\."):
        dl.launch(sv.serve_tensor_parallel, world_size=3, runs_root=str(tmp_path))
    assert not any(tmp_path.iterdir())
