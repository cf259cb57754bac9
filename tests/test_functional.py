"""The functional view of a model (probes/functional.py): fixed tensors, parameter blocks, mode
restore, dtype/device copies and data kept on the device across passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dynascope.datasets.batching import as_batches
from dynascope.probes.functional import (
    DEVICE_DATA_BUDGET,
    FunctionalModel,
    ModeGuard,
    ParamSpace,
    ResidentBatches,
    prepare_model,
    select_parameters,
)
from dynascope.probes.operators import CurvatureOperator
from dynascope.probes.per_example import prepare

D = torch.float64


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)
    ).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    return m


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_fixed_tensors_are_the_other_parameters_and_every_buffer() -> None:
    model = _bn_net()
    fm = FunctionalModel(model, params="4")  # the head only
    assert fm.names == ["4.weight", "4.bias"] and fm.size == 4 * 2 + 2
    assert set(fm.fixed) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                             "1.num_batches_tracked"}  # fmt: skip
    assert all(not t.requires_grad for t in fm.fixed.values())
    assert fm.fixed["1.running_mean"] is model[1].running_mean  # buffers are shared, not copied
    x = _x()
    with fm.guard():
        assert torch.equal(fm(fm.params, x), model(x))  # eval: running statistics, no dropout
        # a changed head enters the output; the fixed body does not move
        p = {n: t + 1.0 for n, t in fm.params.items()}
        h = model[:4](x)
        expected = h @ (model[4].weight + 1.0).T + (model[4].bias + 1.0)
        assert torch.allclose(fm(p, x), expected, rtol=0, atol=1e-12)
    assert fm.live["4.weight"] is model[4].weight and fm.live["4.weight"].requires_grad
    assert not fm.params["4.weight"].requires_grad
    assert torch.equal(fm.parameters_vector(), torch.cat([model[4].weight.reshape(-1), model[4].bias]))


def test_parameter_subsets_by_name_and_module_prefix() -> None:
    model = _bn_net()
    assert [n for n, _ in select_parameters(model, ["0", "4.bias"])] == ["0.weight", "0.bias", "4.bias"]
    assert [n for n, _ in select_parameters(model, "1.weight")] == ["1.weight"]
    model[0].bias.requires_grad_(False)  # frozen parameters are never selected: they are fixed
    fm = FunctionalModel(model, params="0")
    assert fm.names == ["0.weight"] and "0.bias" in fm.fixed
    with pytest.raises(ValueError, match="no trainable parameter matches"):
        select_parameters(model, "head")
    space = ParamSpace(select_parameters(model))
    v = torch.arange(space.size, dtype=D)
    parts = space.split(v)
    assert [tuple(t.shape) for t in parts.values()] == space.shapes
    assert torch.equal(space.flatten(parts), v)
    V = torch.randn(space.size, 3, dtype=D)  # trailing dimensions survive split/flatten per column
    assert torch.equal(space.split(V)["4.weight"][..., 2], space.split(V[:, 2])["4.weight"])


def test_mode_guard_restores_every_submodule_flag() -> None:
    model = _bn_net()
    model.train()
    model[3].eval()  # a mixed state: must come back exactly
    before = [m.training for m in model.modules()]
    for mode in ("eval", "train"):
        with ModeGuard(model, mode):
            assert all(m.training == (mode == "train") for m in model.modules())
        assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), ModeGuard(model, "eval"):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError, match="mode must be 'eval' or 'train'"):
        FunctionalModel(model, mode="inference")


def test_dtype_copy_leaves_the_callers_model_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))  # float32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fm = FunctionalModel(model, dtype=D)
    assert fm.model is not model and fm.dtype == D
    assert all(t.dtype == D for t in fm.params.values()) and fm.fixed["1.running_var"].dtype == D
    with torch.no_grad():
        fm.model[0].weight.add_(1.0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the same dtype and device: no copy
    same = FunctionalModel(model, dtype=torch.float32, device="cpu")
    assert same.model is model
    assert prepare_model(model) is model
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite .* 0\.weight \(1 of 12\)"):
        prepare_model(model, dtype=D)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prepare_model("model")  # type: ignore[arg-type]


class _Counting(Dataset):
    """A map-style dataset that counts item reads (a re-collated pass reads every item again)."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 3, generator=g, dtype=D), torch.randint(0, 2, (n,), generator=g)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


def test_resident_batches_keep_the_data_within_the_budget() -> None:
    ds = _Counting(10)
    src = ResidentBatches(as_batches(DataLoader(ds, batch_size=4), dtype=D))
    assert src.max_bytes == DEVICE_DATA_BUDGET == 1 << 30
    next(iter(src))  # a partial pass keeps nothing
    assert not src.resident
    first = [(b.x.clone(), b.y.clone()) for b in src]
    assert src.resident and ds.reads == 4 + 10
    second = list(src)
    assert ds.reads == 14  # served from the device copy
    assert [b.n for b in second] == [4, 4, 2] and src.num_samples() == 10 and src.batch_size is None
    assert all(torch.equal(a, b.x) and torch.equal(c, b.y) for (a, c), b in zip(first, second))
    # over budget: every pass streams, with the same batches
    small = ResidentBatches(as_batches(DataLoader(ds, batch_size=4), dtype=D), max_bytes=100)
    again = [list(small) for _ in range(2)]
    assert not small.resident and ds.reads == 14 + 20
    assert all(torch.equal(a.x, b.x) for a, b in zip(*again))


def test_curvature_operator_reads_the_data_once_and_matches_the_streamed_products() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ds = _Counting(10)
    op = CurvatureOperator(model, DataLoader(ds, batch_size=4), kind="ggn")
    V = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(3), dtype=D)
    a = op.matmat(V)
    reads = ds.reads
    b = op.matmat(V)
    assert ds.reads == reads and op.source.resident  # the second product re-reads nothing
    assert torch.equal(a, b)
    x, y = ds.x, ds.y
    ref = CurvatureOperator(model, (x, y), kind="ggn", batch_size=4).matmat(V)
    assert torch.allclose(a, ref, rtol=1e-12, atol=1e-14)


def test_per_example_gradients_and_the_ntk_use_the_functional_model() -> None:
    from dynascope.probes.ntk.empirical import NTKOperator

    model = _bn_net()
    x = _x()
    ctx = prepare(model, (x, torch.zeros(6, dtype=torch.long)), params="4", chunk_size=4)
    assert isinstance(ctx.fm, FunctionalModel) and ctx.space.names == ["4.weight", "4.bias"]
    assert ctx.model is model and ctx.params is ctx.fm.params
    op = NTKOperator(model, x, params="4")
    assert isinstance(op.fm, FunctionalModel) and op.fm.size == 10


def test_resident_batches_copy_and_single_batch() -> None:
    import copy

    x, y = _x(), torch.zeros(6, dtype=torch.long)
    src = ResidentBatches(as_batches((x, y)))
    assert src.single_batch() is not None and src.single_batch().n == 6
    list(src)
    dup = copy.deepcopy(src)
    assert dup.resident and dup.num_samples() == 6 and torch.equal(next(iter(dup)).x, x)
    assert ResidentBatches(as_batches((x, y), 4)).single_batch() is None
