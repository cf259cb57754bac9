"""Drawers of the landscape results: the figures carry the results' numbers."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from test_landscape import classification, mlp, theta_of
from test_opposing import gd_checkpoints, planted
from torch.nn.utils import vector_to_parameters

import dynascope.probes as probes
from dynascope.probes import figures


def test_hessian_diagonal_figure() -> None:
    x, y = classification()
    res = probes.hessian_diagonal(mlp().double(), (x.double(), y), n_matvecs=10)
    fig = res.figure()
    bars = fig.data[0]
    assert list(bars.x) == res.names
    assert np.allclose(bars.y, res.layer_mean.numpy())
    assert np.allclose(bars.error_y.array, 2 * res.layer_mean_stderr.numpy())
    boxes = [t for t in fig.data if t.type == "box"]
    w = res.split()["0.weight"].reshape(-1)
    assert boxes[0].median[0] == pytest.approx(float(np.median(w.numpy())))
    assert boxes[0].upperfence[0] == float(w.max()) and boxes[0].lowerfence[0] == float(w.min())


def test_landscape_figures_contour_surface_and_line() -> None:
    x, y = classification()
    center = mlp()
    theta = theta_of(center)
    ckpts = []
    for t in range(4):
        m = copy.deepcopy(center)
        vector_to_parameters(
            theta + 0.1 * t * torch.linspace(-1, 1, theta.numel()) + 0.02 * t**2, m.parameters()
        )
        ckpts.append(m)
    res = probes.landscape_trajectory(ckpts, (x, y), resolution=5, center=0)
    fig = res.figure()  # log₁₀ colour scale by default: the basin is not one colour
    contour = fig.data[0]
    assert np.allclose(np.asarray(contour.z), np.log10(res.loss.numpy().T))
    assert np.allclose(np.asarray(res.figure(log=False).data[0].z), res.loss.numpy().T)
    path = next(t for t in fig.data if t.name == "trajectory")
    assert np.allclose(path.x, res.trajectory_coords[:, 0].numpy()) and np.allclose(
        path.y, res.trajectory_coords[:, 1].numpy()
    )
    assert "variance explained" in fig.layout.title.text
    surf = figures.loss_landscape(res, surface=True, log=True)
    assert np.allclose(np.asarray(surf.data[0].z), np.log10(res.loss.numpy().T))
    acc = figures.loss_landscape(res, value="accuracy")
    assert np.allclose(np.asarray(acc.data[0].z), res.accuracy.numpy().T)
    line = probes.loss_landscape(center, (x, y), directions=["random"], resolution=4).figure(log=False)
    assert np.allclose(
        line.data[0].y,
        probes.loss_landscape(center, (x, y), directions=["random"], resolution=4).loss.numpy(),
    )


def test_opposing_signals_figure_with_sharpness() -> None:
    x, y, a, b = planted()
    model, states, _ = gd_checkpoints(x, y, steps=130)
    res = probes.opposing_signals(states, (x, y), model=model)
    sharp = pd.DataFrame(
        {"step": res.steps, "sharpness": np.linspace(0.4, 0.6, len(res.steps)), "two_over_lr": 0.5}
    )
    fig = figures.opposing_signals(res, sharpness=sharp)
    traj = res.trajectory_frame()
    plus = next(t for t in fig.data if t.name and t.name.startswith("group +v"))
    assert np.allclose(plus.y, traj["loss_+v"].to_numpy())
    assert plus.name == f"group +v ({len(res.groups['+v'])})"
    shares = [t for t in fig.data if t.type == "bar"]
    assert np.allclose(shares[0].y, res.group_step_share[0].numpy(), equal_nan=True)
    assert any(t.name == "λ_max" for t in fig.data) and any(t.name == "2/η" for t in fig.data)
    assert type(res.figure()).__name__ == "Figure"
