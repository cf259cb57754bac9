"""Researchers' own models with the numbers checked against dense float64 references
(``torch.autograd.functional.hessian``, per-sample ``jacrev``): HF-style dict batches (every key reaches
``forward``), ``-100`` token labels with the whole-dataset token mean, auxiliary heads and ``output=``, losses
taking ``(outputs, batch)``, parameters that do not reach the loss, freezing in specs (notebook = runner =
CLI), the GRU NTK fallback, small degenerate operators (dense eigensolver), the preconditioned sharpness at
``lr = 0`` and raw SDPA attention in ``meta``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader

import dynascope
import dynascope.probes as probes
from dynascope.datasets import load_spec
from dynascope.probes.functional import attention_kernels
from dynascope.probes.operators import OperatorSpec

HERE = Path(__file__).resolve().parent
OWN = HERE / "own" / "dict_models.py"
sys.path.insert(0, str(OWN.parent))
import dict_models as dm  # noqa: E402


def dense_hessian(model: nn.Module, loss_of_outputs) -> torch.Tensor:
    """``∇²_θ`` of ``loss_of_outputs(functional_call(model, θ))`` over every trainable parameter (float64)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(t: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, p in named:
            ps[n] = t[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return loss_of_outputs(lambda *a, **kw: functional_call(model, ps, a, kw))

    with attention_kernels():  # the fused SDPA kernels have no double backward
        return torch.autograd.functional.hessian(f, theta)


def top(H: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(H).flip(0)[:k]


# ------------------------------------------------------------------------------------------ dict batches
def test_masked_model_from_dict_batches_matches_the_dense_reference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = dm.masked_mean().double()
    batch = dm.masked_tokens(12)
    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    H = dense_hessian(model, lambda f: F.cross_entropy(f(input_ids=ids, attention_mask=mask), y))
    H_nomask = dense_hessian(model, lambda f: F.cross_entropy(f(input_ids=ids), y))
    ref = top(H, 3)
    assert float((top(H_nomask, 3) - ref).abs().max()) > 1e-2  # dropping the mask measures another function
    spec = {"factory": f"{OWN}:masked_loader", "kwargs": {"n": 12, "batch_size": 5}}
    split = load_spec(spec)
    assert isinstance(split.train[0], dict) and set(split.train[0]) == {"input_ids", "attention_mask"}
    assert split.info["input_keys"] == {"input_ids": [6], "attention_mask": [6]}
    sources = {
        "DataLoader of dicts": dm.masked_loader(12, batch_size=5),
        "dict of tensors": batch,
        "data spec": split.train,
        "Dataset of dicts": dm.DictItems(batch),
    }
    for name, data in sources.items():
        res = probes.hessian_eigenvalues(model, data, k=3, tol=1e-10, batch_size=5)
        assert torch.allclose(res.values, ref, rtol=1e-10, atol=1e-13), (name, res.values, ref)
        assert res.meta["n_samples"] == 12
    tr = probes.hessian_trace(model, dm.masked_loader(12, batch_size=5), n_matvecs=3 * H.shape[0])
    assert tr.estimate == pytest.approx(float(H.trace()), rel=1e-9)


def test_token_labels_minus_100_use_the_whole_dataset_token_mean() -> None:
    """Labels ``[B, T]`` with -100: ``loss="auto"`` is the token cross-entropy, the mean over the counted
    tokens of the whole dataset (batches of 5, 5, 2 sequences count 14, 17, 4 tokens — not a batch mean)."""
    torch.manual_seed(1)
    V, n, Tn = 5, 12, 4

    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(V, 3)
            self.out = nn.Linear(3, V)

        def forward(self, input_ids, attention_mask):
            return self.out(torch.tanh(self.emb(input_ids)) * attention_mask[..., None])

    model = TokenNet().double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (n, Tn), generator=g)
    mask = torch.ones(n, Tn, dtype=torch.long)
    labels = torch.randint(0, V, (n, Tn), generator=g)
    labels[torch.rand(n, Tn, generator=g) < 0.35] = -100
    counted = int((labels != -100).sum())

    def loss(f):
        out = f(input_ids=ids, attention_mask=mask)
        ll = F.cross_entropy(out.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return ll / counted

    H = dense_hessian(model, loss)
    items = dm.DictItems({"input_ids": ids, "attention_mask": mask, "labels": labels})
    data = DataLoader(items, batch_size=5)
    op = OperatorSpec(kind="hessian").build(model, data)
    assert op.loss.name == "token_cross_entropy" and op.meta()["reduction"] == f"mean over {counted} tokens"
    assert torch.allclose(op.to_dense(), H, atol=1e-12)


def test_per_example_probes_slice_every_key() -> None:
    torch.manual_seed(2)
    model = dm.masked_mean().double()
    batch = dm.masked_tokens(6, seed=3)
    P = {n: p.detach() for n, p in model.named_parameters()}
    rows, jac = [], []
    for i in range(6):
        kw = {k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask")}
        g = torch.func.grad(lambda p, kw=kw, i=i: F.cross_entropy(functional_call(model, p, (), kw),
                                                                  batch["labels"][i : i + 1]))(P)  # fmt: skip
        rows.append(torch.cat([g[n].reshape(-1) for n in P]))
        J = jacrev(lambda p, kw=kw: functional_call(model, p, (), kw)[0])(P)
        jac.append(torch.cat([J[n].reshape(3, -1) for n in P], dim=1))
    G = probes.per_example_gradients(model, batch, chunk_size=4)
    assert torch.allclose(G, torch.stack(rows), atol=1e-13)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    Jall = torch.stack(jac)
    K = probes.empirical_ntk(model, inputs)
    assert torch.allclose(K, torch.einsum("iop,jop->ij", Jall, Jall), atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 6 samples: the unbiased estimates may be negative
        coh = probes.gradient_coherence(model, batch)
    assert coh.meta["n_params"] == sum(p.numel() for p in model.parameters())
    assert "n_parameters" not in coh.meta


def test_dry_run_names_every_input_key_and_shape(tmp_path: Path) -> None:
    from dynascope.dry_run import dry_run

    report = dry_run({"factory": f"{OWN}:masked_mean"}, {"factory": f"{OWN}:masked_loader"}, "cross_entropy")
    assert report.inputs == {"input_ids": [4, 6], "attention_mask": [4, 6]}
    assert "inputs input_ids [4, 6], attention_mask [4, 6] → outputs [4, 3]" in report.summary()


# ------------------------------------------------------------------------------------------ outputs
def test_aux_head_unused_parameters_output_and_batch_losses() -> None:
    torch.manual_seed(3)
    model = dm.AuxHead().double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    n_aux = sum(p.numel() for p in model.aux.parameters())
    H = dense_hessian(model, lambda f: F.cross_entropy(f(x)["logits"], y))
    assert float(H[-n_aux:].abs().max()) == 0  # the aux head's block is zero
    for backend in ("graph", "func"):
        with pytest.warns(RuntimeWarning, match="do not reach the loss"):
            op = OperatorSpec(kind="hessian", backend=backend).build(model, (x, y))
        assert torch.allclose(op.to_dense(), H, atol=1e-12), backend
        assert op.meta()["unused_params"] == ["aux.weight", "aux.bias"] and op.meta()["outputs"] == "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-10)
    assert torch.allclose(res.values, top(H, 2), rtol=1e-10)
    assert res.meta["unused_params"] == ["aux.weight", "aux.bias"]
    # output= picks the aux head (a regression target): the class head is then the unused block
    t = torch.randn(20, 2, dtype=torch.float64)
    H_aux = dense_hessian(model, lambda f: F.mse_loss(f(x)["aux"], t))
    with pytest.warns(RuntimeWarning, match="head.weight, head.bias"):
        op = OperatorSpec(kind="hessian", loss="mse", output="aux").build(model, (x, t))
    assert torch.allclose(op.to_dense(), H_aux, atol=1e-12) and op.meta()["outputs"] == "output['aux']"
    # a loss taking (outputs, batch) sees both heads and the batch
    def both(outputs, batch):
        aux = F.mse_loss(outputs["aux"], batch["x"][:, :2])
        return F.cross_entropy(outputs["logits"], batch["labels"]) + 0.5 * aux

    H_both = dense_hessian(model, lambda f: both(f(x), {"x": x, "labels": y}))
    op = OperatorSpec(kind="hessian", loss=both).build(model, (x, y))
    assert op.loss.takes_batch and "unused_params" not in op.meta()
    assert torch.allclose(op.to_dense(), H_both, atol=1e-12)
    assert "whole output" in op.meta()["outputs"]
    with pytest.raises(ValueError, match="no such key"):
        OperatorSpec(kind="hessian", output="nope").build(model, (x, y))


# ------------------------------------------------------------------------------------------ freezing
def test_frozen_layers_in_a_spec_agree_in_notebook_runner_and_cli(tmp_path: Path) -> None:
    from dynascope.cli import main
    from dynascope.models import Run, build_from_spec

    spec = {"factory": f"{OWN}:frozen_body", "frozen": ["body.*"]}
    model = build_from_spec(spec)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["body.0.weight", "body.0.bias"]
    x, y = dm.classes(40)
    data_path = tmp_path / "d.pt"
    torch.save({"x": x, "y": y}, data_path)
    run = Run.create(tmp_path / "run", model=spec, dataset={"file": str(data_path)}, loss="cross_entropy")
    run.save_checkpoint(model, step=0)
    nb = probes.hessian_eigenvalues(model, (x, y), k=3, tol=1e-10)
    head = sum(p.numel() for p in model.head.parameters())
    assert nb.meta["n_params"] == head and nb.meta["frozen_params"] == ["body.0.weight", "body.0.bias"]
    m64 = build_from_spec(spec).double()
    m64.load_state_dict(model.state_dict())
    H = dense_hessian(m64, lambda f: F.cross_entropy(f(x.double()), y))
    assert torch.allclose(nb.values.double(), top(H, 3), rtol=1e-4)
    rp = dynascope.open_run(run.path).probe("hessian_eigenvalues", step=0, k=3, tol=1e-10)
    assert rp.meta["n_params"] == head and torch.allclose(rp.values, nb.values, rtol=1e-6)
    out = tmp_path / "eig.json"
    assert main(["probe", "hessian_eigenvalues", str(run.path), "--step", "0", "--param", "k=3",
                 "--param", "tol=1e-10", "--json"]) == 0  # fmt: skip
    assert main(["export", str(run.path), "--probe", "hessian_eigenvalues", "--format", "json",
                 "--out", str(out)]) == 0  # fmt: skip
    assert f'"n_params": {head}' in out.read_text()
    with pytest.raises(ValueError, match="names no parameter"):
        build_from_spec({"factory": f"{OWN}:frozen_body", "trainable": ["decoder"]})
    json.dumps(spec)


# ------------------------------------------------------------------------------------------ NTK fallback
def test_gru_ntk_falls_back_to_per_example_jacrev() -> None:
    torch.manual_seed(4)
    model = dm.GRUNet().double()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    P = {n: p.detach() for n, p in model.named_parameters()}
    J = []
    for i in range(6):
        Ji = jacrev(lambda p, i=i: functional_call(model, p, (x[i : i + 1],))[0])(P)
        J.append(torch.cat([Ji[n].reshape(2, -1) for n in P], dim=1))
    J = torch.stack(J)
    ref = torch.einsum("iop,jop->ij", J, J)
    for strategy in ("jacobian", "ntk_vp", "auto"):
        with pytest.warns(RuntimeWarning, match="per-example jacrev used instead"):
            K, plan = probes.empirical_ntk(model, x, strategy=strategy, return_plan=True)
        assert torch.allclose(K, ref, atol=1e-12) and plan.strategy == "per_example_jacrev", strategy
        assert plan.fallback.startswith(f"{strategy if strategy != 'auto' else 'jacobian'} failed")
    full = probes.empirical_ntk(model, x, reduce_outputs=None)
    assert torch.allclose(full, J.reshape(12, -1) @ J.reshape(12, -1).T, atol=1e-12)
    with pytest.warns(RuntimeWarning):
        res = probes.ntk_probe(model, (x, y), k=3)
    assert torch.allclose(res.eigenvalues, top(ref, 3), rtol=1e-10) and "ntk_fallback" in res.meta
    assert res.trace == pytest.approx(float(ref.trace()), rel=1e-12)


# ------------------------------------------------------------------------------------------ dense path
@pytest.mark.parametrize("d", [5, 6])
def test_degenerate_linear_regression_every_copy_exact(d: int) -> None:
    """nn.Linear(d, 3) with MSE: P = 3d + 3 (18, 21), every eigenvalue three times; k = 10 returns all copies
    (block Lanczos on this operator stopped at 2 of 3 copies, error 0.29, ``converged=False``)."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(40, d, generator=g, dtype=torch.float64)
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 3).double()
    H = dense_hessian(model, lambda f: F.mse_loss(f(x), y))
    res = probes.hessian_eigenvalues(model, (x, y), k=10, loss="mse")
    assert torch.allclose(res.values, top(H, 10), rtol=0, atol=1e-13) and bool(res.converged.all())
    assert res.n_matvecs == 3 * d + 3 and res.meta["eigensolver"].startswith("dense float64 eigh")


def test_k_equal_to_p_on_600_parameters() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 4)).double()  # P = 604
    x, y = torch.randn(32, 20, dtype=torch.float64), torch.randint(0, 4, (32,))
    H = dense_hessian(model, lambda f: F.cross_entropy(f(x), y))
    res = probes.hessian_eigenvalues(model, (x, y), k=604)
    assert res.n_matvecs == 604 and bool(res.converged.all())
    assert torch.allclose(res.values, top(H, 604), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ lr = 0
def test_preconditioned_sharpness_at_lr_zero_and_lr_from_the_schedule(tmp_path: Path) -> None:
    from dynascope.models import Run, build_from_spec

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for g in opt.param_groups:
        g["lr"] = 0.0  # the last step of a cosine-to-zero schedule
    H = dense_hessian(model, lambda f: F.cross_entropy(f(x), y))
    t = [float(opt.state[p]["step"]) for p in model.parameters()]  # Adam's P, bias corrections folded in
    v = [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
    P = torch.cat([((1 - 0.9**ti) * ((vi / (1 - 0.999**ti)).sqrt() + 1e-8)).reshape(-1)
                   for ti, vi in zip(t, v)])  # fmt: skip
    D = P.rsqrt()
    ref = float(torch.linalg.eigvalsh(D[:, None] * H * D[None]).max())
    res = probes.sharpness(model, (x, y), optimizer_state=opt, trace=False, tol=1e-10)
    assert res.preconditioned_lambda_max == pytest.approx(ref, rel=1e-9)
    assert res.preconditioned_threshold != res.preconditioned_threshold and res.two_over_lr is None
    assert "threshold is NaN" in res.meta["preconditioned"]["note"]
    # a run whose schedule decays to 0: the runner reads η at each step (0 at the end: no threshold)
    cfg = {"name": "mlp", "in_dim": 2, "width": 6, "depth": 1, "out_dim": 3}
    run = Run.create(tmp_path / "run", model=cfg, dataset={"name": "gaussian_mixture"},
                     optimizer={"name": "sgd", "lr": 0.1},
                     lr_schedule={"type": "cosine", "lr": 0.1, "total_steps": 10})  # fmt: skip
    net = build_from_spec(cfg)
    for step in (0, 10):
        run.save_checkpoint(net, step=step)
    opened = dynascope.open_run(run.path)
    mid = opened.probe("sharpness", step=0, trace=False, max_samples=64)
    end = opened.probe("sharpness", step=10, trace=False, max_samples=64)
    assert mid.lr == pytest.approx(0.1) and mid.two_over_lr == pytest.approx(20.0)
    assert end.lr == 0.0 and end.two_over_lr is None


# ------------------------------------------------------------------------------------------ attention meta
def test_raw_sdpa_models_record_the_attention_backend() -> None:
    torch.manual_seed(7)
    model = dm.RawSDPA().double()
    x, y = torch.randn(8, 5, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    H = dense_hessian(model, lambda f: F.cross_entropy(f(x), y))
    res = probes.hessian_eigenvalues(model, (x, y), k=2, tol=1e-10)
    assert res.meta["attention"] == "math SDPA" and torch.allclose(res.values, top(H, 2), rtol=1e-9)
    assert probes.ntk_probe(model, (x, y), k=2).meta["attention"] == "math SDPA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert probes.gradient_coherence(model, (x, y)).meta["attention"] == "math SDPA"


# ------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.slow
def test_tiny_bert_trained_by_hf_trainer_keeps_its_attention_mask(tmp_path: Path) -> None:
    """A BERT (1 layer, width 4) trained 2 steps by ``transformers.Trainer`` on padded dict items, tracked by
    ``HFTracker`` and imported as a run with a data spec of the same items: the run's Hessian top-3 match a
    dense float64 reference that uses the attention mask (and differ from one that drops it)."""
    transformers = pytest.importorskip("transformers")
    from dynascope.models import import_checkpoints

    cfg = transformers.BertConfig(vocab_size=dm.VOCAB, hidden_size=4, num_hidden_layers=1,
                                  num_attention_heads=1, intermediate_size=8, max_position_embeddings=8,
                                  num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    pretrained = tmp_path / "bert-tiny"
    model.save_pretrained(pretrained)
    out = tmp_path / "trainer"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_steps=2, logging_steps=1, learning_rate=1e-2,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        save_only_model=True,
    )  # fmt: skip
    import transformers.trainer as hf_trainer

    tracker = dynascope.HFTracker(tmp_path / "tracked", loss="cross_entropy", probes={"lambda_max": 1},
                                  probe_samples=8)  # fmt: skip
    saved = hf_trainer.is_datasets_available
    hf_trainer.is_datasets_available = lambda: False  # our datasets/ folder is not Hugging Face `datasets`
    try:
        transformers.Trainer(model=model, args=args, train_dataset=dm.bert_items(12),
                             callbacks=[tracker]).train()  # fmt: skip
    finally:
        hf_trainer.is_datasets_available = saved
    data = {"factory": f"{OWN}:bert_items", "kwargs": {"n": 12}}
    run = import_checkpoints(out, tmp_path / "runs" / "bert", model={"hf": str(pretrained)}, dataset=data,
                             loss="cross_entropy")  # fmt: skip
    bert = transformers.BertForSequenceClassification
    ref_model = bert.from_pretrained(out / "checkpoint-2").double().eval()
    batch = dm.masked_tokens(12, classes=2)
    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    H = dense_hessian(ref_model, lambda f: F.cross_entropy(f(input_ids=ids, attention_mask=mask).logits, y))
    H0 = dense_hessian(ref_model, lambda f: F.cross_entropy(f(input_ids=ids).logits, y))
    ref = top(H, 3)
    # dropping the mask moves the top-3 by ~1e-4 relative, 1e4 times the tolerance below (measured: λ₂
    # 0.856057 with the mask, 0.856130 without; trace 0.75548 vs 0.75592)
    assert float((top(H0, 3) - ref).abs().max()) > 1e-5 * float(ref[0])
    opened = dynascope.open_run(run.path)
    res = opened.probe("hessian_eigenvalues", step=2, k=3, tol=1e-10, dtype=torch.float64)
    assert torch.allclose(res.values, ref, rtol=1e-8), (res.values, ref)
    assert res.meta["attention"] == "math SDPA" and res.meta["outputs"] == "logits"
    # the tracked run kept every key of the Trainer's batches
    from dynascope.models import Run

    x, _ = Run.open(tmp_path / "tracked").load_dataset().train
    assert isinstance(x, dict) and {"input_ids", "attention_mask"} <= set(x)
    assert len(dynascope.open_run(tmp_path / "tracked").results) >= 1  # inline λ_max ran on dict batches


def test_ntk_trajectory_records_attention_and_fallback() -> None:
    torch.manual_seed(8)
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    a, b = dm.RawSDPA().double(), dm.RawSDPA().double()
    traj = probes.ntk_trajectory([a, b], x)
    assert traj.meta["attention"] == "math SDPA"
    _, plan = probes.empirical_ntk(a, x, return_plan=True)
    assert plan.attention == "math SDPA"
    g1, g2 = dm.GRUNet().double(), dm.GRUNet().double()
    with pytest.warns(RuntimeWarning, match="per-example jacrev"):
        gru = probes.ntk_trajectory([g1, g2], torch.randn(4, 5, 3, dtype=torch.float64))
    assert "ntk_fallback" in gru.meta and "attention" not in gru.meta


def test_lmc_and_batch_sharpness_take_dict_batches() -> None:
    """lmc_barrier's evaluation and the batch sharpness slice and pass every key (reference: the model
    called with keyword arguments by hand)."""
    torch.manual_seed(9)
    a, b = dm.masked_mean().double(), dm.masked_mean().double()
    batch = dm.masked_tokens(12)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask")}
    lmc = probes.lmc_barrier(a, b, batch, n_points=3)
    assert lmc.losses[0] == pytest.approx(float(F.cross_entropy(a(**kw), batch["labels"])), rel=1e-12)
    res = probes.sharpness(a, batch, lr=0.1, trace=False, batch_size_for_batch_sharpness=6, n_batches=2)
    assert len(res.batch_lambdas) == 2 and all(v > 0 for v in res.batch_lambdas)


def test_first_tensor_rule_names_what_it_took() -> None:
    class NoLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.a(x), "other": self.b(x)}

    x, y = dm.classes(10)
    with pytest.warns(RuntimeWarning, match="b.weight, b.bias"):
        res = probes.hessian_eigenvalues(NoLogits(), (x, y), k=1)
    assert res.meta["outputs"] == "first tensor: ['scores'] of keys ['scores', 'other']"
