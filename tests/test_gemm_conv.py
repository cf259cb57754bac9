"""conv2d as gather + matmul (probes/gemm_conv.py) against PyTorch's native float64 convolution.

References: ``F.conv2d`` outside the mode (values), ``gradcheck`` / ``gradgradcheck`` (first and second
derivatives), and Hessian-vector products of a tiny CNN with the native convolution.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from dynascope.probes.gemm_conv import Float64GemmConv, cols_numel, conv2d_gemm
from dynascope.probes.operators import make_operator

CONFIGS = [
    # (C, O, H, W, kernel, kwargs)
    (3, 4, 6, 5, (3, 3), {"padding": 1}),
    (2, 3, 7, 7, (3, 3), {"stride": 2}),
    (2, 3, 9, 8, (3, 2), {"padding": (1, 0), "dilation": (2, 1)}),
    (1, 2, 5, 6, (2, 2), {"padding": "same"}),
    (2, 2, 5, 5, (3, 3), {"padding": "valid", "stride": (1, 2)}),
    (3, 2, 4, 4, (1, 1), {}),
]


def _inputs(C, O, H, W, kernel, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(O, C, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    return x, w, b


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_native_conv2d(cfg, with_bias: bool) -> None:
    C, O, H, W, kernel, kw = cfg
    x, w, b = _inputs(C, O, H, W, kernel)
    bias = b if with_bias else None
    ref = F.conv2d(x, w, bias, **kw)
    out = conv2d_gemm(x, w, bias, **kw)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_first_and_second_derivatives(cfg) -> None:
    C, O, H, W, kernel, kw = cfg
    x, w, b = _inputs(C, O, H, W, kernel, seed=1)
    args = tuple(t.requires_grad_(True) for t in (x, w, b))
    fn = lambda x, w, b: conv2d_gemm(x, w, b, **kw)  # noqa: E731
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)
    # the gradients equal the native convolution's (not only self-consistent)
    g_out = torch.randn(F.conv2d(x, w, b, **kw).shape, dtype=torch.float64)
    ours = torch.autograd.grad(fn(*args), args, g_out)
    native = torch.autograd.grad(F.conv2d(*args, **kw), args, g_out)
    for a, n in zip(ours, native):
        assert torch.allclose(a, n, rtol=1e-12, atol=1e-12)


def test_mode_redirects_only_float64_cpu_ungrouped() -> None:
    x, w, b = _inputs(4, 4, 5, 5, (3, 3))
    with Float64GemmConv() as mode:
        out = F.conv2d(x, w, b, padding=1)
        assert mode.n_redirected == 1
        nn.Conv2d(4, 4, 3).double()(x)  # the module path (F.conv2d) as well
        assert mode.n_redirected == 2
        y32 = F.conv2d(x.float(), w.float(), b.float(), padding=1)  # float32: untouched
        grouped = F.conv2d(x, w[:, :2], b, padding=1, groups=2)  # grouped: native
        assert mode.n_redirected == 2
    assert torch.allclose(out, F.conv2d(x, w, b, padding=1), rtol=1e-13, atol=1e-13)
    assert torch.allclose(y32.double(), out, rtol=1e-4, atol=1e-4)
    assert torch.allclose(grouped, F.conv2d(x, w[:, :2], b, padding=1, groups=2))
    # arguments conv2d_gemm does not take go to PyTorch, which reports them as usual
    with pytest.raises((RuntimeError, ValueError)) as native_err:
        F.conv2d(x, w, b, stride=2, padding="same")
    with Float64GemmConv() as mode, pytest.raises(type(native_err.value)):
        F.conv2d(x, w, b, stride=2, padding="same")
    assert mode.n_redirected == 0


def test_large_convolutions_stay_native() -> None:
    """Above ``max_cols`` entries of the gathered matrix the native kernel runs (memory bound)."""
    x, w, b = _inputs(3, 4, 6, 5, (3, 3))
    assert cols_numel(x.shape, w.shape, 1, 1, 1) == 3 * 9 * 2 * 6 * 5
    with Float64GemmConv(max_cols=3 * 9 * 2 * 6 * 5 - 1) as small:
        out = F.conv2d(x, w, b, padding=1)
    with Float64GemmConv(max_cols=3 * 9 * 2 * 6 * 5) as enough:
        F.conv2d(x, w, b, padding=1)
    assert small.n_redirected == 0 and enough.n_redirected == 1
    assert torch.equal(out, F.conv2d(x, w, b, padding=1))


def test_bad_arguments_are_named() -> None:
    x, w, b = _inputs(2, 2, 4, 4, (3, 3))
    with pytest.raises(ValueError, match="groups"):
        conv2d_gemm(x, w, b, groups=2)
    with pytest.raises(ValueError, match="channels"):
        conv2d_gemm(x[:, :1], w, b)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_gemm(x, torch.randn(2, 2, 7, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="stride 1"):
        conv2d_gemm(x, w, b, stride=2, padding="same")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        return self.fc(torch.relu(self.c2(h)).flatten(1))


@pytest.mark.parametrize("backend", ["graph", "func"])
def test_hessian_products_match_native(backend: str) -> None:
    """Double backward (graph) and vmap-ed forward-over-reverse (func) through the mode."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=torch.float64)
    ref = make_operator(copy.deepcopy(model), (x, y), backend=backend).matmat(V)
    with Float64GemmConv() as mode:
        out = make_operator(model, (x, y), backend=backend).matmat(V)
    assert mode.n_redirected >= 2
    assert torch.allclose(out, ref, rtol=1e-11, atol=1e-13), float((out - ref).abs().max())
