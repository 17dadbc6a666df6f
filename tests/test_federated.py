"""Federated aggregators against the papers' definitions on hand-made inputs; server optimizers
against their equations; data partitions and generators."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import trim_mean

from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.aggregation import (
    ServerOptimizer,
    aggregate,
    fedavg,
    krum,
    krum_scores,
    median,
    trimmed_mean,
)


def results_of(*points, counts=None):
    """One single-layer update per point, all with 10 examples unless counts says otherwise."""
    counts = counts or [10] * len(points)
    return [([torch.tensor(p, dtype=torch.float32)], n) for p, n in zip(points, counts)]


def test_fedavg_weights_each_update_by_its_example_count():
    out = fedavg(results_of([1.0, 2.0], [3.0, 4.0], counts=[1, 3]))
    assert torch.allclose(out[0], torch.tensor([2.5, 3.5]))


def test_aggregators_return_arrays_for_arrays_and_keep_every_layer():
    results = [([np.ones((2, 3)), np.full(4, float(k))], 5) for k in range(3)]
    out = fedavg(results)
    assert isinstance(out[0], np.ndarray) and out[0].shape == (2, 3) and np.allclose(out[1], 1.0)


def test_median_is_coordinatewise_and_ignores_one_huge_value():
    five = results_of([1.0, 10.0], [2.0, 20.0], [100.0, -50.0], [3.0, 30.0], [-50.0, 40.0])
    assert torch.equal(median(five)[0], torch.tensor([2.0, 20.0]))
    four = results_of([1.0], [2.0], [3.0], [100.0])
    assert median(four)[0].item() == 2.5  # an even count averages the two middle values, like numpy


def test_trimmed_mean_cuts_the_fraction_from_each_end_like_scipy():
    values = torch.randn(10, 7, generator=torch.Generator().manual_seed(0))
    results = [([v], 1) for v in values]
    for fraction in (0.0, 0.1, 0.2, 0.35):
        expected = trim_mean(values.numpy(), fraction, axis=0)
        assert np.allclose(trimmed_mean(results, fraction)[0].numpy(), expected, atol=1e-6)
    assert trimmed_mean(results_of([1.0], [2.0], [3.0], [4.0], [100.0]), 0.2)[0].item() == 3.0
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(results, 0.5)


def test_krum_scores_and_choices_match_a_hand_computation():
    # Five 2-D updates, f = 1: each score sums the squared distances to the n - f - 2 = 2 nearest others.
    results = results_of([0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0])
    assert krum_scores(results, 1).tolist() == [3.0, 2.0, 6.0, 3.0, 326.0]
    assert torch.equal(krum(results, 1)[0], torch.tensor([1.0, 0.0]))  # Krum: the lowest score
    multi = krum(results, 1, multi=3)[0]  # Multi-Krum: the mean of the 3 best (b, a, d)
    assert torch.allclose(multi, torch.tensor([2 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="num_malicious"):
        krum(results, 5)


def test_aggregate_dispatches_by_name_and_refuses_unknown_rules():
    results = results_of([1.0], [2.0], [9.0])
    assert aggregate(results, "median")[0].item() == 2.0
    with pytest.raises(ValueError, match="rule must be one of"):
        aggregate(results, "mean")


def test_server_sgd_with_lr_1_is_fedavg_and_adam_yogi_follow_reddi_et_al():
    params, deltas = [torch.tensor([0.0])], [torch.tensor([2.0]), torch.tensor([-1.0])]
    assert ServerOptimizer("sgd").step(params, deltas[:1])[0].item() == 2.0
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    for kind in ("adam", "yogi"):
        opt, w, m, v = ServerOptimizer(kind, lr, (b1, b2), tau), params, 0.0, tau ** 2
        expected = 0.0
        for d in deltas:
            w = opt.step(w, [d])
            g = d.item()
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g if kind == "adam" else v - (1 - b2) * g * g * math.copysign(1, v - g * g)
            expected += lr * m / (math.sqrt(v) + tau)
        assert math.isclose(w[0].item(), expected, rel_tol=1e-5), kind
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizer("rmsprop")


def covers_once(parts, n):
    joined = torch.cat(parts)
    return len(joined) == n and len(joined.unique()) == n


def labels_per_client(fed, share=0.9):
    """How many labels make up `share` of each client's data."""
    counts = fed.label_counts().float().sort(dim=1, descending=True).values
    cumulative = counts.cumsum(1) / counts.sum(1, keepdim=True)
    return (cumulative < share).sum(1) + 1


