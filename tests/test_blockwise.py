"""Blockwise Hessian spectra (Zhang et al. 2024) on a tiny GPT-2 against per-block dense float64 Hessians:
the extreme Ritz values of each block equal its exact extreme eigenvalues once the Lanczos steps reach the
block size; the trace estimate lies within 4 standard deviations of the Rayleigh-quotient estimator
(computed from the dense block); Jensen–Shannon divergences obey their closed forms."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from dense import token_loss_hessian

import dynascope.probes as probes
from dynascope.probes.blockwise import js_divergence

SHIFTED = {"name": "token_cross_entropy", "shift": True}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    from dynascope.models import build_from_spec

    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=1, n_inner=8,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    folder: Path = tmp_path_factory.mktemp("gpt2") / "micro"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    model = build_from_spec({"hf": str(folder)}).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (4, 6), generator=g)
    return model, (x, x.clone()), token_loss_hessian(model, x, x.clone())


def _blocks(model: torch.nn.Module, H: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each parameter group's diagonal block of the dense Hessian (rows in ``named_parameters`` order)."""
    named = list(model.named_parameters())
    starts = dict(zip((n for n, _ in named), itertools.accumulate([0] + [p.numel() for _, p in named])))
    sizes = {n: p.numel() for n, p in named}
    out = {}
    for name, members in probes.parameter_groups(model).items():
        idx = torch.cat([torch.arange(starts[m], starts[m] + sizes[m]) for m in members])
        out[name] = H[idx][:, idx]
    return out


def test_block_extremes_equal_dense_block_eigenvalues(gpt2) -> None:
    model, data, H = gpt2
    r = probes.blockwise_spectra(model, data, loss=SHIFTED, n_probes=2, lanczos_steps=400)
    dense = _blocks(model, H)
    assert r.blocks == list(dense) and len(r.blocks) == 9  # wte, wpe, 2 norms, 4 projections, final norm
    for b, (name, Hb) in enumerate(dense.items()):
        ev = torch.linalg.eigvalsh(Hb)
        scale = float(ev.abs().max())
        assert r.n_params[b] == Hb.shape[0]
        assert abs(float(r.lambda_max[b]) - float(ev[-1])) <= 1e-8 * scale, name
        assert abs(float(r.lambda_min[b]) - float(ev[0])) <= 1e-8 * scale, name
    js = r.js
    assert torch.equal(js, js.T) and bool((js.diagonal() == 0).all())
    assert bool((js >= 0).all()) and bool((js <= math.log(2) + 1e-12).all())
    upper = js[torch.triu_indices(9, 9, 1).unbind()]
    assert r.heterogeneity == pytest.approx(float(upper.mean()), rel=1e-12)
    width = float(r.grid[1] - r.grid[0])
    assert torch.allclose(r.densities.sum(dim=1) * width, torch.ones(9, dtype=torch.float64), atol=1e-12)
    assert r.figure().data  # drawn: one density per block and the JS heatmap


def test_block_trace_within_its_estimator_spread(gpt2) -> None:
    """The trace of the embedding block, P_b × the mean Rayleigh quotient of 64 probes, lies within 4
    standard deviations of tr H_bb; for v uniform on the sphere Var(vᵀHv/‖v‖²) = 2(P tr H² − (tr H)²) /
    (P²(P + 2))."""
    model, data, H = gpt2
    Hb = _blocks(model, H)["transformer.wte"]
    P, n = Hb.shape[0], 64
    groups = {"wte": ["transformer.wte"], "wpe": ["transformer.wpe"]}
    r = probes.blockwise_spectra(model, data, loss=SHIFTED, groups=groups, n_probes=n, lanczos_steps=P)
    tr, tr2 = float(Hb.trace()), float((Hb @ Hb).trace())
    sd = P * math.sqrt(2 * (P * tr2 - tr**2) / (P**2 * (P + 2)) / n)
    assert abs(float(r.trace[0]) - tr) <= 4 * sd


def test_js_closed_forms_and_errors(gpt2) -> None:
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 0.25, 0.75], dtype=torch.float64)
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, q) == pytest.approx(math.log(2), rel=1e-12)
    model, data, _ = gpt2
    with pytest.raises(ValueError, match="at least two parameter blocks"):
        probes.blockwise_spectra(model, data, loss=SHIFTED, groups={"all": ["transformer"]})


def test_a_block_the_loss_does_not_use_has_a_zero_spectrum() -> None:
    """A module left out of the forward pass: its Hessian block is exactly zero (with a warning), for the
    spectral probes and for the blockwise spectra; before, torch raised from inside autograd."""

    class WithUnused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = WithUnused().double()
    data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
    with pytest.warns(UserWarning, match="does not depend on the parameters"):
        r = probes.hessian_eigenvalues(model, data, k=1, params=["unused"])
    assert float(r.values[0]) == 0.0
    with pytest.warns(UserWarning, match="does not depend on the parameters"):
        b = probes.blockwise_spectra(model, data, n_probes=2, lanczos_steps=10)
    assert b.blocks == ["a", "b", "unused"] and float(b.lambda_max[2]) == 0.0 and float(b.lambda_max[0]) > 0
