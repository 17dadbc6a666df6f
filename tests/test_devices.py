"""Where ranks run: the placement rule with the GPU count injected (CI has no GPU), the refusal of NCCL for
functions it cannot run, and the job's device as torch's default in a rank, undone after the job."""

from functools import partial

import pytest
import torch

import distlab as dl
from distlab import audit, data, gpt, models, ranks, worker
from distlab.architectures import parameter_server as ps
from distlab.communication import rpc


@pytest.fixture
def gpus(monkeypatch):
    def have(n: int) -> None:
        monkeypatch.setattr(ranks, "gpu_count", lambda: n)

    return have


def test_auto_picks_nccl_only_with_a_gpu_per_rank(gpus):
    gpus(4)
    assert ranks.place(4) == ranks.Placement("nccl", ("cuda:0", "cuda:1", "cuda:2", "cuda:3"), "one GPU per rank, NCCL")
    assert ranks.place(2, "gloo").devices == ("cuda:0", "cuda:1") and ranks.place(2, "gloo").backend == "gloo"
    gpus(2)
    shared = ranks.place(4)
    assert shared.backend == "gloo" and shared.devices == ("cuda:0", "cuda:1", "cuda:0", "cuda:1")
    assert "4 ranks sharing 2 GPU(s) over gloo" in shared.summary
    gpus(0)
    assert ranks.place(3) == ranks.Placement("gloo", ("cpu",) * 3, "CPU, gloo")
    with pytest.raises(ValueError, match="needs one GPU per rank: 3 ranks, 0 GPU"):
        ranks.place(3, "nccl")


def test_functions_nccl_cannot_run_get_gloo_over_the_gpus_and_refuse_nccl(gpus):
    gpus(4)
    for fn in (ps.train, ps.run, partial(ps.run, staleness=0), rpc.demo):
        reason = ranks.gloo_reason(fn)
        assert reason, fn
        placed = ranks.place(4, "auto", reason)
        assert placed.backend == "gloo" and placed.devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
        assert reason in placed.summary
        with pytest.raises(ValueError, match="backend='nccl' cannot run this function: .*backend='auto'"):
            ranks.place(4, "nccl", reason)
    assert ranks.gloo_reason(ps.ddp_train) is None
    assert "receives from any source" in ranks.gloo_reason(ps.train)


def test_launch_refuses_nccl_for_the_parameter_server_before_starting_ranks(gpus, tmp_path):
    gpus(2)
    with pytest.raises(ValueError, match="cannot run this function: a server receives from any source"):
        dl.launch(ps.train, world_size=2, backend="nccl", runs_root=str(tmp_path))
    assert not any(tmp_path.iterdir())  # refused before a run folder or a rank existed


def test_the_parameter_server_itself_names_the_way_out_when_wrapped():
    with pytest.raises(ValueError, match="needs backend='gloo' .*got 'nccl'.*needs_gloo"):
        ps.Config().check(3, "nccl")


def test_the_job_device_is_torch_default_and_is_undone_after(monkeypatch):
    fresh = worker.FreshState(torch.get_num_threads())
    try:
        assert worker.place_job(torch.device("meta")) == torch.device("meta")  # standing for a GPU
        assert torch.ones(1).device.type == "meta" and torch.get_default_device().type == "meta"
        # a CPU generator's draw (DistributedSampler's shuffle) is drawn on the CPU and moved to the job's device
        assert torch.randperm(6, generator=torch.Generator().manual_seed(0)).device.type == "meta"
        leaf = torch.randn(3, generator=torch.Generator(), device=None, requires_grad=True)
        assert leaf.device.type == "meta" and leaf.is_leaf and leaf.requires_grad
        on_cpu = torch.randperm(6, generator=torch.Generator().manual_seed(0), device="cpu")
        fresh.restore()
        assert on_cpu.tolist() == torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
        assert torch.get_default_device() == torch.device("cpu") and torch.ones(1).device.type == "cpu"
        monkeypatch.setenv(audit.ENV, "1")
        assert worker.place_job(torch.device("cpu")) == torch.device("cpu", 0)  # the audit's spelling
        monkeypatch.setenv(audit.ENV, "0")
        assert worker.place_job(torch.device("cpu")) == torch.device("cpu")
        assert torch.utils._device.CURRENT_DEVICE is None  # CPU: no default-device mode, no per-call cost
    finally:
        fresh.restore()


def test_models_and_data_draw_on_the_cpu_whatever_the_default_device():
    torch.manual_seed(0)
    reference = models.mlp(8, 4, 2)
    with torch.device("meta"):  # a default device with no values at all: everything must be drawn on the CPU
        torch.manual_seed(0)
        moved = models.mlp(8, 4, 2, device="cpu")
        x, y, x_test, _ = data.digits(1, 3, device="cpu")
        xb, yb = next(data.minibatches(x, y, 16, seed=2, rank=1))
    assert models.largest_difference(list(reference.parameters()), list(moved.parameters())) == 0
    x_ref, y_ref, x_test_ref, _ = data.digits(1, 3)
    xb_ref, yb_ref = next(data.minibatches(x_ref, y_ref, 16, seed=2, rank=1))
    assert torch.equal(x, x_ref) and torch.equal(x_test, x_test_ref)
    assert torch.equal(xb, xb_ref) and torch.equal(yb, yb_ref)


def test_the_launchs_tensor_arguments_arrive_on_the_jobs_device():
    config = ps.Config(steps=3)
    args = {"x": torch.ones(2), "pair": (torch.zeros(1), 3), "fed": [torch.ones(1)], "config": config,
            "cfg": gpt.GPTConfig()}
    moved = worker.on_device(args, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["pair"][0].device.type == "meta" and moved["pair"][1] == 3
    assert moved["fed"][0].device.type == "meta" and moved["config"] == config and moved["cfg"] == args["cfg"]
    assert args["x"].device.type == "cpu"  # the launcher's own objects are left as they were