def test_partitions_split_every_example_once():
    labels = fd.digits(1).ys[0]
    for scheme in fd.SCHEMES:
        assert covers_once(fd.partition(labels, 10, scheme), len(labels)), scheme
    sizes = [len(p) for p in fd.partition(labels, 10, "iid")]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="scheme must be one of"):
        fd.partition(labels, 10, "random")


def test_shards_give_each_client_about_two_labels_and_dirichlet_alpha_sets_the_skew():
    assert (labels_per_client(fd.digits(10, "shards"), share=0.85) <= 2).all()  # a shard may straddle two labels
    assert (labels_per_client(fd.digits(10, "iid")) >= 9).all()
    skewed = labels_per_client(fd.digits(10, "dirichlet", alpha=0.1)).float().mean()
    mild = labels_per_client(fd.digits(10, "dirichlet", alpha=100.0)).float().mean()
    assert skewed < 5 < 8 < mild


def test_quantity_skew_changes_sizes_not_labels():
    fed = fd.digits(10, "quantity", alpha=0.5)
    assert max(fed.sizes) > 4 * min(fed.sizes)
    big = fed.label_counts()[int(torch.tensor(fed.sizes).argmax())]
    assert (big > 0).all()  # the largest client still sees every label


def test_synthetic_is_seeded_and_has_power_law_sizes():
    a, b = fd.synthetic(1, 1, num_clients=50, seed=3), fd.synthetic(1, 1, num_clients=50, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.xs, b.xs))
    sizes = torch.tensor(a.sizes)
    assert a.xs[0].shape[1] == 60 and a.num_classes == 10 and sizes.min() >= 40
    assert sizes.max() > 3 * sizes.median()  # a long tail
    # Model shift: with alpha = beta = 1 clients' label mixes differ much more than with alpha = beta = 0.
    def spread(fed):
        mix = fed.label_counts().float()
        mix = mix / mix.sum(1, keepdim=True)
        return (mix - mix.mean(0)).abs().sum(1).mean().item()
    assert spread(fd.synthetic(1, 1, 50)) > spread(fd.synthetic(0, 0, 50))


def test_hospitals_and_credit_applications():
    hospitals = fd.hospitals(4)
    assert sum(hospitals.sizes) + len(hospitals.y_test) == 569 and hospitals.num_clients == 4
    credit = fd.credit(num_banks=5, n=6000, fraud_rate=0.05)
    all_labels = torch.cat(credit.ys + [credit.y_test])
    assert len(all_labels) == 6000 and credit.num_classes == 2
    assert 0.04 < all_labels.float().mean().item() < 0.06  # imbalanced: about 5% fraud


def test_figures_have_one_trace_per_series_and_labelled_axes():
    import pandas as pd

    from distlab.viz import federated as viz

    feds = {"IID": fd.digits(5, "iid"), "shards": fd.digits(5, "shards")}
    labels = viz.label_distribution(feds)
    assert len(labels.data) == 2 * 10 and labels.layout.title.text and labels.layout.yaxis.title.text == "examples"
    assert labels.data[10].y == tuple(feds["shards"].label_counts()[:, 0].tolist())
    table = pd.DataFrame([{"attack": a, "attackers": s, "rule": r, "accuracy": 0.5}
                          for a in ("sign_flip", "scaled") for s in (0.0, 0.2) for r in ("fedavg", "median")])
    robust = viz.robustness_figure(table)
    assert len(robust.data) == 4 and all(len(t.x) == 2 for t in robust.data)
    assert robust.layout.xaxis.title.text == "% malicious clients"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_federated_digits_are_the_courses_split_the_training_images_dealt_out_and_the_test_set_whole(scheme):
    """Notebooks 05 and 12 (and the rest of the course) report accuracies on the same 359 test digits."""
    from distlab import data

    x, y, x_test, y_test = data.digits()
    fed = fd.digits(10, scheme)
    assert torch.equal(fed.x_test, x_test) and torch.equal(fed.y_test, y_test)
    assert sum(fed.sizes) == len(y) == 1438
    dealt = sorted(map(tuple, torch.cat(fed.xs).tolist()))
    assert dealt == sorted(map(tuple, x.tolist()))  # every training image once, no test image among them
