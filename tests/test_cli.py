"""The `dynascope` command line end to end on a tiny run: probe → store → export, and readable errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dynascope import probes
from dynascope.cli import main
from dynascope.models import Run
from dynascope.store import ResultStore

DATASET = {"name": "xor", "n_train": 24, "n_test": 8, "seed": 0}
MODEL = {"name": "mlp", "in_dim": 2, "width": 5, "depth": 1, "out_dim": 2, "seed": 0}
STEPS = (0, 4, 8)


def make_run(path: Path) -> Run:
    """A 3-checkpoint run of a tiny MLP trained on XOR with SGD."""
    from dynascope.datasets import load

    run = Run.create(
        path, model=MODEL, dataset=DATASET, optimizer={"name": "sgd", "lr": 0.5}, loss="cross_entropy"
    )
    model = run.build_model()
    x, y = load(**DATASET).train
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS[-1] + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step in STEPS:  # checkpoint and log before the update of that step
            run.save_checkpoint(model, step, metrics={"train_loss": loss.detach().item()})
            run.log_metrics({"step": step, "train_loss": loss.detach().item()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The tiny run after `dynascope probe hessian_eigenvalues RUN --all --param k=2`."""
    run = make_run(tmp_path_factory.mktemp("cli") / "run")
    assert main(["probe", "hessian_eigenvalues", str(run.path), "--all", "--param", "k=2"]) == 0
    return run


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------- probe → store
def test_probe_sweep_stores_correct_values_and_then_reports_cached(
    probed_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = ResultStore(probed_run.path).list("hessian_eigenvalues")
    assert [s.step for s in stored] == list(STEPS)
    for s in stored:  # the CLI ran the probe with the run's loss on its training data
        x, y = probed_run.load_dataset().train
        direct = probes.hessian_eigenvalues(probed_run.load_model(s.step), (x, y), k=2, loss="cross_entropy")
        torch.testing.assert_close(s.result.values, direct.values.double(), rtol=1e-5, atol=1e-7)
        assert s.params["k"] == 2 and s.params["loss"] == "cross_entropy"
    code, out, err = run_cli(
        ["probe", "hessian_eigenvalues", str(probed_run.path), "--all", "--param", "k=2"], capsys
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == [f"hessian_eigenvalues step {s} (cached)" for s in STEPS]
    assert "0 computed, 3 cached" in lines[-1]
    assert len(ResultStore(probed_run.path).list("hessian_eigenvalues")) == 3


def test_probe_one_step_json_output_seed_and_params(
    probed_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["probe", "hessian_trace", str(probed_run.path), "--step", "4", "--param", "n_matvecs=9",
            "--param", "method=hutchinson", "--seed", "3", "--json"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["step"] == 4 and row["cached"] is False
    assert row["result"]["n_matvecs"] == 9 and row["result"]["method"] == "hutchinson"
    assert row["result"]["meta"]["seed"] == 3
    model = probed_run.load_model(4)
    direct = probes.hessian_trace(
        model, probed_run.load_dataset().train, n_matvecs=9, method="hutchinson", seed=3
    )
    assert row["result"]["estimate"] == pytest.approx(direct.estimate, rel=1e-5)


def test_bare_checkpoint_and_checkpoint_inside_run(
    probed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = probed_run.checkpoint_path(8)
    code, out, _ = run_cli(["probe", "hessian_eigenvalues", str(inside), "--param", "k=2"], capsys)
    assert code == 0 and "step 8 (cached)" in out  # recognised as the run's step-8 checkpoint
    bare = tmp_path / "model.safetensors"
    shutil.copy(inside, bare)
    argv = ["probe", "hessian_eigenvalues", str(bare), "--param", "k=2", "--param", "loss=cross_entropy",
            "--dataset", json.dumps(DATASET)]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    (row,) = ResultStore(tmp_path).list("hessian_eigenvalues")  # the store beside the bare file
    (ref,) = [s for s in ResultStore(probed_run.path).list("hessian_eigenvalues") if s.step == 8]
    torch.testing.assert_close(row.result.values, ref.result.values, rtol=1e-6, atol=1e-8)
    code, _, err = run_cli(["probe", "hessian_trace", str(bare)], capsys)
    assert code == 2 and "--dataset" in err


def test_bare_checkpoint_cache_key_holds_the_dataset_and_model_config(
    probed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stale-cache repro: another --dataset config recomputes; once a result is cached, a
    --model-config that cannot load the checkpoint gives its error (exit 2), not the cached value."""
    bare = tmp_path / "ckpt.safetensors"
    shutil.copy(probed_run.checkpoint_path(8), bare)
    base = ["probe", "hessian_trace", str(bare), "--model-config", json.dumps(MODEL),
            "--param", "n_matvecs=6", "--json"]  # fmt: skip
    code, out, err = run_cli([*base, "--dataset", json.dumps(DATASET)], capsys)
    assert code == 0 and json.loads(out)["cached"] is False, err
    code, out, err = run_cli([*base, "--dataset", json.dumps(DATASET)], capsys)
    assert code == 0 and json.loads(out)["cached"] is True, err
    code, out, err = run_cli([*base, "--dataset", json.dumps({**DATASET, "n_train": 12})], capsys)
    row = json.loads(out)
    assert code == 0 and row["cached"] is False, err
    assert row["result"]["meta"]["n_samples"] == 12
    from dynascope.datasets import load

    x, y = load(**{**DATASET, "n_train": 12}).train
    direct = probes.hessian_trace(probed_run.load_model(8), (x, y), n_matvecs=6)
    assert row["result"]["estimate"] == pytest.approx(direct.estimate, rel=1e-5)
    wrong = ["probe", "hessian_trace", str(bare), "--model-config", json.dumps({**MODEL, "width": 7}),
             "--param", "n_matvecs=6", "--dataset", json.dumps(DATASET)]  # fmt: skip
    code, out, err = run_cli(wrong, capsys)
    assert code == 2 and out == ""
    assert err.startswith("dynascope probe: error: ") and "checkpoint [5] vs model [7]" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert len(ResultStore(tmp_path).list("hessian_trace")) == 2


# ------------------------------------------------------------------------------------------- export
def test_export_formats_parse(probed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["export", str(probed_run.path), "--probe", "hessian_eigenvalues"]
    for fmt in ("csv", "parquet", "json", "html"):
        code, _, err = run_cli([*base, "--format", fmt, "--out", str(tmp_path / f"eig.{fmt}")], capsys)
        assert code == 0, err
    csv = pd.read_csv(tmp_path / "eig.csv")  # tidy: one row per step and quantity, params in a sidecar
    assert list(csv.columns) == ["step", "setting", "quantity", "index", "value"]
    eig = csv[csv.quantity == "values"]
    assert len(eig) == 3 * 2 and sorted(set(eig["step"])) == list(STEPS)
    side = json.loads((tmp_path / "eig.params.json").read_text())
    assert side["settings"][csv.setting.iloc[0]]["params"]["k"] == 2
    pq = pd.read_parquet(tmp_path / "eig.parquet")
    pd.testing.assert_frame_equal(pq[["step", "value"]], csv[["step", "value"]], check_dtype=False)
    data = json.loads((tmp_path / "eig.json").read_text())
    assert [d["step"] for d in data] == list(STEPS) and len(data[0]["result"]["values"]) == 2
    assert data[0]["result"]["values"][0] == pytest.approx(eig["value"].iloc[0])
    html = (tmp_path / "eig.html").read_text()
    assert "plotly" in html.lower() and "Top Hessian eigenvalues over training" in html  # λ1, λ2 over steps
    # one checkpoint → the probe's own figure; format from the suffix
    code, _, err = run_cli([*base, "--step", "4", "--out", str(tmp_path / "one.html")], capsys)
    assert code == 0, err
    assert "Top eigenvalues" in (tmp_path / "one.html").read_text()


def test_png_unavailable_is_a_readable_error(tmp_path: Path) -> None:
    from dynascope.probes.figures import ExportError, write_png

    class Broken:
        def to_image(self, **kwargs):
            raise RuntimeError("Chrome not found\nlong details")

    with pytest.raises(ExportError, match="Chrome/Chromium.*Chrome not found"):
        write_png(Broken(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("google-chrome") is None, reason="no browser"
)
def test_export_png(probed_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "eig.png"
    assert main(["export", str(probed_run.path), "--probe", "hessian_eigenvalues", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- runs, recipe
def test_runs_lists_runs(probed_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["runs", str(probed_run.path.parent)], capsys)
    assert code == 0 and "mlp on xor" in out and "3 checkpoint(s), steps 0–8" in out
    code, out, _ = run_cli(["runs", str(probed_run.path.parent), "--json"], capsys)
    row = json.loads(out.splitlines()[0])
    assert row["checkpoints"] == 3 and row["results"] >= 3


def test_recipe_delegates_to_the_recipes_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    import dynascope.recipes as recipes

    seen: list[list[str]] = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "dynascope.recipes.__main__" else real_find_spec(n, *a),
    )
    monkeypatch.setattr(recipes, "main", lambda argv: seen.append(argv) or 0, raising=False)
    assert main(["recipe", "grokking", "--out", "/tmp/x", "--steps", "10"]) == 0
    assert seen == [["grokking", "--out", "/tmp/x", "--steps", "10"]]
    monkeypatch.delattr(recipes, "main")
    code, _, err = run_cli(["recipe", "grokking", "--out", "/tmp/x"], capsys)
    assert code == 2 and "no training recipes" in err


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "nope", "{run}"], "unknown probe 'nope'; choose one of"),
        (["probe", "hessian_trace", "{run}", "--param", "bogus=1"], "has no parameter 'bogus'"),
        (["probe", "hessian_trace", "{run}", "--param", "n_matvecs=abc"], "takes an integer"),
        (["probe", "hessian_trace", "{run}", "--param", "novalue"], "NAME=VALUE"),
        (["probe", "hessian_eigenvalues", "{run}", "--param", "k=0"], "k must be a positive int"),
        (["probe", "hessian_trace", "{run}", "--step", "7"], "no checkpoint at step 7"),
        (["probe", "hessian_trace", "{tmp}"], "not a run folder"),
        (["probe", "hessian_trace", "{tmp}/missing"], "does not exist"),
        (["probe", "hessian_trace", "{tmp}/bad.safetensors", "--dataset", "xor"], "not a valid safetensors"),
        (["probe", "hessian_trace", "{tmp}/empty.pt", "--dataset", "xor"], "empty"),
        (["probe", "hessian_trace", "{tmp}/bad.safetensors", "--dataset", "{{oops"], "not valid JSON"),
        (["probe", "hessian_trace", "{run}", "--dataset", "xor"], "bare checkpoint files"),
        (["export", "{run}", "--probe", "ntk", "--out", "{tmp}/x.csv"], "no cached results for probe 'ntk'"),
        (
            ["export", "{run}", "--probe", "hessian_eigenvalues", "--out", "{tmp}/x.txt"],
            "cannot tell the format",
        ),
        (["export", "{tmp}", "--probe", "ntk", "--out", "{tmp}/x.csv"], "not a run folder"),
        (["runs", "{tmp}/missing"], "is not a folder"),
    ],
)
def test_bad_input_gives_one_readable_line_and_exit_2(
    probed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    argv = [a.format(run=probed_run.path, tmp=tmp_path) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err and err.startswith(f"dynascope {argv[0]}: error: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["probes"],  # removed: `dynascope probe` lists the probes
        ["export", "x"],
        ["nonsense"],
        ["probe", "a", "b", "--step", "x"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unexpected_failure_exits_1(
    probed_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynascope.runner import PROBES, ProbeSpec

    def boom(model, data, *, loss="auto"):
        raise RuntimeError("kaboom inside the probe")

    monkeypatch.setattr(probes, "boom", boom, raising=False)
    monkeypatch.setitem(PROBES, "boom", ProbeSpec("boom", "boom"))
    monkeypatch.delenv("DYNASCOPE_DEBUG", raising=False)
    code, _, err = run_cli(["probe", "boom", str(probed_run.path)], capsys)
    assert code == 1 and "unexpected error: RuntimeError: kaboom inside the probe" in err
    assert "Traceback" not in err
    monkeypatch.setenv("DYNASCOPE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["probe", "boom", str(probed_run.path)])


def test_subprocess_python_m_dynascope(probed_run: Run) -> None:
    cmd = [sys.executable, "-m", "dynascope", "probe", "hessian_eigenvalues"]
    proc = subprocess.run(
        [*cmd, str(probed_run.path / "run.json")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("dynascope probe: error: ") and len(proc.stderr.strip().splitlines()) == 1
    argv = [*cmd, str(probed_run.path), "--step", "0", "--param", "k=2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step 0 (cached)" in proc.stdout


# ------------------------------------------------------------------------------------------ hardening
def test_runs_lists_the_other_runs_and_marks_a_truncated_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "good")
    broken = make_run(tmp_path / "broken")
    ck = broken.checkpoint_path(8)
    ck.write_bytes(ck.read_bytes()[:100])
    code, out, err = run_cli(["runs", str(tmp_path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert f"{tmp_path / 'broken'}  mlp on xor  2 checkpoint(s), steps 0–4" in lines[0]
    assert "[broken: step_000008.safetensors: is not a readable safetensors file" in lines[1]
    assert f"{tmp_path / 'good'}  mlp on xor  3 checkpoint(s), steps 0–8" in lines[2]
    code, out, _ = run_cli(["runs", str(tmp_path), "--json"], capsys)
    rows = {Path(r["run"]).name: r for r in map(json.loads, out.splitlines())}
    assert rows["good"]["checkpoints"] == 3 and "broken" not in rows["good"]
    assert rows["broken"]["checkpoints"] == 2
    assert [b["file"] for b in rows["broken"]["broken"]] == ["step_000008.safetensors"]


def test_json_into_a_closed_pipe_is_quiet(
    probed_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dynascope runs --json | head -0`: the reader is gone before the first line is written."""
    import io
    import os

    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    saved = os.dup(write_fd)  # main() points the pipe's descriptor at /dev/null; keep ours to close
    pipe = io.TextIOWrapper(os.fdopen(write_fd, "wb", buffering=0), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        code = main(["runs", str(probed_run.path.parent), "--json"])
    finally:
        monkeypatch.undo()
        os.close(saved)
    _, err = capsys.readouterr()
    assert code == 141 and err == ""


def test_export_out_folder_or_missing_parent_is_exit_2(
    probed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["export", str(probed_run.path), "--probe", "hessian_eigenvalues", "--format", "csv"]
    code, _, err = run_cli([*base, "--out", str(tmp_path)], capsys)
    assert code == 2 and f"--out '{tmp_path}' is a folder; give a file name" in err
    missing = tmp_path / "no" / "such" / "x.csv"
    code, _, err = run_cli([*base, "--out", str(missing)], capsys)
    assert code == 2 and "does not exist" in err and "create it" in err
    assert not (tmp_path / "no").exists()  # refused, never created
    code, out, err = run_cli([*base, "--out", str(tmp_path / "x.csv")], capsys)
    assert code == 0 and (tmp_path / "x.csv").is_file(), err


def test_dataset_that_does_not_fit_the_model_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynascope.models import build, save_checkpoint

    ck = save_checkpoint(build("mlp", in_dim=64, width=8, depth=1, out_dim=10), tmp_path / "m64.safetensors")
    argv = ["probe", "hessian_eigenvalues", str(ck), "--dataset", '{"name": "xor"}', "--param", "k=2"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "got float32 inputs of shape [" in err and "expects float32 inputs [..., 64]" in err
    assert len(err.strip().splitlines()) == 1 and "unexpected" not in err


def test_runs_marks_a_checkpoint_with_a_nan_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    run = make_run(tmp_path / "r")
    state = run.load_model(8).state_dict()
    meta = {"format": "pt", "dynascope": '{"step": 8, "epoch": NaN}'}
    save_file({k: v.contiguous() for k, v in state.items()}, str(run.checkpoint_path(8)), metadata=meta)
    code, out, err = run_cli(["runs", str(tmp_path)], capsys)
    assert code == 0, err
    assert "2 checkpoint(s), steps 0–4" in out and "[broken: step_000008.safetensors: metadata 'epoch'" in out


def test_checkpoint_step_beyond_int64_is_exit_2_before_any_probe(
    probed_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    state = probed_run.load_model(8).state_dict()
    meta = {"format": "pt", "dynascope": json.dumps({"step": 2**63, "model_config": MODEL})}
    bare = tmp_path / "huge_step.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bare), metadata=meta)
    argv = ["probe", "hessian_trace", str(bare), "--dataset", json.dumps(DATASET), "--param", "n_matvecs=6"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and "metadata 'step' = 9223372036854775808 is outside [0, 2**63)" in err, err
    assert not (tmp_path / "results.sqlite").exists() or not ResultStore(tmp_path).list()


def test_probe_without_a_target_lists_probes_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    """One command: ``dynascope probe`` lists what the runner can evaluate, ``dynascope probe NAME`` its
    parameters (``spec`` and the other runner-set names are not shown); there is no ``probes`` twin."""
    from dynascope.runner import PROBES

    assert main(["probe"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(PROBES)
    assert main(["probe", "hessian_eigenvalues"]) == 0
    out = capsys.readouterr().out
    assert "--param k=5" in out and "--param loss='auto'" in out and "spec" not in out
