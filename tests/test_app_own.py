"""The Runs page imports a checkpoint folder of a user's own model (factory spec, data factory, token loss)
after a dry run; then every page renders on that run and the Hessian and Gradients pages compute on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynascope.models import Run
from dynascope.probes.losses import resolve_loss

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"
USER = str(Path(__file__).resolve().parent / "own" / "user_models.py")
LM = {"factory": f"{USER}:attention_lm", "kwargs": {"vocab": 7, "dim": 4}}
SHIFTED = {"name": "token_cross_entropy", "shift": True}
PAGES = ("hessian", "edge_of_stability", "gradients", "grokking", "double_descent", "neural_collapse",
         "mode_connectivity")  # fmt: skip


def _plain_folder(root: Path) -> Path:
    """Checkpoints of the attention LM trained a few steps, as plain ``.pt`` files, tied head dropped."""
    run = Run.create(root / "src", model=LM, dataset={"factory": f"{USER}:token_data"}, loss=SHIFTED)
    model = run.build_model()
    x, y = run.load_dataset().train
    lossf = resolve_loss(SHIFTED)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    folder = root / "plain"
    folder.mkdir()
    for step in range(4):
        if step in (0, 3):
            sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "head.weight"}
            torch.save(sd, folder / f"model_step{step}.pt")
        opt.zero_grad()
        (lossf.total(model(x), y) / lossf.count(y)).backward()
        opt.step()
    return folder


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_runs_page_imports_an_own_model_folder_and_every_page_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    folder = _plain_folder(tmp_path)
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(root))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    assert not at.exception
    at.text_input(key="own_folder").set_value(str(folder))
    at.text_area(key="own_model").set_value(json.dumps(LM))
    at.text_area(key="own_data").set_value(f"{USER}:token_data")
    # a loss that does not fit the outputs: the dry run names the shapes and suggests the loss
    at.text_input(key="own_loss").set_value("cross_entropy")
    at.button(key="own_check").click().run()
    assert not at.exception
    err = _texts(at.error)
    assert "does not fit the model outputs [4, 5, 7]" in err and "token_cross_entropy" in err
    at.text_input(key="own_loss").set_value(json.dumps(SHIFTED))
    at.button(key="own_check").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    ok = _texts(at.success)
    assert "2 plain checkpoint(s) (steps [0, 3])" in ok and "head.weight ← embed.weight" in ok
    at.text_input(key="own_name").set_value("lm")
    at.button(key="own_create").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert "Created run `imported/lm`" in _texts(at.success)
    assert "Run `imported/lm`" in _texts(at.subheader)
    assert Path(at.session_state["dynascope_run_path"]).name == "lm"
    for page in PAGES:
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, at.exception)
    at.switch_page("views/hessian.py").run()
    at.button(key="hess_topk_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    at.switch_page("views/gradients.py").run()
    at.button(key="grad_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)


@pytest.mark.slow
def test_gpt2_trainer_folder_in_the_app_every_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hugging Face Trainer folder of GPT-2 tiny imported on the Runs page; Hessian top-k, density and
    trace, sharpness, gradient coherence, the NTK trajectory and LMC (no alignment) computed on its pages."""
    from streamlit.testing.v1 import AppTest
    from test_own_frameworks import DATA, train_tiny_gpt2

    pretrained, out = train_tiny_gpt2(tmp_path)
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(root))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=300).run()
    at.text_input(key="own_folder").set_value(str(out))
    at.text_area(key="own_model").set_value(json.dumps({"hf": str(pretrained)}))
    at.text_area(key="own_data").set_value(json.dumps(DATA))
    at.text_input(key="own_loss").set_value(json.dumps(SHIFTED))
    at.text_input(key="own_name").set_value("gpt2")
    at.button(key="own_create").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert "2 hf_trainer checkpoint(s)" in _texts(at.success)
    pages = [
        ("hessian", ["hess_topk_run", "hess_density_run", "hess_trace_run"], "hess_max_samples", 4),
        ("edge_of_stability", ["eos_run"], "eos_max_samples", 4),
        ("gradients", ["grad_run"], "grad_max_samples", 8),
        ("grokking", ["grok_run"], "grok_max_samples", 2),
    ]
    for page, buttons, samples, n in pages:
        at.switch_page(f"views/{page}.py").run()
        at.number_input(key=samples).set_value(n).run()
        for b in buttons:
            at.button(key=b).click().run()
            assert not at.exception and not at.error, (page, b, _texts(at.error))
    at.switch_page("views/mode_connectivity.py").run()
    at.selectbox(key="lmc_align").set_value("none")
    at.toggle(key="lmc_layerwise").set_value(False)
    at.number_input(key="lmc_max_samples").set_value(8).run()
    at.button(key="lmc_run").click().run()
    assert not at.exception and not at.error, _texts(at.error)
    assert "Loss barrier (none)" in [m.label for m in at.metric]
