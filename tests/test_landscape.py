"""loss_landscape: grid values vs direct evaluations, filter normalisation, curvature along v₁, PCA planes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_operators import dense_reference, tiny_cnn
from torch import nn
from torch.nn.utils import vector_to_parameters

import dynascope.probes as probes


def classification(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def direct(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy of a copy of ``model`` with its parameters set to ``theta`` (eval mode)."""
    m = copy.deepcopy(model).eval()
    vector_to_parameters(theta, m.parameters())
    with torch.no_grad():
        out = m(x)
    return float(F.cross_entropy(out.double(), y)), float((out.argmax(1) == y).double().mean())


def theta_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("make", [mlp, tiny_cnn], ids=["mlp", "cnn-bn"])
def test_grid_equals_direct_evaluation_float32(make) -> None:
    model = make()
    if make is tiny_cnn:
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(30, 1, 4, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    else:
        x, y = classification()
    res = probes.loss_landscape(model, (x, y), span=0.8, resolution=5, points_per_batch=7, seed=3)
    assert res.loss.shape == (5, 5) and res.accuracy is not None
    theta = theta_of(model)
    D = res.directions
    worst = 0.0
    for i, a in enumerate(res.coords[0]):
        for j, b in enumerate(res.coords[1]):
            loss, acc = direct(model, theta + a * D[0] + b * D[1], x, y)
            worst = max(worst, abs(float(res.loss[i, j]) - loss))
            assert float(res.accuracy[i, j]) == pytest.approx(acc, abs=1e-12)
    assert worst < 1e-6, worst
    assert res.center_loss == pytest.approx(direct(model, theta, x, y)[0], abs=1e-6)
    assert res.loss[2, 2] == pytest.approx(res.center_loss, abs=1e-6)  # the centre is on the grid
    frame = res.to_frame()
    assert list(frame.columns) == ["a", "b", "loss", "accuracy"] and len(frame) == 25
    assert frame.iloc[7]["loss"] == pytest.approx(float(res.loss[1, 2]))
    assert res.meta["batchnorm"].startswith("running statistics frozen")


def test_filter_normalisation_per_filter() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    res = probes.loss_landscape(model, (x, y), resolution=2)
    for D in res.directions:
        parts = torch.split(D, [p.numel() for p in model.parameters()])
        for (name, p), d in zip(model.named_parameters(), parts):
            d = d.reshape(p.shape)
            if p.dim() <= 1:  # biases and BatchNorm parameters are zeroed (Li et al. 2018)
                assert torch.all(d == 0), name
                continue
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            assert torch.allclose(dn, wn, rtol=1e-5), name
    # the two directions are different draws (seed + LANDSCAPE_DIRECTION_OFFSET + 0, + 1)
    assert not torch.allclose(res.directions[0], res.directions[1])
    copied = probes.loss_landscape(model, (x, y), resolution=2, bias_bn="copy")
    bias = torch.split(copied.directions[0], [p.numel() for p in model.parameters()])[1]
    assert torch.equal(bias, model[0].bias.detach())


def test_recomputed_batchnorm_matches_a_direct_reestimate() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 1, 4, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    res = probes.loss_landscape(model, (x, y), directions=["random"], span=0.5, resolution=3, bn="recompute")
    theta = theta_of(model)
    for i, a in enumerate(res.coords[0]):
        m = copy.deepcopy(model)
        vector_to_parameters(theta + a * res.directions[0], m.parameters())
        m[1].reset_running_stats()
        m[1].momentum = None
        m.train()
        with torch.no_grad():
            m(x)
        loss, _ = direct(m, theta_of(m), x, y)
        assert float(res.loss[i]) == pytest.approx(loss, abs=1e-6)
    assert res.meta["batchnorm"].startswith("running statistics re-estimated")
    assert model[1].running_var.ne(1).any(), "the caller's statistics are untouched"


def test_top_eigenvector_slice_curvature_is_lambda_1() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = classification()
    x = x.double()
    lam1 = float(torch.linalg.eigvalsh(dense_reference(model, x, y, "hessian"))[-1])
    h = 1e-3
    res = probes.loss_landscape(model, (x, y), directions=["hessian"], span=h, resolution=3, hessian_tol=1e-8)
    lo, mid, hi = (float(v) for v in res.loss)
    curvature = (hi - 2 * mid + lo) / h**2
    assert curvature == pytest.approx(lam1, rel=1e-5)
    assert res.eigenvalues is not None and res.eigenvalues[0] == pytest.approx(lam1, rel=1e-8)
    assert res.norms[0] == pytest.approx(1.0)
    assert res.kinds == ["hessian eigenvector 1"]
    two = probes.loss_landscape(model, (x, y), directions="hessian", span=h, resolution=3)
    assert two.kinds == ["hessian eigenvector 1", "hessian eigenvector 2"]
    assert abs(float(two.directions[0] @ two.directions[1])) < 1e-6


def test_direction_to_another_model_and_alignment() -> None:
    x, y = classification()
    a, b = mlp(), mlp()
    res = probes.loss_landscape(a, (x, y), directions=[b], span=(0.0, 1.0), resolution=5)
    assert res.loss.shape == (5,)
    assert float(res.loss[0]) == pytest.approx(direct(a, theta_of(a), x, y)[0], abs=1e-6)
    assert float(res.loss[-1]) == pytest.approx(direct(b, theta_of(b), x, y)[0], abs=1e-6)
    aligned = probes.loss_landscape(a, (x, y), directions=[b], span=(0.0, 1.0), resolution=5, align=True)
    # the permuted model computes the same function: same loss at a = 1, shorter distance
    assert float(aligned.loss[-1]) == pytest.approx(float(res.loss[-1]), abs=1e-6)
    assert aligned.norms[0] <= res.norms[0] + 1e-6
    assert aligned.kinds == ["to model (permutation-aligned)"]
    both = probes.loss_landscape(a, (x, y), directions=[b.state_dict(), "random"], resolution=3)
    assert both.loss.shape == (3, 3) and both.kinds[1] == "random (filter-normalised)"


def test_trajectory_pca_plane_and_projection() -> None:
    x, y = classification()
    center = mlp()
    theta = theta_of(center)
    g = torch.Generator().manual_seed(4)
    u, w = torch.randn(theta.numel(), generator=g), torch.randn(theta.numel(), generator=g)
    ckpts = []
    for t in range(6):  # a path that lies in the plane span(u, w) through the centre
        m = copy.deepcopy(center)
        vector_to_parameters(theta + (1 - t / 5) * 0.3 * u + 0.05 * (t % 2) * w, m.parameters())
        ckpts.append(m)
    steps = [0, 10, 20, 30, 40, 50]
    res = probes.loss_landscape(center, (x, y), directions="pca", trajectory=ckpts, steps=steps, span="auto",
                                resolution=4)  # fmt: skip
    assert res.explained_variance is not None and sum(res.explained_variance) == pytest.approx(1.0)
    assert res.trajectory_in_plane is not None
    assert torch.allclose(res.trajectory_in_plane, torch.ones(6, dtype=torch.float64))
    D, C = res.directions.double(), res.trajectory_coords
    for t, m in enumerate(ckpts):  # the projection reconstructs each checkpoint
        assert torch.allclose(theta.double() + C[t] @ D, theta_of(m).double(), atol=1e-5)
        assert float(res.trajectory_loss[t]) == pytest.approx(direct(m, theta_of(m), x, y)[0], abs=1e-6)
    assert res.coords[0][-1] == pytest.approx(1.25 * float(C.abs().max()))
    frame = res.trajectory_frame()
    assert list(frame["step"]) == steps and frame["in_plane"].min() > 0.999
    # random directions: the path is mostly out of their plane, which is reported
    rnd = probes.loss_landscape(center, (x, y), trajectory=ckpts, resolution=2)
    assert float(rnd.trajectory_in_plane.max()) < 0.5
    via = probes.landscape_trajectory(ckpts, (x, y), resolution=4, center=-1)
    assert via.meta["probe"] == "landscape_trajectory" and via.meta["center_step"] == 5
    assert float(via.trajectory_coords[-1].abs().max()) < 1e-5  # the centre projects to the origin


def test_bad_arguments() -> None:
    x, y = classification()
    model = mlp()
    with pytest.raises(ValueError, match="directions must be"):
        probes.loss_landscape(model, (x, y), directions=["random"] * 3)
    with pytest.raises(ValueError, match="directions must be one of"):
        probes.loss_landscape(model, (x, y), directions="eigen")
    with pytest.raises(ValueError, match="needs trajectory="):
        probes.loss_landscape(model, (x, y), directions="pca")
    with pytest.raises(ValueError, match="span must be a positive number"):
        probes.loss_landscape(model, (x, y), span=-1)
    with pytest.raises(ValueError, match="resolution must be"):
        probes.loss_landscape(model, (x, y), resolution=1)
    with pytest.raises(ValueError, match="bn must be one of"):
        probes.loss_landscape(model, (x, y), bn="train")
    with pytest.raises(ValueError, match="a direction is zero"):
        probes.loss_landscape(model, (x, y), directions=[copy.deepcopy(model)])
    with pytest.raises(ValueError, match=r"shape \[83\]"):
        probes.loss_landscape(model, (x, y), directions=[torch.ones(5)])
    with pytest.raises(ValueError, match="parallel"):
        d = torch.ones(83)
        probes.loss_landscape(model, (x, y), directions=[d, 2 * d])


def test_landscape_between_two_models() -> None:
    x, y = classification()
    a, b = mlp(), mlp()
    res = probes.landscape_between(a, b, (x, y), span=(0.0, 1.0), resolution=5)
    assert res.loss.shape == (5, 5) and res.kinds[0] == "to model B"
    assert res.coords[1] == [-0.5, -0.25, 0.0, 0.25, 0.5]  # the random axis: same width, centred
    assert float(res.loss[-1, 2]) == pytest.approx(direct(b, theta_of(b), x, y)[0], abs=1e-6)  # a = 1, b = 0
    C = res.trajectory_coords
    assert torch.allclose(C, torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64), atol=1e-6)
    line = probes.landscape_between(a, b, (x, y), plane=False, align=True, resolution=3, span=(0.0, 1.0))
    assert line.loss.shape == (3,) and line.meta["alignment"] == "weight matching"
    assert float(line.loss[-1]) == pytest.approx(direct(b, theta_of(b), x, y)[0], abs=1e-6)


def test_random_direction_stream_is_named() -> None:
    from dynascope.probes.functional import FunctionalModel
    from dynascope.probes.landscape import filter_normalized_direction
    from dynascope.probes.seeds import LANDSCAPE_DIRECTION_OFFSET

    x, y = classification()
    model = mlp()
    res = probes.loss_landscape(model, (x, y), directions="random", resolution=2, seed=7)
    fm = FunctionalModel(model)
    for j in range(2):
        expected = filter_normalized_direction(fm, seed=7 + LANDSCAPE_DIRECTION_OFFSET + j)
        assert torch.equal(res.directions[j], expected)
