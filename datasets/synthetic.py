"""Synthetic datasets: Gaussian mixtures, teacher-student regression, XOR clusters (2-d and the
high-dimensional ``xor_cluster`` of benign-overfitting theory), polynomials.

All draw from one local ``torch.Generator`` seeded by ``seed``; the population parameters
(means, teacher weights, coefficients) are drawn first, then the training set, then the test
set. For the regression sets ``noise`` is added to the *training* targets only unless
``test_noise=True`` (so test error measures distance to the clean target function).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .registry import (
    Pair,
    check_choice,
    check_float,
    check_int,
    check_seed,
    exact_subset,
    register,
    torch_generator,
)

_MAX_N = 10_000_000


def _balanced_labels(n: int, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` labels with class counts differing by at most one, in random order."""
    return (torch.arange(n) % n_classes)[torch.randperm(n, generator=gen)]


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@register("gaussian_mixture")
def gaussian_mixture(
    *,
    n_classes: int = 3,
    dim: int = 2,
    n_train: int = 300,
    n_test: int = 300,
    separation: float = 3.0,
    noise: float = 1.0,
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """Class ``k`` ~ N(μ_k, noise² I); μ_k = separation · u_k with u_k uniform on the unit sphere.

    Classes are balanced (counts differ by at most one). ``info["means"]`` holds the μ_k.
    """
    n_classes = check_int("n_classes", n_classes, low=2, high=10_000)
    dim = check_int("dim", dim, low=1, high=100_000)
    n_train = check_int("n_train", n_train, low=1, high=_MAX_N)
    n_test = check_int("n_test", n_test, low=1, high=_MAX_N)
    separation = check_float("separation", separation, low=0.0)
    noise = check_float("noise", noise, low=0.0)
    seed = check_seed(seed)
    gen = torch_generator(seed)
    u = torch.randn(n_classes, dim, generator=gen, dtype=torch.float64)
    if dim == 1:  # the unit "sphere" is {-1, +1}: spread the means evenly instead
        u = torch.linspace(-1.0, 1.0, n_classes, dtype=torch.float64)[:, None]
    else:
        u = u / u.norm(dim=1, keepdim=True)
    means = separation * u

    def sample(n: int) -> Pair:
        y = _balanced_labels(n, n_classes, gen)
        x = means[y] + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
        return x.float(), y

    train, test = sample(n_train), sample(n_test)
    info = {"task": "classification", "n_classes": n_classes, "means": means.tolist()}
    return train, test, info


@register("teacher_student")
def teacher_student(
    *,
    dim: int = 10,
    n_train: int = 200,
    n_test: int = 200,
    out_dim: int = 1,
    teacher: str = "linear",
    teacher_width: int = 32,
    activation: str = "tanh",
    noise: float = 0.0,
    test_noise: bool = False,
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """x ~ N(0, I_dim); y = f*(x) + noise · ε (ε ~ N(0, I_out)).

    ``teacher="linear"``: f*(x) = W x / √dim, W ~ N(0, 1)^{out_dim×dim}.
    ``teacher="mlp"``: f*(x) = A σ(W x / √dim) / √width with W, A ~ N(0, 1), σ = ``activation``.
    Targets are float32 ``[N, out_dim]``.
    """
    dim = check_int("dim", dim, low=1, high=100_000)
    n_train = check_int("n_train", n_train, low=1, high=_MAX_N)
    n_test = check_int("n_test", n_test, low=1, high=_MAX_N)
    out_dim = check_int("out_dim", out_dim, low=1, high=100_000)
    teacher = check_choice("teacher", teacher, ("linear", "mlp"))
    teacher_width = check_int("teacher_width", teacher_width, low=1, high=100_000)
    activation = check_choice("activation", activation, ("tanh", "relu", "erf"))
    noise = check_float("noise", noise, low=0.0)
    test_noise = _check_bool("test_noise", test_noise)
    seed = check_seed(seed)
    gen = torch_generator(seed)
    act = {"tanh": torch.tanh, "relu": torch.relu, "erf": torch.erf}[activation]
    f64 = torch.float64
    if teacher == "linear":
        w = torch.randn(out_dim, dim, generator=gen, dtype=f64)

        def f(x: torch.Tensor) -> torch.Tensor:
            return x @ w.T / math.sqrt(dim)
    else:
        w = torch.randn(teacher_width, dim, generator=gen, dtype=f64)
        a = torch.randn(out_dim, teacher_width, generator=gen, dtype=f64)

        def f(x: torch.Tensor) -> torch.Tensor:
            return act(x @ w.T / math.sqrt(dim)) @ a.T / math.sqrt(teacher_width)

    def sample(n: int, noisy: bool) -> Pair:
        x = torch.randn(n, dim, generator=gen, dtype=f64)
        eps = torch.randn(n, out_dim, generator=gen, dtype=f64)
        y = f(x) + (noise * eps if noisy else 0.0)
        return x.float(), y.float()

    train, test = sample(n_train, True), sample(n_test, test_noise)
    return train, test, {"task": "regression", "out_dim": out_dim}


@register("xor")
def xor(
    *,
    n_train: int = 200,
    n_test: int = 200,
    std: float = 0.3,
    label_flip: float = 0.0,
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """Four Gaussian blobs N(c, std² I) at c ∈ {(±1, ±1)}; label 1 iff the centre's coordinates
    differ in sign (XOR of the quadrant signs), else 0. Blob counts are balanced.

    ``label_flip``: exactly ``round(label_flip · n_train)`` distinct *training* labels are flipped
    (indices in ``info["flipped_indices"]``); test labels stay clean.
    """
    n_train = check_int("n_train", n_train, low=1, high=_MAX_N)
    n_test = check_int("n_test", n_test, low=1, high=_MAX_N)
    std = check_float("std", std, low=0.0)
    label_flip = check_float("label_flip", label_flip, low=0.0, high=1.0)
    seed = check_seed(seed)
    gen = torch_generator(seed)
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    blob_label = torch.tensor([0, 1, 0, 1])

    def sample(n: int) -> Pair:
        blob = _balanced_labels(n, 4, gen)
        x = centres[blob] + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        return x.float(), blob_label[blob].clone()

    (x_tr, y_tr), test = sample(n_train), sample(n_test)
    flipped = exact_subset(n_train, label_flip, gen)
    y_tr[flipped] = 1 - y_tr[flipped]
    info = {"task": "classification", "n_classes": 2, "flipped_indices": flipped.tolist()}
    return (x_tr, y_tr), test, info


def xor_bayes_accuracy(mean_norm: float) -> float:
    """Accuracy of the Bayes rule for :func:`xor_cluster` (clean labels): predict the cluster pair with
    the larger ``|⟨x, μ⟩|``; correct with probability ``P(|r + Z₁| > |Z₂|)``, ``Z`` i.i.d. N(0, 1),
    ``r = ‖μ‖`` (the noise along the other ``d − 2`` directions is irrelevant). Gauss–Hermite-free:
    ``P = E_{Z₁}[erf(|r + Z₁| / √2)]`` by a 20001-point trapezoid rule on ``Z₁ ∈ [−10, 10]``."""
    z = torch.linspace(-10.0, 10.0, 20001, dtype=torch.float64)
    dens = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    inner = torch.erf((mean_norm + z).abs() / math.sqrt(2))
    return min(1.0, float(torch.trapezoid(dens * inner, z)))


@register("xor_cluster")
def xor_cluster(
    *,
    n_train: int = 80,
    n_test: int = 500,
    dim: int = 3000,
    mean_norm: float = 15.8,
    label_flip: float = 0.15,
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """High-dimensional XOR clusters of Xu, Wang, Frei, Gu et al. (2023): ``x = μ + ξ``, ``ξ ~ N(0, I_d)``,
    ``μ`` one of ``±μ₁`` (label 1) or ``±μ₂`` (label 0) with equal probability (balanced counts),
    ``μ₁ = r·e₁ ⊥ μ₂ = r·e₂``, ``r = mean_norm``. ``label_flip``: exactly ``round(label_flip·n_train)``
    distinct training labels flipped (``info["flipped_indices"]``); test labels stay clean.
    ``info["bayes_accuracy"]``: :func:`xor_bayes_accuracy` of ``mean_norm`` (clean test labels).
    """
    n_train = check_int("n_train", n_train, low=1, high=_MAX_N)
    n_test = check_int("n_test", n_test, low=1, high=_MAX_N)
    dim = check_int("dim", dim, low=2, high=_MAX_N)
    mean_norm = check_float("mean_norm", mean_norm, low=0.0)
    label_flip = check_float("label_flip", label_flip, low=0.0, high=1.0)
    seed = check_seed(seed)
    gen = torch_generator(seed)

    def sample(n: int) -> Pair:
        cluster = _balanced_labels(n, 4, gen)  # 0: +μ₁, 1: −μ₁, 2: +μ₂, 3: −μ₂
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        sign = 1.0 - 2.0 * (cluster % 2).double()
        x[cluster < 2, 0] += mean_norm * sign[cluster < 2]
        x[cluster >= 2, 1] += mean_norm * sign[cluster >= 2]
        return x.float(), (cluster < 2).long()

    (x_tr, y_tr), test = sample(n_train), sample(n_test)
    flipped = exact_subset(n_train, label_flip, gen)
    y_tr[flipped] = 1 - y_tr[flipped]
    info = {
        "task": "classification",
        "n_classes": 2,
        "flipped_indices": flipped.tolist(),
        "bayes_accuracy": xor_bayes_accuracy(mean_norm),
    }
    return (x_tr, y_tr), test, info


def _basis(x: torch.Tensor, k: int, basis: str) -> torch.Tensor:
    """``[N, k]`` columns φ_0(x) … φ_{k-1}(x): monomials x^j or Legendre P_j (Bonnet recursion)."""
    cols = [torch.ones_like(x)]
    if k > 1:
        cols.append(x.clone())
    for j in range(1, k - 1):
        if basis == "monomial":
            cols.append(cols[-1] * x)
        else:  # (j+1) P_{j+1} = (2j+1) x P_j - j P_{j-1}
            cols.append(((2 * j + 1) * x * cols[j] - j * cols[j - 1]) / (j + 1))
    return torch.stack(cols[:k], dim=1)


@register("polynomial")
def polynomial(
    *,
    degree: int | None = None,
    coefficients: list[float] | None = None,
    n_train: int = 20,
    n_test: int = 200,
    noise: float = 0.1,
    test_noise: bool = False,
    features: int | None = None,
    basis: str = "monomial",
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """x ~ U[-1, 1]; y = Σ_j c_j x^j + noise · ε, ε ~ N(0, 1); targets float32 ``[N, 1]``.

    ``coefficients`` (c_0 … c_d, lowest degree first) fix the polynomial, else ``degree + 1``
    coefficients are drawn N(0, 1) from ``seed`` (in ``info["coefficients"]``); ``degree=None``
    means 3 without ``coefficients`` and ``len(coefficients) - 1`` with them.
    ``features=None``: inputs ``[N, 1]`` (x itself); ``features=k``: inputs ``[N, k]`` =
    ``basis`` functions of degrees 0 … k-1 ("monomial" x^j or "legendre" P_j(x)).
    """
    n_train = check_int("n_train", n_train, low=1, high=_MAX_N)
    n_test = check_int("n_test", n_test, low=1, high=_MAX_N)
    noise = check_float("noise", noise, low=0.0)
    test_noise = _check_bool("test_noise", test_noise)
    basis = check_choice("basis", basis, ("monomial", "legendre"))
    if features is not None:
        features = check_int("features", features, low=1, high=10_000)
    seed = check_seed(seed)
    gen = torch_generator(seed)
    if coefficients is None:
        degree = 3 if degree is None else check_int("degree", degree, low=0, high=1000)
        coef = torch.randn(degree + 1, generator=gen, dtype=torch.float64)
    else:
        if not isinstance(coefficients, list) or not coefficients:
            raise ValueError(f"coefficients must be a non-empty list of numbers, got {coefficients!r}")
        coefs = [check_float(f"coefficients[{i}]", c) for i, c in enumerate(coefficients)]
        if degree is not None and degree != len(coefs) - 1:
            raise ValueError(
                f"degree={degree} disagrees with {len(coefs)} coefficients (degree {len(coefs) - 1}); "
                "pass degree=None or a matching degree"
            )
        coef = torch.tensor(coefs, dtype=torch.float64)

    def sample(n: int, noisy: bool) -> Pair:
        x = 2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0
        eps = torch.randn(n, generator=gen, dtype=torch.float64)
        y = _basis(x, coef.numel(), "monomial") @ coef + (noise * eps if noisy else 0.0)
        inputs = x[:, None] if features is None else _basis(x, features, basis)
        return inputs.float(), y[:, None].float()

    train, test = sample(n_train, True), sample(n_test, test_noise)
    info = {"task": "regression", "out_dim": 1, "degree": coef.numel() - 1, "coefficients": coef.tolist()}
    return train, test, info
