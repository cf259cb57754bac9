"""Architectures beyond the registry, against dense float64 references: complex buffers under dtype=,
torch.compile'd modules."""

from __future__ import annotations

import warnings

import pytest
import torch
from dense import flat_params
from torch import nn

from dynascope.probes import hessian_eigenvalues


class FFTFilter(nn.Module):
    """A fixed complex filter in the frequency domain between two linear layers (a complex buffer)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("filt", torch.randn(5, generator=g, dtype=torch.cfloat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return self.out(torch.fft.irfft(torch.fft.rfft(h, dim=-1) * self.filt, n=8, dim=-1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)


def _dense_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, buffers: dict) -> torch.Tensor:
    flat, unflat = flat_params(model)
    flat = flat.double()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**unflat(theta), **buffers}, (x.double(),))
        return nn.functional.cross_entropy(out, y)

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)


def test_a_complex_buffer_keeps_its_imaginary_part_under_dtype_float64() -> None:
    torch.manual_seed(0)
    model = FFTFilter()  # float32 parameters, complex64 buffer
    x, y = _data()
    ref = _dense_top(model, x, y, {"filt": model.filt.detach().to(torch.complex128)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it discards an imaginary part: none may be left
        eig = hessian_eigenvalues(model, (x, y), k=3, tol=1e-10, dtype=torch.float64, loss="cross_entropy")
    torch.testing.assert_close(eig.values, ref[:3], rtol=1e-8, atol=1e-12)
    assert model.filt.dtype == torch.cfloat and next(model.parameters()).dtype == torch.float32  # untouched


def test_a_compiled_module_is_probed_through_its_original_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)).double()
    x, y = _data()
    plain = hessian_eigenvalues(model, (x.double(), y), k=3, tol=1e-10, loss="cross_entropy")
    compiled = hessian_eigenvalues(torch.compile(model), (x.double(), y), k=3, tol=1e-10,
                                   loss="cross_entropy")
    torch.testing.assert_close(compiled.values, plain.values, rtol=1e-10, atol=0)
    ref = _dense_top(model, x, y, {})
    torch.testing.assert_close(compiled.values, ref[:3], rtol=1e-8, atol=1e-12)
    assert "_orig_mod" in compiled.meta["compiled"] and "compiled" not in plain.meta


def test_weight_norm_is_probed_through_plain_ops() -> None:
    """torch 2.13's fused weight-norm double backward is wrong; the probes evaluate the same function with
    plain ops: eigenvalues equal a dense Hessian of the hand-written function, and the self-check passes."""
    from torch.nn.utils.parametrizations import weight_norm

    from dynascope.probes.operators import OperatorSpec
    from dynascope.probes.selfcheck import check_product

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(8, 6)), nn.Tanh(), weight_norm(nn.Linear(6, 3))).double()
    x, y = _data()
    x = x.double()
    flat, unflat = flat_params(model)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        p = unflat(theta)
        h = x
        for i, act in ((0, torch.tanh), (2, None)):
            g, v = p[f"{i}.parametrizations.weight.original0"], p[f"{i}.parametrizations.weight.original1"]
            w = v * (g / v.pow(2).sum(dim=1, keepdim=True).sqrt())
            h = h @ w.T + p[f"{i}.bias"]
            h = act(h) if act is not None else h
        return nn.functional.cross_entropy(h, y)

    ref = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)
    eig = hessian_eigenvalues(model, (x, y), k=3, tol=1e-10, loss="cross_entropy")
    torch.testing.assert_close(eig.values, ref[:3], rtol=1e-8, atol=1e-12)
    assert check_product(OperatorSpec(kind="hessian", loss="cross_entropy").build(model, (x, y)))["passed"]


class Checkpointed(nn.Module):
    """Three blocks; the first and second run under activation checkpointing (reentrant or not)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for i, block in enumerate(self.blocks):
            if self.reentrant is not None and i < 2:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
            else:
                x = block(x)
        return self.head(x)


