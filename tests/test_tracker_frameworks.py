"""dynascope.Tracker inside a real Lightning Trainer and a real Hugging Face Trainer (tiny models, CPU), and a
training process killed with SIGKILL leaving a readable run, one that ends without close() a finished one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dynascope
from dynascope.probes import hessian_eigenvalues
from dynascope.runner import run_probe
from dynascope.tracker import STATUS_FILE, describe_status, run_status

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIFTED = {"name": "token_cross_entropy", "shift": True}


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _check_inline_lambda_max(run: dynascope.RunView, steps: list[int], loss, params: dict) -> None:
    """Inline λ_max is a runner cache hit and the top Hessian eigenvalue of the saved checkpoint."""
    m = run.metrics
    x, y = run.dataset().train
    for s in steps:
        inline = m.loc[(m["step"] == s) & m["lambda_max"].notna(), "lambda_max"].item()
        res, cached = run_probe(run.run, "sharpness", step=s, params=params, store=run.store)
        assert cached and res.lambda_max == pytest.approx(inline, rel=1e-12)
        ref = hessian_eigenvalues(run.model(s), (x, y), k=1, loss=loss, tol=1e-6).values[0]
        assert inline == pytest.approx(float(ref), rel=1e-3)


def test_lightning_trainer(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(HERE / "own"))
    try:
        from tracked_lightning import LitNet
    finally:
        sys.path.remove(str(HERE / "own"))
    torch.manual_seed(0)
    model = LitNet()
    loader = DataLoader(TensorDataset(*_data()), batch_size=8, shuffle=False)
    cb = dynascope.LightningTracker(tmp_path / "run", loss="cross_entropy", probes={"lambda_max": 4},
                                    budget=None, checkpoint_every=5)  # fmt: skip
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])  # fmt: skip
    trainer.fit(model, loader)
    run = dynascope.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 4, 5, 8, 10, 12]
    info = run.run.extra["tracker"]["model_spec"]
    assert info["reopenable"] is True and "hparams" in info["source"]
    assert run.run.model_config["kwargs"] == {"in_dim": 4, "width": 8, "out_dim": 3, "lr": 0.1}
    torch.testing.assert_close(run.model(12)(_data()[0]), model(_data()[0]))
    m = run.metrics
    assert m["step"].tolist() == list(range(13)) and m["train_loss"].notna().sum() == 12
    status = run_status(tmp_path / "run")
    assert status["state"] == "finished"
    # the probes ran in the worker process; planned vs done over the trainer's max_steps (steps 0, 4, 8, 12)
    assert status["probe_worker"] == "process" and status["planned_steps"] == 12
    assert status["probes"]["lambda_max"]["planned"] == status["probes"]["lambda_max"]["done"] == 4
    _check_inline_lambda_max(
        run, [4, 8, 12], "cross_entropy", {"k": 1, "tol": 1e-3, "trace": False, "lr": 0.1}
    )


def _tokens(n: int = 16, t: int = 8, vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, t), generator=g)


def test_hf_trainer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    cfg = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    x = _tokens()

    class Tokens(Dataset):
        def __len__(self) -> int:
            return x.shape[0]

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": x[i], "labels": x[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=6, save_strategy="no", logging_steps=1, learning_rate=1e-3,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    cb = dynascope.HFTracker(tmp_path / "run", loss=SHIFTED, probes={"lambda_max": 3}, budget=None,
                             checkpoint_every=3, probe_samples=8)  # fmt: skip
    # run from the repository root, our datasets/ folder looks like Hugging Face `datasets` to the Trainer's
    # availability check (see tests/test_own_frameworks.py): tell it the library is absent
    import transformers.trainer as hf_trainer

    saved = hf_trainer.is_datasets_available
    hf_trainer.is_datasets_available = lambda: False
    try:
        transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb]).train()
    finally:
        hf_trainer.is_datasets_available = saved
    run = dynascope.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 3, 4, 6]
    assert run.run.model_config["hf"] == str((tmp_path / "run" / "hf_config").resolve())
    assert run.run.extra["tracker"]["model_spec"]["reopenable"] is True
    assert run.dataset().train[0]["input_ids"].shape == (8, 8)  # dict batches keep their keys
    m = run.metrics
    assert m["train_loss"].notna().sum() == 6 and "grad_norm" in m.columns
    status = run_status(tmp_path / "run")  # dict batches reach the worker process too (steps 0, 3, 6)
    assert status["probe_worker"] == "process" and status["planned_steps"] == 6
    assert status["probes"]["lambda_max"]["planned"] == status["probes"]["lambda_max"]["done"] == 3
    for s in (3, 6):  # the inline λ_max used the Trainer's current lr (0 once it decays: no threshold)
        two = m.loc[(m["step"] == s) & m["lambda_max"].notna(), "two_over_lr"].item()
        params = {"k": 1, "tol": 1e-3, "trace": False, "lr": 2 / two if two == two else 0.0}
        _check_inline_lambda_max(run, [s], SHIFTED, params)


SCRIPT = """
import sys, time, torch, dynascope
from dynascope.models import build
model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
tr = dynascope.Tracker(sys.argv[1], model, data=(x, y), loss="cross_entropy", optimizer=opt,
                       schedule="linear", checkpoint_every=5, probes={"lambda_max": 10}, heartbeat_s=0.0,
                       budget=None)
