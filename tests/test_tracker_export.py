"""A model whose class no reader can import travels with its run as a torch.export program
(models/exported.py): reopened with no factory, probed, equal to the live model; loaded without pickle."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dynascope
import dynascope.probes as probes
from dynascope.cli import main as cli_main
from dynascope.models import build_from_spec
from dynascope.models.exported import EXPORT_FILE, ExportError, export_model, load_exported, tensors_file
from dynascope.probes import hessian_eigenvalues
from dynascope.store import ResultStore

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _own_class() -> nn.Module:
    class Residual(nn.Module):  # defined in a function: no reader can import it
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 10)
            self.norm = nn.LayerNorm(10)
            self.out = nn.Linear(10, 3)
            self.register_buffer("shift", torch.full((10,), 0.1), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.inp(x))
            return self.out(self.norm(h + h.pow(2) * 0.5) + self.shift)

    torch.manual_seed(3)
    return Residual()


def _sequential() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 3))


def track_plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    """Ten SGD steps of cross-entropy in a plain loop, tracked: checkpoints every 5 steps, λ_max every 5."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dynascope.Tracker(path, model, data=(x, y), loss="cross_entropy", optimizer=opt, schedule="linear",
                           checkpoint_every=5, probes={"lambda_max": 5}, budget=None) as tr:  # fmt: skip
        tr.step(0)
        for s in range(1, 11):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            tr.step(s, metrics={"train_loss": loss.item()})


@pytest.mark.parametrize("make, source", [(_sequential, "structure"), (_own_class, "exported")])
def test_a_model_defined_inline_is_probed_afterwards_with_no_factory(tmp_path: Path, make, source) -> None:
    """Plain loop, Tracker with λ_max; afterwards ``open_run(...).probe("hessian_eigenvalues", step=last)``
    equals the live model's values to 1e-6 (relative) with no factory anywhere."""
    model = make()
    x, y = _data()
    path = tmp_path / "run"
    track_plain_loop(model, x, y, path)
    run = dynascope.open_run(path)
    assert source in run.run.model_config
    assert run.run.extra["tracker"]["model_spec"]["reopenable"] is True
    assert run.run.code_refs() == []  # nothing to trust: the architecture is data
    live = hessian_eigenvalues(model.eval(), (x, y), k=3, tol=1e-8, loss="cross_entropy")
    again = run.probe("hessian_eigenvalues", step=10, k=3, tol=1e-8)
    assert torch.allclose(again.values, live.values, rtol=1e-6, atol=1e-9)
    lam = run.metrics.dropna(subset=["lambda_max"]).set_index("step")["lambda_max"]
    assert lam.index.tolist() == [0, 5, 10]
    assert float(lam.loc[10]) == pytest.approx(float(live.values[0]), rel=1e-3)  # inline tol 1e-3
    # the CLI too (no factory, no trust): it computes at step 5 and stores what open_run then reads
    argv = ["probe", "hessian_eigenvalues", str(path), "--step", "5", "--param", "k=3", "--param", "tol=1e-8"]
    assert cli_main(argv) == 0
    cli = ResultStore(path).list("hessian_eigenvalues")
    at5 = next(r for r in cli if r.step == 5)
    direct = hessian_eigenvalues(run.model(5), (x, y), k=3, tol=1e-8, loss="cross_entropy")
    torch.testing.assert_close(at5.result.values.double(), direct.values.double(), rtol=1e-6, atol=1e-9)


