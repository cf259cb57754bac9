"""Bad data and settings: a clear error or a recorded warning, never a raw torch error or a silent number."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynascope.probes as probes
from dynascope.datasets.batching import as_batches
from dynascope.probes.coherence import coherence_stats


def mlp(in_dim: int = 5, out_dim: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, 6), nn.Tanh(), nn.Linear(6, out_dim))


def data(n: int = 12, in_dim: int = 5, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_dim, generator=g), torch.randint(0, classes, (n,), generator=g)


PROBES = {
    "hessian_eigenvalues": lambda m, d: probes.hessian_eigenvalues(m, d, k=2),
    "hessian_trace": lambda m, d: probes.hessian_trace(m, d, n_matvecs=6),
    "gradient_coherence": lambda m, d: probes.gradient_coherence(m, d),
    "ntk_probe": lambda m, d: probes.ntk_probe(m, d, k=2),
    "sharpness": lambda m, d: probes.sharpness(m, d, trace=False),
    "hessian_density": lambda m, d: probes.hessian_density(m, d, n_probes=1, lanczos_steps=5),
    "neural_collapse": lambda m, d: probes.neural_collapse(m, d),
    "lmc_barrier": lambda m, d: probes.lmc_barrier(m, mlp(out_dim=4, seed=1), d, n_points=3),
}


# ----------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("name", sorted(PROBES))
@pytest.mark.parametrize("where", ["x", "y"])
def test_nonfinite_data_is_named_with_its_first_index(name, where):
    x, y = data()
    if where == "x":
        x[7, 2] = float("nan")
        x[9, 0] = float("inf")
        y_float = None
    else:
        y_float = torch.randn(12, 4, generator=torch.Generator().manual_seed(3))
        y_float[5, 1] = float("inf")
    with pytest.raises(ValueError) as e:
        PROBES[name](mlp(), (x, y if y_float is None else y_float))
    msg = str(e.value)
    if where == "x":
        assert "inputs (x) contain NaN/Inf: first at sample 7 (element [2] = nan)" in msg, msg
    else:
        assert "targets (y) contain NaN/Inf: first at sample 5 (element [1] = inf)" in msg, msg


def test_nonfinite_batch_of_a_loader_is_found_as_it_streams():
    x, y = data(n=40)
    x[29, 4] = float("-inf")
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(ValueError, match=r"inputs \(x\) contain NaN/Inf: first at sample 29 \(element \[4\]"):
        probes.hessian_trace(mlp(), loader, n_matvecs=6)


@pytest.mark.parametrize("which", ["x1", "x2"])
def test_empirical_ntk_names_nonfinite_inputs(which):
    x = data()[0]
    bad = x.clone()
    bad[4, 1] = float("nan")
    args = (bad, None) if which == "x1" else (x, bad)
    with pytest.raises(ValueError, match=rf"inputs \({which}\) contain NaN/Inf: first at sample 4"):
        probes.empirical_ntk(mlp(), *args)


def test_finiteness_is_checked_on_the_first_pass_only():
    x, y = data(n=16)
    source = as_batches((x, y), 4)
    assert sum(b.n for b in source) == 16  # first complete pass: checked
    x[3, 0] = float("nan")  # in place, after the check: later passes do not pay for checks
    assert sum(b.n for b in source) == 16
    with pytest.raises(ValueError, match="first at sample 3"):
        list(as_batches((x, y), 4))  # a new source (a new probe call) checks again


# ----------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("name", sorted(PROBES))
@pytest.mark.parametrize("bad", [7, -1])
def test_labels_out_of_range_are_a_clear_error(name, bad):
    x, y = data()
    y[6] = bad
    with pytest.raises(ValueError) as e:
        PROBES[name](mlp(out_dim=4), (x, y))
    msg = str(e.value)
    if name == "neural_collapse":  # its own check, over all labels at once
        assert "labels must lie in [0, 4)" in msg and str(bad) in msg, msg
    else:
        assert f"class label {bad} at index [6] is outside [0, 4)" in msg and "4 outputs" in msg, msg


def test_ignore_index_is_allowed_for_cross_entropy():
    x, y = data()
    y[6] = -100
    r = probes.hessian_trace(mlp(), (x, y), n_matvecs=6)
    assert torch.isfinite(torch.tensor(r.estimate))


def test_label_check_under_vmap_translates_the_kernel_error():
    from dynascope.probes.losses import resolve_loss

    loss = resolve_loss("cross_entropy")
    out = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"class label 9 at index \[1\] is outside \[0, 4\)"):
        loss.per_sample(out, torch.tensor([0, 9, 2]))
    per = torch.func.vmap(lambda o, t: loss.per_sample(o[None], t[None])[0])
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        per(out, torch.tensor([0, 9, 2]))


def test_label_check_is_remembered_per_batch_but_sees_in_place_changes(monkeypatch):
    from dynascope.probes import losses

    loss = losses.resolve_loss("cross_entropy")
    out, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    loss.per_sample(out, y)
    calls = []
    real_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda self, *a, **k: calls.append(1) or real_any(self, *a, **k))
    loss.per_sample(out, y)  # the same, unchanged batch: no second check (no device sync on GPU)
    assert calls == []
    y[2] = 5  # in place: a new version of the batch is checked again
    with pytest.raises(ValueError, match=r"class label 5 at index \[2\]"):
        loss.per_sample(out, y)


# ----------------------------------------------------------------------------------------- inputs vs model
@pytest.mark.parametrize("name", sorted(PROBES))
def test_integer_inputs_to_a_float_model(name):
    x, y = data()
    with pytest.raises(ValueError) as e:
        PROBES[name](mlp(), (x.round().long(), y))
    msg = str(e.value)
    assert "got int64 inputs of shape [12, 5]" in msg and "expects float32 inputs [..., 5]" in msg, msg


@pytest.mark.parametrize("name", sorted(PROBES))
def test_wrong_feature_size(name):
    x, y = data(in_dim=3)
    with pytest.raises(ValueError) as e:
        PROBES[name](mlp(in_dim=5), (x, y))
    msg = str(e.value)
    assert "got float32 inputs of shape [12, 3]" in msg and "first layer 0 (Linear)" in msg, msg
    assert "expects float32 inputs [..., 5]" in msg, msg


def test_model_input_check_restores_train_mode():
    from dynascope.probes.losses import check_model_input

    model = mlp().train()
    out = check_model_input(model, data()[0])
    assert out.shape == (8, 4) and all(m.training for m in model.modules())


# ----------------------------------------------------------------------------------------- coherence
def test_coherence_stats_report_plugin_estimates_beside_unbiased_ones():
    st = coherence_stats(4, s_sq=2.0, q=8.0)  # ‖S‖² < Q: the unbiased estimators go negative
    assert st["alpha"] < 0 and st["grad_norm_sq"] < 0 and st["noise_scale"] < 0
    assert st["alpha_with_self"] == pytest.approx(2.0 / 32.0)
    assert st["grad_norm_sq_plugin"] == pytest.approx(2.0 / 16.0)
    assert st["trace_cov_plugin"] == pytest.approx(8.0 / 4.0 - 2.0 / 16.0)
    assert st["noise_scale_plugin"] == pytest.approx(4 * 8.0 / 2.0 - 1)
    assert st["alpha_with_self"] == pytest.approx(1 / (1 + st["noise_scale_plugin"]))


def test_gradient_coherence_warns_on_negative_unbiased_estimates():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.ones(2, 1), torch.tensor([[1.0], [-1.0]])  # opposite gradients: S = 0
    with pytest.warns(UserWarning, match="unbiased estimates are negative") as rec:
        r = probes.gradient_coherence(model, (x, y))
    assert "alpha_with_self=0" in str(rec[0].message)
    assert r.alpha == pytest.approx(-1.0) and r.noise_scale == pytest.approx(-2.0)
    assert r.grad_norm_sq_plugin == 0.0 and r.noise_scale_plugin == float("inf")
    assert r.meta["negative_unbiased"] == ["alpha", "grad_norm_sq", "noise_scale"]
    assert "noise_scale_plugin" in r.to_frame().columns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coherent dataset does not warn
        ok = probes.gradient_coherence(model, (x, torch.tensor([[1.0], [2.0]])))
    assert ok.alpha > 0 and ok.meta["negative_unbiased"] == []


# ----------------------------------------------------------------------------------------- train-mode dropout
def test_train_mode_with_dropout_warns_and_records():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4))
    x, y = data()
    with pytest.warns(UserWarning, match=r"mode='train' with dropout \(2\)"):
        r1 = probes.hessian_eigenvalues(model, (x, y), k=2, mode="train")
    with pytest.warns(UserWarning, match="results change between calls"):
        r2 = probes.hessian_eigenvalues(model, (x, y), k=2, mode="train")
    assert r1.meta["stochastic_modules"] == ["2"] == r2.meta["stochastic_modules"]
    assert not torch.allclose(torch.as_tensor(r1.values), torch.as_tensor(r2.values))  # why it warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = probes.hessian_eigenvalues(model, (x, y), k=2)  # eval mode: dropout off, deterministic
    assert r.meta["stochastic_modules"] == [] and r.meta["deterministic"] is True
