"""The Landscape page under Streamlit's AppTest: the numbers on the page are the probes' numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_app import _app, _charts, _downloads, _texts, make_tiny_run

from dynascope import probes
from dynascope.models import Run
from dynascope.runner import PROBES, probe_data
from dynascope.store import ResultStore


def frame_with(at, column: str):
    """The first table on the page with ``column`` (AppTest does not expose dataframe keys)."""
    for d in at.dataframe:
        if column in d.value.columns:
            return d.value
    raise AssertionError(f"no table with a {column!r} column")


@pytest.fixture()
def oscillation_score(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny runs have no outlier groups, so the default score="spike" flags nothing there; the page's
    group tables and images are exercised with the earlier score="oscillation" (top 10 %)."""
    spec = PROBES["opposing_signals"]
    oscillation = dataclasses.replace(spec, defaults={"score": "oscillation"})
    monkeypatch.setitem(PROBES, "opposing_signals", oscillation)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_tiny_run(tmp_path / "tiny", steps=(0, 2, 4, 6, 8, 10, 12), lr=2.0)
    return tmp_path


def test_landscape_page_without_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(tmp_path, monkeypatch, "landscape")
    assert "No run selected" in _texts(at.info)


def test_hessian_diagonal_tab(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(root, monkeypatch, "landscape")
    at.number_input(key="land_max_samples").set_value(40)
    at.radio(key="land_diag_method").set_value("exact").run()
    at.button(key="land_diag_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    table = frame_with(at, "mean_stderr")
    run = Run.open(root / "tiny")
    x, y = probe_data(run, max_samples=40)
    direct = probes.hessian_diagonal(run.load_model(12), (x, y), method="exact", loss="cross_entropy")
    assert list(table["parameter"]) == direct.names
    assert table["n_params"].sum() == 8 * 2 + 8 + 3 * 8 + 3
    assert torch.allclose(
        torch.tensor(table["mean"].tolist(), dtype=torch.float64), direct.layer_mean, atol=1e-7
    )
    assert f"tr(H) = Σ diag = {float(direct.values.sum()):.6g}" in _texts(at.caption)
    assert _downloads(at)[:5] == ["CSV", "Parquet", "JSON", "HTML", "PNG"]
    (stored,) = ResultStore(root / "tiny").list("hessian_diagonal")
    assert stored.step == 12 and stored.params["method"] == "exact"


def test_loss_surface_tab_trajectory_and_point(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(root, monkeypatch, "landscape")
    at.number_input(key="land_max_samples").set_value(40)
    at.number_input(key="land_res").set_value(5)
    at.multiselect(key=f"land_traj_steps_{root / 'tiny'}").set_value([0, 4, 8, 12]).run()
    at.button(key="land_traj_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    traj = frame_with(at, "in_plane")
    assert list(traj["step"]) == [0, 4, 8, 12]
    assert traj["in_plane"].iloc[-1] == pytest.approx(1.0)  # the centre itself
    run = Run.open(root / "tiny")
    x, y = probe_data(run, max_samples=40)
    direct = probes.landscape_trajectory(run, (x, y), steps=[0, 4, 8, 12], resolution=5, loss="cross_entropy")
    assert traj["loss"].tolist() == pytest.approx(direct.trajectory_loss.tolist(), abs=1e-9)
    ev = ", ".join(f"{100 * v:.1f} %" for v in direct.explained_variance)
    assert f"explained by the two directions: {ev}" in _texts(at.caption)
    assert _charts(at) == 1
    at.radio(key="land_view").set_value("surface").run()  # display option: no recompute
    assert not at.exception and _charts(at) == 1 and "land_traj_run" not in [b.key for b in at.button]
    at.radio(key="land_mode").set_value("Around one checkpoint").run()
    at.radio(key="land_dirs").set_value("hessian").run()
    at.button(key="land_point_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    point = probes.loss_landscape(run.load_model(12), (x, y), directions="hessian", resolution=5)
    assert f"Loss at the centre: {point.center_loss:.6g}" in _texts(at.caption)
    at.radio(key="land_dirs").set_value("toward a checkpoint").run()
    at.selectbox(key="land_other").set_value(0).run()
    at.button(key="land_between_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    between = frame_with(at, "in_plane")
    assert list(between["step"]) == ["a", "b"] and between["a"].tolist() == pytest.approx(
        [0.0, 1.0], abs=1e-6
    )
    first = probes.loss_landscape(run.load_model(0), (x, y), directions=["random"], resolution=2)
    assert between["loss"].iloc[1] == pytest.approx(first.center_loss, abs=1e-6)


def test_opposing_signals_tab(root: Path, monkeypatch: pytest.MonkeyPatch, oscillation_score: None) -> None:
    at = _app(root, monkeypatch, "landscape")
    at.number_input(key="land_max_samples").set_value(0).run()
    at.button(key="land_opp_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    groups = frame_with(at, "spike_share")
    run = Run.open(root / "tiny")
    x, y = probe_data(run)
    direct = probes.opposing_signals(run, (x, y), loss="cross_entropy", score="oscillation")
    assert list(groups["group"]) == ["+v", "-v"]
    assert groups["n"].tolist() == [len(direct.groups["+v"]), len(direct.groups["-v"])]
    assert groups["spike_share"].tolist() == pytest.approx(list(direct.spike_share.values()), nan_ok=True)
    assert f"{len(direct.selected)} examples selected" in _texts(at.caption)
    assert "No sharpness for these steps yet" in _texts(at.caption)
    assert _charts(at) == 1
    feats = [d.value for d in at.dataframe if "group mean (z)" in d.value.columns]
    assert len(feats) == sum(1 for m in direct.groups.values() if m)
    assert list(feats[0].columns) == ["feature", "group mean (z)", "data mean"]
    at.radio(key="land_opp_dir").set_value("hessian").run()
    at.number_input(key="land_opp_k").set_value(2).run()
    at.button(key="land_opp_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    (stored,) = [
        s for s in ResultStore(root / "tiny").list("opposing_signals") if s.params["direction"] == "hessian"
    ]
    assert stored.params["k"] == 2 and len(stored.result.meta["hessian_eigenvalues"]) == 2
    members = next(m for m in direct.groups.values() if m)
    flat = x.reshape(x.shape[0], -1).double()
    z = (flat[members].mean(0) - flat.mean(0)) / flat.std(0)
    assert feats[0]["group mean (z)"].abs().iloc[0] == pytest.approx(float(z.abs().max()))


def test_opposing_signals_on_image_data_shows_the_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, oscillation_score: None
) -> None:
    """A BatchNorm CNN on 8×8 digit images: the groups are shown as images, and the Hessian diagonal of the
    conv kernels can be spatially averaged."""
    from dynascope.datasets import load

    dataset = {"name": "digits", "n_train": 64, "n_test": 16, "flatten": False, "seed": 0}
    model_cfg = {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [4], "out_dim": 10,
                 "batchnorm": True, "seed": 0}  # fmt: skip
    run = Run.create(tmp_path / "img", model=model_cfg, dataset=dataset, optimizer={"name": "sgd", "lr": 2.0},
                     loss="cross_entropy")  # fmt: skip
    model = run.build_model()
    x, y = load(**dataset).train
    assert x.dim() == 4
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for step in range(8):
        run.save_checkpoint(model, step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    at = _app(tmp_path, monkeypatch, "landscape")
    at.number_input(key="land_max_samples").set_value(0).run()
    at.toggle(key="land_diag_spatial").set_value(True).run()
    at.number_input(key="land_diag_mv").set_value(10).run()
    at.button(key="land_diag_run").click().run()
    at.button(key="land_opp_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    (diag,) = ResultStore(tmp_path / "img").list("hessian_diagonal")
    kernel = diag.result.split()["body.0.weight"]
    assert torch.allclose(kernel, kernel.mean(dim=(2, 3), keepdim=True).expand_as(kernel))
    (opp,) = ResultStore(tmp_path / "img").list("opposing_signals")
    groups = [m for m in opp.result.groups.values() if m]
    (strip,) = at.get("image")  # one strip per non-empty group
    assert len(groups) == 1 and len(strip.proto.imgs) == min(8, len(groups[0]))
    assert [i.caption for i in strip.proto.imgs] == [f"#{i}" for i in groups[0][:8]]
    assert not [d for d in at.dataframe if "group mean (z)" in d.value.columns]  # images, not feature tables
