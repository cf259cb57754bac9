"""Detectors on synthetic metric tables with known answers (fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from dynascope.models import Run
from dynascope.recipes import detect, detect_double_descent, detect_edge_of_stability, detect_grokking


def _grok_table(s_mem: int, s_gen: int, steps: int = 1000) -> pd.DataFrame:
    step = np.arange(0, steps + 1, 10)
    train_acc = np.clip(step / s_mem, 0, 1) * 0.995 + 0.005 * (step >= s_mem)
    test_acc = np.where(step >= s_gen, 0.95, 0.01)
    wn = 100 - 0.05 * step
    return pd.DataFrame({"step": step, "train_acc": train_acc, "test_acc": test_acc, "weight_norm": wn})


def test_grokking_detector_synthetic():
    ev = detect_grokking(_grok_table(100, 600))
    assert ev.s_mem == 100 and ev.s_gen == 600
    assert ev.delay_ratio == pytest.approx(6.0)
    assert ev.test_acc_at_mem == pytest.approx(0.01)
    assert ev.weight_norm_at_mem == pytest.approx(95.0) and ev.weight_norm_at_gen == pytest.approx(70.0)
    assert ev.final_test_acc == pytest.approx(0.95)
    assert ev.detected
    json.dumps(ev.to_dict())


def test_grokking_detector_rejects_ordinary_learning():
    ev = detect_grokking(_grok_table(100, 150))  # generalises right after memorising
    assert ev.delay_ratio == pytest.approx(1.5) and not ev.detected
    never = _grok_table(100, 10_000)
    ev = detect_grokking(never)
    assert ev.s_gen is None and math.isnan(ev.delay_ratio) and not ev.detected
    assert ev.to_dict()["delay_ratio"] is None


def test_grokking_detector_unsorted_and_missing_columns():
    df = _grok_table(100, 600).sample(frac=1.0, random_state=0)
    assert detect_grokking(df).s_mem == 100
    with pytest.raises(ValueError, match="test_acc"):
        detect_grokking(df.drop(columns=["test_acc"]))
    with pytest.raises(TypeError):
        detect_grokking([1, 2, 3])


def _dd_table(peak_at: float, n: int = 100) -> pd.DataFrame:
    p = np.array([5, 10, 20, 40, 50, 70, 90, 95, 100, 105, 110, 130, 200, 500, 1000])
    mse = 0.1 + 5.0 / (1 + ((p - peak_at) / 3.0) ** 2)
    cond = 10 + 1e4 / (1 + ((p - peak_at) / 3.0) ** 2)
    return pd.DataFrame({"step": p, "test_mse": mse, "cond": cond})


def test_double_descent_detector_synthetic():
    ev = detect_double_descent(_dd_table(100), threshold=100)
    assert ev.peak_x == 100 and ev.peak_location == pytest.approx(1.0)
    assert ev.peak_value == pytest.approx(5.1) and ev.best_under_x == 5
    assert ev.ratio_to_under == pytest.approx(5.1 / (0.1 + 5.0 / (1 + (95 / 3) ** 2)))
    assert ev.over_x == 1000 and ev.ratio_to_over > 40
    assert ev.cond_peak_x == 100 and ev.detected


def test_double_descent_detector_off_threshold_peak_not_detected():
    ev = detect_double_descent(_dd_table(200), threshold=100)
    assert ev.peak_x == 200 and ev.peak_location == pytest.approx(2.0) and not ev.detected
    flat = pd.DataFrame({"step": [10, 50, 100, 200, 1000], "test_mse": [1.0, 0.9, 0.95, 0.9, 0.85]})
    assert not detect_double_descent(flat, threshold=100).detected
    with pytest.raises(ValueError, match="threshold"):
        detect_double_descent(flat)


def _eos_table(lr: float = 0.5, leave_band: bool = False) -> pd.DataFrame:
    edge = 2 / lr
    step = np.arange(0, 401, 5)
    sharp = np.where(
        step % 25 == 0, np.minimum(0.6 * edge + step * 0.01, edge * (1.0 + 0.05 * np.sin(step))), np.nan
    )
    if leave_band:
        sharp[step == 300] = 0.5 * edge
    loss = 1.0 / (1 + step / 50) + 0.02 * (step % 20 == 0) * (step > 150)
    return pd.DataFrame({"step": step, "train_loss": loss, "sharpness": sharp, "lr": lr})


def test_eos_detector_synthetic():
    df = _eos_table()
    ev = detect_edge_of_stability(df)
    lam = df["sharpness"].dropna().to_numpy()
    steps = df.dropna()["step"].to_numpy()
    entry = steps[np.nonzero(lam >= 0.95 * 4)[0][0]]
    assert ev.lr == 0.5 and ev.two_over_lr == 4.0 and ev.entry_step == entry
    assert ev.initial_sharpness == pytest.approx(2.4) and ev.initial_ratio == pytest.approx(0.6)
    assert ev.fraction_in_band == 1.0 and ev.loss_increases >= 1
    assert ev.loss_at_entry == pytest.approx(float(df.loc[df.step == entry, "train_loss"].iloc[0]))
    assert ev.detected


def test_eos_detector_band_violation_and_lr():
    ev = detect_edge_of_stability(_eos_table(leave_band=True))
    assert ev.fraction_in_band < 1.0 and ev.min_ratio_after == pytest.approx(0.5)
    never = _eos_table().assign(sharpness=lambda d: d["sharpness"] * 0.5)
    ev = detect_edge_of_stability(never)
    assert ev.entry_step is None and not ev.detected
    with pytest.raises(ValueError, match="lr"):
        detect_edge_of_stability(_eos_table().drop(columns=["lr"]))
    assert detect_edge_of_stability(_eos_table(lr=0.25)).two_over_lr == 8.0


def test_detect_dispatches_on_run_folder(tmp_path):
    run = Run.create(
        tmp_path / "r",
        model={"name": "mlp", "in_dim": 2, "width": 3, "depth": 1, "out_dim": 2},
        dataset={"name": "xor"},
        optimizer={"name": "sgd", "lr": 0.5},
        extra={"phenomenon": "edge_of_stability"},
    )
    run.log_metrics(_eos_table().drop(columns=["lr"]).to_dict("records"))
    ev = detect(run)
    assert ev.lr == 0.5 and ev.detected
    assert detect_edge_of_stability(str(run.path)).entry_step == ev.entry_step