def test_the_app_probes_an_exported_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _own_class()
    x, y = _data()
    path = tmp_path / "runs" / "own"
    with dynascope.Tracker(path, model, data=(x, y), loss="cross_entropy", schedule=[0, 1]) as tr:
        tr.step(0)
        tr.step(1)
    assert "exported" in dynascope.open_run(path).run.model_config
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    at.switch_page("views/hessian.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    next(b for b in at.button if b.key == "hess_topk_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    stored = dynascope.open_run(path).store.list("hessian_eigenvalues")
    assert {s.step for s in stored} == {0, 1}  # the page's default checkpoints; the weights never changed
    for s in stored:
        k = s.result.values.numel()
        live = probes.hessian_eigenvalues(model, (x, y), k=k, loss="cross_entropy", tol=1e-8)  # live model
        assert torch.allclose(s.result.values.double(), live.values.double(), rtol=1e-3)  # page tol 1e-3


def _flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y)

    return loss, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_hvps_through_the_reloaded_program_equal_the_original(tmp_path: Path) -> None:
    """Top-3 Hessian eigenvalues through the reloaded exported module (Lanczos, tol 1e-10) equal the dense
    float64 Hessian of the original model to 1e-6; the two dense Hessians agree to float64 rounding."""
    model = _own_class().double().eval()
    x, y = _data(24)
    x = x.double()
    spec = export_model(model, x[:4], tmp_path / EXPORT_FILE)
    loaded = build_from_spec(spec)
    dense = {}
    for name, m in (("original", model), ("reloaded", loaded)):
        f, flat = _flat_loss(m, x, y)
        dense[name] = torch.autograd.functional.hessian(f, flat)
    assert torch.allclose(dense["reloaded"], dense["original"], rtol=1e-10, atol=1e-12)
    ref = torch.linalg.eigvalsh(dense["original"]).flip(0)[:3]
    got = hessian_eigenvalues(loaded, (x, y), k=3, tol=1e-10, loss="cross_entropy").values
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    # a new batch size (the batch dimension is dynamic) and the mode: eval only, train() refused
    assert loaded(x[:7]).shape == (7, 3)
    loaded.eval()
    with pytest.raises(ValueError, match="traced in eval mode"):
        loaded.train()


class _Plant:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_runs_no_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _own_class()
    x, _ = _data(8)
    path = tmp_path / EXPORT_FILE
    export_model(model, x, path)
    marker = tmp_path / "pwned"
    # a legitimate load unpickles nothing (pickle and torch.load are made to fail)
    def refuse(*a, **k):
        raise AssertionError("an unpickler ran")

    with monkeypatch.context() as m:
        m.setattr(pickle, "loads", refuse)
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "Unpickler", refuse)
        m.setattr(torch, "load", refuse)
        loaded = load_exported(path)
    assert torch.allclose(loaded(x), model.eval()(x), rtol=1e-6, atol=1e-7)
    # planted pickles in place of either file: refused with the file named, the marker never created
    payload = pickle.dumps(_Plant(marker))
    for victim in (path, tensors_file(path)):
        good = victim.read_bytes()
        victim.write_bytes(payload)
        with pytest.raises(ValueError, match=victim.name.replace(".", r"\.")):
            build_from_spec({"exported": str(path)})
        assert not marker.exists()
        victim.write_bytes(good)
    # a zip archive as torch.export.save writes it (tensors pickled inside) is not read either
    torch.export.save(torch.export.export(model.eval(), (x,)), tmp_path / "archive.pt2")
    tensors_file(tmp_path / "archive.pt2").write_bytes(tensors_file(path).read_bytes())
    with pytest.raises(ValueError, match="not a torch.export program in JSON"):
        load_exported(tmp_path / "archive.pt2")


def test_export_failure_falls_back_with_a_warning_that_says_why(tmp_path: Path) -> None:
    class Branchy(nn.Module):  # data-dependent control flow: torch.export cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    with pytest.raises(ExportError, match="torch.export failed"):
        export_model(Branchy(), _data(4)[0], tmp_path / EXPORT_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="torch.export cannot carry it .*model_spec="):
            dynascope.Tracker(tmp_path / "run", Branchy(), data=_data(), loss="cross_entropy")
    said = [str(w.message) for w in caught if "falling back to the spec route" in str(w.message)]
    assert said and "GuardOnDataDependent" in said[0]  # why: data-dependent control flow
