"""The ``memory_budget`` knob of every probe (trace, diagonal, SLQ density, blockwise spectra, top-k, NTK,
landscapes): exact references where the budget binds, the same estimates where it does not, an error naming
the knob, and the peak measured in a fresh process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_operators import dense_reference

import dynascope.probes as probes
import dynascope.probes.diagonal as diagonal_module
from dynascope.probes import budget
from dynascope.probes.budget import MemoryBudgetError, names_the_knob
from dynascope.probes.density import plan_slq, slq
from dynascope.probes.diagonal import diagonal_estimate, plan_diagonal
from dynascope.probes.lanczos import eigsh, lanczos_tridiagonal
from dynascope.probes.operators import DenseOperator, random_vectors
from dynascope.probes.trace import estimate_trace, plan_trace


def _sym(P: int, seed: int, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spectrum is None:
        B = torch.randn(P, P, generator=g, dtype=torch.float64)
        return (B + B.T) / 2
    U = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    return (U * spectrum) @ U.T


def _streamed_signs(P: int, blocks: list[int], seed: int) -> torch.Tensor:
    """The probes drawn per block when the budget cannot hold the signs (budget.RademacherProbes)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.cat([torch.randint(0, 2, (P, b), generator=gen, dtype=torch.int8) for b in blocks], 1) * 2 - 1
    )


def test_probes_held_are_those_of_random_vectors() -> None:
    gen = torch.Generator().manual_seed(7)
    src = budget.RademacherProbes(50, 9, gen, hold=True, dtype=torch.float32, device=torch.device("cpu"))
    got = torch.cat([src.take(4), src.take(5)], 1)
    want = random_vectors(50, 9, seed=7, dtype=torch.float32, device=torch.device("cpu"), kind="rademacher")
    assert torch.equal(got, want)


def test_hutchinson_streamed_under_a_binding_budget_equals_its_dense_reference() -> None:
    P, m, seed = 200, 20, 4
    A = _sym(P, 1)
    V = P * 8
    tight = 7 * V  # no room for the signs of all m probes nor for 32 probes per product
    plan = plan_trace("hutchinson", P, m, 8, block=32, budget=tight)
    assert plan.binds and not plan.hold_probes and plan.block < m
    est, se, samples, low = estimate_trace(
        DenseOperator(A), m, method="hutchinson", seed=seed, memory_budget=tight
    )
    Z = _streamed_signs(P, [min(plan.block, m - lo) for lo in range(0, m, plan.block)], seed).double()
    want = (Z * (A @ Z)).sum(0)
    torch.testing.assert_close(samples, want, rtol=1e-12, atol=1e-12)
    assert est == pytest.approx(float(want.mean()), rel=1e-12)
    assert se == pytest.approx(float(want.std() / math.sqrt(m)), rel=1e-12)


@pytest.mark.parametrize("method", ["hutch++", "auto", "krylov++"])
def test_smaller_sketch_under_a_binding_budget_is_exact_on_low_rank(method: str) -> None:
    """rank(A) = 3: a sketch of >= 3 vectors (Krylov: >= 3 steps) leaves a zero residual, so the estimate is
    the trace to rounding although the budget cut the sketch from m // 3 = 20 vectors to 6 (Krylov: 8)."""
    P, m = 300, 60
    spectrum = torch.zeros(P, dtype=torch.float64)
    spectrum[:3] = torch.tensor([40.0, 25.0, -10.0])
    A = _sym(P, 2, spectrum)
    tight = 12 * P * 8 + budget.chunk_bytes(P, 1) + P  # 12 vectors, one probe's signs and float64 chunks
    plan = plan_trace(method, P, m, 8, block=32, budget=tight)
    assert plan.binds and 3 <= plan.sketch < m // 3 and plan.vector_bytes <= tight
    est, se, _, low = estimate_trace(DenseOperator(A), m, method=method, seed=0, memory_budget=tight)
    assert est == pytest.approx(55.0, rel=1e-10) and low == pytest.approx(55.0, rel=1e-10)
    assert se <= 1e-10 * 55


