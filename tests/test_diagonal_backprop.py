"""The exact diagonal by second-order backpropagation (probes/second_order.py) against the diagonal of dense
float64 Hessians / GGNs (``torch.autograd.functional``), including models where some blocks go to products."""

from __future__ import annotations

import math

import pytest
import torch
from test_operators import dense_reference
from torch import nn

import dynascope.probes as probes
from dynascope.models import build
from dynascope.probes.budget import MemoryBudgetError

TOL = 1e-10  # relative to the largest entry; float64 rounding of a few thousand terms is ~1e-15


def _data(n: int = 13, shape: tuple[int, ...] = (5,), classes: int = 4, mse: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, dtype=torch.float64, generator=g)
    if mse:
        return x, torch.randn(n, classes, dtype=torch.float64, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str = "hessian", **kw):
    model = model.double().eval()
    ref = dense_reference(model, x, y, kind, kw.get("loss", "auto")).diagonal()
    res = probes.hessian_diagonal(model, (x, y), method="exact", operator=kind, check_determinism=False, **kw)
    sizes = dict(zip(res.names, (math.prod(s) for s in res.shapes)))
    if kw.get("params") is None and not any(not p.requires_grad for p in model.parameters()):
        err = float((res.values - ref).abs().max() / ref.abs().max())
        assert err < TOL, f"relative error {err:.2e}"
    assert res.n_matvecs == sum(sizes[n] for n in res.meta["exact_products"])
    assert sorted(res.meta["exact_backprop"] + res.meta["exact_products"]) == sorted(res.names)
    return res, ref


@pytest.mark.parametrize("act", ["relu", "linear", "tanh", "sigmoid", "gelu", "silu", "softplus"])
@pytest.mark.parametrize("mse", [False, True], ids=["ce", "mse"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_mlp_every_activation_and_loss(act: str, mse: bool, kind: str) -> None:
    torch.manual_seed(0)
    model = build("mlp", in_dim=5, width=6, depth=2, out_dim=4, activation=act)
    res, _ = _check(model, *_data(mse=mse), kind)
    assert res.meta["exact_products"] == [] and res.n_matvecs == 0


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("pool", ["avg", "flatten"])
def test_cnn(act: str, pool: str) -> None:
    torch.manual_seed(0)
    model = build("cnn", in_channels=2, image_size=6, channels=[3, 4], out_dim=3, activation=act, pool=pool,
                  hidden=[5])  # fmt: skip
    res, _ = _check(model, *_data(9, (2, 6, 6), 3))
    assert res.meta["exact_products"] == []


def test_cnn_strides_dilation_pooling_inplace_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, padding=(1, 2), dilation=2), nn.ELU(), nn.AvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(12, 5), nn.SiLU(inplace=True), nn.Linear(5, 3),
    )  # fmt: skip
    res, _ = _check(model, *_data(9, (2, 6, 6), 3))
    assert res.meta["exact_products"] == []


class _TiedByCode(nn.Module):
    """``c.weight`` is used upstream of the chain by the parent's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b, self.c = nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.act(self.a(x) + (x[:, :4] @ self.c.weight).sum(1, keepdim=True))))


class _InPlace(nn.Module):
    """The parent scales a layer's output in place before the next module."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        z.mul_(2.0)
        return self.b(self.act(z))


