"""Your own model, data and loss: specs, runs built from them, checkpoint key fitting, attention models,
folder import, the CLI and readable errors for bad specs (issue 14). No downloads, random init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dense import token_loss_hessian
from safetensors.torch import save_file
from torch import nn

import dynascope.probes as probes
from dynascope import runner
from dynascope.cli import main
from dynascope.datasets import data_fingerprint, load_spec
from dynascope.dry_run import dry_run
from dynascope.models import (
    Run,
    build_from_spec,
    import_checkpoints,
    load_weights,
    model_config,
    model_fingerprint,
    save_checkpoint,
    scan_checkpoint_folder,
)
from dynascope.probes.losses import resolve_loss

HERE = Path(__file__).resolve().parent
USER = str(HERE / "own" / "user_models.py")
LM = {"factory": f"{USER}:attention_lm", "kwargs": {"vocab": 7, "dim": 4}}
TOKENS = {"factory": f"{USER}:token_data"}
SHIFTED = {"name": "token_cross_entropy", "shift": True}


# ------------------------------------------------------------------------------------------ model specs
def test_model_factory_by_module_and_by_file_is_seeded_and_records_its_spec() -> None:
    a = build_from_spec({"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}})
    b = build_from_spec({"factory": "torch.nn:Linear", "kwargs": {"out_features": 2, "in_features": 3}})
    assert torch.equal(a.weight, b.weight)  # seed 0 by default: the same init
    c = build_from_spec(
        {"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}, "seed": 1}
    )
    assert not torch.equal(a.weight, c.weight)
    assert model_config(a) == {"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2},
                               "seed": 0}  # fmt: skip
    lm = build_from_spec(LM)
    assert lm.head.weight is lm.embed.weight
    assert (
        build_from_spec({"name": "mlp", "in_dim": 2, "width": 3, "depth": 1, "out_dim": 2}).dynascope_config[
            "name"
        ]
        == "mlp"
    )


def test_tuple_outputs_are_reduced_to_logits_by_the_stated_rule() -> None:
    m = build_from_spec({"factory": f"{USER}:tuple_model"})
    x = torch.randn(5, 3)
    out = m(x)
    assert isinstance(out, torch.Tensor) and out.shape == (5, 2)
    res = probes.hessian_eigenvalues(m, (x, torch.randint(0, 2, (5,))), k=1)
    assert res.meta["outputs"] == "first tensor: [0] of 2"


def test_model_fingerprint_follows_the_factory_file(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    spec = {"factory": f"{f}:make"}
    k1 = model_fingerprint(spec)
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2, bias=False)\n")
    assert model_fingerprint(spec) != k1
    lin = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 1, "out_features": 1}}
    assert model_fingerprint(lin) == {**lin, "seed": 0, "factory_code": {"ref": "torch.nn:Linear"}}


def test_hf_folder_fingerprint_follows_its_config_and_weights(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    a = model_fingerprint({"hf": str(folder)})
    assert a["hf"] == str(folder.resolve()) and a["hf_weights_sha256"] and a["hf_config_sha256"]
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    b = model_fingerprint({"hf": str(folder)})
    assert b["hf_weights_sha256"] != a["hf_weights_sha256"] and b["hf_config_sha256"] == a["hf_config_sha256"]
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 3}')
    assert model_fingerprint({"hf": str(folder)})["hf_config_sha256"] != b["hf_config_sha256"]


def test_changed_data_file_changes_the_runner_cache_key(tmp_path: Path) -> None:
    x, y = torch.randn(12, 2), torch.arange(12) % 2
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    mlp = {"name": "mlp", "in_dim": 2, "width": 4, "depth": 1, "out_dim": 2}
    run = Run.create(tmp_path / "run", model=mlp, dataset={"file": str(tmp_path / "d.safetensors")})
    run.save_checkpoint(run.build_model(), 0)
    runner.run_probe(run, "hessian_trace", step=0, params={"n_matvecs": 6})
    assert runner.cached_result(run, "hessian_trace", step=0, params={"n_matvecs": 6}) is not None
    save_file({"x": x * 2, "y": y}, str(tmp_path / "d.safetensors"))
    assert runner.cached_result(run, "hessian_trace", step=0, params={"n_matvecs": 6}) is None


# ------------------------------------------------------------------------------------------ data specs
def test_data_files_of_every_kind(tmp_path: Path) -> None:
    x = torch.randn(10, 3)
    y = torch.arange(10) % 2
    save_file({"inputs": x, "labels": y}, str(tmp_path / "d.safetensors"))
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    df = pd.DataFrame({"a": x[:, 0].numpy(), "b": x[:, 1].numpy(), "c": x[:, 2].numpy(), "label": y.numpy()})
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    specs = [
        {"file": str(tmp_path / "d.safetensors"), "x": "inputs", "y": "labels"},
        {"file": str(tmp_path / "d.pt")},
        {"file": str(tmp_path / "d.npz"), "test_file": str(tmp_path / "d.pt")},
        {"file": str(tmp_path / "d.parquet"), "label": "label"},
        {"file": str(tmp_path / "d.csv"), "label": "label"},
    ]
    for spec in specs:
        ds = load_spec(spec)
        assert torch.allclose(ds.train[0], x) and torch.equal(ds.train[1], y), spec
        assert ds.train[1].dtype == torch.int64 and ds.info["n_classes"] == 2
    assert load_spec(specs[0]).info["test"].startswith("same as train")
    fp = data_fingerprint(specs[1])
    torch.save({"x": x + 1, "y": y}, tmp_path / "d.pt")
    assert data_fingerprint(specs[1])["file_sha256"] != fp["file_sha256"]


def test_data_factory_returning_a_dataloader_of_hf_dicts() -> None:
    ds = load_spec(TOKENS)
    assert ds.train[0].shape == (6, 5) and ds.info["task"] == "sequence"
    assert not torch.equal(ds.test[0], ds.train[0])


# ------------------------------------------------------------------------------------------ losses
def test_token_cross_entropy_is_the_mean_over_counted_tokens_of_the_whole_dataset() -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (6, 5), generator=g)
    y[0, 1:] = -100  # a sequence with a single counted token
    y[3, 2] = -100
    loss = resolve_loss("token_cross_entropy")
    want = torch.nn.functional.cross_entropy(out.reshape(-1, 7), y.reshape(-1), ignore_index=-100)
    # two uneven batches: Σ per-sample / Σ counted tokens is the token mean, not the mean of batch means
    total = loss.total(out[:2], y[:2]) + loss.total(out[2:], y[2:])
    count = loss.count(y[:2]) + loss.count(y[2:])
    assert count == int((y != -100).sum()) and loss.unit == "tokens"
    torch.testing.assert_close(total / count, want, rtol=1e-14, atol=0)
    shifted = resolve_loss(SHIFTED)
    want_s = torch.nn.functional.cross_entropy(
        out[:, :-1].reshape(-1, 7), y[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(shifted.total(out, y) / shifted.count(y), want_s, rtol=1e-14, atol=0)
    # the operator divides by the counted tokens: its loss value is the same token mean
    model = build_from_spec(LM).double()
    x, yy = load_spec(TOKENS).train
    op = probes.make_operator(model, (x, yy), loss=SHIFTED, batch_size=4)
    with torch.no_grad():
        o = model(x)
    ref = torch.nn.functional.cross_entropy(
        o[:, :-1].reshape(-1, 7), yy[:, 1:].reshape(-1), ignore_index=-100
    )
    assert op.num_samples == int((yy[:, 1:] != -100).sum())
    assert abs(op.loss_value() - float(ref)) < 1e-12
    assert op.meta()["reduction"] == f"mean over {op.num_samples} tokens"


def test_loss_by_reference_and_shape_errors_that_suggest_the_loss() -> None:
    loss = resolve_loss("torch.nn.functional:mse_loss")
    assert loss.per_sample(torch.ones(3, 2), torch.zeros(3, 2)).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"\[B, T, V\] outputs: use loss='token_cross_entropy'"):
        resolve_loss("cross_entropy").per_sample(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"use loss='cross_entropy'"):
        resolve_loss("token_cross_entropy").per_sample(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown options"):
        resolve_loss({"name": "token_cross_entropy", "shfit": True})


# ------------------------------------------------------------------------------------------ weights
class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_load_weights_adds_prefixes_and_fills_tied_weights(tmp_path: Path) -> None:
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    save_checkpoint(inner, tmp_path / "inner.safetensors")
    w = Wrapper()
    rec = load_weights(tmp_path / "inner.safetensors", w)  # prefix found automatically
    assert "+backbone." in rec.stripped_prefixes
    assert torch.equal(w.backbone[0].weight, inner[0].weight)
    w2 = Wrapper()
    load_weights(tmp_path / "inner.safetensors", w2, add_prefix="backbone.")
    assert torch.equal(w2.backbone[2].bias, inner[2].bias)
    w3 = Wrapper()
    load_weights(tmp_path / "inner.safetensors", w3, key_map={"": "backbone."})
    assert torch.equal(w3.backbone[2].weight, inner[2].weight)
    # a tied head absent from the file (what save_pretrained writes) is filled from its tie
    lm = build_from_spec(LM)
    sd = {k: v.clone() for k, v in lm.state_dict().items() if k != "head.weight"}
    save_file(sd, str(tmp_path / "lm.safetensors"))
    fresh = build_from_spec({**LM, "seed": 3})
    rec = load_weights(tmp_path / "lm.safetensors", fresh)
    assert rec.metadata["tied_filled"] == {"head.weight": "embed.weight"}
    assert torch.equal(fresh.head.weight, lm.embed.weight) and fresh.head.weight is fresh.embed.weight


# ------------------------------------------------------------------------------------------ attention
def test_attention_model_hessian_matches_a_dense_float64_reference() -> None:
    """nn.MultiheadAttention + LayerNorm + tied embedding from a module:function spec, token loss with
    ignored positions: Lanczos top-k to 1e-8 (graph and func backends), Hutch++ trace within 2 s.e."""
    model = build_from_spec(LM).double()
    x, y = load_spec(TOKENS).train
    H = token_loss_hessian(model, x, y)
    ev = torch.linalg.eigvalsh(H).flip(0)
    for batch_size in (None, 4):  # one batch: graph reuse; two batches: forward-over-reverse
        r = probes.hessian_eigenvalues(model, (x, y), k=3, loss=SHIFTED, batch_size=batch_size, tol=1e-10)
        assert (r.values - ev[:3]).abs().max() < 1e-8, (batch_size, r.values, ev[:3])
        assert r.meta["attention"] == "math SDPA" and r.meta["loss"] == "token_cross_entropy (shifted)"
    tr = probes.hessian_trace(model, (x, y), loss=SHIFTED, n_matvecs=60)
    assert abs(tr.estimate - float(H.trace())) < 2 * tr.stderr
    c = probes.gradient_coherence(model, (x, y), loss=SHIFTED)
    assert c.meta["attention"] == "math SDPA" and np.isfinite(c.alpha)
    K = probes.empirical_ntk(model, x[:3])
    assert K.shape == (3, 3) and torch.allclose(K, K.T)


def test_missing_derivative_errors_name_the_op_and_the_fallbacks() -> None:
    from dynascope.probes.functional import derivative_error

    err = RuntimeError("derivative for aten::_fused_thing_backward is not implemented")
    hint = derivative_error(err, "func products, then double backward")
    assert hint is not None and "aten::_fused_thing_backward" in str(hint) and "double backward" in str(hint)
    assert derivative_error(RuntimeError("shapes do not match"), "x") is None

    class NoFunc(torch.autograd.Function):  # old-style: no setup_context, so torch.func cannot trace it
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh() ** 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return NoFunc.apply(self.lin(x))

    with pytest.raises(RuntimeError, match=r"without torch.func support.*tried: the NTK.s Jacobian"):
        probes.empirical_ntk(Net(), torch.randn(4, 3))


# ------------------------------------------------------------------------------------------ runs
def _lm_run(tmp_path: Path, name: str = "lm", steps: tuple[int, ...] = (0, 5)) -> Run:
    run = Run.create(tmp_path / name, model=LM, dataset=TOKENS, loss=SHIFTED)
    model = run.build_model()
    x, y = run.load_dataset().train
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lossf = resolve_loss(SHIFTED)
    for step in range(steps[-1] + 1):
        loss = lossf.total(model(x), y) / lossf.count(y)
        if step in steps:
            run.save_checkpoint(model, step, metrics={"train_loss": float(loss.detach())})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run


def test_run_from_specs_rebuilds_and_probes_through_the_runner(tmp_path: Path) -> None:
    run = _lm_run(tmp_path)
    again = Run.open(run.path)
    assert again.model_config["factory"].endswith(":attention_lm") and again.loss == SHIFTED
    m = again.load_model(5)
    assert m.head.weight is m.embed.weight
    res, cached = runner.run_probe(again, "hessian_eigenvalues", step=5, params={"k": 2})
    assert not cached and res.meta["reduction"].endswith("tokens")
    _, cached = runner.run_probe(again, "hessian_eigenvalues", step=5, params={"k": 2})
    assert cached
    key = runner.plan(again, "hessian_eigenvalues", step=5).key
    assert (
        key["model_spec"]["factory_code"]["file_sha256"] and key["data_spec"]["factory_code"]["file_sha256"]
    )


def test_import_plain_folder_by_reference_and_copied(tmp_path: Path) -> None:
    src = _lm_run(tmp_path, "src")
    plain = tmp_path / "plain"
    plain.mkdir()
    for c in src.checkpoints():
        m = src.load_model(c.step)
        torch.save(
            {k: v for k, v in m.state_dict().items() if k != "head.weight"}, plain / f"ckpt-{c.step}.pt"
        )
    scan = scan_checkpoint_folder(plain)
    assert scan.layout == "plain" and scan.steps == [0, 5]
    ref = import_checkpoints(plain, tmp_path / "ref", model=LM, dataset=TOKENS, loss=SHIFTED)
    cp = import_checkpoints(plain, tmp_path / "cp", model=LM, dataset=TOKENS, loss=SHIFTED, copy=True)
    assert ref.steps() == cp.steps() == [0, 5]
    assert Run.open(ref.path).checkpoint(5).path == (plain / "ckpt-5.pt").resolve()
    a, b = Run.open(ref.path).load_model(5), Run.open(cp.path).load_model(5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(a.embed.weight, src.load_model(5).embed.weight)


def test_cli_import_and_probe_with_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _lm_run(tmp_path, "src")
    out = tmp_path / "runs" / "lm"
    rc = main(["import", str(src.checkpoint_dir), "--model", json.dumps(LM), "--data", f"{USER}:token_data",
               "--loss", json.dumps(SHIFTED), "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "dry run ok" in text and "imported 2 plain checkpoint(s) by reference" in text
    rc = main(["probe", "hessian_trace", str(out), "--param", "n_matvecs=6", "--json"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and row["result"]["meta"]["reduction"].endswith("tokens")
    # a bare checkpoint with a factory model spec (shorthand), a data factory and a loss
    bare = src.checkpoint_path(5)
    rc = main(["probe", "hessian_eigenvalues", str(bare), "--model-config", f"{USER}:attention_lm",
               "--dataset", f"{USER}:token_data", "--loss", "token_cross_entropy", "--param", "k=1",
               "--store", str(tmp_path / "store")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input
def test_bad_specs_give_errors_that_name_the_spec(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"model factory 'no_such_pkg.models:make': module 'no_such_pkg.models' is not importable",
    ):
        build_from_spec({"factory": "no_such_pkg.models:make"})
    with pytest.raises(ValueError, match=r"'torch.nn' has no attribute 'NoSuchNet'"):
        build_from_spec({"factory": "torch.nn:NoSuchNet"})
    with pytest.raises(
        ValueError, match=r"model factory '.*:broken_model' raised RuntimeError: out of coffee"
    ):
        build_from_spec({"factory": f"{USER}:broken_model"})
    with pytest.raises(ValueError, match=r"file '.*missing.py' does not exist"):
        build_from_spec({"factory": f"{tmp_path}/missing.py:make"})
    save_file({"inputs": torch.zeros(3, 2), "y": torch.zeros(3)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match=r"has no key\(s\) \['x'\]; it has \['inputs', 'y'\]"):
        load_spec({"file": str(tmp_path / "d.safetensors")})
    save_file({"x": torch.zeros(3, 2), "y": torch.zeros(4)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match=r"x has 3 samples but y has 4"):
        load_spec({"file": str(tmp_path / "e.safetensors")})
    with pytest.raises(ValueError, match=r"has no column 'target'"):
        pd.DataFrame({"a": [1.0], "b": [0]}).to_csv(tmp_path / "t.csv", index=False)
        load_spec({"file": str(tmp_path / "t.csv"), "label": "target"})
    ragged = tmp_path / "ragged.py"
    ragged.write_text(
        "import torch\n"
        "def make():\n"
        "    items = [(torch.zeros(3 + i), torch.zeros(3 + i)) for i in range(2)]\n"
        "    return torch.utils.data.DataLoader(items, batch_size=1)\n"
    )
    with pytest.raises(ValueError, match=r"items cannot be stacked into one tensor \(pad sequences"):
        load_spec({"factory": f"{ragged}:make"})
    # data that does not fit the model: found by the dry run
    lin = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 5, "out_features": 2}}
    with pytest.raises(
        ValueError, match=r"the data \(spec .*\) does not fit the model \(spec .*Linear.*inputs \[3, 2\]"
    ):
        dry_run(lin, {"file": str(tmp_path / "d.safetensors"), "x": "inputs"})
    # a loss that does not fit the outputs: names the shapes and suggests the loss
    with pytest.raises(
        ValueError,
        match=r"loss 'cross_entropy' does not fit the model outputs \[4, 5, 7\].*token_cross_entropy",
    ):
        dry_run(LM, TOKENS, "cross_entropy")
    rep = dry_run(LM, TOKENS, SHIFTED)
    assert rep.output_shape == [4, 5, 7] and rep.loss == "token_cross_entropy (shifted)"
    with pytest.raises(ValueError, match="model config must be a dict"):
        Run.create(tmp_path / "r", model={"factory": "a:b", "hf": "x"}, dataset=TOKENS)


def test_cli_bad_specs_are_one_readable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _lm_run(tmp_path, "src")
    base = ["import", str(src.checkpoint_dir), "--data", f"{USER}:token_data", "--out", str(tmp_path / "o")]
    assert main([*base, "--model", "no_such_pkg:make"]) == 2
    err = capsys.readouterr().err
    assert "model factory 'no_such_pkg:make': module 'no_such_pkg' is not importable" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*base, "--model", json.dumps(LM), "--loss", "cross_entropy"]) == 2
    err = capsys.readouterr().err
    assert "the loss 'cross_entropy' does not fit the model outputs [4, 5, 7]" in err
    assert "token_cross_entropy" in err and not (tmp_path / "o").exists()  # nothing written
    assert main([*base, "--model", '{"width": 3}']) == 2
    assert '--model must be a JSON object with a "name", "factory" or "hf"' in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nothing"), "--model", json.dumps(LM), "--data", "digits",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "is not a folder" in capsys.readouterr().err
