"""OperatorSpec: one constructor for every curvature operator, value semantics, validation, and the
same operator keys in the ``.meta`` of every probe that uses one."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import dynascope.probes as probes
from dynascope.probes.operators import CurvatureOperator, OperatorSpec, make_operator

D = torch.float64
OPERATOR_META_KEYS = {
    "operator", "loss", "reduction", "n_samples", "n_params", "dtype", "device", "mode", "backend",
    "product_fallbacks",
}  # fmt: skip


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 3, generator=g, dtype=D)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def test_value_semantics_equality_and_hash() -> None:
    a = OperatorSpec(kind="ggn", params=["0", "2.bias"], device="cpu", batch_size=4)
    b = OperatorSpec(kind="ggn", params=("0", "2.bias"), device=torch.device("cpu"), batch_size=4)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.params == ("0", "2.bias") and a.device == torch.device("cpu")
    assert OperatorSpec(params="0").params == ("0",)
    assert a != a.replace(kind="hessian") and a.replace(kind="ggn") == a
    assert OperatorSpec() == OperatorSpec(kind="hessian", loss="auto", mode="eval", backend="auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kind = "fisher"  # type: ignore[misc]
    assert a.settings() == {
        "operator": "ggn", "params": ["0", "2.bias"], "batch_size": 4, "mode": "eval", "backend": "auto",
        "dtype": None, "device": "cpu", "sharded": False,
    }  # fmt: skip
    assert probes.OperatorSpec is OperatorSpec


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "laplacian"}, "unknown operator 'laplacian'"),
        ({"mode": "inference"}, "mode must be one of"),
        ({"backend": "jax"}, "backend must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer or None; got 0"),
        ({"batch_size": True}, "batch_size must be a positive integer or None; got True"),
        ({"max_vectors": 0}, "max_vectors must be a positive integer"),
        ({"dtype": "float64"}, "dtype must be a torch.dtype"),
        ({"params": []}, "params must be parameter names"),
        ({"params": [0]}, "params must be parameter names"),
        ({"loss": 3}, "loss must be a name, a callable or a Loss"),
        ({"device": "nowhere"}, "device must be a torch.device"),
        ({"reduce_fn": "sum"}, "reduce_fn must be callable"),
    ],
)
def test_bad_fields_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorSpec(**fields)
    with pytest.raises(ValueError, match=message):  # replace validates again
        OperatorSpec().replace(**fields)


def test_one_constructor_behind_every_spelling() -> None:
    model, x, y = _problem()
    spec = OperatorSpec(kind="ggn", batch_size=5)
    ops = [
        spec.build(model, (x, y)),
        CurvatureOperator(model, (x, y), spec),
        CurvatureOperator(model, (x, y), kind="ggn", batch_size=5),
        CurvatureOperator(model, (x, y), OperatorSpec(), kind="ggn", batch_size=5),  # fields on top of a spec
        make_operator(model, (x, y), operator="ggn", batch_size=5),
        make_operator(model, (x, y), spec),
    ]
    assert all(op.spec == spec for op in ops)
    dense = [op.to_dense() for op in ops]
    assert all(torch.equal(dense[0], d) for d in dense[1:])
    assert ops[0].meta() == {
        "operator": "ggn", "loss": "cross_entropy", "reduction": "mean over 12 samples", "n_samples": 12,
        "n_params": 31, "dtype": "torch.float64", "device": "cpu", "mode": "eval", "backend": "func",
        "product_fallbacks": [],
    }  # fmt: skip
    with pytest.raises(ValueError, match="spec must be an OperatorSpec"):
        CurvatureOperator(model, (x, y), {"kind": "ggn"})  # type: ignore[arg-type]


def test_every_operator_probe_writes_the_same_operator_meta_keys() -> None:
    model, x, y = _problem(3)
    P = sum(p.numel() for p in model.parameters())
    data = (x, y)
    results = {
        "hessian_eigenvalues": probes.hessian_eigenvalues(model, data, k=2),
        "hessian_trace": probes.hessian_trace(model, data, n_matvecs=9),
        "hessian_density": probes.hessian_density(model, data, n_probes=2, lanczos_steps=5),
        "layerwise_hessian": probes.layerwise_hessian(model, data, k=1, trace=False),
        "sharpness": probes.sharpness(model, data, lr=0.1, trace_matvecs=9),
        "adaptive_sharpness": probes.adaptive_sharpness(model, data),
        "average_sharpness": probes.average_sharpness(model, data, n_samples=4),
    }
    for name, res in results.items():
        missing = OPERATOR_META_KEYS - set(res.meta)
        assert not missing, f"{name} meta lacks {sorted(missing)}"
        assert "n_parameters" not in res.meta, name
        assert res.meta["n_params"] == P, name
        assert res.meta["n_samples"] == 12 and res.meta["loss"] == "cross_entropy", name
        assert res.meta["operator"] == "hessian" and res.meta["mode"] == "eval", name
        assert res.meta["reduction"] == "mean over 12 samples", name


#: Every probe that takes ``spec: OperatorSpec`` and a cheap call of it.
SPEC_PROBES = {
    "hessian_eigenvalues": {"k": 2},
    "hessian_trace": {"n_matvecs": 9},
    "hessian_density": {"n_probes": 2, "lanczos_steps": 5},
    "hessian_diagonal": {"n_matvecs": 4},
    "layerwise_hessian": {"k": 1, "trace": False},
    "sharpness": {"lr": 0.1, "trace": False},
    "adaptive_sharpness": {},
    "average_sharpness": {"n_samples": 4},
}


@pytest.mark.parametrize("name", sorted(SPEC_PROBES))
def test_spec_and_its_keywords_give_the_same_result_and_both_at_once_is_an_error(name: str) -> None:
    """``spec=OperatorSpec(...)`` and the same fields as keywords are one call (same numbers, same operator
    meta); passing both is a ValueError naming the keywords, never a silent choice of one."""
    model, x, y = _problem(4)
    fn = getattr(probes, name)
    kind = {} if name in ("sharpness", "adaptive_sharpness", "average_sharpness") else {"operator": "ggn"}
    spec = OperatorSpec(kind=kind.get("operator", "hessian"), loss="mse", mode="eval")
    y1 = torch.nn.functional.one_hot(y, 3).double()
    by_spec = fn(model, (x, y1), spec=spec, **SPEC_PROBES[name])
    by_keywords = fn(model, (x, y1), loss="mse", mode="eval", **kind, **SPEC_PROBES[name])
    a, b = by_spec.to_dict(), by_keywords.to_dict()
    for d in (a, b):
        # time, measured memory and the default budget (half the memory available now) vary between calls
        for volatile in ("wall_time_s", "measured_peak_bytes", "memory_budget"):
            d["meta"].pop(volatile, None)
    assert a == b
    assert by_spec.meta["loss"] == "mse" and by_spec.meta["operator"] == spec.kind
    with pytest.raises(ValueError, match=r"either spec= or the operator keywords \['loss'\]"):
        fn(model, (x, y1), spec=spec, loss="mse", **SPEC_PROBES[name])
    with pytest.raises(ValueError, match="spec must be an OperatorSpec"):
        fn(model, (x, y1), spec={"loss": "mse"}, **SPEC_PROBES[name])
    params = inspect.signature(fn).parameters
    assert params["spec"].default is None and params["loss"].default == "auto"


def test_layerwise_rejects_a_spec_with_a_parameter_block() -> None:
    model, x, y = _problem(5)
    with pytest.raises(ValueError, match="spec.params=.*pass groups= instead"):
        probes.layerwise_hessian(model, (x, y), spec=OperatorSpec(params=["0"]))
