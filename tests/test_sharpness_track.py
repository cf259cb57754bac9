"""Edge-of-stability tracker over run folders: agreement with the one-shot probe, schedules, warm
starts, and a real edge-of-stability run (full-batch GD, tanh MLP, half-SSE on digits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynascope.datasets import load
from dynascope.models import Run, build
from dynascope.probes.curvature_sharpness import run_loss, sharpness, track_sharpness


def _half_sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


def _gd_run(
    path: Path,
    *,
    n_train: int,
    width: int,
    depth: int,
    lr: float,
    total: int,
    every: int,
    schedule: dict | None = None,
) -> Run:
    """Full-batch GD on ½‖f − y‖² (digits, centred inputs, one-hot targets) saving checkpoints to a run."""
    ds = load("digits", n_train=n_train, normalize="center", targets="onehot", seed=0)
    model = build("mlp", in_dim=64, width=width, depth=depth, out_dim=10, activation="tanh", seed=0)
    run = Run.create(
        path,
        model=model,
        dataset=ds.config,
        optimizer={"name": "sgd", "lr": lr},
        lr_schedule=schedule or {"type": "constant", "lr": lr},
    )
    cfg = json.loads((path / "run.json").read_text())
    cfg["loss"] = "half_sse"  # the loss the run was trained with, read by the tracker
    (path / "run.json").write_text(json.dumps(cfg))
    run = Run.open(path)
    x, y = ds.train
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(total + 1):
        for g in opt.param_groups:
            g["lr"] = run.lr_at(step)
        opt.zero_grad()
        loss = _half_sse(model(x), y)
        if step % every == 0:
            run.save_checkpoint(model, step, metrics={"train_loss": float(loss.detach())})
        loss.backward()
        opt.step()
    return run


def test_tracker_matches_one_shot_sharpness_and_reads_the_schedule(tmp_path: Path) -> None:
    schedule = {"type": "step", "lr": 0.2, "gamma": 0.5, "step_size": 10}
    run = _gd_run(
        tmp_path / "run", n_train=64, width=8, depth=1, lr=0.2, total=20, every=10, schedule=schedule
    )
    assert run_loss(run) == ("half_sse", "loss")
    track = track_sharpness(run, k=2, tol=1e-8, progress=False)
    assert track.steps == [0, 10, 20]
    assert track.lr == pytest.approx([0.2, 0.1, 0.05])
    assert track.two_over_lr == pytest.approx([10.0, 20.0, 40.0])
    assert track.loss == "half_sse" and track.meta["params"]["loss_source"] == "run.json:loss"
    x, y = run.load_dataset().train
    for i, step in enumerate(track.steps):
        one = sharpness(run.load_model(step), (x, y), loss="half_sse", k=2, tol=1e-8, trace=False)
        assert track.top_k[i] == pytest.approx(one.eigenvalues, rel=1e-6)
        assert track.ratio[i] == pytest.approx(one.lambda_max / track.two_over_lr[i], rel=1e-6)
        assert track.train_loss[i] == pytest.approx(one.loss_value, rel=1e-10)
    assert all(track.converged)
    frame = track.to_frame()
    assert list(frame["step"]) == [0, 10, 20]
    assert {"lambda_max", "lambda_1", "lambda_2", "two_over_lr", "ratio", "train_loss", "n_matvecs"} <= set(
        frame.columns
    )
    assert len(track.figure().data) == 4  # λ_2, λ_max, 2/η, loss
    json.dumps(track.to_dict())

    # a subset of steps, path input, explicit data and loss
    sub = track_sharpness(
        str(tmp_path / "run"), (x, y), steps=[20], loss="half_sse", tol=1e-8, warm_start=False, progress=False
    )
    assert sub.steps == [20] and sub.lambda_max[0] == pytest.approx(track.lambda_max[2], rel=1e-6)
    with pytest.raises(ValueError, match="no checkpoints at steps"):
        track_sharpness(run, steps=[5], progress=False)
    with pytest.raises(TypeError, match="run_or_path"):
        track_sharpness(42, progress=False)


def test_track_meta_has_the_operator_keys_of_the_one_shot_probe(tmp_path: Path) -> None:
    run = _gd_run(tmp_path / "run", n_train=32, width=4, depth=1, lr=0.1, total=2, every=2)
    track = track_sharpness(run, tol=1e-6, progress=False)
    one = sharpness(run.load_model(2), run.load_dataset().train, loss="half_sse", tol=1e-6, trace=False)
    keys = ("operator", "loss", "reduction", "n_samples", "n_params", "dtype", "device", "mode", "backend")
    assert {k: track.meta[k] for k in keys} == {k: one.meta[k] for k in keys}
    assert track.meta["n_params"] == sum(p.numel() for p in run.load_model(2).parameters())
    assert "n_parameters" not in track.meta and "n_parameters" not in one.meta


def test_warm_start_saves_matvecs_between_close_checkpoints(tmp_path: Path) -> None:
    run = _gd_run(tmp_path / "run", n_train=100, width=16, depth=1, lr=0.05, total=8, every=1)
    cold = track_sharpness(run, tol=1e-6, warm_start=False, progress=False)
    warm = track_sharpness(run, tol=1e-6, warm_start=True, progress=False)
    assert warm.lambda_max == pytest.approx(cold.lambda_max, rel=1e-5)
    assert sum(warm.n_matvecs[1:]) < sum(cold.n_matvecs[1:])


@pytest.mark.slow
def test_edge_of_stability_run_hovers_at_two_over_lr(tmp_path: Path) -> None:
    lr = 0.35  # 2/η ≈ 5.71; λ_max ≈ 2.3 at initialisation
    total = 2000
    run = _gd_run(tmp_path / "eos", n_train=500, width=64, depth=2, lr=lr, total=total, every=100)
    track = track_sharpness(run, tol=1e-3, progress=False)
    ratio = torch.tensor(track.ratio)
    steps = torch.tensor(track.steps)
    # progressive sharpening: starts well below the threshold and rises to it
    assert ratio[0] < 0.6
    first_hit = int(steps[ratio >= 0.9][0])
    assert first_hit <= total // 2
    # edge of stability: within ±20% of 2/η over the whole second half of training
    second = ratio[steps >= total // 2]
    assert len(second) >= 10
    assert float(second.min()) >= 0.8 and float(second.max()) <= 1.2, track.ratio
    # and the loss still goes down overall (non-monotonically) while λ_max hovers
    assert track.train_loss[-1] < 0.5 * track.train_loss[len(track.steps) // 2]
