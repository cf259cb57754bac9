"""Per-example gradients and gradient coherence: exact references and the real-vs-random-label signal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dynascope.probes.coherence import coherence_stats, gradient_coherence
from dynascope.probes.per_example import per_example_gradients

D = torch.float64


def _mlp(seed: int = 0, d: int = 5, h: int = 6, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()


def _data(n: int = 23, d: int = 5, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, c, (n,), generator=g)


def _loop_gradients(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
    rows = []
    for i in range(X.shape[0]):
        model.zero_grad()
        loss_fn(model(X[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    return torch.stack(rows)


def test_per_example_gradients_equal_per_sample_autograd_loop() -> None:
    model = _mlp()
    X, y = _data()
    ref = _loop_gradients(model, X, y, nn.functional.cross_entropy)
    G = per_example_gradients(model, (X, y), chunk_size=7)  # uneven chunks: 7, 7, 7, 2
    assert G.shape == ref.shape == (23, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
    # a parameter block: the matching columns
    G_head = per_example_gradients(model, (X, y), params="2", chunk_size=5)
    n_body = sum(p.numel() for p in model[0].parameters())
    torch.testing.assert_close(G_head, ref[:, n_body:], rtol=1e-12, atol=1e-12)


def test_per_example_gradients_regression_and_batchnorm_eval_mode() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(torch.randn(64, 4, dtype=D) * 3 + 1)
    X = torch.randn(9, 4, dtype=D)
    y = torch.randn(9, 2, dtype=D)
    G = per_example_gradients(model, (X, y), loss="half_sse", chunk_size=4)
    assert model.training  # the caller's mode is restored
    model.eval()
    ref = _loop_gradients(model, X, y, lambda o, t: 0.5 * ((o - t) ** 2).sum())
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)


def test_m_coherence_is_one_for_orthogonal_and_m_for_identical_gradients() -> None:
    # linear model at w = 0 with half_sse: g_i = −y_i x_i
    n = 8
    model = nn.Linear(n, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    ortho = gradient_coherence(model, (torch.eye(n, dtype=D), torch.ones(n, 1, dtype=D)), loss="half_sse")
    assert ortho.m == n
    assert ortho.m_coherence == pytest.approx(1.0, abs=1e-12)
    assert ortho.alpha == pytest.approx(0.0, abs=1e-12)
    assert ortho.alpha_with_self == pytest.approx(1.0 / n)
    same_x = torch.ones(n, n, dtype=D) / n**0.5
    ident = gradient_coherence(model, (same_x, torch.ones(n, 1, dtype=D)), loss="half_sse")
    assert ident.m_coherence == pytest.approx(float(n))
    assert ident.alpha == pytest.approx(1.0) and ident.alpha_with_self == pytest.approx(1.0)
    assert ident.noise_scale == pytest.approx(0.0, abs=1e-12)  # no variance
    ident_m = gradient_coherence(model, (same_x, torch.ones(n, 1, dtype=D)), loss="half_sse", m=5)
    assert ident_m.m == 5 and ident_m.m_coherence == pytest.approx(5.0)
    assert gradient_coherence(
        model, (torch.eye(n, dtype=D), torch.ones(n, 1, dtype=D)), loss="half_sse", m=5
    ).m_coherence == pytest.approx(1.0)


def test_estimators_match_explicit_pairwise_formulas_and_identity() -> None:
    model = _mlp(seed=2)
    X, y = _data(n=31, seed=2)
    G = _loop_gradients(model, X, y, nn.functional.cross_entropy)
    n = G.shape[0]
    gram = G @ G.T
    off = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))  # E_{i≠j} g_i·g_j
    diag = gram.diagonal().mean()  # E ‖g_i‖²
    tr_cov = torch.cov(G.T).trace()  # unbiased sample covariance
    res = gradient_coherence(model, (X, y), chunk_size=8)
    assert res.alpha == pytest.approx(float(off / diag), rel=1e-10)
    assert res.alpha_with_self == pytest.approx(float(G.mean(0).norm() ** 2 / diag), rel=1e-10)
    assert res.trace_cov == pytest.approx(float(tr_cov), rel=1e-10)
    assert res.grad_norm_sq == pytest.approx(float(off), rel=1e-10)
    assert res.noise_scale == pytest.approx(float(tr_cov / off), rel=1e-10)
    assert res.alpha == pytest.approx(1.0 / (1.0 + res.noise_scale), rel=1e-12)  # exact identity
    # a random m-subset's ratio of expectations E‖Σ_M g‖² / E Σ_M ‖g‖² = 1 + (m − 1) α
    m = 6
    res_m = gradient_coherence(model, (X, y), m=m)
    exp_num = m * diag + m * (m - 1) * off
    assert res_m.m_coherence == pytest.approx(float(exp_num / (m * diag)), rel=1e-10)
    # per-class rows equal the estimator on each class's own gradients
    for row in res.per_class:
        Gc = G[y == row["class"]]
        sc = float(Gc.sum(0).norm() ** 2)
        st = coherence_stats(Gc.shape[0], sc, float((Gc**2).sum()))
        assert row["n"] == Gc.shape[0]
        assert row["alpha"] == pytest.approx(st["alpha"], rel=1e-10)
        assert row["alpha"] == pytest.approx(1.0 / (1.0 + row["noise_scale"]), rel=1e-10)
    frame = res.to_frame()
    assert list(frame["group"])[0] == "all" and len(frame) == 1 + len(res.per_class) == 4
    d = json.loads(json.dumps(res.to_dict()))
    assert d["meta"]["mode"] == "eval" and "i != j" in d["meta"]["pairs"]
    fig = res.figure()  # bars per class, α(all) as a line named in the legend
    assert [t.name for t in fig.data][0] == "α per class" and fig.data[1].name.startswith("α (all)")
    assert list(fig.data[1].y) == pytest.approx([res.alpha] * 3)


def test_coherence_stats_edge_cases_and_bad_input() -> None:
    one = coherence_stats(1, 4.0, 4.0)
    assert one["alpha_with_self"] == 1.0 and one["alpha"] != one["alpha"]  # NaN: no distinct pairs
    model = _mlp()
    X, y = _data()
    with pytest.raises(ValueError, match="m must"):
        gradient_coherence(model, (X, y), m=0)
    with pytest.raises(ValueError, match="chunk_size"):
        gradient_coherence(model, (X, y), chunk_size=0)
    with pytest.raises(ValueError, match="data tuple"):
        gradient_coherence(model, [1, 2, 3])
    with pytest.raises(TypeError, match="nn.Module"):
        gradient_coherence(lambda x: x, (X, y))


def test_real_labels_are_more_coherent_than_random_labels_early_in_training() -> None:
    from dynascope.datasets import load
    from dynascope.models import build

    alphas, mcoh = {}, {}
    for noise in (0.0, 1.0):
        x, y = load("digits", n_train=300, label_noise=noise, seed=0).train
        model = build("mlp", in_dim=64, width=32, depth=1, out_dim=10, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):  # a few SGD steps (batch 32)
            idx = torch.randperm(300, generator=gen)[:32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        res = gradient_coherence(model, (x, y), per_class=False, m=100)
        alphas[noise], mcoh[noise] = res.alpha, res.m_coherence
    assert alphas[0.0] > 0.005
    assert alphas[0.0] > 5 * abs(alphas[1.0])
    assert mcoh[0.0] > 1.5 and mcoh[1.0] < 1.2