def test_activation_checkpointing_is_differentiated_as_the_plain_model() -> None:
    from dynascope.probes import empirical_ntk, gradient_coherence

    x, y = _data()
    x = x.double()
    plain = Checkpointed(None).double()
    ref = _dense_top(plain, x, y, {})
    coh = gradient_coherence(plain, (x, y), loss="cross_entropy")
    ntk = empirical_ntk(plain, x[:6])
    for reentrant in (True, False):
        model = Checkpointed(reentrant).double()
        model.load_state_dict(plain.state_dict())
        eig = hessian_eigenvalues(model, (x, y), k=3, tol=1e-10, loss="cross_entropy")
        torch.testing.assert_close(eig.values, ref[:3], rtol=1e-8, atol=1e-12)
        c = gradient_coherence(model, (x, y), loss="cross_entropy")
        assert c.alpha == pytest.approx(coh.alpha, rel=1e-10)
        torch.testing.assert_close(empirical_ntk(model, x[:6]), ntk, rtol=1e-10, atol=1e-12)


def test_sharpness_in_train_mode_with_dropout_warns_and_records_it() -> None:
    from dynascope.probes import sharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
    x, y = _data()
    with pytest.warns(UserWarning, match="mode='train' with dropout"):
        res = sharpness(model, (x, y), mode="train", trace=False)
    assert res.meta["stochastic_modules"] == ["2"]
    assert sharpness(model, (x, y), trace=False).meta["stochastic_modules"] == []


def test_a_bfloat16_model_runs_the_spectral_probes_with_float32_krylov_vectors() -> None:
    """Products in bfloat16, Lanczos vectors in float32 (no half-precision QR on CPU): the values agree
    with the dense float64 Hessian of the same (bfloat16-rounded) weights to a few bfloat16 epsilons."""
    from dynascope.probes import sharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).bfloat16()
    x, y = _data()
    x16 = x.bfloat16()
    ref = _dense_top(model, x16.double(), y, {})
    eig = hessian_eigenvalues(model, (x16, y), k=3, loss="cross_entropy")
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(eig.values, ref[:3], rtol=4 * eps, atol=0)
    lam = sharpness(model, (x16, y), lr=0.1, trace=False).lambda_max
    assert lam == pytest.approx(float(ref[0]), rel=4 * eps)


def test_gradient_coherence_with_a_token_loss_uses_the_token_mean_per_sample() -> None:
    """Per-sample losses are token means (as the dataset-mean loss weighs tokens), so with T counted
    tokens per sequence the plug-in |mean g|² equals the squared gradient of the token-mean loss (it was
    T² times that)."""
    from dynascope.probes import gradient_coherence

    torch.manual_seed(0)
    vocab, T, n = 7, 6, 10
    model = nn.Sequential(nn.Embedding(vocab, 8), nn.Tanh(), nn.Linear(8, vocab)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, vocab, (n, T), generator=g)
    y = torch.randint(0, vocab, (n, T), generator=g)
    res = gradient_coherence(model, (x, y), loss="token_cross_entropy")
    out = model(x)
    full = nn.functional.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))
    grads = torch.autograd.grad(full, list(model.parameters()))
    want = float(sum(gr.pow(2).sum() for gr in grads))
    assert res.grad_norm_sq_plugin == pytest.approx(want, rel=1e-10)
    assert "mean over its counted tokens" in res.meta["reduction"]


class Denoiser(nn.Module):
    """A diffusion-style model ``forward(x_t, t)``: two positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.t, self.b = nn.Linear(4, 8), nn.Linear(1, 8), nn.Linear(8, 4)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x_t) + self.t(t[:, None])))


def test_a_model_of_two_positional_inputs_from_tuples_and_a_dataloader() -> None:
    """``((x_t, t), eps)``: the inputs reach ``forward`` positionally; eigenvalues, trace and the NTK agree
    with dense float64 references (Hessian of the MSE; explicit Jacobians)."""
    from dynascope.probes import empirical_ntk

    model = Denoiser().double()
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(24, 4, generator=g, dtype=torch.float64)
    t = torch.rand(24, generator=g, dtype=torch.float64)
    eps = torch.randn(24, 4, generator=g, dtype=torch.float64)
    flat, unflat = flat_params(model)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(model, unflat(theta), (xt, t)) - eps).pow(2).mean()

    ref = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)
    loader = torch.utils.data.DataLoader(list(zip(zip(xt, t), eps)), batch_size=7)
    for data in (((xt, t), eps), loader):
        eig = hessian_eigenvalues(model, data, k=3, tol=1e-10, loss="mse")
        torch.testing.assert_close(eig.values, ref[:3], rtol=1e-8, atol=1e-12)
    def outputs(theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, unflat(theta), (xt[:5], t[:5]))

    J = torch.autograd.functional.jacobian(outputs, flat).reshape(5, 4, -1)
    want = torch.einsum("iop,jop->ij", J, J)  # the traced NTK sums over outputs
    torch.testing.assert_close(empirical_ntk(model, (xt[:5], t[:5])), want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_a_tiny_t5_from_dict_batches_derives_its_decoder_inputs_as_hf_does() -> None:
    """``{"input_ids", "labels"}`` batches: the decoder inputs are the labels shifted right (−100 → pad),
    as T5 builds them itself; the top eigenvalues equal a dense float64 Hessian of HF's own loss."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=6, num_layers=1, num_decoder_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                dropout_rate=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 10, (6, 5), generator=g)
    labels = torch.randint(1, 10, (6, 4), generator=g)
    labels[0, -1] = -100  # an ignored target
    flat, unflat = flat_params(model)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, unflat(theta), (), {"input_ids": ids, "labels": labels}).loss

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        ref = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)
    eig = hessian_eigenvalues(model, {"input_ids": ids, "labels": labels}, k=3, tol=1e-10)
    torch.testing.assert_close(eig.values, ref[:3], rtol=1e-7, atol=1e-10)


