"""opposing_signals on a dataset with two planted groups of outliers that share a strong feature but carry
opposite labels, trained by full-batch GD with a step size large enough that the loss oscillates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dense import flat_call
from torch import nn

import dynascope.probes as probes


def planted(seed: int = 0, n: int = 300, d: int = 10, n_out: int = 15, strength: float = 8.0):
    """Bulk: labels from a linear teacher on features 1..d−1, feature 0 ≈ 0. Outliers: feature 0 =
    ``strength``, the others scaled by 0.3; group A (rows 0..n_out−1) label 0, group B (the next n_out
    rows) label 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] = 0.1 * torch.randn(n, generator=g)
    y = (x[:, 1:] @ torch.randn(d - 1, generator=g) > 0).long()
    a, b = list(range(n_out)), list(range(n_out, 2 * n_out))
    x[: 2 * n_out, 1:] *= 0.3
    x[: 2 * n_out, 0] = strength
    y[a], y[b] = 0, 1
    return x, y, a, b


def gd_checkpoints(
    x, y, *, lr: float = 4.0, steps: int = 160, keep_from: int = 100, seed: int = 0, loss_fn=F.cross_entropy,
    n_out: int = 2,
):  # fmt: skip
    """Full-batch GD on a tanh MLP (``n_out`` outputs, ``loss_fn``); state dicts of the steps
    ``keep_from .. steps−1`` (consecutive)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, n_out))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    states, losses = [], []
    for t in range(steps):
        if t >= keep_from:
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        loss = loss_fn(model(x), y)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, states, losses


def match(result, a: list[int], b: list[int]) -> dict[str, float]:
    """Precision/recall of the selection and of each planted group against the reported group it fills."""
    sel, planted_all = set(result.selected), set(a) | set(b)
    out = {
        "precision": len(sel & planted_all) / len(sel),
        "recall": len(sel & planted_all) / len(planted_all),
    }
    for label, grp in (("A", set(a)), ("B", set(b))):
        best = max(result.groups.values(), key=lambda m: len(set(m) & grp))
        out[f"precision_{label}"] = len(set(best) & grp) / len(best)
        out[f"recall_{label}"] = len(set(best) & grp) / len(grp)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_opposing_groups_are_found(seed: int) -> None:
    x, y, a, b = planted(seed=seed)
    model, states, losses = gd_checkpoints(x, y, seed=seed)
    assert any(l1 > l0 for l0, l1 in zip(losses[100:], losses[101:])), "the training loss must oscillate"
    res = probes.opposing_signals(states, (x, y), model=model, steps=list(range(100, 160)))
    scores = match(res, a, b)
    assert min(scores.values()) >= 0.9, scores
    assert res.groups["+v"] and res.groups["-v"]
    assert (
        res.alternation is not None and res.alternation < -0.9
    )  # one group's loss rises as the other's falls
    # the two groups carry the spike: their shares sum to that of all the selected examples
    spike = res.spike_index
    assert spike is not None and res.steps[spike] == res.reference_step
    total = float((res.example_loss[:, spike + 1] - res.example_loss[:, spike]).sum())
    all_delta = float(res.mean_loss[spike + 1] - res.mean_loss[spike]) * x.shape[0]
    assert sum(res.spike_share.values()) == pytest.approx(total / all_delta, rel=1e-6)
    # their share of the loss rise far exceeds their share of the data (10 %)
    assert max(abs(v) for v in res.spike_share.values()) > 0.5
    frame = res.groups_frame()
    assert list(frame["group"]) == ["+v", "-v"] and frame["n"].sum() == len(res.selected)


def dense_top_split(
    state: dict, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 references at one checkpoint of :func:`gd_checkpoints`' MLP: the dense Hessian's eigenvalues
    (ascending), its top eigenvector ``v₁`` and the per-example gradients ``g_i`` (rows)."""
    m = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, 2)).double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    theta, call = flat_call(m)
    xd = x.double()
    lam, U = torch.linalg.eigh(
        torch.autograd.functional.hessian(lambda t: F.cross_entropy(call(t, xd), y), theta)
    )
    one = torch.func.grad(lambda t, xi, yi: F.cross_entropy(call(t, xi[None]), yi[None]))
    return lam, U[:, -1], torch.func.vmap(one, (None, 0, 0))(theta, xd, y)


