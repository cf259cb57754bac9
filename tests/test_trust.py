"""Files are data: code named by a received run folder or checkpoint runs only once trusted.

Each received folder below names code that would write a marker file when imported or called; every entry
point (notebook, CLI, app) must leave the marker absent until the folder is trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dynascope
from dynascope.cli import main
from dynascope.models import Run, UntrustedCodeError, build_from_spec
from dynascope.models.trust import revoke, trust_file

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
DATA = {"name": "digits", "n_train": 48, "n_test": 16}
HELPER = """
import pathlib
MARKER = pathlib.Path(__file__).with_name("MARKER")
MARKER.write_text("imported")  # importing the file is running it


def make(width=6):
    MARKER.write_text("called")
    from dynascope.models import build
    return build("mlp", in_dim=64, width=width, depth=1, out_dim=10, seed=0)


def loss(outputs, targets):
    MARKER.write_text("loss called")
    return torch.nn.functional.cross_entropy(outputs, targets)
"""


def _received(root: Path, *, loss: bool = False, data_factory: str | None = None) -> Path:
    """A run folder as a colleague sends it: run.json names ``helper.py:make`` (and optionally its loss, or
    a data factory), two checkpoints; not trusted on this machine."""
    folder = root / "received"
    model = {"factory": f"{folder}/helper.py:make", "kwargs": {"width": 6}}
    run = Run.create(folder, model=model, dataset=DATA, loss=f"{folder}/helper.py:loss" if loss else None)
    (folder / "helper.py").write_text("import torch\n" + HELPER)
    net = build_from_spec(run.model_config)
    for step in (0, 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * step)
        run.save_checkpoint(net, step)
    if data_factory is not None:
        run.config["dataset"] = {"factory": data_factory, "kwargs": {"command": f"touch {folder / 'MARKER'}"}}
        (folder / "run.json").write_text(json.dumps(run.config))
    (folder / "MARKER").unlink()
    revoke(folder)  # received: no trust record on this machine
    return folder


def _marker(folder: Path) -> bool:
    return (folder / "MARKER").exists()


def test_a_received_run_runs_no_code_in_the_notebook_until_trusted(tmp_path: Path) -> None:
    folder = _received(tmp_path, loss=True)
    view = dynascope.open_run(folder)
    refs = view.run.untrusted_refs()
    assert [r.what for r in refs] == ["model factory", "loss"]
    with pytest.raises(UntrustedCodeError) as e:
        view.probe("hessian_trace", step=1, n_matvecs=4)
    assert "helper.py:make" in str(e.value) and f"dynascope trust {folder}" in str(e.value)
    with pytest.raises(UntrustedCodeError):
        view.run.load_model(1)
    with pytest.raises(UntrustedCodeError):
        view.run.build_model()
    assert not _marker(folder)
    # metrics, checkpoints and the (empty) cache stay readable
    assert view.run.steps() == [0, 1] and view.run.metrics is not None
    # trusting it (as open_run(..., trust=True) does) lets the code run
    trusted = dynascope.open_run(folder, trust=True)
    result = trusted.probe("hessian_trace", step=1, n_matvecs=4)
    assert _marker(folder) and (folder / "MARKER").read_text() == "loss called"
    assert result.n_matvecs == 4


def test_editing_run_json_or_the_referenced_file_revokes_trust(tmp_path: Path) -> None:
    folder = _received(tmp_path)
    run = Run.open(folder, trust=True)
    assert not run.untrusted_refs()
    helper = folder / "helper.py"
    helper.write_text(helper.read_text() + "\n# edited\n")
    assert [r.ref for r in Run.open(folder).untrusted_refs()] == [f"{folder}/helper.py:make"]
    Run.open(folder, trust=True)
    cfg = json.loads((folder / "run.json").read_text())
    cfg["notes"] = "edited"
    (folder / "run.json").write_text(json.dumps(cfg))
    assert Run.open(folder).untrusted_refs()
    with pytest.raises(UntrustedCodeError):
        Run.open(folder).load_model(0)
    assert not _marker(folder)


def test_a_module_reference_in_a_received_data_spec_never_runs(tmp_path: Path) -> None:
    folder = _received(tmp_path, data_factory="os:system")
    run = Run.open(folder)
    assert [r.ref for r in run.untrusted_refs()] == [f"{folder}/helper.py:make", "os:system"]
    with pytest.raises(UntrustedCodeError, match="names the data factory 'os:system'"):
        run.load_dataset()
    with pytest.raises(UntrustedCodeError):
        dynascope.open_run(folder).probe("hessian_trace", step=1, n_matvecs=4)
    rc = main(["probe", "hessian_trace", str(folder), "--param", "n_matvecs=4"])
    assert rc == 2 and not _marker(folder)


def test_cli_refuses_then_trust_command_and_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _received(tmp_path)
    rc = main(["probe", "hessian_trace", str(folder), "--param", "n_matvecs=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "names the model factory" in err and "dynascope trust" in err
    assert not _marker(folder)
    # `dynascope trust` shows the code; without a terminal it does not ask and does not trust
    rc = main(["trust", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 2 and "helper.py:make" in out and "runs the file" in out and "--yes" in err
    assert Run.open(folder).untrusted_refs() and not _marker(folder)
    assert main(["trust", str(folder), "--yes"]) == 0
    assert "trusted" in capsys.readouterr().out and str(trust_file()) != ""
    assert main(["probe", "hessian_trace", str(folder), "--param", "n_matvecs=4"]) == 0
    assert (folder / "MARKER").read_text() == "called"
    (folder / "MARKER").unlink()
    assert main(["trust", str(folder), "--revoke"]) == 0
    capsys.readouterr()
    assert main(["probe", "hessian_trace", str(folder), "--param", "n_matvecs=5"]) == 2
    assert not _marker(folder)
    assert main(["probe", "hessian_trace", str(folder), "--param", "n_matvecs=5", "--trust"]) == 0
    assert _marker(folder)


def test_a_checkpoint_file_whose_metadata_names_a_factory(tmp_path: Path) -> None:
    folder = _received(tmp_path)
    single = tmp_path / "single.safetensors"
    single.write_bytes((folder / "checkpoints" / "step_000001.safetensors").read_bytes())
    rc = main(["probe", "hessian_trace", str(single), "--dataset", "digits", "--param", "n_matvecs=4"])
    assert rc == 2 and not _marker(folder)
    # the same factory given on the command line is the user's own choice
    rc = main(["probe", "hessian_trace", str(single), "--dataset", "digits", "--param", "n_matvecs=4",
               "--model-config", f"{folder}/helper.py:make", "--store", str(tmp_path / "s1")])  # fmt: skip
    assert rc == 0 and _marker(folder)


def test_cached_results_and_reports_of_an_untrusted_run(tmp_path: Path) -> None:
    folder = _received(tmp_path)
    dynascope.open_run(folder, trust=True).probe("hessian_trace", step=1, n_matvecs=4)
    (folder / "MARKER").unlink()
    revoke(folder)
    view = dynascope.open_run(folder)
    again = view.probe("hessian_trace", step=1, n_matvecs=4)  # cached: nothing to import
    assert again.n_matvecs == 4 and not _marker(folder)
    assert len(view.results) == 1
    from dynascope.report import build_report

    rep = build_report(view.run, tmp_path / "report.html", svg=False)
    assert rep.html_path.is_file() and not _marker(folder)


def test_a_user_given_loss_reference_runs_in_an_untrusted_run(tmp_path: Path) -> None:
    """A reference the caller passes in this process is theirs, even when the run is not trusted."""
    folder = _received(tmp_path)
    other = tmp_path / "mine.py"
    other.write_text("import torch\n\ndef loss(o, t):\n    return torch.nn.functional.cross_entropy(o, t)\n")
    with pytest.raises(UntrustedCodeError, match="model factory"):  # the run's own model still needs trust
        dynascope.open_run(folder).probe("hessian_trace", step=1, n_matvecs=4, loss=f"{other}:loss")
    assert not _marker(folder)


def test_runs_created_here_are_trusted_and_the_trust_file_moves(tmp_path: Path) -> None:
    assert os.environ["DYNASCOPE_TRUST_FILE"] == str(trust_file())
    folder = tmp_path / "mine"
    Run.create(folder, model={"factory": f"{tmp_path}/f.py:make"}, dataset=DATA)
    record = json.loads(trust_file().read_text())[str(folder.resolve())]
    assert record["refs"][0]["ref"] == f"{tmp_path}/f.py:make"
    assert not Run.open(folder).untrusted_refs()


@pytest.mark.parametrize(
    "page", ["hessian", "landscape", "edge_of_stability", "gradients", "grokking", "double_descent",
             "lr_transfer", "neural_collapse", "mode_connectivity", "compare", "runs"],
)  # fmt: skip
def test_every_app_page_on_an_untrusted_run_runs_nothing_and_shows_the_trust_box(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "runs"
    root.mkdir()
    folder = _received(root)
    monkeypatch.setenv("DYNASCOPE_RUNS_DIR", str(root))
    monkeypatch.setenv("DYNASCOPE_DEMOS", "0")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    assert not _marker(folder)
    warnings = " ".join(w.value for w in at.warning)
    if page != "compare":
        assert "names code that dynascope runs only if you trust it" in warnings, warnings
        assert any(b.label == "Trust this run" for b in at.button)
    if page == "hessian":  # the button trusts it, and the page's probes then run its code
        next(b for b in at.button if b.label == "Trust this run").click().run()
        assert not at.exception, at.exception
        assert not Run.open(folder).untrusted_refs()


# ------------------------------------------------------------------------------------------ recipes
def _checkpoint_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "checkpoints").iterdir())}


def test_a_recipe_never_trains_into_or_clears_another_run(tmp_path: Path, capsys) -> None:
    from dynascope.recipes.__main__ import main as recipe_main

    folder = _received(tmp_path)
    before = _checkpoint_bytes(folder), (folder / "run.json").read_bytes()
    rc = recipe_main(["grokking", "--out", str(folder), "--small", "--steps", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds another run" in err and "--overwrite" in err
    assert (_checkpoint_bytes(folder), (folder / "run.json").read_bytes()) == before
    assert not _marker(folder)


def test_a_recipe_resumes_its_own_run_and_refuses_to_restart_it(tmp_path: Path, capsys) -> None:
    from dynascope.recipes.__main__ import main as recipe_main

    out = tmp_path / "grok"
    args = ["grokking", "--out", str(out), "--small", "--steps", "4", "--quiet",
            "--set", "n_checkpoints=3"]  # fmt: skip
    assert recipe_main(args) == 0
    before = _checkpoint_bytes(out)
    assert recipe_main(args) == 0  # complete: resumed, nothing rewritten
    assert _checkpoint_bytes(out) == before
    capsys.readouterr()
    assert recipe_main([*args, "--no-resume"]) == 2  # starting over would delete them
    assert "resume=False" in capsys.readouterr().err and _checkpoint_bytes(out) == before
    assert recipe_main([*args, "--set", "lr=0.5"]) == 2  # another config (lr): another run
    assert _checkpoint_bytes(out) == before
    assert recipe_main([*args[:5], "6", *args[6:]]) == 0  # training longer continues the same run
    assert all(_checkpoint_bytes(out)[k] == v for k, v in before.items() if k in _checkpoint_bytes(out))
    assert recipe_main([*args, "--no-resume", "--overwrite"]) == 0


# ------------------------------------------------------------------------------------- HF folders
def _hf_folder(root: Path, config) -> Path:
    folder = root / "hf"
    config.save_pretrained(folder)
    return folder


def test_hf_folder_with_custom_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path, transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('ran')\n"
    )
    with pytest.raises(ValueError, match="custom model code.*trust_remote_code=False"):
        build_from_spec({"hf": str(folder)})
    assert not _marker(folder)


@pytest.mark.parametrize("field,value", [("n_layer", 10**6), ("n_embd", 10**6), ("vocab_size", 10**10)])
def test_hf_config_too_large_for_memory_is_refused_before_building(tmp_path: Path, field, value) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    setattr(cfg, field, value)
    folder = _hf_folder(tmp_path, cfg)
    with pytest.raises(ValueError, match="parameters, above the limit") as e:
        build_from_spec({"hf": str(folder)})
    assert "max_params" in str(e.value)


@pytest.mark.parametrize("kind", ["gpt2", "t5", "bert"])
def test_hf_parameter_estimate_equals_the_built_model(tmp_path: Path, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    from dynascope.models.specs import _hf_param_count

    config = {
        "gpt2": lambda: transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=40),
        "t5": lambda: transformers.T5Config(num_layers=2, num_decoder_layers=3, d_model=16, d_ff=24,
                                            num_heads=2, d_kv=8, vocab_size=40),  # fmt: skip
        "bert": lambda: transformers.BertConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                                                intermediate_size=24, vocab_size=40),  # fmt: skip
    }[kind]()
    cls = {"gpt2": transformers.GPT2LMHeadModel, "t5": transformers.T5ForConditionalGeneration,
           "bert": transformers.BertForMaskedLM}[kind]  # fmt: skip
    real = sum(p.numel() for p in cls(config).parameters())
    assert _hf_param_count(cls, config) == real
    config.architectures = [cls.__name__]
    folder = _hf_folder(tmp_path, config)
    limit = real - 1
    with pytest.raises(ValueError, match=f"{real:,} parameters, above the limit of {limit:,}"):
        build_from_spec({"hf": str(folder), "max_params": limit})
    built = build_from_spec({"hf": str(folder), "max_params": real})
    assert sum(p.numel() for p in built.parameters()) == real


def test_folder_fuzz_every_outcome_loads_or_is_a_clear_refusal(tmp_path: Path) -> None:
    """240 seeded cases of bench/fuzz_folders.py in-process (the bench runs 10,000+ in subprocesses):
    odd metadata JSON, float8, Trainer/Lightning folders, HF configs and run.json specs naming code."""
    import importlib.util
    import warnings
    from collections import Counter

    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz_folders.py"
    spec = importlib.util.spec_from_file_location("fuzz_folders", path)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    case = fuzz.FolderCase(tmp_path, seed=2026)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = Counter(case.run(j) for j in range(240))
    assert not [o for o in outcomes if o.startswith("BAD")], outcomes
    for family in fuzz.FAMILIES:  # every family both loads and refuses something
        assert any(o.startswith(f"{family}:ok") for o in outcomes), (family, outcomes)
        assert any(o.startswith(f"{family}:refused") for o in outcomes) or family == "metadata_json", outcomes


# ------------------------------------------------------------------------------------------- faults
def test_orphan_temporary_files_of_a_killed_writer_are_removed_on_open(tmp_path: Path) -> None:
    import time as _time

    folder = _received(tmp_path)
    ck = folder / "checkpoints"
    old = [ck / ".step_000002.safetensors.abcd1234.tmp", folder / ".run.json.k3j4h5g6.tmp"]
    fresh = ck / ".step_000003.safetensors.zzzz9999.tmp"  # a write in progress in another process
    for f in [*old, fresh]:
        f.write_bytes(b"partial")
    stale = _time.time() - 3600
    for f in old:
        os.utime(f, (stale, stale))
    keep = ck / "notes.tmp"
    keep.write_text("mine")
    run = Run.open(folder)
    assert not any(f.exists() for f in old) and fresh.exists() and keep.exists()
    assert run.steps() == [0, 1]
    assert run.remove_orphans() == [fresh]  # the run's own writer (resume) removes every one


def test_a_full_disk_names_the_write_and_leaves_no_empty_store(tmp_path: Path) -> None:
    """RLIMIT_FSIZE=0 in a child process: every write fails as on a full disk (EFBIG)."""
    import subprocess
    import sys

    folder = _received(tmp_path)
    Run.open(folder, trust=True)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
        "from dynascope.store import ResultStore\n"
        "from dynascope.models.atomic import atomic_write_text\n"
        "d = sys.argv[1]\n"
        "writes = (lambda: ResultStore(d), lambda: atomic_write_text(d + '/x.json', 'x'))\n"
        "for f in writes:\n"
        "    try:\n"
        "        f()\n"
        "    except OSError as e:\n"
        "        print('OSError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert f"creating the result store '{folder / 'results.sqlite'}' failed" in lines[0]
    assert f"writing '{folder / 'x.json'}' failed" in lines[1]
    assert not (folder / "results.sqlite").exists() and not list(folder.glob(".*.tmp"))


def test_module_references_given_here_are_found_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    from dynascope.datasets.factory import code_policy

    (tmp_path / "cwd_models_7f3a.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    spec = {"factory": "cwd_models_7f3a:make"}
    # a folder's trusted module reference is a module of the environment, never the working directory's
    with code_policy("run 'x'", ["cwd_models_7f3a:make"]), pytest.raises(ValueError, match="not importable"):
        build_from_spec(spec)
    assert isinstance(build_from_spec(spec), torch.nn.Linear)  # the user's own, named in this process
