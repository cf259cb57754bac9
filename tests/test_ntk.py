"""Empirical NTK, kernel comparisons and NTK probes against exact float64 references.

Reference Jacobians come from ``torch.autograd.functional.jacobian`` (reverse mode, no torch.func),
so the vmap/jacrev/jvp machinery is checked against an independent path.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import dynascope.probes as probes
from dynascope.models import build
from dynascope.probes.ntk.empirical import NTKOperator, plan_ntk

N, O = 5, 3


# --------------------------------------------------------------------------- models and references
def _mlp() -> tuple[nn.Module, torch.Tensor]:
    return build("mlp", in_dim=4, width=6, depth=2, out_dim=O, activation="tanh").double(), torch.randn(
        N, 4, dtype=torch.float64
    )


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    m = build("cnn", in_channels=1, image_size=4, channels=[2, 3], out_dim=O, batchnorm=True).double()
    m.train()
    with torch.no_grad():  # non-trivial running statistics, then evaluate with them
        m(torch.randn(16, 1, 4, 4, dtype=torch.float64) * 2 + 1)
    m.eval()
    return m, torch.randn(N, 1, 4, 4, dtype=torch.float64)


def _transformer() -> tuple[nn.Module, torch.Tensor]:
    m = build("transformer", vocab_size=7, seq_len=3, d_model=8, n_heads=2, n_layers=1, d_mlp=8, out_dim=O)
    return m.double().eval(), torch.randint(0, 7, (N, 3))


MODELS = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}


def reference_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J [N·O, P]`` (sample-major rows) by reverse-mode autograd on the batched forward."""
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for _, p in model.named_parameters())
    buffers = dict(model.named_buffers())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**buffers, **dict(zip(names, ps))}, (x,))
        return out.reshape(out.shape[0], -1)

    jac = torch.autograd.functional.jacobian(f, values)
    rows = x.shape[0] * f(*values).shape[1]
    return torch.cat([j.reshape(rows, -1) for j in jac], dim=1)


def traced(K_full: torch.Tensor, n1: int, n2: int, o: int) -> torch.Tensor:
    return K_full.reshape(n1, o, n2, o).diagonal(dim1=1, dim2=3).sum(-1)


