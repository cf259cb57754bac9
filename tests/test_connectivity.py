"""Linear mode connectivity: exact cases (identical endpoints, convex quadratic, permuted copies),
BatchNorm re-estimation against a manual computation, integer buffers, layer-wise barriers, and a
real pair of MLPs trained on digits from different seeds."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope.probes as probes
from dynascope.datasets import as_batches
from dynascope.models import build
from dynascope.probes.alignment import apply_permutations, random_permutations
from dynascope.probes.connectivity import barrier_of, interpolate_state, reestimate_batchnorm


def _classification(n: int = 40, d: int = 12, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def test_identical_checkpoints_have_zero_barrier() -> None:
    model = build("mlp", in_dim=12, width=8, depth=2, out_dim=5, seed=1).double()
    data = _classification()
    r = probes.lmc_barrier(model, copy.deepcopy(model), data, n_points=7, layerwise=True)
    assert r.barrier == 0.0 and r.barrier_accuracy == 0.0
    assert len(set(r.losses)) == 1 and len(r.alphas) == 7
    assert r.alphas[0] == 0.0 and r.alphas[-1] == 1.0
    assert set(r.layerwise) == {"body.0", "body.2", "head"} and all(v == 0.0 for v in r.layerwise.values())
    with torch.no_grad():
        direct = F.cross_entropy(model(data[0]), data[1]).item()
    assert r.losses[0] == pytest.approx(direct, rel=1e-12)


def test_convex_quadratic_path() -> None:
    """Linear model + MSE: L(α) is a convex quadratic in α, so it never rises above the chord."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    with torch.no_grad():
        b.weight.mul_(5.0)
    r = probes.lmc_barrier(a, b, (x, y), n_points=11, batch_size=7)
    assert r.meta["loss"] == "mse" and r.accuracies is None and r.barrier_accuracy is None
    alphas = np.asarray(r.alphas)
    chord = (1 - alphas) * r.losses[0] + alphas * r.losses[-1]
    gap = np.asarray(r.losses) - chord
    assert abs(r.barrier) < 1e-12 and np.all(gap[1:-1] < 0)
    # reference: the loss of the hand-interpolated linear model at every α
    for alpha, value in zip(r.alphas, r.losses):
        w = (1 - alpha) * a.weight + alpha * b.weight
        bias = (1 - alpha) * a.bias + alpha * b.bias
        assert value == pytest.approx(F.mse_loss(x @ w.T + bias, y).item(), rel=1e-12)
    # its curvature: second differences of the quadratic are constant and positive
    second = np.diff(r.losses, 2)
    assert np.all(second > 0) and np.allclose(second, second[0], rtol=1e-8)


