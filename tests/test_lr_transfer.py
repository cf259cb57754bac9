"""Learning-rate transfer across widths (issue 20): SP, NTK, μP MLPs; the lr_transfer recipe, detector."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import torch

from dynascope.models import RunError, build
from dynascope.recipes import RECIPES, detect, detect_lr_transfer, read_lr_sweep

TINY = {
    "widths": [8, 16],
    "base_width": 8,
    "n_train": 32,
    "lrs": [2.0, 4.0, 8.0],
    "reference_lr": 4.0,
    "steps": 6,
    "log_every": 3,
}


def _mlp(p: str, width: int, base: int = 64, in_dim: int = 64) -> torch.nn.Module:
    return build(
        "parametrized_mlp",
        in_dim=in_dim,
        width=width,
        depth=2,
        out_dim=10,
        parametrization=p,
        base_width=base,
        seed=3,
    )


def test_parametrizations_state_their_multipliers_and_lr_scales() -> None:
    n, n0, d = 256, 64, 64
    sp, ntk, mup = (_mlp(p, n, n0, d) for p in ("sp", "ntk", "mup"))
    assert [m.lr_scale for m in (sp, ntk, mup)] == [1.0, float(n0), float(n)]
    assert [sp.body[0].multiplier, sp.body[2].multiplier, sp.head.multiplier] == [1.0, 1.0, 1.0]
    assert ntk.body[0].multiplier == d**-0.5 and ntk.body[2].multiplier == n**-0.5
    assert ntk.head.multiplier == n**-0.5
    assert mup.body[2].multiplier == n**-0.5 and mup.head.multiplier == math.sqrt(n0) / n
    # same seed, same draws: SP stores the NTK weights times 1/√fan_in
    torch.testing.assert_close(sp.body[2].weight, ntk.body[2].weight / math.sqrt(n))
    assert abs(float(ntk.body[2].weight.detach().std()) - 1) < 0.02 and isinstance(ntk.head, torch.nn.Linear)
    with pytest.raises(ValueError, match="parametrization"):
        _mlp("mf", 8)


def test_parametrizations_coincide_at_the_base_width() -> None:
    """With d = n = n₀ the three are one function and, at the scaled rate η·lr_scale, one GD trajectory."""
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(20, 10, generator=torch.Generator().manual_seed(1))
    outs = []
    for p in ("sp", "ntk", "mup"):
        m = _mlp(p, 64)
        opt = torch.optim.SGD(m.parameters(), lr=0.5 * m.lr_scale)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        outs.append(m(x).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-5)


def test_mup_output_shrinks_with_width_and_its_features_move_by_order_one() -> None:
    """μP: f at init ~ 1/√n·√(n₀/n)·√n = √(n₀/n); one GD step moves hidden pre-activations by Θ(1) (μP)
    and by Θ(1/√n) (NTK) as the width grows from 64 to 1024."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))

    def feature_move(p: str, n: int) -> tuple[float, float]:
        m = _mlp(p, n)
        h0 = m.body[:3](x).detach()
        f0 = float(m(x).detach().pow(2).mean().sqrt())
        torch.optim.SGD(m.parameters(), lr=0.05 * m.lr_scale).zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        with torch.no_grad():
            for q in m.parameters():
                q -= 0.05 * m.lr_scale * q.grad
        return float((m.body[:3](x).detach() - h0).pow(2).mean().sqrt()), f0

    (mu_s, f_s), (mu_l, f_l) = feature_move("mup", 64), feature_move("mup", 1024)
    (nt_s, _), (nt_l, _) = feature_move("ntk", 64), feature_move("ntk", 1024)
    assert 0.5 < mu_l / mu_s < 2.0  # Θ(1)
    assert nt_l / nt_s < 0.4  # ~ 1/√16 = 0.25
    assert 0.15 < f_l / f_s < 0.4  # √(64/1024) = 0.25


