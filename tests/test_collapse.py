"""Neural-collapse probe: exact geometries (simplex ETF, orthogonal frames), a brute-force float64
reference on random features, invariances, input errors and a real training run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope.probes as probes
from dynascope.probes.collapse import find_classifier


def _etf(n_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Simplex ETF columns [dim, C]: sqrt(C/(C−1)) U (I − 11ᵀ/C), U with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, n_classes, generator=g, dtype=torch.float64))
    centre = torch.eye(n_classes, dtype=torch.float64) - 1.0 / n_classes
    return math.sqrt(n_classes / (n_classes - 1)) * u @ centre


def _feature_model(means: torch.Tensor, head_weight: torch.Tensor | None = None) -> nn.Sequential:
    """One-hot class input x → features means[:, y] (a bias-free Linear) → head (default W = meansᵀ)."""
    d, c = means.shape
    feat = nn.Linear(c, d, bias=True).double()
    head = nn.Linear(d, c).double()
    with torch.no_grad():
        feat.weight.copy_(means)
        feat.bias.zero_()
        head.weight.copy_(means.T if head_weight is None else head_weight)
        head.bias.zero_()
    return nn.Sequential(feat, head)


def _onehot_data(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(sizes)])
    return F.one_hot(y, len(sizes)).double(), y


def _reference(h: np.ndarray, y: np.ndarray, w: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Brute-force NC metrics from stored features (float64 numpy, module-docstring formulas)."""
    c = w.shape[0]
    means = np.stack([h[y == k].mean(0) for k in range(c)])
    mg = means.mean(0)
    cen = means - mg
    sw = sum(np.outer(h[i] - means[y[i]], h[i] - means[y[i]]) for i in range(len(y))) / len(y)
    sb = cen.T @ cen / c
    gram = cen @ cen.T
    etf = (np.eye(c) - 1 / c) / np.sqrt(c - 1)
    ncc = np.argmin(((h[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    norms = np.linalg.norm(cen, axis=1)
    cos = (cen / norms[:, None]) @ (cen / norms[:, None]).T
    iu = np.triu_indices(c, 1)
    return {
        "nc1": np.trace(sw @ np.linalg.pinv(sb, rcond=1e-6, hermitian=True)) / c,
        "nc1_trace_ratio": np.trace(sw) / np.trace(sb),
        "nc2_equinorm": norms.std() / norms.mean(),
        "nc2_equiangular": np.abs(cos[iu] + 1 / (c - 1)).mean(),
        "nc2_etf_distance": np.linalg.norm(gram / np.linalg.norm(gram) - etf),
        "nc3": np.linalg.norm(w / np.linalg.norm(w) - cen / np.linalg.norm(cen)) ** 2,
        "nc4": float(np.mean(ncc == logits.argmax(1))),
    }


def test_exact_simplex_etf_is_fully_collapsed() -> None:
    c, d = 5, 8
    model = _feature_model(_etf(c, d))
    x, y = _onehot_data([4] * c)
    r = probes.neural_collapse(model, (x, y))
    assert r.nc1 == pytest.approx(0, abs=1e-12)
    assert r.nc1_trace_ratio == pytest.approx(0, abs=1e-12)
    assert r.nc2_etf_distance == pytest.approx(0, abs=1e-10)
    assert r.nc2_equinorm == pytest.approx(0, abs=1e-10)
    assert r.nc2_equinorm_classifier == pytest.approx(0, abs=1e-10)
    assert r.nc2_equiangular == pytest.approx(0, abs=1e-10)
    assert r.nc3 == pytest.approx(0, abs=1e-12)
    assert r.nc4 == 1.0 and r.accuracy == 1.0
    assert r.class_sizes == [4] * c and r.n_samples == 4 * c and r.feature_dim == d


def test_perturbed_etf_is_not_collapsed() -> None:
    """Negative control: a non-ETF geometry and a mismatched classifier move every metric off 0."""
    c, d = 5, 8
    means = _etf(c, d) + 0.3 * torch.randn(d, c, dtype=torch.float64)
    model = _feature_model(means, head_weight=torch.randn(c, d, dtype=torch.float64))
    x, y = _onehot_data([4] * c)
    r = probes.neural_collapse(model, (x, y))
    assert r.nc2_etf_distance > 0.05 and r.nc2_equinorm > 0.01 and r.nc3 > 0.1


def test_matches_bruteforce_reference_with_uneven_batches() -> None:
    torch.manual_seed(1)
    c, d, n = 4, 6, 53
    model = nn.Sequential(nn.Linear(5, d), nn.Tanh(), nn.Linear(d, c)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.arange(n) % c
    r = probes.neural_collapse(model, (x, y), batch_size=7)
    with torch.no_grad():
        h = model[:2](x).numpy()
        logits = model(x).numpy()
    ref = _reference(h, y.numpy(), model[2].weight.detach().numpy(), logits)
    for key, value in ref.items():
        assert getattr(r, key) == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_constant_shift_leaves_nc1_unchanged() -> None:
    torch.manual_seed(2)
    c, d, n = 3, 5, 60
    model = nn.Sequential(nn.Linear(4, d), nn.Linear(d, c)).double()
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted[0].bias += torch.tensor([3.0, -2.0, 7.0, 0.5, 10.0], dtype=torch.float64)
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    a = probes.neural_collapse(model, (x, y))
    b = probes.neural_collapse(shifted, (x, y))
    assert a.nc1 > 0.01
    for key in ("nc1", "nc1_trace_ratio", "nc2_equinorm", "nc2_equiangular", "nc2_etf_distance", "nc3"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9), key
    assert b.class_mean_norms_uncentred != pytest.approx(a.class_mean_norms_uncentred)


def test_imbalanced_orthogonal_frame() -> None:
    sizes = [3, 6, 9, 12]
    c = len(sizes)
    d = 6
    frame = torch.zeros(d, c, dtype=torch.float64)
    for k, n in enumerate(sizes):
        frame[k, k] = 0.5 + 0.1 * n  # orthogonal, length grows with class size
    x, y = _onehot_data(sizes)
    r = probes.neural_collapse(_feature_model(frame), (x, y))
    assert r.class_sizes == sizes
    assert r.orthogonality_offdiag == pytest.approx(0, abs=1e-12)
    assert r.norms_ordered_by_size is True
    assert r.size_norm_spearman == pytest.approx(1.0)
    assert r.nc1 == pytest.approx(0, abs=1e-12)
    assert r.class_mean_norms_uncentred == pytest.approx([0.5 + 0.1 * n for n in sizes])
    # negative controls: an ETF has large off-diagonal mass; reversed lengths are not ordered by size
    r_etf = probes.neural_collapse(_feature_model(_etf(c, d)), (x, y))
    assert r_etf.orthogonality_offdiag == pytest.approx(1 / math.sqrt(c))  # closed form for an ETF
    r_rev = probes.neural_collapse(_feature_model(frame.flip(1)), (x, y))
    assert r_rev.norms_ordered_by_size is False
    assert r_rev.size_norm_spearman == pytest.approx(-1.0)


def test_more_classes_than_feature_dimensions() -> None:
    torch.manual_seed(3)
    c, d, n = 10, 3, 80
    model = nn.Sequential(nn.Linear(4, d), nn.Linear(d, c)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.arange(n) % c
    r = probes.neural_collapse(model, (x, y))
    with torch.no_grad():
        h, logits = model[0](x).numpy(), model(x).numpy()
    ref = _reference(h, y.numpy(), model[1].weight.detach().numpy(), logits)
    assert math.isfinite(r.nc1) and r.nc1 == pytest.approx(ref["nc1"], rel=1e-8)
    assert r.nc2_etf_distance == pytest.approx(ref["nc2_etf_distance"], rel=1e-9)


def test_empty_class_is_an_error_and_hook_is_removed() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(10, 4)
    y = torch.tensor([0, 1] * 5)
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        probes.neural_collapse(model, (x, y))
    assert not model[2]._forward_hooks
    probes.neural_collapse(model, (x, torch.arange(10) % 3))
    assert not model[2]._forward_hooks


def test_bad_inputs() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(9, 4), torch.arange(9) % 3
    with pytest.raises(ValueError, match="not a submodule"):
        probes.neural_collapse(model, (x, y), classifier="nope")
    with pytest.raises(TypeError, match="not an nn.Linear"):
        probes.neural_collapse(model, (x, y), classifier="1")
    with pytest.raises(ValueError, match="labels must lie"):
        probes.neural_collapse(model, (x, y + 1))
    with pytest.raises(ValueError, match="n_classes=4"):
        probes.neural_collapse(model, (x, y), n_classes=4)
    with pytest.raises(ValueError, match="mode"):
        probes.neural_collapse(model, (x, y), mode="test")


def test_classifier_resolution_and_onehot_targets() -> None:
    from dynascope.models import build

    mlp = build("mlp", in_dim=4, width=6, depth=2, out_dim=3)
    assert find_classifier(mlp) == ("head", mlp.head)
    seq = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Identity())
    assert find_classifier(seq)[0] == "2"
    assert find_classifier(seq, seq[0])[0] == "0"
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    a = probes.neural_collapse(mlp, (x, y))
    b = probes.neural_collapse(mlp, (x, F.one_hot(y, 3).float()))
    assert a.nc1 == pytest.approx(b.nc1) and a.nc4 == b.nc4


def test_mode_restored_and_exports() -> None:
    from dynascope.models import build

    cnn = build("cnn", in_channels=1, image_size=4, channels=[3], out_dim=2, batchnorm=True)
    cnn.train()
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 2
    r = probes.neural_collapse(cnn, (x, y))
    assert cnn.training and all(m.training for m in cnn.modules())
    assert r.meta["mode"] == "eval" and r.meta["probe"] == "neural_collapse"
    json.dumps(r.to_dict())
    frame = r.to_frame()
    assert list(frame["class_size"]) == [4, 4] and "nc1" in frame
    assert r.figure() is not None


def test_trajectory_over_models() -> None:
    c, d = 4, 6
    x, y = _onehot_data([3] * c)
    etf = _etf(c, d)
    noisy = etf + 0.5 * torch.randn(d, c, dtype=torch.float64)
    models = [_feature_model(noisy), _feature_model(0.5 * noisy + 0.5 * etf), _feature_model(etf)]
    tr = probes.nc_trajectory(models, (x, y), steps=[0, 10, 20])
    assert tr.steps == [0, 10, 20]
    assert (
        tr.nc2_etf_distance[0] > tr.nc2_etf_distance[1] > tr.nc2_etf_distance[2] == pytest.approx(0, abs=1e-9)
    )
    frame = tr.to_frame()
    assert len(frame) == 3 and {"steps", "nc1", "nc4"} <= set(frame.columns)
    assert tr.figure() is not None
    json.dumps(tr.to_dict())
    with pytest.raises(ValueError, match="2 steps for 3 models"):
        probes.nc_trajectory(models, (x, y), steps=[0, 1])


@pytest.mark.slow
def test_nc1_decreases_after_zero_training_error_on_digits() -> None:
    """MLP (3×128, ReLU) trained full-batch with SGD on MSE to one-hot targets: once the training error
    is zero, NC1 keeps decreasing over the checkpoints (terminal phase of training)."""
    from dynascope.datasets import load
    from dynascope.models import build

    x, y = load("digits", n_train=300, flatten=True, seed=0).train
    model = build("mlp", in_dim=64, width=128, depth=3, out_dim=10, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=1e-4)
    target = F.one_hot(y, 10).float()
    ckpts = []
    for step in range(1, 1201):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            ckpts.append((step, copy.deepcopy(model)))
    tr = probes.nc_trajectory([m for _, m in ckpts], (x, y), steps=[s for s, _ in ckpts])
    perfect = [i for i, acc in enumerate(tr.accuracy) if acc == 1.0]
    assert perfect and perfect == list(range(perfect[0], len(ckpts))), tr.accuracy
    nc1 = [tr.nc1[i] for i in perfect]
    assert len(nc1) >= 3
    assert all(b < a for a, b in zip(nc1, nc1[1:])), nc1
    assert nc1[-1] < 0.6 * nc1[0], nc1


def test_train_mode_with_dropout_warns_and_is_recorded() -> None:
    import pytest
    from torch import nn

    from dynascope.probes import neural_collapse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = torch.randn(60, 4), torch.arange(60) % 3
    with pytest.warns(UserWarning, match="mode='train' with dropout"):
        res = neural_collapse(model, (x, y), mode="train")
    assert res.meta["stochastic_modules"] == ["2"]
    assert neural_collapse(model, (x, y)).meta["stochastic_modules"] == []
