"""Curvature operators against dense float64 Hessian / GGN / Fisher matrices on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dynascope.probes.curvature_setup import RecordingOperator
from dynascope.probes.functional import parameter_groups, select_parameters
from dynascope.probes.losses import resolve_loss
from dynascope.probes.operators import CurvatureOperator, DenseOperator


class TinyAttention(nn.Module):
    """One causal self-attention block + readout, written with plain ops."""

    def __init__(self, vocab: int = 5, d: int = 4, seq: int = 3, out: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.qkv = nn.Linear(d, 3 * d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        h = self.ln(h + att @ v)
        return self.head(h[:, -1])


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def tiny_cnn() -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    with torch.no_grad():  # non-trivial running statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    return m


def cases():
    g = torch.Generator().manual_seed(1)
    x_mlp = torch.randn(11, 3, generator=g, dtype=torch.float64)
    x_cnn = torch.randn(7, 1, 4, 4, generator=g, dtype=torch.float64)
    x_tok = torch.randint(0, 5, (9, 3), generator=g)
    y_cls = lambda n: torch.randint(0, 3, (n,), generator=g)  # noqa: E731
    return {
        "mlp-ce": (tiny_mlp, x_mlp, y_cls(11)),
        "mlp-mse": (tiny_mlp, x_mlp, torch.randn(11, 3, generator=g, dtype=torch.float64)),
        "cnn-bn": (tiny_cnn, x_cnn, y_cls(7)),
        "attention": (TinyAttention, x_tok, y_cls(9)),
    }


def dense_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, loss_name: str = "auto"):
    """Dense float64 matrix of the dataset-mean loss (eval mode) on a flat parameter vector.

    Built with ``torch.autograd.functional`` (reverse-over-reverse): in torch 2.13 ``torch.func.hessian``
    returns a wrong, asymmetric Hessian through ``nn.LayerNorm`` (checked against finite differences).
    """
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = dict(model.named_buffers())
    loss = resolve_loss(loss_name, y)

    def unflat(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.reshape(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}

    def out_fn(t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**unflat(t), **buffers}, (x,))

    n = x.shape[0]
    if kind == "hessian":
        return hessian(lambda t: loss.total(out_fn(t), y) / n, theta, vectorize=True)
    if kind == "ggn":
        out = out_fn(theta)
        J = jacobian(out_fn, theta).reshape(out.numel(), -1)
        H = hessian(lambda o: loss.total(o.reshape(out.shape), y), out.reshape(-1).detach())
        return J.T @ H @ J / n
    G = jacobian(lambda t: loss.per_sample(out_fn(t), y), theta)  # [N, P]
    return G.T @ G / n


@pytest.mark.parametrize("case", ["mlp-ce", "mlp-mse", "cnn-bn", "attention"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("backend", ["auto", "func"])
def test_operator_matches_dense(case: str, kind: str, backend: str) -> None:
    make, x, y = cases()[case]
    torch.manual_seed(0)
    model = make().double()
    ref = dense_reference(model, x, y, kind)
    op = CurvatureOperator(model, (x, y), kind=kind, backend=backend)
    dense = op.to_dense()
    assert torch.allclose(dense, dense.T, atol=1e-10)
    rel = (dense - ref).norm() / ref.norm()
    assert rel < 1e-9, f"{case}/{kind}/{backend}: relative error {rel:.2e}"
    # matvec and matmat agree with the dense matrix on random vectors
    V = torch.randn(op.size, 3, dtype=torch.float64)
    assert torch.allclose(op.matmat(V), ref @ V, rtol=1e-8, atol=1e-10)
    assert torch.allclose(op.matvec(V[:, 0]), ref @ V[:, 0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_unequal_batches_weight_by_sample_count(kind: str) -> None:
    make, x, y = cases()["mlp-ce"]
    model = make().double()
    ref = dense_reference(model, x, y, kind)
    # 11 samples in batches of 4, 4, 3 (tensor batching) and via a DataLoader (5, 5, 1)
    for data, bs in (((x, y), 4), (DataLoader(TensorDataset(x, y), batch_size=5), None)):
        op = CurvatureOperator(model, data, kind=kind, batch_size=bs)
        assert op.num_samples == 11
        assert op.backend == "func"
        assert torch.allclose(op.to_dense(), ref, rtol=1e-8, atol=1e-11)


def test_eval_mode_is_used_and_restored() -> None:
    make, x, y = cases()["cnn-bn"]
    model = make().double().train()
    ref = dense_reference(model, x, y, "hessian")  # eval-mode reference (sets eval)
    model.train()
    op = CurvatureOperator(model, (x, y))
    assert torch.allclose(op.to_dense(), ref, rtol=1e-8, atol=1e-11)
    assert model.training, "the operator must restore the caller's mode"
    rec = RecordingOperator(op)
    rec.matvec(torch.randn(op.size, dtype=torch.float64))
    assert rec.determinism() == 0.0
    assert rec.determinism_matvecs == 1  # column-wise CPU products: only the first column is recomputed


def test_determinism_check_keeps_no_vectors_on_large_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynascope.probes import curvature_setup

    monkeypatch.setattr(curvature_setup, "KEEP_FIRST_MAX_BYTES", 0)  # as if two vectors were too large
    make, x, y = cases()["mlp-ce"]
    rec = RecordingOperator(CurvatureOperator(make().double(), (x, y)))
    rec.matvec(torch.randn(rec.size, dtype=torch.float64))
    assert rec._first is None and rec.determinism() == 0.0 and rec.determinism_matvecs == 2


class _Noisy(nn.Module):
    """Adds fresh noise on every forward: products that recompute the forward differ between calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x)