def _hooked() -> nn.Module:
    """A user's forward hook doubles the tanh's output."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    model[1].register_forward_hook(lambda m, args, out: 2.0 * out)
    return model


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.b(self.act(self.a(x)))))


@pytest.mark.parametrize(
    "case, backprop",
    [
        ("layernorm", ["3.weight", "3.bias", "5.weight", "5.bias"]),
        ("batchnorm", ["head.weight", "head.bias"]),
        ("tied", ["b.weight", "b.bias", "c.bias"]),
        ("twice", []),
        ("inplace", ["b.weight", "b.bias"]),
        ("hooked", ["2.weight", "2.bias"]),
    ],
)
def test_fallback_blocks_are_exact(case: str, backprop: list[str]) -> None:
    """Modules the pass does not know (LayerNorm, BatchNorm, a module called twice, a parameter also used
    upstream) send their parameters and everything upstream to products; every entry stays exact."""
    torch.manual_seed(0)
    x, y = _data(9, (2, 6, 6), 6) if case == "batchnorm" else _data(classes=6 if case == "twice" else 4)
    model = {
        "layernorm": lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6),
                                           nn.SiLU(), nn.Linear(6, 4)),
        "batchnorm": lambda: build("cnn", in_channels=2, image_size=6, channels=[3, 4], out_dim=6,
                                   activation="tanh", batchnorm=True),
        "tied": _TiedByCode,
        "twice": _Twice,
        "inplace": _InPlace,
        "hooked": _hooked,
    }[case]()  # fmt: skip
    res, _ = _check(model, x, y)
    assert sorted(res.meta["exact_backprop"]) == sorted(backprop)
    assert res.meta["exact_products"], "every case has blocks the pass must not take"


def test_batches_blocks_frozen_budget_and_products_agree() -> None:
    torch.manual_seed(0)
    model = build("mlp", in_dim=5, width=6, depth=2, out_dim=4, activation="gelu").double()
    x, y = _data(mse=True)
    ref = dense_reference(model, x, y, "hessian").diagonal()
    kw = {"method": "exact", "check_determinism": False}
    many = probes.hessian_diagonal(model, (x, y), batch_size=4, **kw)
    assert float((many.values - ref).abs().max() / ref.abs().max()) < TOL
    chunked = probes.hessian_diagonal(model, (x, y), memory_budget=3 * 8 * 10 * 30, **kw)
    assert 1 <= chunked.meta["backprop_samples_per_chunk"] < x.shape[0]
    assert float((chunked.values - ref).abs().max() / ref.abs().max()) < TOL
    products = probes.hessian_diagonal(model, (x, y), exact_backprop=False, **kw)
    assert products.n_matvecs == ref.numel() and products.meta["exact_backprop"] == []
    assert float((products.values - ref).abs().max() / ref.abs().max()) < TOL
    block = probes.hessian_diagonal(model, (x, y), params=["body.2", "head.bias"], **kw)
    sel = torch.cat([ref[36:78], ref[-4:]])
    assert float((block.values - sel).abs().max() / sel.abs().max()) < TOL
    assert block.meta["exact_backprop"] == ["body.2.weight", "body.2.bias", "head.bias"]
    with pytest.raises(MemoryBudgetError, match="memory_budget"):
        probes.hessian_diagonal(model, (x, y), memory_budget=100, **kw)
    model.body[0].weight.requires_grad_(False)
    frozen = probes.hessian_diagonal(model, (x, y), **kw)
    assert float((frozen.values - ref[30:]).abs().max() / ref.abs().max()) < TOL


def test_half_sse_and_a_callable_named_mse() -> None:
    """``half_sse`` takes the pass; a user's callable named ``mse`` is not the built-in: products."""
    torch.manual_seed(0)
    model = build("mlp", in_dim=5, width=6, depth=2, out_dim=4, activation="tanh")
    x, y = _data(mse=True)
    res, _ = _check(model, x, y, loss="half_sse")
    assert res.meta["exact_products"] == []

    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 3.0 * ((out - target) ** 4).mean()

    res = probes.hessian_diagonal(model, (x, y), method="exact", loss=mse, check_determinism=False)
    assert res.meta["exact_backprop"] == []


def test_train_mode_leaves_batchnorm_statistics_as_the_products_do() -> None:
    """The pass's own forward passes do not move BatchNorm's running statistics (the products' may)."""
    torch.manual_seed(0)
    model = build("cnn", in_channels=2, image_size=6, channels=[3], out_dim=3, batchnorm=True).double()
    x, y = _data(9, (2, 6, 6), 3)
    start = {n: t.clone() for n, t in model.named_buffers()}
    after = []
    for backprop in (False, True):
        with torch.no_grad():
            for n, t in model.named_buffers():
                t.copy_(start[n])
        res = probes.hessian_diagonal(model, (x, y), method="exact", mode="train", check_determinism=False,
                                      exact_backprop=backprop)  # fmt: skip
        after.append({n: t.clone() for n, t in model.named_buffers()})
    assert res.meta["exact_backprop"] == ["head.weight", "head.bias"]
    for n, t in after[1].items():
        assert torch.equal(t, after[0][n]), n


def test_float32_model() -> None:
    """A float32 model's pass runs in float32: within ~100 float32 epsilons of the float64 diagonal."""
    torch.manual_seed(0)
    model = build("mlp", in_dim=5, width=6, depth=2, out_dim=4, activation="tanh")
    x, y = _data()
    ref = dense_reference(model.double().eval(), x, y, "hessian").diagonal()
    res = probes.hessian_diagonal(model.float(), (x.float(), y), method="exact", check_determinism=False)
    assert res.meta["exact_products"] == [] and res.meta["dtype"] == "torch.float32"
    assert float((res.values - ref).abs().max() / ref.abs().max()) < 100 * torch.finfo(torch.float32).eps


def test_ignored_labels() -> None:
    """Cross-entropy targets equal to -100 add no loss and no curvature (the mean still counts them)."""
    torch.manual_seed(0)
    x, y = _data()
    y[[0, 5]] = -100
    res, _ = _check(build("mlp", in_dim=5, width=6, depth=2, out_dim=4, activation="silu"), x, y)
    assert res.meta["exact_products"] == []


def test_fisher_goes_to_products() -> None:
    torch.manual_seed(0)
    model = build("mlp", in_dim=5, width=6, depth=1, out_dim=4, activation="tanh")
    res, _ = _check(model, *_data(), "fisher")
    assert res.meta["exact_backprop"] == [] and res.n_matvecs == sum(math.prod(s) for s in res.shapes)