# --------------------------------------------------------------------------- empirical_ntk correctness
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("strategy", ["jacobian", "ntk_vp"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ntk_matches_explicit_jacobian_product(name: str, strategy: str, chunk_size: int | None) -> None:
    model, x = MODELS[name]()
    x2 = x[:3] if x.is_floating_point() else torch.randint(0, 7, (3, 3))
    J1, J2 = reference_jacobian(model, x), reference_jacobian(model, x2)
    full11, full12 = J1 @ J1.T, J1 @ J2.T
    kw = {"strategy": strategy, "chunk_size": chunk_size}
    got = {
        ("full", None): probes.empirical_ntk(model, x, reduce_outputs=None, **kw),
        ("trace", None): probes.empirical_ntk(model, x, **kw),
        ("full", "x2"): probes.empirical_ntk(model, x, x2, reduce_outputs=None, **kw),
        ("trace", "x2"): probes.empirical_ntk(model, x, x2, reduce_outputs="trace", **kw),
    }
    want = {
        ("full", None): full11,
        ("trace", None): traced(full11, N, N, O),
        ("full", "x2"): full12,
        ("trace", "x2"): traced(full12, N, 3, O),
    }
    for key, K in got.items():
        assert K.dtype == torch.float64
        assert K.shape == want[key].shape, key
        torch.testing.assert_close(K, want[key], rtol=1e-10, atol=1e-10, msg=f"{name} {strategy} {key}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("reduce_outputs", ["trace", None])
def test_ntk_symmetric_psd(name: str, reduce_outputs: str | None) -> None:
    model, x = MODELS[name]()
    K = probes.empirical_ntk(model, x, reduce_outputs=reduce_outputs)
    assert torch.equal(K, K.T)
    evals = torch.linalg.eigvalsh(K)
    assert float(evals.min()) >= -1e-10 * float(evals.max())
    assert float(evals.max()) > 0


def test_linear_model_closed_form() -> None:
    """f(x) = W x (no bias, O outputs): Θ_full = (x·x') I_O, Θ_trace = O · X Xᵀ."""
    d, o = 4, 3
    model = nn.Linear(d, o, bias=False).double()
    x = torch.randn(6, d, dtype=torch.float64)
    x2 = torch.randn(2, d, dtype=torch.float64)
    eye = torch.eye(o, dtype=torch.float64)
    for strategy in ("jacobian", "ntk_vp"):
        full = probes.empirical_ntk(model, x, reduce_outputs=None, strategy=strategy)
        torch.testing.assert_close(full, torch.kron(x @ x.T, eye))
        torch.testing.assert_close(probes.empirical_ntk(model, x, strategy=strategy), o * x @ x.T)
        torch.testing.assert_close(probes.empirical_ntk(model, x, x2, strategy=strategy), o * x @ x2.T)
    # the registry's depth-0 MLP is the same linear model
    mlp = build("mlp", in_dim=d, width=5, depth=0, out_dim=o, bias=False).double()
    torch.testing.assert_close(probes.empirical_ntk(mlp, x), o * x @ x.T)


def test_head_only_kernel_closed_form() -> None:
    """Restricting θ to the last Linear (weight, bias): Θ_full = (φ(x)·φ(x') + 1) I_O."""
    model, x = _mlp()
    phi = model.body(x).detach()
    K = probes.empirical_ntk(model, x, reduce_outputs=None, params="head")
    torch.testing.assert_close(K, torch.kron(phi @ phi.T + 1, torch.eye(O, dtype=torch.float64)))


def test_memory_bound_forces_chunked_paths_with_same_result() -> None:
    model, x = _cnn()
    ref = probes.empirical_ntk(model, x, reduce_outputs=None, strategy="jacobian")
    P = sum(p.numel() for p in model.parameters())
    tight = 8 * (2 * O * P + O * 500)  # room for ~one sample per chunk: not cached, recomputed columns
    K, plan = probes.empirical_ntk(model, x, reduce_outputs=None, memory_budget=tight, return_plan=True)
    assert not plan.cached and plan.chunk_size < N
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-10)
    # a tangent column and a row's activations fit (P + A + O numbers, A = 252), two Jacobians (2·O·P) do not
    K, plan = probes.empirical_ntk(model, x, reduce_outputs=None, memory_budget=8 * 4 * P, return_plan=True)
    assert plan.strategy == "ntk_vp"
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-10)


def test_jacrev_subchunks_fill_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import dynascope.probes.ntk.empirical as ntk

    model, x = _transformer()
    ref = probes.empirical_ntk(model, x, reduce_outputs=None)
    monkeypatch.setattr(ntk, "JACREV_SAMPLES", 2)  # 5 samples -> sub-chunks 2, 2, 1
    torch.testing.assert_close(
        probes.empirical_ntk(model, x, reduce_outputs=None), ref, rtol=1e-12, atol=1e-12
    )


def test_traced_kernel_split_by_output_groups() -> None:
    model, x = _cnn()
    ref = probes.empirical_ntk(model, x, strategy="jacobian")
    P = sum(p.numel() for p in model.parameters())
    budget = 8 * 2 * (N * (P + 400))  # one output's Jacobians of all samples fit, not all three
    K, plan = probes.empirical_ntk(model, x, strategy="jacobian", memory_budget=budget, return_plan=True)
    assert plan.cached and 1 <= plan.output_chunk < O
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-10)