tr.step(0)
for s in range(1, 100000):
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    tr.step(s, metrics={"train_loss": loss})
    time.sleep(0.005)
"""


def _gone(pid: int) -> bool:
    """The process ``pid`` has exited (a zombie no init reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def test_killed_training_leaves_a_readable_run(tmp_path: Path) -> None:
    """kill -9 of the training process: its probe worker (which writes the run) finishes what it was sent
    — the probe it computes, every row it holds, the status — and exits; nothing half-written is visible."""
    path = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            st = run_status(path)  # rows wait for a probe the worker computes: wait for what is written
            if st and (st.get("last_row") or 0) >= 22:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail("the training process did not reach step 23 in time")
        assert run_status(path)["live"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    worker = run_status(path)["worker_pid"]
    deadline = time.time() + 60
    while not _gone(worker) and time.time() < deadline:  # the orphaned worker writes what it holds, exits
        time.sleep(0.05)
    assert _gone(worker), "the probe worker outlived the killed training process"
    assert not list(path.rglob(".*.tmp"))  # no half-written file
    status = run_status(path)
    assert status["state"] == "running" and not status["live"]
    assert describe_status(status).startswith("stopped without closing")
    run = dynascope.open_run(path)
    steps = run.steps
    assert steps[:5] == [0, 5, 10, 15, 20] and all(s % 5 == 0 for s in steps)
    run.model(steps[-1])  # every visible checkpoint loads
    m = run.metrics
    assert m["step"].tolist() == list(range(len(m))) and len(m) >= 23
    assert status["last_row"] == m["step"].max()  # the status was written after the last rows
    assert len(run.cached("sharpness")) >= 3
    listed = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dynascope", "runs", str(tmp_path), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    assert listed["status"].startswith("stopped without closing")
    assert json.loads((path / STATUS_FILE).read_text())["pid"] == proc.pid


EXIT_SCRIPT = """
import sys, torch, dynascope
from dynascope.models import build
model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
tr = dynascope.Tracker(sys.argv[1], model, data=(x, y), loss="cross_entropy", optimizer=opt,
                       schedule="linear", checkpoint_every=5, probes={"lambda_max": 5}, budget=None,
                       heartbeat_s=1e9)
tr.step(0)
for s in range(1, 13):
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    tr.step(s, metrics={"train_loss": loss.item()})
# no close(): the interpreter's exit closes the tracker and waits for the background writer
"""


def test_a_script_that_ends_without_close_leaves_a_finished_complete_run(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(EXIT_SCRIPT)
    cmd = [sys.executable, str(script), str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = run_status(tmp_path / "run")
    assert status["state"] == "finished" and status["step"] == 12 and status["last_checkpoint"] == 12
    run = dynascope.open_run(tmp_path / "run")
    assert run.steps == [0, 5, 10, 12] and run.metrics["step"].tolist() == list(range(13))
    assert len(run.cached("sharpness")) == 3


RESUME_SCRIPT = """
import sys, time, torch, dynascope
from dynascope.models import build
path, resume, last = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
model = build("mlp", in_dim=4, width=8, depth=2, out_dim=3, seed=0)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
tr = dynascope.Tracker(path, model, data=(x, y), loss="cross_entropy", optimizer=opt, schedule="linear",
                       checkpoint_every=5, heartbeat_s=0.0, budget=None, resume=resume)
start = 0 if tr.start_step is None else tr.start_step + 1
if start == 0:
    tr.step(0)
    start = 1
for s in range(start, last + 1):
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
    tr.step(s, metrics={"train_loss": loss})
    time.sleep(0.01 if last > 1000 else 0)
tr.close()
"""


@pytest.mark.slow
def test_a_killed_tracker_run_continues_with_resume(tmp_path: Path) -> None:
    """kill -9 mid-training, then Tracker(resume=True): the run continues after its last checkpoint (weights
    and momentum restored), with one metrics row per step, equal to a run that was never killed."""
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    path, ref = tmp_path / "run", tmp_path / "ref"
    proc = subprocess.Popen([sys.executable, str(script), str(path), "new", "100000"], cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_status(path) or {}).get("step") or 0) >= 23:
            assert proc.poll() is None
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ck = path / "checkpoints"
    (ck / ".step_000099.safetensors.abcd1234.tmp").write_bytes(b"partial")  # as a kill mid-write leaves
    for args, folder in (("resume", path), ("new", ref)):
        subprocess.run([sys.executable, str(script), str(folder), args, "40"], cwd=tmp_path, check=True)
    assert not list(ck.glob(".*.tmp"))
    a, b = dynascope.open_run(path), dynascope.open_run(ref)
    assert a.steps == b.steps and a.steps[-1] == 40
    ma, mb = a.metrics, b.metrics
    assert ma["step"].tolist() == list(range(41)) == mb["step"].tolist()  # no duplicate or missing row
    assert np.allclose(ma["train_loss"], mb["train_loss"], rtol=1e-6, atol=1e-7, equal_nan=True)
    for p, q in zip(a.model(40).parameters(), b.model(40).parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
