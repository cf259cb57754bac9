"""Structured (input × output-gradient) NTK contributions of Linear layers against explicit Jacobians."""

from __future__ import annotations

import pytest
import torch
from test_ntk import reference_jacobian, traced
from torch import nn

import dynascope.probes as probes
import dynascope.probes.ntk.structure as structure
from dynascope.models import build


def _reference(
    model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, reduce: str | None
) -> torch.Tensor:
    J1 = reference_jacobian(model, x1)
    J2 = J1 if x2 is None else reference_jacobian(model, x2)
    K = J1 @ J2.T
    if reduce is None:
        return K
    o = K.shape[0] // x1.shape[0]
    return traced(K, x1.shape[0], J2.shape[0] // o, o)


def _wide_transformer() -> tuple[nn.Module, torch.Tensor]:
    """d_model 32 over 3 positions: the attention and MLP Linears are cheaper structured (T = 3)."""
    m = build("transformer", vocab_size=7, seq_len=3, d_model=32, n_heads=2, n_layers=1, d_mlp=32, out_dim=3)
    return m.double().eval(), torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))


def _lenet() -> tuple[nn.Module, torch.Tensor]:
    m = build("cnn", in_channels=1, image_size=4, channels=[2], out_dim=3, pool="flatten", hidden=[6, 5])
    return m.double().eval(), torch.randn(
        5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("make", [_wide_transformer, _lenet], ids=["transformer_T3", "lenet"])
@pytest.mark.parametrize("reduce", ["trace", None])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_structured_kernel_matches_explicit_jacobians(
    make, reduce: str | None, chunk_size: int | None
) -> None:
    model, x = make()
    x2 = x[:3]
    for other in (None, x2):
        K, plan = probes.empirical_ntk(
            model,
            x,
            other,
            reduce_outputs=reduce,
            chunk_size=chunk_size,
            strategy="jacobian",
            return_plan=True,
        )
        assert plan.structured, "the test models must exercise structured sites"
        torch.testing.assert_close(K, _reference(model, x, other, reduce), rtol=1e-10, atol=1e-10)


def test_transformer_sites_span_positions() -> None:
    model, x = _wide_transformer()
    sites = structure.find_sites(model, {n for n, _ in model.named_parameters()}, x, model, 3, True)
    by_name = {s.module: s for s in sites}
    assert by_name["blocks.0.attn.qkv"].positions == 3 and by_name["head"].positions == 1


def test_row_sub_blocks_and_output_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _wide_transformer()
    want = {r: _reference(model, x, None, r) for r in ("trace", None)}
    monkeypatch.setattr(structure, "CONTRACT_NUMBERS", 10)  # one row per contraction sub-block
    for r in ("trace", None):
        K = probes.empirical_ntk(model, x, reduce_outputs=r, strategy="jacobian")
        torch.testing.assert_close(K, want[r], rtol=1e-10, atol=1e-10)
    for mem in (2**k for k in range(20, 8, -1)):  # shrink the budget until the outputs go in groups
        K, plan = probes.empirical_ntk(model, x, strategy="jacobian", memory_budget=mem, return_plan=True)
        if plan.output_chunk < 3:
            break
    assert plan.output_chunk < 3 and plan.structured
    torch.testing.assert_close(K, want["trace"], rtol=1e-10, atol=1e-10)


def test_parameter_subsets_and_bias_outside_the_kernel() -> None:
    model, x = _lenet()
    names = [n for n, _ in model.named_parameters()]
    for params in (["fc.0.weight"], ["fc", "body"], ["head.weight", "fc.2.bias"]):
        chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in params)]
        J = reference_jacobian(model, x)
        cols = torch.cat([torch.full((p.numel(),), n in chosen) for n, p in model.named_parameters()])
        Js = J[:, cols]
        K = probes.empirical_ntk(model, x, reduce_outputs=None, params=params, strategy="jacobian")
        torch.testing.assert_close(K, Js @ Js.T, rtol=1e-10, atol=1e-10)


def test_structured_off_gives_the_same_kernel_without_sites() -> None:
    model, x = _lenet()
    K1, p1 = probes.empirical_ntk(model, x, return_plan=True)
    K0, p0 = probes.empirical_ntk(model, x, structured=False, return_plan=True)
    assert p1.structured and not p0.structured
    assert p1.cost_jacobian < p0.cost_jacobian
    torch.testing.assert_close(K1, K0, rtol=1e-10, atol=1e-10)


class _Tied(nn.Module):
    """The same Linear applied twice, and a second Linear sharing another's weight: never structured."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))) + self.c.weight.sum(0)))


class _Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.a(h[:, :4])))  # module `a` runs twice


def test_shared_weights_and_repeated_modules_are_plain_or_caught() -> None:
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _Reuse().double()
    K, plan = probes.empirical_ntk(model, x, reduce_outputs=None, return_plan=True)
    assert plan.structured == ("head",)
    torch.testing.assert_close(K, _reference(model, x, None, None), rtol=1e-10, atol=1e-10)
    model = _Tied().double()  # c.weight is read outside c's forward: the first-sample check catches it
    with pytest.warns(RuntimeWarning, match="disagree"):
        K, plan = probes.empirical_ntk(model, x, reduce_outputs=None, return_plan=True)
    assert not plan.structured
    torch.testing.assert_close(K, _reference(model, x, None, None), rtol=1e-10, atol=1e-10)


class _Convs(nn.Module):
    """Strided, dilated, rectangular, bias-free convolutions (sites) and grouped / 'same' ones (plain)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.b = nn.Conv2d(4, 4, 3, padding="same", bias=False)
        self.c = nn.Conv2d(4, 6, 2, groups=2)
        self.d = nn.Conv2d(6, 3, 1, bias=False)
        self.head = nn.Linear(3 * 2 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.c(torch.tanh(self.b(h))))
        return self.head(torch.tanh(self.d(h)).flatten(1))


@pytest.mark.parametrize("reduce", ["trace", None])
def test_conv_sites_with_stride_dilation_padding(reduce: str | None) -> None:
    model = _Convs().double().eval()
    x = torch.randn(4, 2, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    K, plan = probes.empirical_ntk(model, x, reduce_outputs=reduce, strategy="jacobian", return_plan=True)
    assert set(plan.structured) == {"a", "d", "head"}  # b: padding="same", c: groups=2 -> plain
    torch.testing.assert_close(K, _reference(model, x, None, reduce), rtol=1e-10, atol=1e-10)
    K2 = probes.empirical_ntk(model, x, x[:2], reduce_outputs=reduce, strategy="jacobian", chunk_size=3)
    torch.testing.assert_close(K2, _reference(model, x, x[:2], reduce), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduce", ["trace", None])
def test_upper_triangular_blocks_for_symmetric_kernels(
    monkeypatch: pytest.MonkeyPatch, reduce: str | None
) -> None:
    import dynascope.probes.ntk.empirical as ntk

    model, x = _lenet()
    monkeypatch.setattr(ntk, "SYM_BLOCK", 1)  # 5 samples -> cached row blocks 2, 2, 1
    K, plan = probes.empirical_ntk(model, x, reduce_outputs=reduce, strategy="jacobian", return_plan=True)
    assert plan.cached and plan.chunk_size == 2
    assert torch.equal(K, K.T)
    torch.testing.assert_close(K, _reference(model, x, None, reduce), rtol=1e-10, atol=1e-10)