def test_plan_cost_model() -> None:
    # MLP-like (F ≈ 2P), traced: contraction costs 2N²OP versus N²O·3F for NTK-vector products
    p = plan_ntk(100, None, 10, 10_000, flops_per_sample=2e4, traced=True)
    assert p.strategy == "jacobian" and p.cached
    assert p.cost_jacobian == pytest.approx((2 * 10 + 1) * 2e4 * 100 + 2 * 100 * 100 * 10 * 10_000)
    assert p.cost_ntk_vp == pytest.approx(3 * 2e4 * 100 * 10 + 3 * 2e4 * 100 * 100 * 10)
    # full kernel with many outputs and cheap forward: N²O²P contraction loses to N²O·3F
    p = plan_ntk(100, None, 100, 10_000, flops_per_sample=2e4, traced=False)
    assert p.strategy == "ntk_vp"
    # forced strategies are honoured
    assert plan_ntk(10, 5, 3, 100, flops_per_sample=1e3, traced=False, strategy="ntk_vp").strategy == "ntk_vp"


def test_output_dtype_device_and_mode_restored() -> None:
    model = build("cnn", in_channels=1, image_size=4, channels=[2], out_dim=2, batchnorm=True)
    model.train()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)  # cast to the model's float32
    K = probes.empirical_ntk(model, x, device="cpu")
    assert K.dtype == torch.float32 and K.shape == (3, 3)
    assert model.training and all(m.training for m in model.modules())  # eval used, then restored
    # eval-mode kernel: running statistics, not batch statistics
    model64 = copy.deepcopy(model).double().eval()
    torch.testing.assert_close(K.double(), probes.empirical_ntk(model64, x), rtol=1e-4, atol=1e-5)


