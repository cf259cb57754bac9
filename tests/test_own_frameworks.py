"""Checkpoint folders of real frameworks imported as runs (random init, no downloads): a Hugging Face GPT-2
with a tiny config trained a few steps by HF ``Trainer``, and a Lightning ``Trainer`` run with its CSV logger.
Every listed probe runs on GPT-2 from the notebook API and the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from dense import token_loss_hessian

import dynascope
from dynascope.cli import main
from dynascope.models import Run, import_checkpoints, scan_checkpoint_folder

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
USER = str(HERE / "own" / "user_models.py")
SHIFTED = {"name": "token_cross_entropy", "shift": True}
VOCAB = 97


def train_tiny_gpt2(root: Path, *, seed: int = 0, max_steps: int = 4) -> tuple[Path, Path]:
    """``(save_pretrained folder, Trainer output folder with checkpoint-2/ and checkpoint-4/)``."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=64, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    pretrained = root / "gpt2-tiny"
    model.save_pretrained(pretrained)
    x, _ = _tokens()

    class Tokens(Dataset):
        def __len__(self) -> int:
            return x.shape[0]

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": x[i], "labels": x[i]}

    out = root / "trainer"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, logging_steps=1, learning_rate=1e-3,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
        save_only_model=True,
    )  # fmt: skip
    # `python -m pytest` from the repository root puts it on sys.path, where our datasets/ folder looks
    # like Hugging Face `datasets` to transformers' availability check: tell the Trainer it is absent
    import transformers.trainer as hf_trainer

    saved = hf_trainer.is_datasets_available
    hf_trainer.is_datasets_available = lambda: False
    try:
        transformers.Trainer(model=model, args=args, train_dataset=Tokens()).train()
    finally:
        hf_trainer.is_datasets_available = saved
    return pretrained, out


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (8, 8), generator=g)
    return x, x.clone()


DATA = {"factory": f"{USER}:lm_tokens", "kwargs": {"n": 8, "T": 8, "vocab": VOCAB}}


def test_hf_trainer_folder_imports_and_every_probe_runs_from_notebook_and_cli(tmp_path: Path) -> None:
    pretrained, out = train_tiny_gpt2(tmp_path)
    scan = scan_checkpoint_folder(out)
    assert scan.layout == "hf_trainer" and scan.steps == [2, 4]
    assert {r["step"] for r in scan.metrics} >= {1, 2, 3, 4} and "train_loss" in scan.metrics[0]
    model = {"hf": str(pretrained)}
    run = import_checkpoints(out, tmp_path / "runs" / "gpt2", model=model, dataset=DATA, loss=SHIFTED)
    assert run.steps() == [2, 4]
    m = run.load_model(4)
    run = dynascope.open_run(run.path)
    assert "train_loss" in run.metrics.columns
    assert m.lm_head.weight is m.transformer.wte.weight
    # the loaded weights are the Trainer's (not the initial ones)
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(out / "checkpoint-4", local_files_only=True)
    assert torch.equal(ref.transformer.h[1].mlp.c_fc.weight, m.transformer.h[1].mlp.c_fc.weight)
    # a second run for LMC: another seed
    pre_b, out_b = train_tiny_gpt2(tmp_path / "b", seed=1)
    run_b = import_checkpoints(out_b, tmp_path / "runs" / "gpt2b", model={"hf": str(pre_b)}, dataset=DATA,
                               loss=SHIFTED)  # fmt: skip
    timings = {}
    calls = {
        "hessian_eigenvalues": {"k": 2, "tol": 1e-3, "refine": False},
        "hessian_trace": {"n_matvecs": 12},
        "hessian_density": {"n_probes": 2, "lanczos_steps": 12},
        "sharpness": {"lr": 1e-3, "trace_matvecs": 6},
        "gradient_coherence": {},
    }
    for probe, params in calls.items():
        t0 = time.perf_counter()
        res = run.probe(probe, step=4, **params)
        timings[probe] = time.perf_counter() - t0
        assert res.meta.get("attention") == "math SDPA", probe
    eig = run.probe("hessian_eigenvalues", step=4, k=2, tol=1e-3, refine=False)
    assert eig.values[0] > 0 and eig.meta["outputs"] == "logits"
    t0 = time.perf_counter()
    ntk = run.probe("ntk_trajectory", steps=[2, 4], max_samples=3)
    timings["ntk_trajectory"] = time.perf_counter() - t0
    assert len(ntk.steps) == 2
    t0 = time.perf_counter()
    lmc = run.probe("lmc_barrier", step=4, other=(run_b, 4), n_points=5)
    timings["lmc_barrier"] = time.perf_counter() - t0
    assert len(lmc.losses) == 5 and all(v > 0 for v in lmc.losses)
    print("GPT-2 tiny probe seconds:", json.dumps({k: round(v, 2) for k, v in timings.items()}))
    # the CLI reads the same cache and computes what is missing
    assert main(["probe", "hessian_eigenvalues", str(run.path), "--step", "4", "--param", "k=2",
                 "--param", "tol=0.001", "--param", "refine=false", "--json"]) == 0  # fmt: skip
    assert main(["probe", "ntk", str(run.path), "--step", "2", "--max-samples", "3", "--param", "k=2"]) == 0
    assert (
        main(["probe", "lmc_barrier", str(run.path), "--other", str(run_b.path), "--param", "n_points=3"])
        == 0
    )