def test_estimates_unchanged_where_the_budget_does_not_bind() -> None:
    """The default budget does not bind on a tiny operator: the same numbers as a budget of 1 TB."""
    A = DenseOperator(_sym(120, 3))
    for method in ("hutchinson", "hutch++", "auto", "krylov++"):
        a = estimate_trace(A, 40, method=method, seed=1)
        b = estimate_trace(A, 40, method=method, seed=1, memory_budget=10**12)
        assert a[:2] == b[:2], method


def test_diagonal_under_a_binding_budget_and_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    P, m, seed = 150, 24, 5
    A = _sym(P, 4)
    shapes = [(5, 2, 3, 3), (60,)]
    tight = 6 * P * 8 + 24 * P + 4 * P * 3 * 8 + 3 * P
    plan = plan_diagonal("hutchinson", P, m, 8, block=32, budget=tight)
    b = plan["block_used"]  # 2b vectors + 24·P + 4 float64 row chunks + b·P signs
    assert plan["budget_binds"] and not plan["probes_held"] and m % b == 0 and plan["vector_bytes"] <= tight
    v, se, layer, _ = diagonal_estimate(DenseOperator(A), n_matvecs=m, seed=seed, shapes=shapes,
                                        memory_budget=tight)  # fmt: skip
    Z = _streamed_signs(P, [b] * (m // b), seed).double()
    S = Z * (A @ Z)
    torch.testing.assert_close(v, S.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(se, S.std(1) / math.sqrt(m), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        layer, torch.stack([S[:90].mean(0), S[90:].mean(0)]).mean(1), rtol=1e-12, atol=0
    )
    # row chunks smaller than a tensor (whole kernels when spatially averaged): the same to rounding
    one = diagonal_estimate(DenseOperator(A), n_matvecs=m, seed=seed, shapes=shapes, spatial_average=True,
                            block=2)  # fmt: skip
    monkeypatch.setattr(budget, "CHUNK_BYTES", 8 * 2 * 20)  # 20 rows of a 2-probe block: 8 chunks
    monkeypatch.setattr(diagonal_module, "CHUNK_BYTES", 8 * 2 * 20)
    assert len(diagonal_module._chunks(shapes, 2, True)) == 8
    many = diagonal_estimate(DenseOperator(A), n_matvecs=m, seed=seed, shapes=shapes, spatial_average=True,
                             block=2)  # fmt: skip
    for x, y in zip(many, one):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


def test_a_budget_below_one_probe_names_the_knob() -> None:
    A = DenseOperator(_sym(100, 0))
    with pytest.raises(MemoryBudgetError, match="memory_budget=100 "):
        estimate_trace(A, 20, method="hutch++", memory_budget=100)
    with pytest.raises(MemoryBudgetError, match="raise memory_budget"):
        diagonal_estimate(A, n_matvecs=10, memory_budget=100)
    with pytest.raises(MemoryBudgetError, match="lower memory_budget or block"):
        with names_the_knob("hessian_trace", 10, "2b·P·itemsize"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: not enough memory")
    for err in (ValueError("unrelated"), RuntimeError("unsupported memory format")):  # passed through as is
        with pytest.raises(type(err), match=str(err)):
            with names_the_knob("hessian_trace", 10, ""):
                raise err


def test_hessian_trace_and_diagonal_meta_on_a_tiny_model() -> None:
    """On a 37-parameter model: estimates against the dense float64 Hessian, and ``meta`` records the plan."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    H = dense_reference(model, x, y, "hessian")
    res = probes.hessian_trace(model, (x, y), n_matvecs=30, method="hutchinson", memory_budget=10**12)
    assert res.meta["budget_binds"] is False and res.meta["probes_held"] is True
    assert res.meta["memory_budget"] == 10**12 and "2b·P·itemsize" in res.meta["memory_formula"]
    assert abs(res.estimate - float(H.trace())) <= 4 * res.stderr
    tight = 3 * 37 * 8 + budget.chunk_bytes(37, 1) + 30 * 37
    res = probes.hessian_trace(model, (x, y), n_matvecs=30, method="hutchinson", memory_budget=tight)
    assert res.meta["budget_binds"] is True and res.meta["block_used"] == 1 and res.n_matvecs == 30
    d = probes.hessian_diagonal(model, (x, y), method="exact", memory_budget=10**12, exact_backprop=False)
    torch.testing.assert_close(d.values, H.diagonal(), rtol=1e-10, atol=1e-12)
    assert d.meta["memory_budget"] == 10**12 and d.meta["block_used"] == 32
    d = probes.hessian_diagonal(model, (x, y), method="exact", memory_budget=10**12)  # backpropagated
    torch.testing.assert_close(d.values, H.diagonal(), rtol=1e-10, atol=1e-12)
    assert d.meta["memory_budget"] == 10**12 and d.meta["backprop_samples_per_chunk"] == 16
    assert d.meta["memory_formula"].startswith("3 · K · D")


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import dynascope.probes as probes
    from dynascope.probes.memory import peak_memory
    torch.set_num_threads(1)
    what, budget = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 10))
    x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))
    op = probes.OperatorSpec().build(model, (x, y))
    out = {"P": op.size}
    kw = {} if budget == 0 else {"memory_budget": budget}
    if what == "product":
        V = torch.randn(op.size, int(sys.argv[3]))
        with peak_memory() as peak:
            op.matmat(V)
    elif what == "trace":
        with peak_memory() as peak:
            r = probes.hessian_trace(model, (x, y), n_matvecs=60, method=sys.argv[3], check_determinism=False,
                                     **kw)
        out.update(block=r.meta.get("block_used"), sketch=r.meta.get("sketch_vectors"), n=r.n_matvecs)
    elif what == "built":  # the operator's own work outside the budget: building it and one product
        with peak_memory() as peak:
            probes.OperatorSpec().build(model, (x, y)).matmat(torch.randn(op.size, int(sys.argv[3])))
    elif what == "density":
        with peak_memory() as peak:
            r = probes.hessian_density(model, (x, y), n_probes=4, lanczos_steps=30, check_determinism=False,
                                       **kw)
        out.update(block=r.meta["block_used"], window=r.meta["reorth_window"], n=r.n_matvecs)
    elif what == "eigen":
        with peak_memory() as peak:
            r = probes.hessian_eigenvalues(model, (x, y), k=3, max_iter=60, check_determinism=False, **kw)
        out.update(block=r.meta["block_size"], max_basis=r.meta["max_basis"], n=r.n_matvecs)
    elif what == "ntk_own":  # the NTK probe's fixed work: two samples, one tangent column at a time
        with peak_memory() as peak:
            probes.ntk_probe(model, (x[:2], y[:2]), k=1, reduce_outputs=None, strategy="ntk_vp", chunk_size=1)
    elif what == "ntk":
        with peak_memory() as peak:
            r = probes.ntk_probe(model, (x, y), k=3, reduce_outputs=None, strategy="ntk_vp", **kw)
        out.update(strategy=r.meta["strategy"]["strategy"], chunk=r.meta["strategy"]["chunk_size"])
    elif what == "landscape":
        traj = [model]
        for i in range(5):
            m = torch.nn.Sequential(torch.nn.Linear(256, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 10))
            traj.append(m)
        with peak_memory() as peak:
            r = probes.loss_landscape(model, (x, y), directions="pca", trajectory=traj, resolution=5, **kw)
        out.update(block=r.meta["points_per_batch_used"], cols=r.meta["coordinate_chunk"])
    else:
        method = sys.argv[3] if len(sys.argv) > 3 else "hutchinson"
        with peak_memory() as peak:
            r = probes.hessian_diagonal(model, (x, y), n_matvecs=60, check_determinism=False, method=method,
                                        **kw)
        out.update(block=r.meta.get("block_used"), n=r.n_matvecs, fast=len(r.meta["exact_backprop"]),
                   chunk=r.meta.get("backprop_samples_per_chunk"))
    out["peak"] = peak.bytes
    print(json.dumps(out))
    """
)


def _measure(*args: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux")
@pytest.mark.parametrize("what", ["hutchinson", "auto", "krylov++", "diagonal"])
def test_peak_memory_stays_within_the_budget(what: str) -> None:
    """A 267k-parameter MLP, 60 products: holding the probes ([P, 60] float64 and float32, as before the
    budget) takes 190 MB; within a 32 MiB budget the peak above the start stays below the budget plus one
    product of the block it chose (the product's own work, outside the budget) and 8 MiB of slack."""
    mib = 2**20
    B = 32 * mib
    args = ("diagonal", str(B)) if what == "diagonal" else ("trace", str(B), what)
    run = _measure(*args)
    product = _measure("product", "0", str(run["block"]))
    assert run["n"] == 60
    assert run["peak"] <= B + product["peak"] + 8 * mib, (run, product)
    assert 12 * run["P"] * 60 > 5 * B  # what the old code held


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux")
def test_backpropagated_exact_diagonal_stays_within_the_budget() -> None:
    """The same MLP, exact diagonal by second-order backpropagation: the tanh's residual makes the factor
    1010 columns × 1000 features per sample (4 MB in float32, 129 MB for the 32 samples at once); within
    a 32 MiB budget the samples go 2 at a time and the peak above the start stays below the budget plus
    8 MiB of slack."""
    mib = 2**20
    B = 32 * mib
    run = _measure("diagonal", str(B), "exact")
    assert run["fast"] == 4 and run["n"] == 0 and run["chunk"] == 2
    assert run["peak"] <= B + 8 * mib, run
    assert 3 * 4 * 1010 * 1000 * 32 > 3 * B  # the factor of every sample at once


def test_exact_diagonal_under_a_binding_budget() -> None:
    P = 90
    A = _sym(P, 6)
    tight = 2 * 3 * P * 8 + 16 * P + 4 * P * 3 * 8  # 3 unit vectors and their products per block
    plan = plan_diagonal("exact", P, 0, 8, block=32, budget=tight)
    assert plan["block_used"] == 3 and plan["budget_binds"]
    v, se, _, _ = diagonal_estimate(DenseOperator(A), method="exact", memory_budget=tight)
    torch.testing.assert_close(v, A.diagonal(), rtol=0, atol=1e-13)
    assert float(se.abs().max()) == 0.0


# ------------------------------------------------------------------------------------ SLQ density
def _gauss_moments(theta: torch.Tensor, tau: torch.Tensor, p: int) -> float:
    return float((tau * theta**p).sum())


def _spiked(P: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with three outliers over a bulk in [−1, 1] (Lanczos converges on the outliers
    first: where the basis loses orthogonality, they come back as ghost copies)."""
    bulk = torch.linspace(-1, 1, P - 3, dtype=torch.float64)
    spectrum = torch.cat([torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64), bulk])
    return _sym(P, seed, spectrum), spectrum


def test_slq_plan_order_and_too_small_budget() -> None:
    P, n, steps = 1000, 4, 30
    full = plan_slq(P, n, steps, 8, budget=10**12)
    assert (full.block, full.window, full.hold_probes, full.binds) == (n, steps, True, False)
    fewer = plan_slq(P, n, steps, 8, budget=full.vector_bytes - 1)  # first: fewer probes per block
    assert fewer.binds and fewer.block < n and fewer.window == steps and fewer.hold_probes
    one = plan_slq(P, n, steps, 8, budget=(steps + 12) * P * 8)  # then: a window of the latest vectors
    assert one.block == 1 and 2 <= one.window < steps and not one.hold_probes
    assert one.vector_bytes <= (steps + 12) * P * 8
    with pytest.raises(MemoryBudgetError, match="hessian_density: memory_budget=1000 bytes"):
        plan_slq(P, n, steps, 8, budget=1000)


def test_slq_in_probe_blocks_equals_all_probes_at_once() -> None:
    """A budget that holds one probe's full basis but not four: the same recurrences one probe at a time,
    so the same Ritz values and weights (to rounding of the batched products)."""
    A, _ = _spiked(300, 1)
    whole = slq(DenseOperator(A), n_probes=4, steps=40, seed=2, memory_budget=10**12)
    tight = plan_slq(300, 4, 40, 8, budget=10**12).vector_bytes // 3
    blocks = slq(DenseOperator(A), n_probes=4, steps=40, seed=2, memory_budget=tight)
    assert blocks.plan is not None and blocks.plan.binds
    assert blocks.plan.window == 40 and blocks.plan.block < 4
    assert blocks.plan.hold_probes  # the probes are those of random_vectors
    torch.testing.assert_close(blocks.nodes, whole.nodes, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(blocks.weights, whole.weights, rtol=1e-10, atol=1e-12)
    assert whole.orthogonality_loss < 1e-12 and blocks.orthogonality_loss < 1e-12


def test_slq_with_a_reorthogonalisation_window_keeps_the_gauss_moments() -> None:
    """Window 3 < 12 steps, probes drawn per block: each probe's Gauss quadrature reproduces the moments
    ``v₁ᵀ A^p v₁ / ‖v₁‖²`` (p < 2·steps) of the dense float64 matrix — the quadrature SLQ estimates."""
    P, steps, n = 200, 12, 3
    A, spectrum = _spiked(P, 1)
    budget_ = (3 + 12) * P * 8 + budget.chunk_bytes(P, 1)  # one probe, its 3 latest vectors and the work
    plan = plan_slq(P, n, steps, 8, budget=budget_)
    assert (plan.block, plan.hold_probes) == (1, False) and 2 <= plan.window < steps
    out = slq(DenseOperator(A), n_probes=n, steps=steps, seed=5, memory_budget=budget_)
    gen = torch.Generator().manual_seed(5)
    V = torch.cat([torch.randn(P, 1, generator=gen, dtype=torch.float64) for _ in range(n)], 1)
    scale = float(spectrum.abs().max())
    for i in range(n):
        v = V[:, i] / V[:, i].norm()
        theta, tau = out.nodes[out.probe == i], out.weights[out.probe == i] * n
        for p in range(1, 2 * steps):
            want = float(v @ torch.linalg.matrix_power(A, p) @ v)
            assert _gauss_moments(theta, tau, p) == pytest.approx(want, abs=1e-12 * scale**p), (i, p)


def test_slq_window_reports_the_loss_of_orthogonality() -> None:
    """120 steps with only the 2 latest vectors: the basis loses orthogonality (the outlier 50 comes back
    as ghost copies), and ``orthogonality`` says so; full reorthogonalisation keeps it at rounding level."""
    A, _ = _spiked(200, 1)
    V0 = torch.randn(200, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = lanczos_tridiagonal(DenseOperator(A), V0, 120)
    short = lanczos_tridiagonal(DenseOperator(A), V0, 120, window=2)
    assert full.orthogonality is not None and short.orthogonality is not None
    assert float(full.orthogonality.max()) < 1e-12
    assert float(short.orthogonality.max()) > 1e-3
    assert int((full.ritz(0)[0] > 49.9).sum()) == 1 and int((short.ritz(0)[0] > 49.9).sum()) > 1


def test_hessian_density_and_blockwise_meta_on_a_tiny_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    H = dense_reference(model, x, y, "hessian")
    free = probes.hessian_density(model, (x, y), n_probes=3, lanczos_steps=37, memory_budget=10**12)
    assert free.meta["budget_binds"] is False and free.meta["memory_budget"] == 10**12
    assert "b·(w + c)·P·itemsize" in free.meta["memory_formula"] and free.meta["orthogonality_loss"] < 1e-10
    tight = plan_slq(37, 3, 37, 8, budget=10**12).vector_bytes // 2
    res = probes.hessian_density(model, (x, y), n_probes=3, lanczos_steps=37, memory_budget=tight)
    assert res.meta["budget_binds"] is True and res.meta["vector_bytes"] <= tight
    exact = torch.linalg.eigvalsh(H)  # 37 steps = P: each probe's Ritz values are the eigenvalues
    assert float(res.ritz_values.max()) == pytest.approx(float(exact.max()), rel=1e-9)
    scale = float(exact.abs().max())
    assert float(res.ritz_values.min()) == pytest.approx(float(exact.min()), abs=1e-9 * scale)
    torch.testing.assert_close(res.moments(2), free.moments(2), rtol=0.5, atol=0)  # the same distribution
    with pytest.raises(MemoryBudgetError, match="memory_budget=500 bytes"):
        probes.hessian_density(model, (x, y), n_probes=3, lanczos_steps=20, memory_budget=500)
    groups = {"first": ["0"], "second": ["2"]}
    bw = probes.blockwise_spectra(model, (x, y), groups=groups, n_probes=2, lanczos_steps=25,
                                  memory_budget=6000)  # fmt: skip
    first = bw.meta["block_plans"]["first"]
    assert bw.meta["memory_budget"] == 6000 and set(bw.meta["block_plans"]) == {"first", "second"}
    assert first["budget_binds"] and first["reorth_window"] < 25
    H1 = H[:25, :25]  # the first Linear's block (weight 20 + bias 5)
    assert float(bw.lambda_max[0]) == pytest.approx(float(torch.linalg.eigvalsh(H1).max()), rel=1e-9)


# ------------------------------------------------------------------------------------ top-k eigenvalues
def test_eigsh_within_memory_budget_against_dense_eigh() -> None:
    P, k = 300, 3
    A, spectrum = _spiked(P, 3)
    free = eigsh(DenseOperator(A), k, tol=1e-10, memory_budget=10**12, method="lanczos")
    assert not free.budget_binds and free.max_basis == 3 * k + 20 + 2 * 2
    tight = 16 * P * 8  # 12 basis vectors and the temporaries of a block of 2
    out = eigsh(DenseOperator(A), k, tol=1e-10, memory_budget=tight, method="lanczos")
    assert out.budget_binds and out.max_basis == 12 and out.peak_basis_vectors <= 12
    torch.testing.assert_close(out.values, spectrum[:k], rtol=1e-9, atol=0)
    with pytest.raises(MemoryBudgetError, match="hessian_eigenvalues: memory_budget=24000 bytes"):
        eigsh(DenseOperator(A), k, memory_budget=10 * P * 8)  # k' + 4b = 11 vectors at least


def test_hessian_eigenvalues_memory_budget_on_a_tiny_model() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    H = dense_reference(model, x, y, "hessian")
    res = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-10, memory_budget=14 * 37 * 8)
    assert res.meta["memory_budget"] == 14 * 37 * 8 and res.meta["budget_binds"] is True
    assert res.meta["max_basis"] == 10 and res.meta["eigensolver"] == "block Lanczos"  # dense: 8·P² > budget
    torch.testing.assert_close(res.values, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------ NTK
def test_ntk_blocked_gram_within_budget_equals_explicit_jacobians() -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    params = dict(model.named_parameters())
    J = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(model, dict(zip(params, ps)), (x,)), tuple(params.values())
    )
    J = torch.cat([j.reshape(14, -1) for j in J], dim=1)  # [N·O, P], sample-major rows
    P = J.shape[1]
    for budget_ in (10**9, 8 * 2 * (2 * P + 50), 8 * 4 * P):  # cached; row-blocks of Jacobians; tangents
        K, plan = probes.empirical_ntk(model, x, reduce_outputs=None, memory_budget=budget_, return_plan=True)
        torch.testing.assert_close(K, J @ J.T, rtol=1e-12, atol=1e-12)
        if budget_ < 10**9:
            assert not plan.cached
    with pytest.raises(MemoryBudgetError, match="memory_budget=100 bytes"):
        probes.empirical_ntk(model, x, memory_budget=100)
    with pytest.warns(DeprecationWarning, match="max_memory is deprecated"):
        K = probes.empirical_ntk(model, x, reduce_outputs=None, max_memory=10**9)
    torch.testing.assert_close(K, J @ J.T, rtol=1e-12, atol=1e-12)
    res = probes.ntk_probe(model, (x, torch.randint(0, 2, (7,))), k=2, memory_budget=8 * 4 * P)
    assert res.meta["memory_budget"] == 8 * 4 * P and "ntk_vp: (b·P" in res.meta["memory_formula"]
    Jt = J.reshape(7, 2, P)
    torch.testing.assert_close(res.trace, float(Jt.pow(2).sum()), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------ landscape
def test_landscape_within_budget_equals_the_unbounded_grid() -> None:
    torch.manual_seed(3)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()  # noqa: E731
    traj = [make() for _ in range(4)]
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    kw = {"directions": "pca", "trajectory": traj, "resolution": 4, "span": 0.5}
    free = probes.loss_landscape(traj[-1], (x, y), memory_budget=10**9, **kw)
    assert free.meta["budget_binds"] is False and free.meta["points_per_batch_used"] == 16
    P = free.directions.shape[1]
    tight = (1 + 2 + 4 + 4) * P * 8 + 3 * 4 * 10 * 8  # one grid point per batch, 10 coordinates at a time
    res = probes.loss_landscape(traj[-1], (x, y), memory_budget=tight, **kw)
    assert res.meta["budget_binds"] and res.meta["points_per_batch_used"] == 1
    assert res.meta["coordinate_chunk"] == 10 and res.meta["vector_bytes"] <= tight
    torch.testing.assert_close(res.directions, free.directions, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.trajectory_coords, free.trajectory_coords, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.loss, free.loss, rtol=1e-12, atol=1e-12)
    theta = torch.cat([p.detach().reshape(-1) for p in traj[-1].parameters()])
    point = theta + res.coords[0][1] * res.directions[0] + res.coords[1][2] * res.directions[1]
    names = [n for n, _ in traj[-1].named_parameters()]
    parts = dict(zip(names, torch.split(point, [p.numel() for p in traj[-1].parameters()])))
    shaped = {n: parts[n].reshape(p.shape) for n, p in traj[-1].named_parameters()}
    direct = torch.nn.functional.cross_entropy(torch.func.functional_call(traj[-1], shaped, (x,)), y)
    assert float(res.loss[1, 2]) == pytest.approx(float(direct), rel=1e-12)
    with pytest.raises(MemoryBudgetError, match="loss_landscape: memory_budget=64 bytes"):
        probes.loss_landscape(traj[-1], (x, y), memory_budget=64, **kw)


# ------------------------------------------------------------------------------------ wiring and peaks
def test_every_budgeted_probe_takes_memory_budget_in_the_runner() -> None:
    from dynascope.runner import PROBES

    for name in ("hessian_eigenvalues", "hessian_trace", "hessian_density", "layerwise_hessian",
                 "blockwise_spectra", "hessian_diagonal", "ntk", "ntk_trajectory", "loss_landscape",
                 "landscape_trajectory", "landscape_between"):  # fmt: skip
        assert PROBES[name].accepts("memory_budget"), name


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux")
@pytest.mark.parametrize("what, budget_mib", [("density", 32), ("eigen", 16), ("ntk", 32), ("landscape", 32)])
def test_peak_memory_of_the_other_probes_stays_within_the_budget(what: str, budget_mib: int) -> None:
    """The 267k-parameter MLP (1.07 MB a vector): within the budget the peak above the start stays below
    the budget plus the operator's own work (building it and one product, outside the budget; SLQ and
    top-k; NTK: the probe on two samples) and 8 MiB;
    with the default budget (half the available memory; top-k: 768 MiB) the same bound
    fails — the budget is what bounds the peak. SLQ: 4 probes × 30 steps (128 MB of basis unbounded); top-k:
    33 basis vectors unbounded; NTK-vector products: 320 tangents (342 MB); landscape: 16 grid points, 6
    checkpoints and their float64 PCA."""
    mib = 2**20
    B = budget_mib * mib
    run = _measure(what, str(B))
    free = _measure(what, "0")
    own = {"density": lambda: _measure("built", "0", "1")["peak"],
           "eigen": lambda: _measure("built", "0", str(run["block"]))["peak"],
           "ntk": lambda: _measure("ntk_own", "0")["peak"], "landscape": lambda: 0}[what]()  # fmt: skip
    assert run["peak"] <= B + own + 8 * mib, (run, own)
    assert free["peak"] > B + own + 8 * mib, (free, own)