def test_ntk_operator_dense_and_trace() -> None:
    model, x = _transformer()
    J = reference_jacobian(model, x)
    full = J @ J.T
    for ro, ref in ((None, full), ("trace", traced(full, N, N, O))):
        op = NTKOperator(model, x, reduce_outputs=ro, batch_size=2)
        assert op.size == ref.shape[0]
        torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(float(op.trace()), float(full.trace()), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- kernels
def test_kernel_alignment_with_label_kernel_is_one() -> None:
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    Y = torch.nn.functional.one_hot(y).double()
    assert probes.kernel_alignment(Y @ Y.T, y) == pytest.approx(1.0, abs=1e-12)
    assert probes.kernel_alignment(3.0 * Y @ Y.T + 5.0, y) == pytest.approx(1.0, abs=1e-12)  # centered
    t = torch.randn(7, 2, dtype=torch.float64)
    assert probes.kernel_alignment(t @ t.T, t) == pytest.approx(1.0, abs=1e-12)
    # full sample-major kernel with vec(Y) targets
    v = t.reshape(-1, 1)
    assert probes.kernel_alignment(v @ v.T, t) == pytest.approx(1.0, abs=1e-12)


def test_kernel_alignment_formula() -> None:
    A = torch.randn(6, 6, dtype=torch.float64)
    K = A @ A.T
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    H = torch.eye(6, dtype=torch.float64) - 1 / 6
    Y = torch.nn.functional.one_hot(y).double()
    Kc, Tc = H @ K @ H, H @ Y @ Y.T @ H
    want = float((Kc * Tc).sum() / (Kc.norm() * Tc.norm()))
    assert probes.kernel_alignment(K, y) == pytest.approx(want, rel=1e-12)
    T = Y @ Y.T
    want_u = float((K * T).sum() / (K.norm() * T.norm()))
    assert probes.kernel_alignment(K, y, centered=False) == pytest.approx(want_u, rel=1e-12)


def test_kernel_distance() -> None:
    A = torch.randn(8, 8, dtype=torch.float64)
    K0, K1 = A @ A.T, torch.randn(8, 8, dtype=torch.float64)
    K1 = K1 @ K1.T
    assert probes.kernel_distance(K0, K0) == pytest.approx(0.0, abs=1e-12)
    assert probes.kernel_distance(K0, 7.5 * K0) == pytest.approx(0.0, abs=1e-12)
    d = probes.kernel_distance(K0, K1)
    assert d == pytest.approx(probes.kernel_distance(2 * K0, 0.1 * K1), rel=1e-12)
    assert 0.0 < d <= 1.0  # PSD kernels: centered alignment in [0, 1]
    H = torch.eye(8, dtype=torch.float64) - 1 / 8
    a, b = H @ K0 @ H, H @ K1 @ H
    assert d == pytest.approx(1 - float((a * b).sum() / (a.norm() * b.norm())), rel=1e-12)
    want_u = 1 - float((K0 * K1).sum() / (K0.norm() * K1.norm()))  # Fort et al. (uncentered)
    assert probes.kernel_distance(K0, K1, centered=False) == pytest.approx(want_u, rel=1e-12)
    assert math.isnan(probes.kernel_distance(torch.ones(3, 3), torch.eye(3)))  # constant kernel centers to 0


def test_kernel_velocity_and_param_change() -> None:
    Ks = [torch.randn(5, 5, dtype=torch.float64) for _ in range(3)]
    Ks = [K @ K.T for K in Ks]
    v = probes.kernel_velocity(Ks, [0, 10, 40])
    assert v == pytest.approx(
        [probes.kernel_distance(Ks[0], Ks[1]) / 10, probes.kernel_distance(Ks[1], Ks[2]) / 30], rel=1e-12
    )
    m0 = nn.Linear(3, 2)
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        m1.weight.add_(1.0)
    flat0 = torch.cat([p.detach().reshape(-1) for p in m0.parameters()]).double()
    want = math.sqrt(6.0) / float(flat0.norm())
    assert probes.relative_param_change(m1, m0) == pytest.approx(want, rel=1e-6)
    assert probes.relative_param_change(m1.state_dict(), m0) == pytest.approx(want, rel=1e-6)
    assert probes.relative_param_change(m0, m0) == 0.0


# --------------------------------------------------------------------------- ntk_probe
@pytest.mark.parametrize("reduce_outputs", ["trace", None])
def test_ntk_probe_lanczos_matches_dense(reduce_outputs: str | None) -> None:
    model = build("mlp", in_dim=4, width=12, depth=2, out_dim=O).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, O, (20,))
    dense = probes.ntk_probe(model, (x, y), k=4, reduce_outputs=reduce_outputs, method="dense")
    lanc = probes.ntk_probe(
        model,
        (x, y),
        k=4,
        reduce_outputs=reduce_outputs,
        method="lanczos",
        tol=1e-10,
        batch_size=7,
        n_probes=64,
    )
    K = probes.empirical_ntk(model, x, reduce_outputs=reduce_outputs)
    ref = torch.linalg.eigvalsh(K).flip(0)[:4]
    torch.testing.assert_close(dense.eigenvalues, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lanc.eigenvalues, ref, rtol=1e-8, atol=1e-8)
    assert bool(lanc.converged.all())
    assert lanc.trace == pytest.approx(float(K.trace()), rel=1e-12)
    assert dense.trace == pytest.approx(float(K.trace()), rel=1e-12)
    assert dense.label_alignment == pytest.approx(probes.kernel_alignment(K, y, n_classes=O), rel=1e-10)
    # Lanczos alignment: exact numerator, Hutchinson ‖K_c‖_F (stated stderr)
    se = lanc.meta["alignment_relative_stderr"]
    assert abs(lanc.label_alignment / dense.label_alignment - 1) < max(4 * se, 1e-3)
    torch.testing.assert_close(lanc.label_energy, dense.label_energy, rtol=1e-6, atol=1e-8)
    assert dense.condition_number == pytest.approx(float(ref[0] / ref[-1]))


def test_ntk_probe_label_energy_complete_basis_and_exports(tmp_path) -> None:
    model, x = _mlp()
    y = torch.tensor([0, 1, 2, 1, 0])
    res = probes.ntk_probe(model, (x, y), k=N)  # all eigenvectors: all the centered label energy
    assert res.topk_label_energy == pytest.approx(1.0, abs=1e-10)
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])
    frame = res.to_frame()
    assert list(frame["rank"]) == list(range(1, N + 1))
    assert frame["cumulative_label_energy"].iloc[-1] == pytest.approx(1.0, abs=1e-10)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["meta"]["probe"] == "ntk_probe" and d["meta"]["mode"] == "eval"
    fig = res.figure()
    assert len(fig.data) == 2
    res.save(tmp_path / "ntk.json")
    # regression targets
    reg = probes.ntk_probe(model, (x, torch.randn(N, O, dtype=torch.float64)), k=2, reduce_outputs=None)
    assert 0.0 <= reg.topk_label_energy <= 1.0 and reg.eigenvalues.shape == (2,)