def test_cli_import_of_a_hf_trainer_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pretrained, out = train_tiny_gpt2(tmp_path, max_steps=2)
    rc = main(["import", str(out), "--model", json.dumps({"hf": str(pretrained)}), "--data", json.dumps(DATA),
               "--loss", json.dumps(SHIFTED), "--out", str(tmp_path / "runs" / "g"), "--copy"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "tied weights filled from their tie: lm_head.weight ← transformer.wte.weight" in text
    assert "imported 1 hf_trainer checkpoint(s) copied" in text
    assert Run.open(tmp_path / "runs" / "g").checkpoint(2).path.name == "step_000002.safetensors"


def test_lightning_trainer_folder_imports_with_its_csv_metrics(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from dynascope.datasets import load
    from dynascope.models import build

    spec = {"name": "mlp", "in_dim": 2, "width": 8, "depth": 1, "out_dim": 2, "seed": 0}
    data = {"name": "xor", "n_train": 32, "n_test": 8, "seed": 0}

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build(**spec)

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    x, y = load(**data).train
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    root = tmp_path / "lightning"
    trainer = L.Trainer(
        default_root_dir=root, max_steps=6, accelerator="cpu", logger=CSVLogger(root), log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=2, save_top_k=-1,
                                   save_last=True, filename="{step}")],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), loader)
    scan = scan_checkpoint_folder(root)
    assert (root / "ckpts" / "last.ckpt").is_file()  # repeats step 6: the named file is kept
    assert scan.layout == "lightning" and scan.steps == [2, 4, 6]
    assert scan.checkpoints[-1].path.name != "last.ckpt"
    run = import_checkpoints(root, tmp_path / "run", model=spec, dataset=data, loss="cross_entropy")
    assert run.steps() == [2, 4, 6] and "train_loss" in run.metrics().columns
    m = run.load_model(6)
    assert torch.isfinite(torch.stack([p.sum() for p in m.parameters()])).all()
    res = dynascope.open_run(run.path).probe("hessian_eigenvalues", step=6, k=2)
    assert res.values[0] > 0


def test_gpt2_micro_float64_hessian_matches_the_dense_reference(tmp_path: Path) -> None:
    """HF GPT-2 (default attention implementation) from an ``{"hf": folder}`` spec, float64: Lanczos top-k
    within 1e-8 of ``torch.autograd.functional.hessian``, Hutch++ trace within 2 s.e."""
    transformers = pytest.importorskip("transformers")

    import dynascope.probes as probes
    from dynascope.models import build_from_spec

    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=1, n_inner=8,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "micro")
    model = build_from_spec({"hf": str(tmp_path / "micro")}).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (4, 6), generator=g)
    y = x.clone()
    y[2, 3] = -100
    t0 = time.perf_counter()
    H = token_loss_hessian(model, x, y)
    dense_s = time.perf_counter() - t0
    ev = torch.linalg.eigvalsh(H).flip(0)
    t0 = time.perf_counter()
    r = probes.hessian_eigenvalues(model, (x, y), k=3, loss=SHIFTED, tol=1e-10)
    eig_s = time.perf_counter() - t0
    err = float((r.values - ev[:3]).abs().max())
    tr = probes.hessian_trace(model, (x, y), loss=SHIFTED, n_matvecs=90)
    z = abs(tr.estimate - float(H.trace())) / tr.stderr
    print(f"GPT-2 micro P={H.shape[0]}: top-3 error {err:.2e} ({eig_s:.2f} s; dense {dense_s:.2f} s), "
          f"trace {tr.estimate:.6g} vs {float(H.trace()):.6g} ({z:.2f} s.e.)")  # fmt: skip
    assert err < 1e-8 and z < 2
    K = probes.empirical_ntk(model, x[:2])
    assert K.shape == (2, 2)