@pytest.mark.parametrize("backend", ["double_backward", "func"])
def test_determinism_check_catches_a_stochastic_forward(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Noisy(), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    op = CurvatureOperator(model, (x, y), backend="func")
    op.backend = backend  # "double_backward": the per-vector path that an op without vmap rules falls to
    assert op.columnwise is (backend == "double_backward")
    rec = RecordingOperator(op)
    rec.matmat(torch.randn(op.size, 3, dtype=torch.float64))
    assert rec.determinism() > 1e-3
    assert rec.determinism_matvecs == (1 if backend == "double_backward" else 2)


def test_parameter_block_is_principal_submatrix() -> None:
    make, x, y = cases()["mlp-ce"]
    model = make().double()
    ref = dense_reference(model, x, y, "hessian")
    groups = parameter_groups(model)
    assert list(groups) == ["0", "2", "4"]
    op = CurvatureOperator(model, (x, y), params="2")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    lo, hi = int(offsets[names.index("2.weight")]), int(offsets[names.index("2.bias") + 1])
    assert op.size == hi - lo
    assert torch.allclose(op.to_dense(), ref[lo:hi, lo:hi], rtol=1e-8, atol=1e-11)
    with pytest.raises(ValueError, match="no trainable parameter"):
        select_parameters(model, "nope")


def test_float32_model_with_float64_products() -> None:
    make, x, y = cases()["mlp-ce"]
    model = make()  # float32
    x = x.float()
    ref = dense_reference(make_double_copy(model), x.double(), y, "hessian")
    op = CurvatureOperator(model, (x, y), dtype=torch.float64)
    assert op.dtype == torch.float64
    assert torch.allclose(op.to_dense(), ref, rtol=1e-8, atol=1e-11)
    op32 = CurvatureOperator(model, (x, y))
    assert op32.dtype == torch.float32
    assert (op32.to_dense().double() - ref).norm() / ref.norm() < 1e-5


def make_double_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def test_reduce_fn_sums_shards() -> None:
    """A reduce_fn that doubles (two identical shards) doubles N and the summed products: same matrix."""
    make, x, y = cases()["mlp-ce"]
    model = make().double()
    ref = dense_reference(model, x, y, "hessian")
    op = CurvatureOperator(model, (x, y), reduce_fn=lambda t: 2 * t)
    assert op.num_samples == 22
    assert torch.allclose(op.to_dense(), ref, rtol=1e-8, atol=1e-11)


def test_scipy_export_and_counters() -> None:
    import numpy as np
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    make, x, y = cases()["mlp-ce"]
    model = make().double()
    ref = dense_reference(model, x, y, "hessian")
    op = CurvatureOperator(model, (x, y))
    lin = op.to_scipy()
    vals = np.sort(scipy_eigsh(lin, k=3, which="LA", tol=1e-12)[0])
    expected = torch.linalg.eigvalsh(ref)[-3:].numpy()
    assert np.allclose(vals, expected, rtol=1e-8)
    before = op.n_matvecs
    op.matmat(torch.randn(op.size, 4, dtype=torch.float64))
    assert op.n_matvecs - before == 4


def test_bad_inputs() -> None:
    make, x, y = cases()["mlp-ce"]
    model = make().double()
    with pytest.raises(ValueError, match="unknown operator"):
        CurvatureOperator(model, (x, y), kind="hessain")
    with pytest.raises(ValueError, match="disagree"):
        CurvatureOperator(model, (x, y[:5]))
    with pytest.raises(TypeError, match="tuple of tensors"):
        CurvatureOperator(model, 42)
    with pytest.raises(ValueError, match=r"must be \(x, y\)"):
        CurvatureOperator(model, (x, y, y))
    op = CurvatureOperator(model, (x, y))
    with pytest.raises(ValueError, match="matmat expects"):
        op.matmat(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(2, 3))


REGISTRY_CASES = ["mlp", "cnn_bn_flatten", "transformer", "embed_mlp", "random_features", "resnet"]


@pytest.mark.parametrize("key", REGISTRY_CASES)
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_registry_models_match_dense(key: str, kind: str) -> None:
    """Built-in architectures (BN in eval mode, hand-written attention) against the dense reference."""
    from dynascope.models.tiny import TINY_CONFIGS, build_tiny, example_input, output_dim

    cfg = TINY_CONFIGS[key]
    model = build_tiny(key).double()
    if key == "cnn_bn_flatten":
        with torch.no_grad():
            model.body[1].running_mean.uniform_(-0.5, 0.5)
            model.body[1].running_var.uniform_(0.5, 1.5)
    x = example_input(cfg, n=5, dtype=torch.float64)
    y = torch.randint(0, output_dim(cfg), (5,), generator=torch.Generator().manual_seed(2))
    ref = dense_reference(model, x, y, kind)
    # two unequal batches (3 + 2) exercise the per-batch weighting on every architecture
    op = CurvatureOperator(model, (x, y), kind=kind, batch_size=3)
    assert (op.to_dense() - ref).norm() / ref.norm() < 1e-9


class _PlainTanh(torch.autograd.Function):
    """tanh as an old-style autograd.Function: no ``setup_context``, so torch.func transforms reject it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _PlainTanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_PlainTanh.apply(self.a(x)))


def test_func_backend_falls_back_to_double_backward_once() -> None:
    torch.manual_seed(0)
    model = _PlainTanhMLP().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = CurvatureOperator(model, (x, y), batch_size=4, backend="func")
    assert op.backend == "func"
    V = torch.randn(op.size, 3, dtype=torch.float64)
    H = dense_reference(model, x, y, "hessian")
    with pytest.warns(RuntimeWarning, match="per-vector double backward"):
        torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert op.backend == "double_backward"  # recorded (e.g. in result meta), not retried per batch
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert len(op.fallbacks) == 1 and "func" in op.meta()["product_fallbacks"][0]  # warned and recorded once


def test_out_of_memory_in_a_product_is_never_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OOM inside a product propagates with the knobs to lower; it does not switch product paths."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = CurvatureOperator(model, (x, y), batch_size=4, backend="func")

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(op, "_func_products", oom)
    with pytest.raises(torch.OutOfMemoryError, match="batch_size=.*block_size=.*max_basis="):
        op.matmat(torch.randn(op.size, 2, dtype=torch.float64))
    assert op.backend == "func" and not op.fallbacks