def test_barrier_definition() -> None:
    assert barrier_of([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier_of([0, 0.5, 1], [0.9, 0.5, 0.7], higher_is_better=True) == pytest.approx(0.3)


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_permuted_copy_has_zero_barrier_after_alignment(kind: str) -> None:
    if kind == "mlp":
        model = build("mlp", in_dim=12, width=16, depth=2, out_dim=5, seed=3).double()
        x, y = _classification()
    else:
        model = build("cnn", in_channels=1, image_size=5, channels=[4, 6], out_dim=3, batchnorm=True, seed=3)
        model = model.double()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(24, 1, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (24,), generator=g)
        reestimate_batchnorm(model, as_batches((x, y)))
    permuted = apply_permutations(model, random_permutations(model, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(permuted.eval()(x), model.eval()(x), atol=1e-6, rtol=0)
    for align in ("weights", "activations"):
        r = probes.lmc_barrier(model, permuted, (x, y), n_points=9, align=align)
        assert r.barrier == pytest.approx(0, abs=1e-10), align
        assert max(r.losses) - min(r.losses) < 1e-10
        assert max(r.losses_unaligned) - min(r.losses_unaligned) > 1e-4  # the unaligned path is not flat
    assert r.meta["alignment"]["method"] == "activations"


def test_batchnorm_reestimation_matches_manual_computation() -> None:
    model = build("cnn", in_channels=1, image_size=4, channels=[3, 2], out_dim=2, batchnorm=True, seed=0)
    model = model.double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (20,), generator=g)
    bn1, bn2 = model.body[1], model.body[4]
    bn1.num_batches_tracked.fill_(5)
    bn2.num_batches_tracked.fill_(9)
    model.train()
    # uneven batches 7, 7, 6: sample-weighted average of batch means / unbiased batch variances
    seen = reestimate_batchnorm(model, as_batches((x, y), 7))
    assert seen == 20 and model.training  # mode restored
    with torch.no_grad():
        means, variances, sizes = [], [], []
        for lo in range(0, 20, 7):
            z = model.body[0](x[lo : lo + 7])
            means.append(z.mean((0, 2, 3)))
            variances.append(z.var((0, 2, 3), unbiased=True))
            sizes.append(z.shape[0])
        w = torch.tensor(sizes, dtype=torch.float64) / 20
        torch.testing.assert_close(
            bn1.running_mean, sum(wi * m for wi, m in zip(w, means)), rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            bn1.running_var, sum(wi * v for wi, v in zip(w, variances)), rtol=1e-12, atol=0
        )
    assert int(bn1.num_batches_tracked) == 5 and int(bn2.num_batches_tracked) == 9
    assert bn1.momentum == 0.1  # restored
    # one full batch: the second BatchNorm sees the first one normalise with batch statistics
    reestimate_batchnorm(model, as_batches((x, y)))
    with torch.no_grad():
        z = model.body[0](x)
        z = (z - z.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            z.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
        )
        z = torch.relu(z * bn1.weight[:, None, None] + bn1.bias[:, None, None])
        z = model.body[3](z)
        torch.testing.assert_close(bn2.running_mean, z.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn2.running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-10, atol=1e-12)


def test_integer_buffers_never_interpolated_and_inputs_untouched() -> None:
    a = build("cnn", in_channels=1, image_size=4, channels=[3], out_dim=2, batchnorm=True, seed=0).double()
    b = build("cnn", in_channels=1, image_size=4, channels=[3], out_dim=2, batchnorm=True, seed=1).double()
    a.body[1].num_batches_tracked.fill_(3)
    b.body[1].num_batches_tracked.fill_(100)
    for alpha in (0.0, 0.3, 1.0):
        s = interpolate_state(a.state_dict(), b.state_dict(), alpha)
        assert s["body.1.num_batches_tracked"].dtype == torch.long
        assert int(s["body.1.num_batches_tracked"]) == 3
    s = interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    torch.testing.assert_close(s["head.weight"], 0.75 * a.head.weight + 0.25 * b.head.weight)
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(12, 1, 4, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 2, (12,), generator=g),
    )
    r = probes.lmc_barrier(a, b, data, n_points=5, align="weights")
    for k, v in a.state_dict().items():
        assert torch.equal(v, before_a[k]), k
    for k, v in b.state_dict().items():
        assert torch.equal(v, before_b[k]), k
    assert r.meta["batchnorm_reestimated"] is True


def test_bn_statistics_reestimated_at_each_alpha() -> None:
    """With re-estimation, the end points equal the end models evaluated after their own re-estimation."""
    a = build("cnn", in_channels=1, image_size=4, channels=[3], out_dim=2, batchnorm=True, seed=0).double()
    b = build("cnn", in_channels=1, image_size=4, channels=[3], out_dim=2, batchnorm=True, seed=1).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    r = probes.lmc_barrier(a, b, (x, y), n_points=3)
    r_stale = probes.lmc_barrier(a, b, (x, y), n_points=3, reset_bn=False)
    for model, value in ((a, r.losses[0]), (b, r.losses[-1])):
        m = copy.deepcopy(model)
        reestimate_batchnorm(m, as_batches((x, y)))
        with torch.no_grad():
            assert value == pytest.approx(F.cross_entropy(m.eval()(x), y).item(), rel=1e-12)
    with torch.no_grad():
        assert r_stale.losses[0] == pytest.approx(F.cross_entropy(a.eval()(x), y).item(), rel=1e-12)
    assert r.losses[0] != pytest.approx(r_stale.losses[0])


def test_layerwise_barrier_matches_manual_path() -> None:
    a = build("mlp", in_dim=12, width=8, depth=1, out_dim=5, seed=1).double()
    b = build("mlp", in_dim=12, width=8, depth=1, out_dim=5, seed=2).double()
    x, y = _classification()
    r = probes.lmc_barrier(a, b, (x, y), n_points=5, layerwise={"hidden": ["body"], "readout": ["head"]})
    assert set(r.layerwise) == {"hidden", "readout"}
    m = copy.deepcopy(a)
    with torch.no_grad():
        m.head.weight.copy_(0.5 * a.head.weight + 0.5 * b.head.weight)
        m.head.bias.copy_(0.5 * a.head.bias + 0.5 * b.head.bias)
        assert r.layerwise_losses["readout"][2] == pytest.approx(F.cross_entropy(m(x), y).item(), rel=1e-12)
    assert r.layerwise["readout"] == pytest.approx(barrier_of(r.alphas, r.layerwise_losses["readout"]))
    with pytest.raises(ValueError, match="match no state-dict keys"):
        probes.lmc_barrier(a, b, (x, y), n_points=3, layerwise={"x": ["nope"]})


def test_exports_and_bad_inputs() -> None:
    a = build("mlp", in_dim=12, width=8, depth=1, out_dim=5, seed=1)
    b = build("mlp", in_dim=12, width=8, depth=1, out_dim=5, seed=2)
    x, y = _classification()
    x = x.float()
    r = probes.lmc_barrier(a, b, (x, y), n_points=4, align="weights")
    json.dumps(r.to_dict())
    frame = r.to_frame()
    assert list(frame.columns[:5]) == ["alpha", "loss", "accuracy", "loss_unaligned", "accuracy_unaligned"]
    assert r.figure() is not None
    with pytest.raises(ValueError, match="n_points"):
        probes.lmc_barrier(a, b, (x, y), n_points=1)
    with pytest.raises(ValueError, match="align"):
        probes.lmc_barrier(a, b, (x, y), align="magic")
    with pytest.raises(ValueError, match="disagree"):
        probes.lmc_barrier(a, build("mlp", in_dim=12, width=9, depth=1, out_dim=5), (x, y))


def assert_endpoints_learned(r: probes.LMCResult, y_test: torch.Tensor) -> None:
    """Both endpoints of a barrier learned the task, not the majority vote: test error at most a quarter
    of the majority-class error. A constant-lr optimiser leaves the last step anywhere in its noise, so no
    bound is drawn near the accuracy one machine happens to reach."""
    chance_error = 1 - float(torch.bincount(y_test).max()) / len(y_test)
    assert max(1 - r.accuracies[0], 1 - r.accuracies[-1]) <= chance_error / 4, (r.accuracies, chance_error)


@pytest.mark.slow
def test_mlps_from_different_seeds_on_digits() -> None:
    """Two MLPs (2×128) trained with Adam from different seeds: a clear loss barrier between them that
    weight matching at least halves (Git Re-Basin)."""
    from dynascope.datasets import load

    split = load("digits", n_train=1000, flatten=True, seed=0)
    (x, y), test = split.train, split.test

    def train(seed: int) -> nn.Module:
        model = build("mlp", in_dim=64, width=128, depth=2, out_dim=10, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(15):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 32):
                idx = perm[i : i + 32]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model

    a, b = train(1), train(2)
    r = probes.lmc_barrier(a, b, test, n_points=11, align="weights")
    assert_endpoints_learned(r, test[1])  # accuracy 0.962 and 0.949 here
    assert r.barrier_unaligned > 0.1, r.barrier_unaligned
    assert r.barrier <= 0.5 * r.barrier_unaligned, (r.barrier, r.barrier_unaligned)
    r_act = probes.lmc_barrier(a, b, test, n_points=11, align="activations", compare_unaligned=False)
    assert r_act.barrier <= 0.5 * r.barrier_unaligned


def test_layerwise_frame_reports_the_rise_over_model_a() -> None:
    """Swapping one layer alone can break the network: the path then stays under its chord (barrier 0)
    while the loss still rises over A; the frame shows both (and L(1))."""
    from dynascope.probes.connectivity import LMCResult

    losses = {"body.0": [0.1, 0.5, 2.0], "head": [0.1, 0.4, 0.2]}
    res = LMCResult(
        alphas=[0.0, 0.5, 1.0], losses=[0.1, 0.3, 0.1], accuracies=None, barrier=0.2,
        barrier_accuracy=None, align=None, meta={}, layerwise={"body.0": 0.0, "head": 0.25},
        layerwise_losses=losses,
    )  # fmt: skip
    frame = res.layerwise_frame()
    assert frame["group"].tolist() == ["body.0", "head"] and frame["barrier"].tolist() == [0.0, 0.25]
    assert frame["max_rise"].tolist() == pytest.approx([1.9, 0.3])
    assert frame["end_loss"].tolist() == pytest.approx([2.0, 0.2])


def test_lmc_on_spectral_norm_models_uses_the_exact_norm_at_every_point() -> None:
    """The power-iteration vectors u, v are functions of the weights: at α the loss is that of
    W_α / σ_max(W_α), computed here by hand with the SVD (float64)."""
    from torch.nn.utils.parametrizations import spectral_norm

    from dynascope.probes import lmc_barrier

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(spectral_norm(nn.Linear(4, 16)), nn.Tanh(), spectral_norm(nn.Linear(16, 3)))
        m = m.double()
        m.train()
        for _ in range(2):  # a couple of power iterations: u, v far from converged, as after short training
            m(torch.randn(2, 4, dtype=torch.float64))
        return m.eval()

    a, b = net(0), net(1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    res = lmc_barrier(a, b, (x, y), n_points=5, loss="cross_entropy")

    def exact_loss(alpha: float) -> float:
        h = x
        for i in (0, 2):
            wa, wb = a[i].parametrizations.weight.original, b[i].parametrizations.weight.original
            w = torch.lerp(wa, wb, alpha)
            bias = torch.lerp(a[i].bias, b[i].bias, alpha)
            h = h @ (w / torch.linalg.matrix_norm(w, ord=2)).T + bias
            if i == 0:
                h = torch.tanh(h)
        return float(nn.functional.cross_entropy(h, y).detach())

    expected = [exact_loss(float(al)) for al in res.alphas]
    assert res.losses == pytest.approx(expected, rel=1e-10)
    assert "recomputed exactly" in res.meta["spectral_norm"]


@pytest.mark.parametrize("wrap", ["spectral_norm", "weight_norm"])
def test_weight_matching_permutes_parametrized_weights_and_keeps_the_function(wrap: str) -> None:
    """The stored ``original`` weights (and spectral norm's ``u``, ``v``) are permuted with the layer: the
    permuted model computes the same function (before: biases permuted, weights not: outputs off by 0.35)."""
    from torch.nn.utils import parametrizations

    from dynascope.probes import weight_matching

    norm = getattr(parametrizations, wrap)

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(norm(nn.Linear(4, 16)), nn.Tanh(), norm(nn.Linear(16, 3))).double()
        m.train()
        for _ in range(3):
            m(torch.randn(2, 4, dtype=torch.float64))
        return m.eval()

    a, b = net(0), net(1)
    x = torch.randn(10, 4, dtype=torch.float64)
    permuted = weight_matching(a, b)
    torch.testing.assert_close(permuted.eval()(x), b(x), rtol=1e-12, atol=1e-12)
    assert not torch.equal(permuted[0].weight, b[0].weight)  # the hidden units did move