def test_lr_transfer_writes_the_sweep_and_trajectories(tmp_path) -> None:
    torch.manual_seed(0)
    run = RECIPES["lr_transfer"].run(tmp_path / "r", seed=0, progress=False, parametrization="sp", **TINY)
    sweep = read_lr_sweep(run)
    assert len(sweep) == 6 and list(sweep["width"].unique()) == [8, 16]
    assert (sweep["log2_lr"] == [1.0, 2.0, 3.0] * 2).all() and (sweep["lr_effective"] == sweep["lr"]).all()
    assert sweep["final_train_loss"].notna().all()
    m = run.metrics()
    assert sorted(m["step"].unique()) == [0, 3, 6] and sorted(m["width"].unique()) == [8, 16]
    assert (m["lr"] == 4.0).all() and (m["two_over_lr"] == 0.5).all()
    torch.testing.assert_close(torch.tensor(m["sharpness"].values), torch.tensor(m["lambda_max"].values))
    assert run.extra["phenomenon"] == "lr_transfer" and run.steps() == [6]
    ev = detect(run)
    best = [sweep[sweep["width"] == w].sort_values("final_train_loss")["lr"].iloc[0] for w in (8, 16)]
    assert ev.optimal_lrs == best and ev.widths == [8, 16] and ev.parametrization == "sp"
    s0 = m[m["step"] == 0].set_index("width")["sharpness"]
    assert ev.spread_at_init == pytest.approx(s0.max() / s0.min())
    assert ev.to_dict()["optimal_lrs"] == best


def test_lr_transfer_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    cfg = {**TINY, "parametrization": "mup"}
    full = RECIPES["lr_transfer"].run(tmp_path / "full", seed=1, progress=False, **cfg)

    class Stop(Exception):
        pass

    def stop_after_four(i: int, total: int, row: dict) -> None:
        if i == 4:
            raise Stop

    with pytest.raises(Stop):
        RECIPES["lr_transfer"].run(tmp_path / "part", seed=1, progress=stop_after_four, **cfg)
    assert len(read_lr_sweep(tmp_path / "part")) == 4
    resumed = RECIPES["lr_transfer"].run(tmp_path / "part", seed=1, progress=False, **cfg)
    cols = ["width", "lr", "final_train_loss", "final_test_loss", "diverged"]
    pd.testing.assert_frame_equal(read_lr_sweep(resumed)[cols], read_lr_sweep(full)[cols])
    key = ["width", "step"]
    a = resumed.metrics().sort_values(key).reset_index(drop=True)
    b = full.metrics().sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[[*key, "train_loss", "sharpness"]], b[[*key, "train_loss", "sharpness"]])
    # a finished run is returned as is; another config or seed is refused
    t = (tmp_path / "full" / "lr_sweep.csv").stat().st_mtime_ns
    RECIPES["lr_transfer"].run(tmp_path / "full", seed=1, progress=False, **cfg)
    assert (tmp_path / "full" / "lr_sweep.csv").stat().st_mtime_ns == t
    with pytest.raises(RunError, match="another config or seed"):
        RECIPES["lr_transfer"].run(tmp_path / "full", seed=2, progress=False, **cfg)


def test_lr_transfer_rejects_bad_configs(tmp_path) -> None:
    with pytest.raises(ValueError, match="reference_lr 3 must be one of the grid"):
        RECIPES["lr_transfer"].run(tmp_path / "a", progress=False, **{**TINY, "reference_lr": 3.0})
    with pytest.raises(ValueError, match="parametrization must be one of"):
        RECIPES["lr_transfer"].run(tmp_path / "b", progress=False, parametrization="standard")
    with pytest.raises(ValueError, match="lrs must be positive"):
        RECIPES["lr_transfer"].run(tmp_path / "c", progress=False, **{**TINY, "lrs": [4.0, -1.0]})
    with pytest.raises(ValueError, match="unknown config keys"):
        RECIPES["lr_transfer"].run(tmp_path / "d", progress=False, width=3)
    RECIPES["xor_grokking"].run(
        tmp_path / "x", progress=False, dim=20, mean_norm=4.0, width=4, steps=1, n_checkpoints=1
    )
    with pytest.raises(RunError, match="lr_sweep.csv"):
        detect_lr_transfer(tmp_path / "x")


