"""The ``memory_budget`` knob of hessian_trace / hessian_diagonal: exact references where the budget binds,
the same estimates where it does not, an error naming the knob, and the peak measured in a fresh process."""

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
from dynascope.probes.diagonal import diagonal_estimate, plan_diagonal
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
