"""dynascope.datasets.batching: one BatchSource over tuples, DataLoaders and Datasets, sharded."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from dynascope.datasets import Batch, BatchSource, as_batches

N = 23


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, generator=g), torch.arange(N)


class PairList(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])  # int target: converted and stacked to int64


class Stream(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def _sources(xy, batch_size: int | None = 5):
    x, y = xy
    return {
        "tuple": BatchSource((x, y), batch_size),
        "list": BatchSource([x, y], batch_size),
        "dataloader": BatchSource(DataLoader(TensorDataset(x, y), batch_size=batch_size or N)),
        "tensordataset": BatchSource(TensorDataset(x, y), batch_size),
        "dataset": BatchSource(PairList(x, y), batch_size),
        "iterable": BatchSource(Stream(x, y), batch_size),
    }


@pytest.mark.parametrize("batch_size", [None, 1, 5, N, 100])
def test_all_input_kinds_give_the_same_data(xy, batch_size) -> None:
    x, y = xy
    for kind, src in _sources(xy, batch_size).items():
        batches = list(src)
        assert all(isinstance(b, Batch) and b.n == b.x.shape[0] == b.y.shape[0] for b in batches), kind
        assert sum(b.n for b in batches) == N == src.num_samples(), kind
        if kind != "dataloader":
            expected = [min(batch_size or N, N - s) for s in range(0, N, batch_size or N)]
            assert [b.n for b in batches] == expected, kind
        bx, by = src.tensors()
        assert torch.equal(bx, x) and torch.equal(by, y), kind
        assert by.dtype == torch.int64, kind
        assert torch.equal(src.targets(), y), kind


def test_re_iterable(xy) -> None:
    src = BatchSource(xy, 4)
    assert [b.n for b in src] == [b.n for b in src] == [4, 4, 4, 4, 4, 3]


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("kind", ["tuple", "dataset", "dataloader", "iterable"])
def test_uneven_shards_cover_data_exactly_once(xy, world_size, kind) -> None:
    x, y = xy
    seen: list[int] = []
    sizes = []
    for rank in range(world_size):
        if kind == "tuple":
            src = BatchSource((x, y), 2, rank=rank, world_size=world_size)
        elif kind == "dataset":
            src = BatchSource(PairList(x, y), 2, rank=rank, world_size=world_size)
        elif kind == "iterable":
            src = BatchSource(Stream(x, y), 2, rank=rank, world_size=world_size)
        else:
            src = BatchSource(DataLoader(TensorDataset(x, y), batch_size=2), rank=rank, world_size=world_size)
        bx, by = src.tensors()
        seen += by.tolist()
        sizes.append(src.num_samples())
        assert torch.equal(bx, x[by]), (kind, rank)  # x and y stay paired
    assert sorted(seen) == list(range(N))  # every sample exactly once
    assert sum(sizes) == N
    if kind in ("tuple", "dataset"):  # contiguous shards, sizes differ by at most one
        assert max(sizes) - min(sizes) <= 1
        assert seen == list(range(N))


def test_world_size_3_shard_sizes(xy) -> None:
    sizes = [BatchSource(xy, rank=r, world_size=3).num_samples() for r in range(3)]
    assert sizes == [8, 8, 7]


def test_more_ranks_than_samples_gives_empty_shards() -> None:
    x, y = torch.arange(2.0)[:, None], torch.arange(2)
    shards = [BatchSource((x, y), rank=r, world_size=3) for r in range(3)]
    assert [s.num_samples() for s in shards] == [1, 1, 0]
    assert list(shards[2]) == [] and shards[2].single_batch() is None
    ex, ey = shards[2].tensors()
    assert ex.shape == (0, 1) and ey.shape == (0,) and ey.dtype == torch.int64
    with pytest.raises(ValueError, match="holds no samples"):
        BatchSource(DataLoader(TensorDataset(x, y), batch_size=1), rank=2, world_size=3).tensors()


def test_single_batch(xy) -> None:
    whole = BatchSource(xy).single_batch()
    assert whole is not None and whole.n == N and whole.x.data_ptr() == xy[0].data_ptr()  # a view, no copy
    assert BatchSource(xy, 5).single_batch() is None
    assert BatchSource(TensorDataset(*xy)).single_batch() is None


def test_device_and_dtype_cast_only_floating(xy) -> None:
    b = next(iter(BatchSource(xy, dtype=torch.float64, device="cpu")))
    assert b.x.dtype == torch.float64 and b.y.dtype == torch.int64 and b.x.device.type == "cpu"


def test_numpy_inputs_accepted(xy) -> None:
    x, y = xy
    bx, by = BatchSource((x.numpy(), y.numpy())).tensors()
    assert torch.equal(bx, x) and torch.equal(by, y)


def test_as_batches_passthrough_and_inheritance(xy) -> None:
    src = BatchSource(xy, 4, rank=1, world_size=3)
    assert as_batches(src) is src
    re = as_batches(src, 2)
    assert re is not src and re.batch_size == 2 and (re.rank, re.world_size) == (1, 3)
    assert torch.equal(re.tensors()[1], src.tensors()[1])
    other = as_batches(src, rank=0)
    assert other.batch_size == 4 and other.rank == 0
    assert isinstance(as_batches(xy), BatchSource)


@pytest.mark.parametrize(
    ("data", "kwargs", "exc", "match"),
    [
        ((torch.zeros(3, 2), torch.zeros(4)), {}, ValueError, "disagree on the number of samples: 3 vs 4"),
        ((torch.zeros(3, 2),), {}, ValueError, "must be \\(x, y\\)"),
        ((torch.zeros(0, 2), torch.zeros(0)), {}, ValueError, "empty"),
        ((torch.tensor(1.0), torch.tensor(2.0)), {}, ValueError, "leading sample dimension"),
        ((["a", "b"], torch.zeros(2)), {}, TypeError, "x cannot be converted"),
        ({"x": torch.zeros(2)}, {}, ValueError, "no target: name it with target_key="),
        ("text", {}, TypeError, "a dict of tensors, a DataLoader or a Dataset; got str"),
        (torch.zeros(3, 2), {}, TypeError, "got Tensor"),
        ((torch.zeros(3, 2), torch.zeros(3)), {"batch_size": 0}, ValueError, "batch_size"),
        ((torch.zeros(3, 2), torch.zeros(3)), {"batch_size": 2.5}, ValueError, "batch_size"),
        ((torch.zeros(3, 2), torch.zeros(3)), {"rank": 3, "world_size": 3}, ValueError, "rank=3"),
        ((torch.zeros(3, 2), torch.zeros(3)), {"world_size": 0}, ValueError, "world_size"),
        ((torch.zeros(3, 2), torch.zeros(3)), {"rank": -1, "world_size": 2}, ValueError, "rank"),
        (TensorDataset(torch.zeros(0, 2), torch.zeros(0)), {}, ValueError, "empty"),
    ],
)
def test_bad_inputs(data, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        BatchSource(data, **kwargs)


def test_bad_items_from_loaders_and_datasets() -> None:
    class NoLen(Dataset):
        def __getitem__(self, i):
            return torch.zeros(2), 0

    with pytest.raises(TypeError, match="needs __len__"):
        BatchSource(NoLen())

    class Singles(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(2)

    with pytest.raises(ValueError, match="\\(x, y\\) pairs"):
        list(BatchSource(Singles()))

    class Ragged(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(i + 1), 0

    with pytest.raises(ValueError, match="inconsistent shapes"):
        list(BatchSource(Ragged()))

    mismatched = DataLoader([(torch.zeros(3, 2), torch.zeros(2))], batch_size=None)
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        list(BatchSource(mismatched))
    dicts = DataLoader([{"x": torch.zeros(2)}], batch_size=None)
    no_target = r"DataLoader for probes: items are dicts with keys \['x'\] and no target"
    with pytest.raises(ValueError, match=no_target):
        list(BatchSource(dicts))
    with pytest.raises(ValueError, match="DataLoader for probes must yield"):
        list(BatchSource(DataLoader([torch.zeros(2)], batch_size=None)))