def test_figures_draw_one_colour_per_width() -> None:
    from dynascope.probes import figures

    sweep = pd.DataFrame(
        {
            "width": [8, 8, 8, 16, 16, 16],
            "lr": [1.0, 2.0, 4.0] * 2,
            "final_train_loss": [0.3, 0.1, 0.2, 0.2, 0.05, math.inf],
        }
    )
    fig = figures.lr_sweep_figure(sweep)
    curves = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in curves] == ["width 8", "width 16"]
    assert curves[0].line.color != curves[1].line.color and list(curves[1].x) == [1.0, 2.0]
    rings = [t for t in fig.data if t.showlegend is False]
    assert [list(t.x) for t in rings] == [[2.0], [2.0]] and fig.layout.xaxis.type == "log"
    traj = pd.DataFrame({"step": [0, 5, 0, 5], "width": [8, 8, 16, 16], "sharpness": [0.1, 0.2, 0.1, 0.3]})
    tfig = figures.width_sharpness_figure(traj, two_over_lr=0.5)
    assert [t.name for t in tfig.data] == ["width 8", "width 16", "2/η"] and list(tfig.data[2].y) == [
        0.5,
        0.5,
    ]


def test_lr_transfer_page_shows_the_best_lr_per_width(tmp_path, monkeypatch) -> None:
    from test_app import _app

    run = RECIPES["lr_transfer"].run(tmp_path / "lrt", seed=0, progress=False, parametrization="mup", **TINY)
    ev = detect_lr_transfer(run)
    at = _app(tmp_path, monkeypatch, "lr_transfer")
    captions = "\n".join(str(c.value) for c in at.caption)
    want = ", ".join(f"{w} → {lr:g}" for w, lr in zip(ev.widths, ev.optimal_lrs))
    assert f"Best η per width: {want}" in captions, captions
    assert "Parametrisation: **mup**" in captions
    assert "detect_lr_transfer" in "\n".join(str(e.value) for e in [*at.success, *at.warning])
    names = [[t.get("name") for t in json.loads(c.proto.spec)["data"]] for c in at.get("plotly_chart")]
    assert len(names) == 2 and "width 16" in names[0] and names[1][-1] == "2/η"


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["mup", "sp", "ntk"])
def test_lr_transfer_recipe_meets_its_detector(tmp_path, parametrization: str) -> None:
    """The full recipe (widths 64…1024, η ∈ 2⁰…2⁶, 100 GD steps), seed 0: μP keeps the optimum on one grid
    point with the sharpness of all widths within ×1.35 after warm-up; SP and NTK move it and spread."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run = RECIPES["lr_transfer"].run(
        tmp_path / parametrization, seed=0, progress=False, parametrization=parametrization
    )
    wall = time.perf_counter() - t0
    ev = detect(run)
    print(f"lr_transfer {parametrization}: {wall:.1f} s, {ev.to_dict()}")
    assert ev.detected and ev.widths == [64, 128, 256, 512, 1024]
    if parametrization == "mup":
        assert ev.transfers and ev.optimum_shift == 0 and ev.fraction_in_band >= 0.5
        assert ev.spread_median <= 1.35
    else:
        assert not ev.transfers and ev.optimum_shift >= 1 and ev.spread_peak >= 1.5
    if parametrization == "sp":  # SP: wider nets start sharper (λ_max ∝ width at init), the optimum falls
        assert ev.spread_at_init >= 5.0 and ev.optimum_trend < 0
    if parametrization == "ntk":  # NTK: narrow nets sharpen, wide ones stay lazy; the optimum rises
        assert ev.spread_median >= 1.5 and ev.optimum_trend > 0


def _fake_run(path, parametrization: str, optima: dict[int, float], sharpness: dict[int, list[float]]):
    """An lr_transfer run folder written by hand: the loss is lowest at ``optima[width]`` on the grid
    1, 2, 4, 8, and ``sharpness[width]`` is logged at steps 0, 10, …, 100 (no warm-up beyond step 10)."""
    from dynascope.models import Run

    run = Run.create(
        path,
        model={"name": "mlp", "in_dim": 2, "width": 2, "depth": 1, "out_dim": 2},
        dataset={"name": "xor"},
        extra={
            "recipe": "lr_transfer",
            "phenomenon": "lr_transfer",
            "parametrization": parametrization,
            "config": {"steps": 100, "reference_lr": 2.0},
        },
    )
    rows = []
    for w, best in optima.items():
        for lr in (1.0, 2.0, 4.0, 8.0):
            loss = math.inf if lr == 8.0 else 0.1 + abs(math.log2(lr / best))
            rows.append({"width": w, "lr": lr, "log2_lr": math.log2(lr), "lr_effective": lr,
                         "final_train_loss": loss, "final_test_loss": loss, "final_test_acc": 0.5,
                         "diverged": lr == 8.0, "steps_run": 100, "wall_time": 0.0})  # fmt: skip
    pd.DataFrame(rows).to_csv(run.path / "lr_sweep.csv", index=False)
    run.log_metrics(
        [
            {"step": 10 * i, "width": w, "sharpness": v}
            for w, vs in sharpness.items()
            for i, v in enumerate(vs)
        ]
    )
    return run


def test_lr_transfer_detector_criteria(tmp_path) -> None:
    flat = [1.0] * 11
    agree = {64: flat, 256: [1.3] + [1.2] * 10}  # spread 1.3 at init, 1.2 after: inside the 1.35 band
    ev = detect_lr_transfer(_fake_run(tmp_path / "a", "mup", {64: 4.0, 256: 4.0}, agree))
    assert ev.detected and ev.transfers and ev.optimum_shift == 0 and ev.optimal_lrs == [4.0, 4.0]
    assert (
        ev.fraction_in_band == 1.0 and ev.n_steps_compared == 10 and ev.spread_at_init == pytest.approx(1.3)
    )
    # μP with the optimum one grid point off at the widest width: no transfer
    ev = detect_lr_transfer(_fake_run(tmp_path / "b", "mup", {64: 4.0, 256: 2.0}, agree))
    assert not ev.detected and ev.optimum_shift == 1 and ev.optimum_trend == -1
    # μP whose sharpness spreads ×1.5 on 6 of the 10 post-warm-up steps: no transfer
    spread = {64: flat, 256: [1.0] * 5 + [1.5] * 6}
    ev = detect_lr_transfer(_fake_run(tmp_path / "c", "mup", {64: 4.0, 256: 4.0}, spread))
    assert not ev.detected and ev.fraction_in_band == pytest.approx(0.4) and ev.spread_max == 1.5
    # NTK: the optimum rises and the widths' sharpness differs ×1.5: the predicted non-transfer
    ev = detect_lr_transfer(_fake_run(tmp_path / "d", "ntk", {64: 2.0, 256: 4.0}, spread))
    assert ev.detected and not ev.transfers and ev.optimum_trend == 1 and ev.spread_peak == 1.5
    # NTK with a moving optimum but agreeing sharpness (spread 1.3 < 1.5): not the NTK picture
    assert not detect_lr_transfer(_fake_run(tmp_path / "e", "ntk", {64: 2.0, 256: 4.0}, agree)).detected
    # the loss would fall beyond the grid, but η = 8 diverged: the optimum is the best finite rate
    ev = detect_lr_transfer(_fake_run(tmp_path / "f", "sp", {64: 2.0, 256: 16.0}, spread))
    assert ev.optimal_lrs == [2.0, 4.0] and ev.detected  # SP: moved up one point, spread ×1.5
    # a wider band does not make a moving optimum transfer
    assert (
        detect_lr_transfer(_fake_run(tmp_path / "g", "sp", {64: 2.0, 256: 4.0}, spread), band=2.0).transfers
        is False
    )