def test_hessian_direction_and_fixed_count() -> None:
    """GD at η = 4 is chaotic here: a 1e-7 relative change of the initial weights (float32 rounding on
    another CPU) moves the checkpoints by O(0.3) and the top eigenvalues by several percent, and with them
    which planted examples one eigenvector ``v₁`` splits right (0.47–1.0 over such perturbations; the
    update and the top-5 eigenspace split all of them in every case). So the ``k=1`` verdict is the maths
    of the probe at this machine's checkpoints: its groups are the signs of ``g_i · v₁`` for the dense
    float64 ``v₁``, on every example whose sign the Lanczos residual cannot flip (Davis–Kahan:
    ``sin∠(v, v₁) ≤ ‖r‖ / gap``)."""
    x, y, a, b = planted(seed=0)
    model, states, _ = gd_checkpoints(x, y, seed=0)
    tol = 1e-6
    res = probes.opposing_signals(states, (x, y), model=model, direction="hessian", hessian_tol=tol)
    scores = match(res, a, b)
    assert min(scores["precision"], scores["recall"]) >= 0.9, scores  # the selection ignores the direction
    assert res.meta["lambda_max"] > 0 and res.direction == "hessian"
    assert res.meta["hessian_converged"] == [True]
    lam, v1, g = dense_top_split(states[res.meta["reference_index"]], x, y)
    lam_max, gap = float(lam[-1]), float(lam[-1] - lam[-2])
    eps32 = torch.finfo(torch.float32).eps
    assert abs(res.meta["lambda_max"] - lam_max) <= (tol + 100 * eps32) * lam_max
    # the probe's vector: residual ≤ tol·λ (Lanczos) plus float32 products, ~100 ε‖H‖ (a generous envelope)
    sin_bound = (tol + 100 * eps32) * lam_max / gap
    p = g @ v1
    decided = [i for i in res.selected if abs(float(p[i])) > (sin_bound + 100 * eps32) * float(g[i].norm())]
    assert decided, (gap, sin_bound)
    side = {i: float(p[i]) > 0 for i in decided}
    plus = {i: True for i in res.groups["+v"] if i in side}
    plus.update({i: False for i in res.groups["-v"] if i in side})
    assert plus == side or plus == {i: not s for i, s in side.items()}  # the sign of v₁ is arbitrary
    # the update's component in the top-5 eigenspace splits every planted example right (seeds 0 and 3;
    # seed 3's top eigenvalues are ≈ 0.560, 0.536, 0.530, ...)
    for seed in (0, 3):
        xs, ys, As, Bs = planted(seed=seed)
        m, st, _ = gd_checkpoints(xs, ys, seed=seed)
        five = probes.opposing_signals(st, (xs, ys), model=m, direction="hessian", k=5)
        assert min(match(five, As, Bs).values()) >= 0.9, (seed, match(five, As, Bs))
        assert len(five.meta["hessian_eigenvalues"]) == 5
    top = probes.opposing_signals(states, (x, y), model=model, n_examples=10)
    assert len(top.selected) == 10 and top.threshold is None
    assert set(top.selected) <= set(a) | set(b)
    ordered = [float(top.scores[i]) for i in top.selected]
    assert ordered == sorted(ordered, reverse=True)


def test_scores_and_frames_follow_the_definition() -> None:
    x, y, a, b = planted(seed=1)
    model, states, _ = gd_checkpoints(x, y, seed=1, steps=120)
    res = probes.opposing_signals(states, (x, y), model=model)
    # recompute the per-example losses at three checkpoints directly
    m = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2))
    L = []
    for s in states:
        m.load_state_dict(s)
        with torch.no_grad():
            L.append(F.cross_entropy(m(x), y, reduction="none").double())
    L = torch.stack(L)
    delta = L[1:] - L[:-1]
    t = res.spike_index  # score="spike": |Δ| over the spike step and one step either side
    assert t is not None and res.reference_step == res.steps[t]
    assert torch.allclose(res.scores, delta[max(t - 1, 0) : t + 2].abs().sum(0), atol=1e-5)
    osc = probes.opposing_signals(states, (x, y), model=model, score="oscillation")
    ref = delta.abs().sum(0) - (L[-1] - L[0]).abs()
    assert torch.allclose(osc.scores, ref, atol=1e-5)
    assert osc.meta["params"]["max_fraction"] == 0.1 and res.meta["params"]["max_fraction"] == 0.5
    assert torch.allclose(res.mean_loss, L.mean(1), atol=1e-6)
    i = res.selected[0]
    assert torch.allclose(res.example_loss[0], L[:, i], atol=1e-6)
    traj = res.trajectory_frame()
    assert list(traj.columns) == ["step", "mean_loss", "loss_+v", "loss_-v"] and len(traj) == len(states)
    assert list(res.to_frame()["example"]) == res.selected
    back = probes.OpposingSignalsResult.from_dict(res.to_dict())
    assert back.groups == res.groups


