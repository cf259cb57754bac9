"""One input convention for the trajectory probes: a run, its path, models, state dicts or a generator
give the same track_sharpness / nc_trajectory / ntk_trajectory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dynascope.probes as probes
from dynascope.datasets import load
from dynascope.models import Run, build
from dynascope.probes.trajectory import checkpoint_models

STEPS = [0, 5, 10]


def _run(path: Path) -> tuple[Run, list[torch.nn.Module]]:
    """A run with checkpoints at STEPS (seeded weight perturbations) and the same models in memory."""
    ds = load("digits", n_train=40, seed=0)
    model = build("mlp", in_dim=64, width=6, depth=1, out_dim=10, seed=0)
    run = Run.create(
        path, model=model, dataset=ds.config, optimizer={"name": "sgd", "lr": 0.5}, loss="cross_entropy"
    )
    g = torch.Generator().manual_seed(0)
    models = []
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        run.save_checkpoint(model, step)
        models.append(run.load_model(step))
    return run, models


def test_every_form_gives_the_same_trajectories(tmp_path: Path) -> None:
    run, models = _run(tmp_path / "run")
    arch = build("mlp", in_dim=64, width=6, depth=1, out_dim=10, seed=1)
    states = [m.state_dict() for m in models]
    x, y = run.load_dataset().train
    data = (x, y)
    forms = {  # factories: a generator is consumed by one call
        "run": lambda: run,
        "path": lambda: str(run.path),
        "models": lambda: models,
        "generator": lambda: (m for m in models),
        "state_dicts": lambda: states,
    }
    kw = {"loss": "cross_entropy", "lr": 0.5, "tol": 1e-8, "progress": False, "model": arch}
    tracks = {k: probes.track_sharpness(f(), data, steps=STEPS, **kw) for k, f in forms.items()}
    numbered = probes.track_sharpness(forms["generator"](), data, **kw)
    ref = tracks["run"]
    assert ref.steps == STEPS and numbered.steps == [0, 1, 2]
    assert numbered.lambda_max == pytest.approx(ref.lambda_max, rel=1e-9)
    for name, t in tracks.items():
        assert t.steps == STEPS, name
        assert t.lambda_max == pytest.approx(ref.lambda_max, rel=1e-9), name
        assert t.two_over_lr == pytest.approx([4.0] * 3), name
    ncs = {k: probes.nc_trajectory(f(), data, steps=STEPS, model=arch) for k, f in forms.items()}
    for name, t in ncs.items():
        assert t.steps == STEPS and t.nc1 == pytest.approx(ncs["run"].nc1, rel=1e-12), name
    sub = (x[:12], y[:12])
    ntks = {k: probes.ntk_trajectory(f(), sub, steps=STEPS, model=arch) for k, f in forms.items()}
    for name, t in ntks.items():
        assert t.steps == STEPS, name
        assert t.kernel_distance == pytest.approx(ntks["run"].kernel_distance, rel=1e-9, abs=1e-12), name
        assert t.kernel_distance[0] == 0.0 and t.kernel_distance[2] > 0.0, name
    # the run's own training set and recorded loss are the defaults of the tracker
    default = probes.track_sharpness(run, tol=1e-8, progress=False)
    assert default.meta["params"]["loss_source"] == "run.json:loss" and default.loss == "cross_entropy"
    assert default.lambda_max == pytest.approx(ref.lambda_max, rel=1e-9) and default.lr == [0.5] * 3


def test_steps_are_checked_and_bad_sources_named(tmp_path: Path) -> None:
    run, models = _run(tmp_path / "run")
    chosen = checkpoint_models(run, [10, 0, 10])
    assert chosen.steps == [0, 10] and chosen.run is run
    assert [m.state_dict()["body.0.weight"].sum() for m in chosen.models] == [
        models[0].state_dict()["body.0.weight"].sum(), models[2].state_dict()["body.0.weight"].sum()
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"no checkpoints at steps \[3\]; it has \[0, 5, 10\]"):
        checkpoint_models(run, [3])
    with pytest.raises(ValueError, match="checkpoint 1 is a state dict: pass model="):
        checkpoint_models([models[0], models[1].state_dict()])
    with pytest.raises(TypeError, match="checkpoint 0 must be an nn.Module or a state dict; got int"):
        checkpoint_models([3])
    with pytest.raises(TypeError, match="checkpoints must be a Run, a path to a run folder"):
        probes.nc_trajectory(models[0], run.load_dataset().train)
    with pytest.raises(ValueError, match="needs data="):
        probes.track_sharpness(models, progress=False)
    with pytest.raises(ValueError, match="checkpoint 0 does not fit model"):
        arch = build("mlp", in_dim=64, width=7, depth=1, out_dim=10, seed=1)
        list(checkpoint_models([models[0].state_dict()], model=arch).models)
