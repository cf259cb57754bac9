"""Hessian spectrum probes (eigenvalues, trace, density, per-layer) against exact references.

References: dense float64 matrices from ``torch.autograd.functional`` (see tests/test_operators.py)
and synthetic operators with known spectra (a few outliers above a bulk, as in deep nets).
"""

from __future__ import annotations

import json

import pytest
import torch
from dense import random_symmetric
from test_operators import cases, dense_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynascope.probes as probes
from dynascope.probes.density import slq, smooth_density, spectral_moments, wasserstein1
from dynascope.probes.functional import parameter_groups
from dynascope.probes.operators import DenseOperator, random_vectors
from dynascope.probes.trace import estimate_trace


def outliers_plus_bulk(n: int = 400, seed: int = 0) -> torch.Tensor:
    """Outliers well above a Marchenko-Pastur-like positive bulk with a small negative part."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([40.0, 25.0, 17.0, 11.0, 7.0, 5.0], dtype=torch.float64)
    bulk = torch.randn(n - 6, generator=g, dtype=torch.float64) ** 2 * 0.4 - 0.1
    return torch.cat([outliers, bulk])


def model_case(name: str):
    make, x, y = cases()[name]
    torch.manual_seed(0)
    return make().double(), x, y


# ------------------------------------------------------------------------------ eigenvalues
@pytest.mark.parametrize("case", ["mlp-ce", "mlp-mse", "cnn-bn"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_top_eigenvalues_match_dense(case: str, kind: str) -> None:
    model, x, y = model_case(case)
    ref = torch.linalg.eigvalsh(dense_reference(model, x, y, kind)).flip(0)
    res = probes.hessian_eigenvalues(model, (x, y), k=3, tol=1e-7, operator=kind)
    assert torch.allclose(res.values, ref[:3], rtol=1e-8, atol=1e-12), (res.values, ref[:3])
    assert bool(res.converged.all())
    assert res.n_matvecs == res.meta["n_matvecs"] > 0
    assert res.meta["operator"] == kind and res.meta["determinism_rel_diff"] == 0.0
    # eigenvectors satisfy H u = θ u against the dense matrix
    H = dense_reference(model, x, y, kind)
    R = H @ res.vectors - res.vectors * res.values
    assert float(R.norm(dim=0).max()) < 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("which", ["SA", "BE", "LM"])
def test_other_ends_match_dense(which: str) -> None:
    model, x, y = model_case("mlp-ce")
    lam = torch.linalg.eigvalsh(dense_reference(model, x, y, "hessian"))
    res = probes.hessian_eigenvalues(model, (x, y), k=2, which=which, tol=1e-8, max_iter=lam.numel())
    s = lam.flip(0)
    expected = {
        "SA": s[-2:],
        "BE": torch.cat([s[:2], s[-2:]]),
        "LM": torch.sort(lam[torch.argsort(lam.abs(), descending=True)[:2]], descending=True).values,
    }[which]
    assert torch.allclose(res.values, expected, rtol=1e-7, atol=1e-10)


def test_float32_model_float64_products_and_data_forms() -> None:
    make, x, y = cases()["mlp-ce"]
    torch.manual_seed(0)
    model = make()  # float32
    ref = torch.linalg.eigvalsh(dense_reference(make_double(model), x, y, "hessian")).flip(0)[:2]
    xf = x.float()
    r64 = probes.hessian_eigenvalues(model, (xf, y), k=2, tol=1e-8, dtype=torch.float64)
    assert r64.meta["dtype"] == "torch.float64" and next(model.parameters()).dtype == torch.float32
    assert torch.allclose(r64.values, ref, rtol=1e-8)
    r32 = probes.hessian_eigenvalues(model, (xf, y), k=2, tol=1e-4)
    assert torch.allclose(r32.values, ref, rtol=1e-5)
    ds = TensorDataset(xf, y)
    for data in (ds, DataLoader(ds, batch_size=4)):
        r = probes.hessian_eigenvalues(model, data, k=2, tol=1e-8, dtype=torch.float64)
        assert torch.allclose(r.values, ref, rtol=1e-8)
        assert r.meta["n_samples"] == 11 and r.meta["reduction"] == "mean over 11 samples"


def make_double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def test_warm_start_from_previous_checkpoint_saves_products() -> None:
    model, x, y = model_case("cnn-bn")
    first = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-6)
    with torch.no_grad():  # the next "checkpoint": a small step along a random direction
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    cold = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-6)
    warm = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-6, v0=first)
    assert torch.allclose(warm.values, cold.values, rtol=1e-9)
    assert warm.meta["params"]["warm_start"] is True
    assert warm.n_matvecs < cold.n_matvecs, (warm.n_matvecs, cold.n_matvecs)


# ------------------------------------------------------------------------------ trace
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_trace_matches_dense(kind: str) -> None:
    model, x, y = model_case("mlp-ce")
    H = dense_reference(model, x, y, kind)
    P = H.shape[0]
    # Hutch++ with a sketch as wide as the space is exact: tr(QᵀAQ) = tr(A), residual 0
    exact = probes.hessian_trace(model, (x, y), n_matvecs=3 * P, operator=kind)
    assert exact.n_matvecs == 3 * P
    assert abs(exact.estimate - float(H.trace())) <= 1e-9 * float(H.abs().sum())
    # small budgets: within 3 reported standard errors (fixed seeds)
    for method in ("hutch++", "hutchinson"):
        for seed in range(3):
            r = probes.hessian_trace(model, (x, y), n_matvecs=30, method=method, seed=seed, operator=kind)
            assert r.n_matvecs == 30 and r.stderr > 0
            assert abs(r.estimate - float(H.trace())) <= 3 * r.stderr, (method, seed, r.estimate)


def test_hutchinson_estimate_and_stderr_definition() -> None:
    A = random_symmetric(outliers_plus_bulk(120), seed=1)
    est, se, samples, low = estimate_trace(DenseOperator(A), 20, method="hutchinson", seed=4, block=7)
    g = torch.Generator().manual_seed(4)
    Z = torch.randint(0, 2, (120, 20), generator=g, dtype=torch.int8).double() * 2 - 1
    expected = (Z * (A @ Z)).sum(0)
    assert torch.allclose(samples, expected, rtol=1e-12)
    assert est == pytest.approx(float(expected.mean()), rel=1e-12)
    assert se == pytest.approx(float(expected.std() / 20**0.5), rel=1e-12)
    assert low == 0.0


def test_hutch_plus_plus_beats_hutchinson_on_low_rank_plus_noise() -> None:
    lam = outliers_plus_bulk(300, seed=2)
    op = DenseOperator(random_symmetric(lam, seed=3))
    true = float(lam.sum())
    errs = {"hutch++": [], "hutchinson": []}
    for seed in range(10):
        for method in errs:
            est, se, _, _ = estimate_trace(op, 30, method=method, seed=seed)
            errs[method].append(abs(est - true))
    mean = {m: sum(e) / len(e) for m, e in errs.items()}
    assert mean["hutch++"] < 0.5 * mean["hutchinson"], mean


# ------------------------------------------------------------------------------ density
def test_slq_moments_and_wasserstein_on_known_spectrum() -> None:
    """Deflated SLQ: m2..m4 (outlier-dominated) within 1 %, m1 within 2 % (its error is the probes'
    sampling error of the bulk, ≈ √(2 Var(bulk) / (P · n_probes))), W1 ≤ 2 % of the range."""
    lam = outliers_plus_bulk(1000, seed=5)
    op = DenseOperator(random_symmetric(lam, seed=6))
    span = float(lam.max() - lam.min())
    exact = spectral_moments(lam)
    for seed in range(3):
        out = slq(op, n_probes=20, steps=20, seed=seed, deflate=6)
        assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(out.deflated, lam.sort(descending=True).values[:6], rtol=1e-8)
        rel = (spectral_moments(out.nodes, out.weights) - exact).abs() / exact.abs()
        assert rel[0] <= 0.02 and torch.all(rel[1:] <= 0.01), rel
        assert wasserstein1(out.nodes, out.weights, lam, None) <= 0.02 * span
    # plain SLQ (no deflation) still gets the distribution right, with fewer products
    plain = slq(op, n_probes=10, steps=40, seed=0)
    assert wasserstein1(plain.nodes, plain.weights, lam, None) <= 0.02 * span
    assert plain.n_matvecs == 400


def test_wasserstein1_closed_form() -> None:
    a = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert wasserstein1(a, None, a + 0.25, None) == pytest.approx(0.25)
    assert wasserstein1(a, torch.tensor([1.0, 0.0]), a, None) == pytest.approx(0.5)


def test_density_of_tiny_model_matches_dense() -> None:
    model, x, y = model_case("cnn-bn")
    lam = torch.linalg.eigvalsh(dense_reference(model, x, y, "hessian"))
    H = dense_reference(model, x, y, "hessian")
    plain = probes.hessian_density(model, (x, y), n_probes=3, lanczos_steps=6, seed=2)
    # Gauss quadrature is exact per probe: Σ_j τ_j θ_j^p = vᵀH^p v / vᵀv for p < 2·steps
    V = random_vectors(H.shape[0], 3, seed=2, dtype=torch.float64, device=torch.device("cpu"))
    for p in range(1, 5):
        ref = torch.stack([v @ torch.linalg.matrix_power(H, p) @ v / (v @ v) for v in V.T]).mean()
        est = (plain.ritz_weights * plain.ritz_values**p).sum()
        assert torch.isclose(est, ref, rtol=1e-8), p
    res = probes.hessian_density(model, (x, y), n_probes=6, lanczos_steps=20, deflate=4)
    exact = spectral_moments(lam)
    assert torch.allclose(res.moments()[1:], exact[1:], rtol=0.2), (res.moments(), exact)
    assert wasserstein1(res.ritz_values, res.ritz_weights, lam, None) <= 0.02 * float(lam.max() - lam.min())
    # the broadened density integrates to 1 and has the stated width
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-3)
    span = float(res.ritz_values.max() - res.ritz_values.min())  # the default width: 3 Gauss-node spacings
    assert 0 < res.sigma <= 3 * span / 20  # of the bulk (tests/test_slq_defaults.py checks the rule)
    assert res.meta["sigma"] == res.sigma and res.n_matvecs == res.meta["n_matvecs"]


def test_smoothing_resmoothing_and_log_scale() -> None:
    vals = torch.tensor([-0.5, 0.001, 2.0, 100.0], dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    grid, dens, sigma, info = smooth_density(vals, w, sigma=0.5, grid=4000)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-4)  # grid spans ±4σ
    assert info["negative_mass"] == pytest.approx(0.1)
    g, d, s, info = smooth_density(vals, w, log_scale=True, log_floor=1e-4, grid=4000)
    assert info["mass_below_floor"] == pytest.approx(0.2)  # |0.001| < 1e-4 · 100: dropped
    assert float(torch.trapezoid(d, g)) == pytest.approx(0.8, abs=1e-3)
    model, x, y = model_case("mlp-ce")
    res = probes.hessian_density(model, (x, y), n_probes=2, lanczos_steps=10)
    wide = res.resmooth(sigma=1.0, grid=50)
    assert wide.sigma == 1.0 and wide.grid.numel() == 50 and wide.n_matvecs == res.n_matvecs
    assert torch.equal(wide.ritz_values, res.ritz_values)
    with pytest.raises(ValueError, match="sigma"):
        smooth_density(vals, w, sigma=-1.0)


# ------------------------------------------------------------------------------ per layer
def test_layerwise_blocks_are_principal_submatrices() -> None:
    model, x, y = model_case("mlp-ce")
    H = dense_reference(model, x, y, "hessian")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    groups = parameter_groups(model)
    res = probes.layerwise_hessian(model, (x, y), k=2, tol=1e-8, trace_matvecs=3 * 24, density=True)
    frame = res.to_frame()
    assert list(frame["layer"]) == list(groups)
    for i, pnames in enumerate(groups.values()):
        lo, hi = offsets[names.index(pnames[0])], offsets[names.index(pnames[-1]) + 1]
        block = H[lo:hi, lo:hi]
        ref = torch.linalg.eigvalsh(block).flip(0)[:2]
        assert res.n_params[i] == hi - lo
        assert torch.allclose(res.eigenvalues[i], ref, rtol=1e-7, atol=1e-12)
        if 3 * (hi - lo) <= 3 * 24:  # sketch covers the block: exact trace
            assert float(res.trace[i]) == pytest.approx(float(block.trace()), rel=1e-9, abs=1e-12)
        else:
            assert abs(float(res.trace[i]) - float(block.trace())) <= 3 * float(res.trace_stderr[i])
    assert set(res.densities) == set(groups)
    assert {"lambda_1", "lambda_2", "trace", "trace_stderr", "n_params"} <= set(frame.columns)


# ------------------------------------------------------------------------------ results and errors
def test_results_export(tmp_path) -> None:
    model, x, y = model_case("mlp-ce")
    results = [
        probes.hessian_eigenvalues(model, (x, y), k=2),
        probes.hessian_trace(model, (x, y), n_matvecs=12),
        probes.hessian_density(model, (x, y), n_probes=2, lanczos_steps=8),
        probes.layerwise_hessian(model, (x, y), trace_matvecs=6),
    ]
    for i, r in enumerate(results):
        d = r.to_dict()
        json.dumps(d)
        assert "vectors" not in d
        for key in ("operator", "loss", "reduction", "n_matvecs", "wall_time_s", "seed", "mode"):
            assert key in r.meta, (type(r).__name__, key)
        assert r.to_frame().shape[0] >= 1
        r.save(tmp_path / f"r{i}.json")
        r.save(tmp_path / f"r{i}.csv")
        assert r.figure().data
    assert results[0].meta["loss"] == "cross_entropy" and results[0].meta["backend"] == "graph"
    assert json.loads((tmp_path / "r0.json").read_text())["values"] == results[0].values.tolist()


#: (probe, keywords, error, message) of a bad call; ``data`` is ``(x, y)`` unless the keywords replace it.
BAD_CALLS = [
    ("hessian_eigenvalues", {"k": 0}, ValueError, "k must be"),
    ("hessian_eigenvalues", {"k": 1000}, ValueError, r"k must be an integer in \[1, \d+\]; got 1000"),
    ("hessian_eigenvalues", {"which": "top"}, ValueError, "which"),
    ("hessian_eigenvalues", {"operator": "hessain"}, ValueError, "unknown operator"),
    ("hessian_eigenvalues", {"tol": 0}, ValueError, "tol"),
    ("hessian_eigenvalues", {"v0": torch.ones(5, dtype=torch.float64)}, ValueError, "v0 has"),
    ("hessian_eigenvalues", {"v0": [1.0]}, TypeError, "v0 must be"),
    ("hessian_trace", {"model": "model"}, TypeError, "nn.Module"),
    ("hessian_trace", {"method": "exact"}, ValueError, "method"),
    ("hessian_trace", {"n_matvecs": 3}, ValueError, "n_matvecs >= 4"),
    ("hessian_density", {"mode": "training"}, ValueError, "mode"),
    ("hessian_density", {"n_probes": 0}, ValueError, "n_probes"),
    ("hessian_trace", {"data": "short targets"}, ValueError, "disagree"),
]


@pytest.mark.parametrize(("probe", "kwargs", "error", "message"), BAD_CALLS)
def test_bad_inputs(probe: str, kwargs: dict, error: type, message: str) -> None:
    model, x, y = model_case("mlp-ce")
    kwargs = dict(kwargs)
    model = kwargs.pop("model", model)
    data = (x, y[:3]) if kwargs.pop("data", None) else (x, y)
    with pytest.raises(error, match=message):
        getattr(probes, probe)(model, data, **kwargs)
