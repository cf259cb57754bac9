"""Result store: caching by (probe, checkpoint hash, params), round-trips, atomic transactions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dynascope.probes.results import Result
from dynascope.store import ResultStore, result_key


@dataclass(frozen=True)
class ToyResult(Result):
    values: torch.Tensor
    converged: torch.Tensor
    estimate: float


def toy() -> ToyResult:
    return ToyResult(
        values=torch.tensor([3.0, 1.5]),
        converged=torch.tensor([True, False]),
        estimate=2.5,
        meta={"probe": "toy"},
    )


def test_put_get_round_trip_rebuilds_the_result_class(tmp_path) -> None:
    store = ResultStore(tmp_path)
    assert store.path.name == "results.sqlite"
    store.put("toy", "abc", {"k": 2}, toy(), step=10)
    hit = store.get("toy", "abc", {"k": 2})
    assert hit is not None and hit.step == 10
    assert isinstance(hit.result, ToyResult)
    assert torch.equal(hit.result.values, torch.tensor([3.0, 1.5], dtype=torch.float64))
    assert hit.result.converged.dtype == torch.bool
    assert hit.result.estimate == 2.5 and hit.result.meta == {"probe": "toy"}
    assert store.get("toy", "abc", {"k": 3}) is None
    assert store.get("toy", "other", {"k": 2}) is None


def test_get_or_compute_never_recomputes(tmp_path) -> None:
    store = ResultStore(tmp_path / "results.sqlite")
    calls = []

    def compute() -> ToyResult:
        calls.append(1)
        return toy()

    r1, cached1 = store.get_or_compute("toy", "h", {"a": 1}, compute)
    r2, cached2 = store.get_or_compute("toy", "h", {"a": 1}, compute)
    assert (cached1, cached2) == (False, True) and len(calls) == 1
    assert r1.estimate == r2.estimate
    cat = store.catalogue("toy")
    assert list(cat.columns) == ["probe", "step", "checkpoint_hash", "setting", "created"]
    assert len(cat) == 1 and cat["probe"][0] == "toy" and cat["checkpoint_hash"][0] == "h"


def test_key_ignores_param_order() -> None:
    assert result_key("p", "h", {"a": 1, "b": 2}) == result_key("p", "h", {"b": 2, "a": 1})
    assert result_key("p", "h", {"a": 1}) != result_key("p", "h", {"a": 2})


def test_failed_write_leaves_previous_state(tmp_path) -> None:
    store = ResultStore(tmp_path)
    store.put("toy", "h", {}, {"x": 1})

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store._connect() as con:
        con.execute("DELETE FROM results")
        raise Boom  # the transaction is rolled back
    assert store.get("toy", "h", {}).result == {"x": 1}
    assert store.delete("toy") == 1 and store.list() == []


def test_corrupt_store_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "results.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not a dynascope result store"):
        ResultStore(bad)


@pytest.mark.parametrize(
    ("former", "module", "current"),
    [
        ("NTKTrajectory", "ntk.diagnostics", "NTKTrajectoryResult"),
        ("NeuralCollapseTrajectory", "collapse", "NeuralCollapseTrajectoryResult"),
        ("SharpnessTrack", "curvature_sharpness", "SharpnessTrackResult"),
    ],
)
def test_rows_stored_under_a_former_class_name_still_decode(tmp_path, former, module, current) -> None:
    """A result class renamed to end in ``Result`` keeps its old name in ``former_names``: rows written
    before the rename (``result_type`` = the old name) come back as the renamed class, not as a dict."""
    import dataclasses
    import importlib
    import json
    import sqlite3

    cls = getattr(importlib.import_module(f"dynascope.probes.{module}"), current)
    assert former in cls.former_names
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "meta"}
    filled = {n: [] if "list" in t else 1 if t == "int" else "mse" for n, t in fields.items()}
    payload = json.dumps(cls(**filled, meta={"probe": "old"}).to_dict())
    store = ResultStore(tmp_path)
    store.put("toy", "abc", {"k": 1}, toy(), step=1)
    with sqlite3.connect(store.path) as con:  # the row as an older version wrote it
        con.execute("UPDATE results SET result_type = ?, result = ?", (former, payload))
    hit = store.get("toy", "abc", {"k": 1})
    assert hit is not None and type(hit.result) is cls and hit.result.meta == {"probe": "old"}


def test_omitted_fields_stay_out_of_to_dict_unless_included() -> None:
    from dynascope.probes.hessian import HessianEigenResult

    r = HessianEigenResult(values=torch.ones(2), residuals=torch.zeros(2), n_matvecs=3, vectors=torch.eye(2),
                           converged=torch.ones(2, dtype=torch.bool))  # fmt: skip
    assert "vectors" not in r.to_dict()
    assert r.to_dict(include=["vectors"])["vectors"] == [[1.0, 0.0], [0.0, 1.0]]
    assert HessianEigenResult.from_dict(r.to_dict()).vectors is None
