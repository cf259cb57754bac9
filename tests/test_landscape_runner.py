"""The landscape probes through the runner: cached, from the CLI and from the notebook, same numbers as a
direct call."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import STEPS, make_run

import dynascope
from dynascope import probes, runner
from dynascope.cli import main
from dynascope.models import Run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return make_run(tmp_path_factory.mktemp("land") / "run")


def cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    assert main([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_hessian_diagonal_cli_matches_direct_call_and_is_cached(run: Run, capsys) -> None:
    rows = cli_json(["probe", "hessian_diagonal", str(run.path), "--param", "n_matvecs=12"], capsys)
    assert len(rows) == 1 and rows[0]["cached"] is False and rows[0]["step"] == STEPS[-1]
    x, y = run.load_dataset().train
    direct = probes.hessian_diagonal(run.load_model(STEPS[-1]), (x, y), n_matvecs=12, loss="cross_entropy")
    assert torch.allclose(torch.tensor(rows[0]["result"]["values"], dtype=torch.float64), direct.values)
    again = cli_json(["probe", "hessian_diagonal", str(run.path), "--param", "n_matvecs=12"], capsys)
    assert again[0]["cached"] is True
    view = dynascope.open_run(run.path)
    res = view.probe("hessian_diagonal", n_matvecs=12)
    assert torch.allclose(res.values, direct.values)


def test_loss_landscape_through_the_runner(run: Run) -> None:
    res, cached = runner.run_probe(run, "loss_landscape", params={"resolution": 5, "span": 0.5})
    assert not cached and res.loss.shape == (5, 5)
    x, y = run.load_dataset().train
    direct = probes.loss_landscape(run.load_model(STEPS[-1]), (x, y), resolution=5, span=0.5)
    assert torch.allclose(res.loss, direct.loss, atol=1e-12)
    again, cached = runner.run_probe(run, "loss_landscape", params={"resolution": 5, "span": 0.5})
    assert cached and torch.allclose(again.loss, res.loss)


def test_multi_checkpoint_landscape_and_opposing_signals(run: Run, capsys) -> None:
    rows = cli_json(["probe", "landscape_trajectory", str(run.path), "--param", "resolution=4"], capsys)
    result = rows[0]["result"]
    assert rows[0]["steps"] == list(STEPS)
    assert result["trajectory_steps"] == list(STEPS) and len(result["trajectory_coords"]) == len(STEPS)
    assert result["meta"]["center_step"] == STEPS[-1] and result["meta"]["probe"] == "landscape_trajectory"
    view = dynascope.open_run(run.path)
    same = view.probe("landscape_trajectory", steps=list(STEPS), resolution=4)
    assert same.trajectory_in_plane.tolist() == pytest.approx(result["trajectory_in_plane"])
    opp = view.probe("opposing_signals", steps=list(STEPS))
    x, y = run.load_dataset().train
    direct = probes.opposing_signals(run, (x, y), loss="cross_entropy")
    assert opp.selected == direct.selected and torch.allclose(opp.scores, direct.scores)
    assert opp.steps == list(STEPS)
    rows = cli_json(["probe", "opposing_signals", str(run.path), "--all"], capsys)
    assert rows[0]["cached"] is True
    assert "opposing_signals" in runner.PROBES and runner.PROBES["opposing_signals"].inputs == "checkpoints"


@pytest.mark.parametrize(
    "probe", ["hessian_diagonal", "loss_landscape", "landscape_trajectory", "opposing_signals"]
)
def test_the_runs_loss_reaches_every_landscape_probe(run: Run, probe: str) -> None:
    where = {"steps": list(STEPS)} if runner.PROBES[probe].inputs == "checkpoints" else {}
    assert runner.plan(run, probe, **where).call["loss"] == run.loss == "cross_entropy"


def test_cached_results_come_back_whole(run: Run) -> None:
    """Results read back from the store (JSON) keep their frames and figures."""
    x, y = run.load_dataset().train
    for probe, where, params in (
        ("hessian_diagonal", {}, {"n_matvecs": 8}),
        ("loss_landscape", {}, {"resolution": 3}),
        ("landscape_trajectory", {"steps": list(STEPS)}, {"resolution": 3}),
        ("opposing_signals", {"steps": list(STEPS)}, {}),
    ):
        fresh, _ = runner.run_probe(run, probe, params=params, **where)
        back = runner.cached_result(run, probe, params=params, **where)
        assert type(back) is type(fresh)
        assert back.to_frame().equals(fresh.to_frame()) or back.to_frame().round(12).equals(
            fresh.to_frame().round(12)
        )
        assert len(back.figure().data) == len(fresh.figure().data)
    back = runner.cached_result(run, "opposing_signals", steps=list(STEPS))
    assert back.groups_frame()["n"].sum() == len(back.selected)
    assert list(back.trajectory_frame()["step"]) == list(STEPS)


def test_landscape_between_two_checkpoints_from_the_cli(run: Run, capsys) -> None:
    argv = ["probe", "landscape_between", str(run.path), "--step", "0", "--other", str(run.path),
            "--other-step", str(STEPS[-1]), "--param", "resolution=3", "--param", "span=[0, 1]"]  # fmt: skip
    rows = cli_json(argv, capsys)
    result = rows[0]["result"]
    x, y = run.load_dataset().train
    last = probes.loss_landscape(run.load_model(STEPS[-1]), (x, y), directions=["random"], resolution=2)
    assert result["loss"][-1][1] == pytest.approx(last.center_loss, abs=1e-6)  # a = 1, b = 0: the last step
    assert result["trajectory_coords"][1] == pytest.approx([1.0, 0.0], abs=1e-6)