class TopOneMoE(nn.Module):
    """Top-1 routing with ``nonzero`` / ``index_add`` dispatch (dynamic shapes: no vmap rule)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList([nn.Linear(4, 3) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x)
        idx, w = scores.argmax(-1), torch.softmax(scores, -1)
        y = torch.zeros(x.shape[0], 3, dtype=x.dtype)
        for k, expert in enumerate(self.experts):
            sel = torch.nonzero(idx == k).squeeze(-1)
            if sel.numel():
                y = y.index_add(0, sel, expert(x[sel]) * w[sel, k : k + 1])
        return y


def test_the_ntk_of_a_mixture_of_experts_falls_back_to_per_example_jacobians() -> None:
    from dynascope.probes import empirical_ntk

    model = TopOneMoE().double()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flat, unflat = flat_params(model)

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, unflat(theta), (x,))

    J = torch.autograd.functional.jacobian(outputs, flat)
    with pytest.warns(RuntimeWarning, match="per-example jacrev used instead"):
        K = empirical_ntk(model, x)
    torch.testing.assert_close(K, torch.einsum("iop,jop->ij", J, J), rtol=1e-12, atol=1e-12)


def test_positional_inputs_through_the_tracker_and_a_data_spec_file(tmp_path) -> None:
    """The Tracker saves ``(x_t, t)`` probe data as a file spec ``"x": ["x.0", "x.1"]``; the reopened
    run's probe equals the live model's."""
    import dynascope

    model = Denoiser()
    g = torch.Generator().manual_seed(0)
    xt, t = torch.randn(24, 4, generator=g), torch.rand(24, generator=g)
    eps = torch.randn(24, 4, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    spec = {"factory": f"{__file__}:Denoiser"}
    with dynascope.Tracker(tmp_path / "run", model, data=((xt, t), eps), loss="mse", optimizer=opt,
                           model_spec=spec, schedule=[0, 3]) as tr:  # fmt: skip
        tr.step(0)
        for s in range(1, 4):
            opt.zero_grad()
            nn.functional.mse_loss(model(xt, t), eps).backward()
            opt.step()
            tr.step(s)
    run = dynascope.open_run(tmp_path / "run")
    assert run.run.dataset_config["x"] == ["x.0", "x.1"]
    live = hessian_eigenvalues(model, ((xt, t), eps), k=2, tol=1e-8, loss="mse")
    again = run.probe("hessian_eigenvalues", step=3, k=2, tol=1e-8)
    torch.testing.assert_close(again.values, live.values, rtol=1e-6, atol=1e-9)


def test_every_probe_with_a_mode_warns_and_records_train_mode_dropout() -> None:
    from dynascope.probes import adaptive_sharpness, average_sharpness, ntk_probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
    x, y = _data()
    for probe, kwargs in ((adaptive_sharpness, {"ascent_steps": 2}), (average_sharpness, {"n_samples": 4})):
        with pytest.warns(UserWarning, match="mode='train' with dropout"):
            res = probe(model, (x, y), mode="train", **kwargs)
        assert res.meta["stochastic_modules"] == ["2"], probe.__name__
        assert probe(model, (x, y), **kwargs).meta["stochastic_modules"] == []
    with pytest.raises(ValueError, match="mode='train' is not supported for models with"):  # a clear refusal
        ntk_probe(model, (x, y), k=2, mode="train")
    assert ntk_probe(model, (x, y), k=2).meta["stochastic_modules"] == []
