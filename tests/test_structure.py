"""A model defined inline travels with its run as data (models/structure.py): reopened, probed, equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_tracker_export import track_plain_loop
from torch import nn

import dynascope
from dynascope.models import build_from_spec
from dynascope.models.structure import StructureError, build_structure, describe_module
from dynascope.probes import hessian_eigenvalues

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"


def _inline() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 12), nn.LayerNorm(12, bias=False), nn.GELU(approximate="tanh"), nn.Dropout(0.1),
        nn.Sequential(nn.Linear(12, 8), nn.SiLU()), nn.Linear(8, 3),
    )  # fmt: skip


def test_describe_and_build_every_constructor_argument() -> None:
    cases = [
        _inline(),
        nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4, momentum=0.3),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),  # fmt: skip
        nn.Sequential(nn.Embedding(11, 5, padding_idx=0), nn.Flatten(), nn.Linear(15, 2), nn.LogSoftmax(-1)),
    ]
    for model in cases:
        spec = describe_module(model)
        rebuilt = build_from_spec(spec)
        assert repr(rebuilt) == repr(model)
        rebuilt.load_state_dict(model.state_dict())
        x = torch.randint(0, 11, (2, 3)) if isinstance(model[0], nn.Embedding) else (
            torch.randn(2, 1, 6, 6) if isinstance(model[0], nn.Conv2d) else torch.randn(2, 6))  # fmt: skip
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_modules_that_are_not_torch_nn_layers_are_refused_by_name() -> None:
    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(StructureError, match="is a .*Mine, not a torch.nn layer"):
        describe_module(nn.Sequential(nn.Linear(2, 2), Mine()))
    with pytest.raises(StructureError, match="'os' is not one of the torch.nn layers"):
        build_structure({"type": "Sequential", "names": ["0"], "layers": [{"type": "os"}]})
    with pytest.raises(StructureError, match="Linear.*failed"):
        build_structure({"type": "Linear", "in_features": "x", "out_features": 2})


def test_an_inline_model_tracked_in_a_plain_loop_is_probed_afterwards(tmp_path: Path, monkeypatch) -> None:
    model = _inline()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    path = tmp_path / "runs" / "inline"
    track_plain_loop(model, x, y, path)
    run = dynascope.open_run(path)
    assert "structure" in run.run.model_config
    assert run.run.extra["tracker"]["model_spec"] == {"source": "the model's torch.nn structure",
                                                       "reopenable": True}  # fmt: skip
    live = hessian_eigenvalues(model.eval(), (x, y), k=3, tol=1e-8, loss="cross_entropy")
    again = run.probe("hessian_eigenvalues", step=10, k=3, tol=1e-8)
    assert torch.allclose(again.values, live.values, rtol=1e-6, atol=1e-9)
    # the app's Hessian page computes on it too, with no factory anywhere
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    at.switch_page("views/hessian.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    button = next(b for b in at.button if b.key == "hess_topk_run")
    button.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
