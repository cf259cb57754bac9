"""Training loop, recipes and the phenomena they reproduce.

Fast tests: checkpoint schedules, optimizer configs, resume determinism (resumed run == uninterrupted
run, bit for bit), min-norm least squares and λ_max against dense references, sweep checkpoints.
Slow tests (CI runs them): the ``small`` variants of the grokking, double-descent and edge-of-stability
recipes, checked against the criteria of the issue.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dynascope.models import Run, build
from dynascope.recipes import (
    RECIPES,
    checkpoint_schedule,
    detect_double_descent,
    detect_edge_of_stability,
    detect_grokking,
    detect_neural_collapse,
    lambda_max,
    make_optimizer,
    min_norm_fit,
    train,
)
from dynascope.recipes.__main__ import main as cli_main


# ------------------------------------------------------------------------------------------ schedules
def test_checkpoint_schedule():
    assert checkpoint_schedule(100, 25) == [0, 25, 50, 75, 100]
    assert checkpoint_schedule(100, [10, 3]) == [0, 3, 10, 100]
    lin = checkpoint_schedule(100, "linear", n_checkpoints=4)
    assert lin == [0, 25, 50, 75, 100]
    log = checkpoint_schedule(1000, "log", n_checkpoints=10)
    assert log[0] == 0 and log[1] == 1 and log[-1] == 1000 and log == sorted(set(log))
    ratios = np.diff(np.log(log[2:]))
    assert np.allclose(ratios, ratios.mean(), rtol=0.3)  # geometric spacing
    with pytest.raises(ValueError, match="checkpoint step"):
        checkpoint_schedule(10, [11])
    with pytest.raises(ValueError, match="schedule"):
        checkpoint_schedule(10, "weird")


def test_make_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer({"name": "adamw", "lr": 1e-3, "weight_decay": 1.0, "betas": [0.9, 0.98]}, p)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer({"name": "lbfgs2", "lr": 1.0}, p)
    with pytest.raises(ValueError, match="invalid config"):
        make_optimizer({"name": "sgd", "lr": 1.0, "bogus": 3}, p)


# ----------------------------------------------------------------------------------- training loop
def _tiny_config(path, **kw):
    cfg = {
        "path": path,
        "model": {"name": "mlp", "in_dim": 2, "width": 8, "depth": 2, "out_dim": 2, "seed": 3},
        "dataset": {"name": "xor", "n_train": 64, "n_test": 32, "seed": 1},
        "optimizer": {"name": "adam", "lr": 0.01},
        "lr_schedule": {"type": "cosine", "lr": 0.01, "total_steps": 40},
        "loss": "cross_entropy",
        "seed": 7,
        "extra": {"recipe": "tiny", "phenomenon": "none"},
    }
    cfg.update(kw)
    return cfg


def _metrics(run: Run) -> pd.DataFrame:
    return run.metrics().drop(columns=["wall_time"])


def test_train_writes_run_folder(tmp_path):
    run = train(_tiny_config(tmp_path / "r"), steps=20, log_every=5, checkpoint_steps=10, progress=False)
    assert run.steps() == [0, 10, 20]
    cfg = json.loads((run.path / "run.json").read_text())
    assert cfg["optimizer"]["name"] == "adam" and cfg["loss"] == "cross_entropy"
    assert cfg["extra"]["recipe"] == "tiny"
    m = run.metrics()
    assert list(m["step"]) == [0, 5, 10, 15, 20]
    for col in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "weight_norm"):
        assert m[col].notna().all(), col
    # lr column follows the cosine schedule; step 0 loss is the initial model's loss
    assert m["lr"].iloc[2] == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 10 / 40)))
    model0 = run.load_model(0)
    x, y = run.load_dataset().train
    ce = torch.nn.functional.cross_entropy(model0(x), y).detach()
    assert m["train_loss"].iloc[0] == pytest.approx(float(ce), rel=1e-5)
    wn = float(torch.cat([p.detach().flatten() for p in run.load_model(20).parameters()]).norm())
    assert m["weight_norm"].iloc[-1] == pytest.approx(wn, rel=1e-5)
    assert run.checkpoint(10).optimizer_path is not None
    assert run.checkpoint(20).metrics["train_loss"] == pytest.approx(m["train_loss"].iloc[-1])


@pytest.mark.parametrize("batch_size", [None, 16])
def test_resume_equals_uninterrupted(tmp_path, batch_size):
    kw = {"steps": 30, "log_every": 5, "checkpoint_steps": 10, "batch_size": batch_size, "progress": False}
    full = train(_tiny_config(tmp_path / "full"), **kw)
    part = train(_tiny_config(tmp_path / "part"), **kw)
    # simulate a crash after step 15: the last checkpoint (step 30) and step 20 vanish, metrics overrun
    for step in (20, 30):
        ck = part.checkpoint(step)
        ck.optimizer_path.unlink()
        ck.path.unlink()
    resumed = train(str(part.path), **kw)
    assert resumed.steps() == full.steps()
    for step in full.steps():
        a, b = full.load_model(step).state_dict(), resumed.load_model(step).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), step
    pd.testing.assert_frame_equal(_metrics(full), _metrics(resumed))


def test_resume_is_not_a_restart(tmp_path):
    """A different seed really changes the mini-batch order (so the determinism test can fail)."""
    kw = {"steps": 10, "log_every": 5, "checkpoint_steps": 10, "batch_size": 16, "progress": False}
    a = train(_tiny_config(tmp_path / "a"), **kw)
    b = train(_tiny_config(tmp_path / "b", seed=8), **kw)
    assert not torch.equal(a.load_model(10).body[0].weight, b.load_model(10).body[0].weight)


def test_train_save_optimizer_last_and_errors(tmp_path):
    run = train(
        _tiny_config(tmp_path / "r"),
        steps=20,
        log_every=5,
        checkpoint_steps=5,
        save_optimizer="last",
        progress=False,
    )
    assert [c.step for c in run.checkpoints() if c.optimizer_path is not None] == [20]
    calls = []
    train(
        _tiny_config(tmp_path / "cb"),
        steps=4,
        log_every=2,
        checkpoint_steps=4,
        progress=lambda s, t, m: calls.append((s, t)),
    )
    assert calls == [(0, 4), (2, 4), (4, 4)]
    with pytest.raises(ValueError, match="steps"):
        train(_tiny_config(tmp_path / "x"), steps=-1)
    with pytest.raises(ValueError, match="path"):
        train({"model": {}}, steps=1)
    with pytest.raises(ValueError, match="unknown run config"):
        train({**_tiny_config(tmp_path / "y"), "bogus": 1}, steps=1)


# ------------------------------------------------------------------------------- numerics references
def test_min_norm_fit_matches_pinv():
    g = torch.Generator().manual_seed(0)
    for n, p in [(20, 8), (20, 20), (20, 50)]:
        phi = torch.randn(n, p, generator=g, dtype=torch.float64)
        y = torch.randn(n, 3, generator=g, dtype=torch.float64)
        a, cond = min_norm_fit(phi, y)
        assert torch.allclose(a, torch.linalg.pinv(phi) @ y, atol=1e-8)
        s = torch.linalg.svdvals(phi)
        assert cond == pytest.approx(float(s[0] / s[-1]))
        if p > n:
            assert torch.allclose(phi @ a, y, atol=1e-8)  # interpolates


def test_lambda_max_matches_dense_hessian():
    model = build("mlp", in_dim=3, width=4, depth=2, out_dim=2, activation="tanh", seed=0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 2, generator=g, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = torch.func.functional_call(model, params, (x,))
        return (0.5 * ((out - y) ** 2).sum(1)).mean()

    dense = torch.func.hessian(loss)(flat0)
    lam, vec, conv = lambda_max(model, (x, y), tol=1e-8)
    assert conv and lam == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)


def test_sweep_checkpoints_load_their_own_size(tmp_path):
    run = RECIPES["double_descent"].run(
        tmp_path / "dd", p_grid=[20, 60, 120], trials=1, n_train=60, progress=False
    )
    assert run.steps() == [20, 60, 120]
    m = run.load_model(120)
    assert m.head.weight.shape == (10, 120)
    x, y = run.load_dataset().train
    with torch.no_grad():
        assert torch.allclose(m(x), y, atol=1e-3)  # p = 2n interpolates the (noisy) training labels
    assert run.load_model(20).head.weight.shape == (10, 20)
    again = RECIPES["double_descent"].run(tmp_path / "dd", p_grid=[20], trials=1, n_train=60, progress=False)
    assert again.steps() == [20, 60, 120]  # a complete sweep is reused, not redone
    with pytest.raises(ValueError, match="unknown config"):
        RECIPES["double_descent"].run(tmp_path / "dd2", bogus=1)


def test_cli_list_and_errors(capsys, tmp_path):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("grokking", "double_descent", "edge_of_stability", "double_descent_nn"):
        assert name in out
    assert cli_main(["nope", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["edge_of_stability", "--out", str(tmp_path / "y"), "--set", "bogus=1"]) == 2


def test_recipe_registry_configs():
    g = RECIPES["grokking"].config
    assert (g["p"], g["train_fraction"], g["d_embed"], g["width"]) == (97, 0.3, 128, 512)
    assert (g["lr"], g["weight_decay"], list(g["betas"])) == (3e-3, 1.0, [0.9, 0.98])
    t = RECIPES["grokking_transformer"].config
    assert (t["p"], t["d_model"], t["n_heads"], t["d_mlp"], t["weight_decay"]) == (113, 128, 4, 512, 1.0)
    assert RECIPES["edge_of_stability"].config["lr"] == 0.5
    assert RECIPES["edge_of_stability_lr0.25"].config["lr"] == 0.25
    assert RECIPES["double_descent"].config["n_train"] == 300
    for r in RECIPES.values():
        assert r.resolve(small=True)  # every recipe has a consistent small variant


# ------------------------------------------------------------------------------------ phenomena (slow)
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_grokking_small_recipe(tmp_path, seed):
    """Reduced grokking (GROKKING_SMALL: 50% train pairs, 32-dim embeddings, width 128; same optimizer)."""
    torch.set_num_threads(1)
    run = RECIPES["grokking"].run(tmp_path / "g", small=True, seed=seed, progress=False)
    ev = detect_grokking(run)
    assert ev.s_mem is not None and ev.s_gen is not None
    assert ev.test_acc_at_mem < 0.05
    assert ev.s_gen >= 3 * ev.s_mem
    assert ev.final_test_acc >= 0.95
    assert ev.weight_norm_at_gen < ev.weight_norm_at_mem
    assert ev.detected


@pytest.mark.slow
def test_double_descent_recipe(tmp_path):
    """The full random-features recipe minus trials (3 instead of 5) and with the coarse p grid."""
    run = RECIPES["double_descent"].run(tmp_path / "dd", small=True, progress=False)
    ev = detect_double_descent(run)
    n = 300
    assert abs(ev.peak_x - n) <= 0.1 * n
    assert ev.ratio_to_under >= 10 and ev.over_x == 10 * n and ev.ratio_to_over >= 10
    assert abs(ev.cond_peak_x - n) <= 0.1 * n
    assert ev.detected
    m = run.metrics().set_index("step")
    assert m.loc[10 * n, "train_mse"] < 1e-12 and m.loc[n // 2, "train_mse"] > 1e-3


@pytest.mark.slow
def test_neural_collapse_recipe_reaches_the_terminal_phase(tmp_path):
    """The full recipe (6000 full-batch steps): NC1 falls by orders of magnitude (measured 0.60 → 5.4e-4,
    3.0 decades, 1.8 of them after the training set is fit), NC4 reaches 1 and the class means approach
    the simplex ETF."""
    torch.set_num_threads(1)
    run = RECIPES["neural_collapse"].run(tmp_path / "nc", progress=False)
    ev = detect_neural_collapse(run)
    assert ev.detected, ev
    assert ev.nc1_decades_total >= 2.0 and ev.nc1_decades >= 1.0
    assert ev.nc4_final >= 0.99 and ev.etf_distance_final < 0.5 * ev.etf_distance_initial
    assert ev.nc1[-1] == min(ev.nc1)


def test_neural_collapse_detector_control_stopped_before_the_terminal_phase(tmp_path):
    """Control: the same recipe stopped at step 40, before the training set is fit, is not detected."""
    run = RECIPES["neural_collapse"].run(tmp_path / "nc", progress=False, steps=40, n_checkpoints=5)
    ev = detect_neural_collapse(run)
    assert not ev.detected
    assert ev.fit_step is None and math.isnan(ev.nc1_decades)
    assert ev.steps[0] == 0 and ev.steps[-1] == 40


@pytest.mark.slow
def test_edge_of_stability_recipe(tmp_path):
    """The EoS recipe (η = 0.5) with EOS_SMALL: 1300 steps, λ_max every 50 steps."""
    torch.set_num_threads(1)
    run = RECIPES["edge_of_stability"].run(tmp_path / "eos", small=True, progress=False)
    ev = detect_edge_of_stability(run)
    assert ev.two_over_lr == 4.0
    assert ev.initial_sharpness < 0.7 * ev.two_over_lr
    assert ev.entry_step is not None and ev.n_after >= 10
    m = run.metrics().dropna(subset=["sharpness"])
    later = m[m.step > ev.entry_step]["sharpness_ratio"]
    assert ((later >= 0.9) & (later <= 1.2)).all(), later.describe()
    assert ev.loss_increases >= 1
    assert ev.final_loss < 0.5 * ev.loss_at_entry
    assert ev.detected


def test_ensure_demos_generates_once(tmp_path, monkeypatch):
    from dynascope.recipes import demos

    tiny = (
        demos.DemoSpec(
            "dd", "double_descent", "tiny sweep", {"p_grid": [20, 60], "trials": 1, "n_train": 60}
        ),
        demos.DemoSpec(
            "eos", "edge_of_stability", "tiny eos", {"steps": 4, "width": 8, "checkpoint_every": 2}
        ),
    )
    monkeypatch.setattr(demos, "DEMOS", tiny)
    seen = []
    runs = demos.ensure_demos(tmp_path, progress=lambda name, s, t, m: seen.append((name, s, t)))
    assert set(runs) == {"dd", "eos"} and runs["eos"].steps() == [0, 2, 4]
    assert ("dd", 2, 2) in seen and ("eos", 4, 4) in seen
    assert "sharpness" in runs["eos"].metrics().columns
    mtime = runs["eos"].checkpoint(4).path.stat().st_mtime_ns
    seen.clear()
    again = demos.ensure_demos(tmp_path, progress=lambda *a: seen.append(a))
    assert not seen and again["eos"].checkpoint(4).path.stat().st_mtime_ns == mtime  # nothing regenerated
    assert [d.name for d in demos.DEMOS] == ["dd", "eos"]


def test_double_descent_nn_runs_a_width_sweep(tmp_path):
    run = RECIPES["double_descent_nn"].run(
        tmp_path / "nn", widths=[3, 5], steps=5, n_train=50, progress=False
    )
    m = run.metrics()
    assert list(m["step"]) == [3, 5] and list(m["n_params"]) == [3 * 75 + 10, 5 * 75 + 10]
    assert run.load_model(5).body[0].weight.shape == (5, 64)
    assert run.config["extra"]["interpolation_threshold"] == pytest.approx((50 * 10 - 10) / 75)


def test_edge_of_stability_adam_saves_optimizer_state_at_every_checkpoint(tmp_path):
    """The Adam EoS recipe's stated schedule: optimizer state beside every checkpoint (with per-parameter
    entries after the first update), Adam at η from the config, no λ_max(H) logged."""
    from dynascope.recipes.eos import EOS_ADAM_CONFIG, EOS_ADAM_SMALL

    assert EOS_ADAM_CONFIG["save_optimizer"] is True and EOS_ADAM_CONFIG["optimizer"] == "adam"
    assert RECIPES["edge_of_stability_adam"].resolve(small=True)["steps"] == EOS_ADAM_SMALL["steps"] == 400
    run = RECIPES["edge_of_stability_adam"].run(
        tmp_path / "adam", small=True, progress=False, steps=20, checkpoint_every=5, width=16
    )
    assert run.steps() == [0, 5, 10, 15, 20]
    assert run.optimizer_config["name"] == "adam" and run.optimizer_config["lr"] == 1e-3
    assert run.extra["recipe"] == "edge_of_stability_adam"
    assert run.extra["stability_threshold"] == pytest.approx(38_000.0)
    for s in run.steps():
        assert run.checkpoint(s).optimizer_path is not None, s
        state = run.load_optimizer_state(s)
        assert bool(state["state"]) == (s > 0), s  # Adam has no state before its first update
    assert "sharpness" not in run.metrics().columns
    # λ_max(P⁻¹H) logged inline at every checkpoint after the first update, equal to the probe on the saved
    # checkpoint and optimizer state (to the inline Lanczos tolerance 1e-3)
    from dynascope.probes import sharpness

    logged = run.metrics().dropna(subset=["precond_sharpness"]).set_index("step")
    assert logged.index.tolist() == [5, 10, 15, 20]
    assert logged["precond_threshold"].tolist() == pytest.approx([38_000.0] * 4)
    ref = sharpness(run.load_model(20), run.load_dataset().train, loss="half_sse",
                    optimizer_state=run.load_optimizer_state(20), trace=False, tol=1e-8)  # fmt: skip
    assert logged.loc[20, "precond_sharpness"] == pytest.approx(ref.preconditioned_lambda_max, rel=1e-3)
    assert logged.loc[20, "precond_ratio"] == pytest.approx(ref.preconditioned_ratio, rel=1e-3)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        RECIPES["edge_of_stability"].run(tmp_path / "bad", optimizer="rmsprop", steps=1, progress=False)


@pytest.mark.slow
def test_edge_of_stability_adam_recipe_reaches_the_preconditioned_threshold(tmp_path):
    """EOS_ADAM_SMALL (400 full-batch Adam steps, η = 1e-3): λ_max(P⁻¹H) from the saved state starts far
    below 38/η (< 0.2 of it at step 50) and hovers at it from step 300 on (0.885 and 1.006 of it at steps
    300 and 400; asserted within 0.85–1.2)."""
    from dynascope.probes import sharpness

    torch.set_num_threads(1)
    run = RECIPES["edge_of_stability_adam"].run(tmp_path / "adam", small=True, progress=False)
    assert len(run.steps()) == 9
    data = run.load_dataset().train
    ratios = {}
    for s in (50, 300, 400):
        r = sharpness(run.load_model(s), data, loss="half_sse", optimizer_state=run.load_optimizer_state(s))
        assert r.preconditioned_threshold == pytest.approx(38_000.0)
        ratios[s] = r.preconditioned_ratio
    assert ratios[50] < 0.2, ratios
    assert 0.85 <= ratios[300] <= 1.2 and 0.85 <= ratios[400] <= 1.2, ratios


def test_build_demos_writes_a_status_file_the_app_reads(tmp_path, monkeypatch):
    """``build_demos`` (what ``dynascope app`` starts in a background process) generates the missing
    demos cheapest first and keeps ``.demos_status.json`` current; ``main`` does nothing when all are done."""
    import json
    import os

    from dynascope.recipes import demos

    tiny = (
        demos.DemoSpec(
            "edge_of_stability",
            "edge_of_stability",
            "tiny eos",
            {"steps": 4, "width": 8, "checkpoint_every": 2},
        ),
        demos.DemoSpec(
            "double_descent", "double_descent", "tiny sweep", {"p_grid": [20, 60], "trials": 1, "n_train": 60}
        ),
    )
    monkeypatch.setattr(demos, "DEMOS", tiny)
    seen: list[dict] = []
    real = demos.ensure_demos

    def spy(root, *, progress=None, names=None):
        seen.append(json.loads(demos.status_path(root).read_text()))
        return real(root, progress=progress, names=names)

    monkeypatch.setattr(demos, "ensure_demos", spy)
    status = demos.build_demos(tmp_path, min_interval=0.0)
    assert status["names"] == ["double_descent", "edge_of_stability"]  # cheapest first
    assert seen[0]["pid"] == os.getpid() and not seen[0]["done"] and seen[0]["finished"] == []
    assert seen[1]["finished"] == ["double_descent"] and seen[1]["progress"]["double_descent"] == [2, 2]
    on_disk = demos.read_status(tmp_path)
    assert on_disk["done"] and on_disk["error"] is None and on_disk["finished"] == status["names"]
    assert on_disk["finished_after"] > 0 and on_disk["progress"]["edge_of_stability"] == [4, 4]
    assert set(on_disk["seconds"]) == set(status["names"]) and all(v > 0 for v in on_disk["seconds"].values())
    assert sum(on_disk["seconds"].values()) <= on_disk["finished_after"]
    assert demos.writer_alive(on_disk) and not demos.writer_alive({"pid": 2**22 + 12345})
    assert demos.main([str(tmp_path)]) == 0  # everything complete: the stale status file goes
    assert demos.read_status(tmp_path) is None
    assert demos.main([]) == 2


def test_edge_of_stability_detector_reads_the_preconditioned_sharpness():
    """An Adam run's metrics (no λ_max(H), ``precond_sharpness`` against ``precond_threshold`` = 38/η): the
    ratio rises to the threshold and hovers in the band while the loss rises once → detected on that
    quantity, not on 2/η (λ_max(P⁻¹H) ≈ 38,000 is 19× 2/η = 2,000)."""
    import pandas as pd

    from dynascope.recipes import detect_edge_of_stability

    steps = list(range(0, 1001, 100))
    ratio = [None, 0.1, 0.5, 0.97, 1.05, 0.95, 1.1, 1.0, 0.98, 1.02, 1.0]
    df = pd.DataFrame({
        "step": steps,
        "precond_sharpness": [None if r is None else 38_000.0 * r for r in ratio],
        "precond_threshold": [None] + [38_000.0] * 10,
        "train_loss": [1.0, 0.5, 0.3, 0.2, 0.25, 0.15, 0.1, 0.12, 0.08, 0.07, 0.06],
    })  # fmt: skip
    ev = detect_edge_of_stability(df, lr=1e-3)
    assert ev.detected and ev.entry_step == 300 and ev.two_over_lr == pytest.approx(38_000.0)
    assert ev.quantity.startswith("lambda_max(P^-1 H)") and ev.fraction_in_band == 1.0
    below = df.assign(precond_sharpness=df["precond_sharpness"] * 0.5)  # never reaches the threshold
    assert not detect_edge_of_stability(below, lr=1e-3).detected
    with pytest.raises(ValueError, match="precond_sharpness with precond_threshold"):
        detect_edge_of_stability(df.drop(columns=["precond_sharpness"]), lr=1e-3)


def test_edge_of_stability_writes_its_lambda_max_to_the_result_store(tmp_path):
    """The recipe's λ_max (the one path: probes.sharpness, warm-started) lands in the result store under the
    runner's key (queued by the recipe, filed by the runner when the run is opened), so the trajectory view
    shows it and the runner finds it cached; the stored value is the logged one, and it equals a cold probe
    on the saved checkpoint to the Lanczos tolerance."""
    from dynascope import open_run
    from dynascope.probes import sharpness
    from dynascope.runner import run_probe

    run = RECIPES["edge_of_stability"].run(tmp_path / "eos", progress=False, steps=4, width=8,
                                           checkpoint_every=2, n_train=64)  # fmt: skip
    logged = run.metrics().dropna(subset=["sharpness"]).set_index("step")["sharpness"]
    assert logged.index.tolist() == [0, 2, 4]
    assert len(run.pending_results()) == 3  # queued by the recipe (it sits below the runner) ...
    frame = open_run(run.path).trajectory("sharpness")
    assert run.pending_results() == []  # ... and filed into the store when the run is read
    lam = frame[frame["quantity"] == "lambda_max"].set_index("step")["value"]
    assert lam.index.tolist() == [0, 2, 4]
    assert lam.tolist() == pytest.approx(logged.tolist(), rel=1e-12)
    res, cached = run_probe(run, "sharpness", step=4, params={"k": 1, "tol": 1e-3, "trace": False, "lr": 0.5})
    assert cached and res.lambda_max == pytest.approx(float(logged.loc[4]), rel=1e-12)
    cold = sharpness(run.load_model(4), run.load_dataset().train, loss="half_sse", trace=False, tol=1e-8)
    assert cold.lambda_max == pytest.approx(float(logged.loc[4]), rel=1e-3)