# --------------------------------------------------------------------------- trajectory
def test_ntk_trajectory() -> None:
    model, x = _mlp()
    y = torch.tensor([0, 1, 2, 1, 0])
    ckpts = []
    for i in range(3):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * i * torch.randn_like(p))
        ckpts.append(m)
    steps = [0, 5, 25]
    res = probes.ntk_trajectory(ckpts, (x, y), steps=steps)
    Ks = [probes.empirical_ntk(m, x) for m in ckpts]
    assert res.kernel_distance[0] == pytest.approx(0.0, abs=1e-12)
    assert res.kernel_distance[2] == pytest.approx(probes.kernel_distance(Ks[0], Ks[2]), rel=1e-10)
    assert math.isnan(res.kernel_velocity[0])
    assert res.kernel_velocity[1:] == pytest.approx(probes.kernel_velocity(Ks, steps), rel=1e-10)
    assert res.label_alignment == pytest.approx([probes.kernel_alignment(K, y) for K in Ks], rel=1e-10)
    assert res.relative_param_change[2] == pytest.approx(probes.relative_param_change(ckpts[2], ckpts[0]))
    # state dicts loaded into a template give the same numbers
    res2 = probes.ntk_trajectory([m.state_dict() for m in ckpts], (x, y), steps=steps, model=model)
    assert res2.kernel_distance == pytest.approx(res.kernel_distance, abs=1e-12)
    frame = res.to_frame()
    assert len(frame) == 3 and {"kernel_distance", "kernel_velocity", "relative_param_change"} <= set(frame)
    json.dumps(res.to_dict())
    assert len(res.figure().data) == 4


# --------------------------------------------------------------------------- bad input
def test_bad_inputs() -> None:
    model, x = _mlp()
    with pytest.raises(ValueError, match="per-sample shape"):
        probes.empirical_ntk(model, x, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot be evaluated"):
        probes.empirical_ntk(model, torch.randn(3, 7))
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor"):
        probes.empirical_ntk(model, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="non-empty"):
        probes.empirical_ntk(model, torch.randn(0, 4))
    with pytest.raises(ValueError, match="reduce_outputs"):
        probes.empirical_ntk(model, x, reduce_outputs="sum")
    with pytest.raises(ValueError, match="strategy"):
        probes.empirical_ntk(model, x, strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        probes.empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(TypeError, match="nn.Module"):
        probes.empirical_ntk(lambda t: t, x)
    with pytest.raises(ValueError, match="no parameters"):
        probes.empirical_ntk(nn.ReLU(), x)
    with pytest.raises(ValueError, match="mode='train'"):
        probes.empirical_ntk(_cnn()[0], _cnn()[1], mode="train")
    with pytest.raises(ValueError, match="exceeds the kernel size"):
        probes.ntk_probe(model, (x, torch.zeros(N, dtype=torch.long)), k=N + 1)
    with pytest.raises(ValueError, match="columns"):
        probes.ntk_probe(model, (x, torch.randn(N, 2)), k=2, reduce_outputs=None)
    with pytest.raises(ValueError, match="same shape"):
        probes.kernel_distance(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="square"):
        probes.kernel_distance(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="does not match"):
        probes.kernel_alignment(torch.eye(4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        probes.kernel_alignment(torch.eye(3), torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="strictly increasing"):
        probes.kernel_velocity([torch.eye(3)] * 3, [0, 2, 2])
    with pytest.raises(ValueError, match="pass model="):
        probes.ntk_trajectory([model.state_dict()], x)
    with pytest.raises(ValueError, match="do not share"):
        probes.relative_param_change(nn.Linear(2, 2), {"other": torch.zeros(2)})