def test_bad_arguments() -> None:
    x, y, _, _ = planted()
    model, states, _ = gd_checkpoints(x, y, steps=103)
    with pytest.raises(ValueError, match="at least 3"):
        probes.opposing_signals(states[:2], (x, y), model=model)
    with pytest.raises(ValueError, match="direction must be one of"):
        probes.opposing_signals(states, (x, y), model=model, direction="gradient")
    with pytest.raises(ValueError, match="reference step 7"):
        probes.opposing_signals(states, (x, y), model=model, reference=7)
    with pytest.raises(ValueError, match="state dict: pass model="):
        probes.opposing_signals(states, (x, y))


@pytest.mark.slow
def test_edge_of_stability_demo_reports_alternating_groups(tmp_path) -> None:
    """The EoS recipe (digits, tanh MLP, ½‖f−y‖², GD η = 0.5) with a checkpoint at every step up to 280: the
    first loss spike (steps ~250–270) is carried by two groups whose losses alternate step by step.
    Measured with score="oscillation": 100 examples (no clear gap: the top 10 %), groups of 43 and 57,
    alternation −0.998. The default score="spike" finds no gap there (ratio 1.07 < 4): the oscillation is
    shared by the whole bulk, with no outlier group, and nothing is flagged."""
    from dynascope.recipes.eos import edge_of_stability

    run = edge_of_stability(tmp_path / "eos", steps=280, checkpoint_every=1, log_every=10, progress=False)
    x, y = run.load_dataset().train
    spike = probes.opposing_signals(run, (x, y), steps=list(range(230, 281)), loss="half_sse")
    assert spike.selected == [] and spike.meta["selection_gap_ratio"] < 4
    steps = list(range(230, 281))
    res = probes.opposing_signals(run, (x, y), steps=steps, loss="half_sse", score="oscillation")
    assert res.meta["selection"].startswith("top 0.1 of the data")
    assert all(len(m) >= 10 for m in res.groups.values())
    assert res.alternation is not None and res.alternation < -0.9
    d = res.group_loss[:, 1:] - res.group_loss[:, :-1]  # per-step changes of each group's mean loss
    assert float((d[0] * d[1] < 0).double().mean()) > 0.9  # opposite signs at almost every step
    assert res.spike_index is not None and 250 <= res.reference_step <= 270
    assert max(abs(v) for v in res.spike_share.values()) > 0.5  # 10 % of the data, most of the spike


def regression_control(seed: int, *, lr: float = 0.6, n: int = 300, d: int = 10, steps: int = 160):
    """No planted groups: a noisy tanh teacher fit by full-batch GD on MSE at a step size where the loss
    oscillates (rises at 2–34 of the last 60 steps, depending on the seed) — an instability every example
    shares."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, 1, generator=g)) + 0.3 * torch.randn(n, 1, generator=g)
    model, states, losses = gd_checkpoints(x, y, lr=lr, steps=steps, seed=seed, loss_fn=F.mse_loss, n_out=1)
    return x, y, model, states, losses


@pytest.mark.parametrize("fraction", [0.05, 0.10, 0.20, 0.30])
def test_planted_groups_of_5_to_30_percent_are_found(fraction: float) -> None:
    """Rosenfeld & Risteski's ranking (loss change at the instability) finds both opposing groups, whatever
    their share of the data; the earlier max_fraction=0.1 cap made the 20 % and 30 % groups unreachable."""
    n = 300
    for seed in (0, 1):
        x, y, a, b = planted(seed=seed, n=n, n_out=round(fraction * n / 2))
        model, states, losses = gd_checkpoints(x, y, seed=seed)
        assert any(l1 > l0 for l0, l1 in zip(losses[100:], losses[101:])), "the training loss must oscillate"
        res = probes.opposing_signals(states, (x, y), model=model, steps=list(range(100, 160)))
        scores = match(res, a, b)
        assert min(scores.values()) >= 0.9, (fraction, seed, scores)
        assert res.meta["selection_gap_ratio"] >= res.meta["params"]["min_gap"] == 4.0


@pytest.mark.parametrize("seed", [0, 1])
def test_control_without_planted_groups_flags_nothing(seed: int) -> None:
    # an oscillating run every example takes part in: no gap in the scores
    x, y, model, states, losses = regression_control(seed)
    assert sum(l1 > l0 for l0, l1 in zip(losses[100:], losses[101:])) >= 2, "the control must oscillate"
    res = probes.opposing_signals(states, (x, y), model=model)
    assert res.selected == [] and res.groups == {"+v": [], "-v": []}
    assert res.meta["selection_gap_ratio"] < 4.0 and "nothing selected" in res.meta["selection"]
    # the planted generator without outliers trains smoothly: no instability, nothing to flag
    x, y, _, _ = planted(seed=seed, n_out=0)
    model, states, _ = gd_checkpoints(x, y, seed=seed)
    smooth = probes.opposing_signals(states, (x, y), model=model)
    assert smooth.selected == [] and smooth.spike_index is None
    assert smooth.meta["selection"].startswith("nothing: the mean loss never rose")
