"""dynascope.datasets: registry, determinism, config round-trips and per-dataset semantics."""

from __future__ import annotations

import json

import pytest
import torch

import dynascope.datasets as D

# Small configs so the whole file runs in a couple of seconds.
SMALL = {
    "modular_arithmetic": {"p": 13},
    "digits": {"n_train": 100, "n_test": 50},
    "gaussian_mixture": {"n_train": 40, "n_test": 30},
    "teacher_student": {"n_train": 40, "n_test": 30, "teacher": "mlp", "noise": 0.1},
    "xor": {"n_train": 40, "n_test": 30, "label_flip": 0.25},
    "xor_cluster": {"n_train": 40, "n_test": 30, "dim": 50, "mean_norm": 3.0},
    "polynomial": {"n_train": 15, "n_test": 25, "features": 4},
}


def _equal(a: D.DatasetSplit, b: D.DatasetSplit) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a.train + a.test, b.train + b.test))


def test_available_lists_all_builtins() -> None:
    assert set(SMALL) <= set(D.available())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_same_data_different_seed_different_data(name: str) -> None:
    a = D.load(name, seed=1, **SMALL[name])
    b = D.load(name, seed=1, **SMALL[name])
    c = D.load(name, seed=2, **SMALL[name])
    assert _equal(a, b)
    assert not _equal(a, c)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_global_rng_untouched(name: str) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    D.load(name, **SMALL[name])
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_json_round_trip_rebuilds_identical_tensors(name: str) -> None:
    split = D.load(name, seed=5, **SMALL[name])
    config = json.loads(json.dumps(split.config))
    assert config["name"] == name and config["seed"] == 5
    assert set(config) == {"name", *D.defaults(name)}  # every resolved parameter is recorded
    again = D.load(**config)
    assert _equal(split, again)
    assert again.config == split.config
    json.dumps(split.info)  # info is JSON-able too


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_dtypes_and_info(name: str) -> None:
    split = D.load(name, **SMALL[name])
    info = split.info
    for x, y in (split.train, split.test):
        assert x.shape[0] == y.shape[0]
        assert list(x.shape[1:]) == info["input_shape"]
        for t in (x, y):
            assert t.dtype in (torch.float32, torch.int64)
        if info["task"] == "classification":
            assert y.dtype == torch.int64 and y.ndim == 1
            assert 0 <= int(y.min()) and int(y.max()) < info["n_classes"]
        else:
            assert info["task"] == "regression"
            assert y.dtype == torch.float32 and y.shape[1:] == (info["out_dim"],)
    assert info["n_train"] == split.train[0].shape[0]
    assert info["n_test"] == split.test[0].shape[0]


def test_expected_sizes() -> None:
    assert D.load("gaussian_mixture", n_train=40, n_test=30, dim=5).train[0].shape == (40, 5)
    ts = D.load("teacher_student", dim=7, out_dim=3, n_train=11, n_test=4)
    assert ts.train[0].shape == (11, 7) and ts.train[1].shape == (11, 3) and ts.test[1].shape == (4, 3)
    assert D.load("xor", n_train=9, n_test=5).test[0].shape == (5, 2)
    assert D.load("polynomial", n_train=9).train[0].shape == (9, 1)
    assert D.load("polynomial", n_train=9, features=6).train[0].shape == (9, 6)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("nope", {}, "available: digits"),
        ("digits", {"bogus": 1}, "valid parameters: .*label_noise"),
        ("modular_arithmetic", {"operation": "pow"}, "'add', 'sub', 'mul', 'div'"),
        ("modular_arithmetic", {"p": 12, "operation": "div"}, "prime"),
        ("modular_arithmetic", {"train_fraction": 1.0}, "train_fraction"),
        ("modular_arithmetic", {"p": 1}, "p must lie"),
        ("modular_arithmetic", {"format": "text"}, "'pairs', 'tokens'"),
        ("digits", {"n_train": 1797}, "n_train"),
        ("digits", {"n_train": 1000, "n_test": 900}, "n_test"),
        ("digits", {"normalize": "minmax"}, "'none', 'scale', 'center', 'standard'"),
        ("digits", {"targets": "soft"}, "'index', 'onehot'"),
        ("digits", {"label_noise": 1.5}, "label_noise"),
        ("digits", {"n_train": 10.5}, "integer"),
        ("digits", {"seed": -1}, "seed"),
        ("digits", {"shuffle": "no"}, "shuffle"),
        ("gaussian_mixture", {"n_classes": 1}, "n_classes"),
        ("teacher_student", {"teacher": "cnn"}, "'linear', 'mlp'"),
        ("xor", {"std": float("nan")}, "std"),
        ("polynomial", {"coefficients": [1.0, 2.0], "degree": 3}, "disagrees"),
        ("polynomial", {"basis": "fourier"}, "'monomial', 'legendre'"),
        ("digits", {"seed": object()}, "JSON"),
    ],
)
def test_bad_names_and_parameters_raise_value_error(name: str, config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        D.load(name, **config)


def test_register_custom_dataset_and_reject_duplicates() -> None:
    def tiny(*, n: int = 3, seed: int = 0):
        x = torch.arange(n, dtype=torch.float32)[:, None] + seed
        return (x, x), (x, x), {"task": "regression", "out_dim": 1}

    D.register("_tiny_test_dataset", tiny, overwrite=True)
    split = D.load("_tiny_test_dataset", n=4)
    assert split.config == {"name": "_tiny_test_dataset", "n": 4, "seed": 0}
    assert split.info["input_shape"] == [1]
    with pytest.raises(ValueError, match="already registered"):
        D.register("_tiny_test_dataset", lambda *, seed=0: None)
    with pytest.raises(ValueError, match="keyword-only"):
        D.register("_bad_builder", lambda n=1: None)


def test_split_batches_and_repr() -> None:
    split = D.load("xor", n_train=10, n_test=4)
    assert sum(b.n for b in split.batches("train", batch_size=3)) == 10
    assert split.batches("test").tensors()[0].shape == (4, 2)
    assert "xor" in repr(split) and "n_train=10" in repr(split)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        split.batches("val")


# ------------------------------------------------------------------ modular arithmetic
def _reference(op: str, a: int, b: int, p: int) -> int:
    return {
        "add": (a + b) % p,
        "sub": (a - b) % p,
        "mul": (a * b) % p,
        "div": (a * pow(b, -1, p)) % p if b else -1,
        "x2+y2": (a * a + b * b) % p,
        "x2+xy+y2": (a * a + a * b + b * b) % p,
        "x2+xy+y2+x": (a * a + a * b + b * b + a) % p,
        "x3+xy": (a**3 + a * b) % p,
        "x3+xy2+y": (a**3 + a * b * b + b) % p,
    }[op]


@pytest.mark.parametrize(
    "op", ["add", "sub", "mul", "div", "x2+y2", "x2+xy+y2", "x2+xy+y2+x", "x3+xy", "x3+xy2+y"]
)
def test_modular_labels_match_formula_and_split_covers_all_pairs(op: str) -> None:
    p = 23
    split = D.load("modular_arithmetic", p=p, operation=op, train_fraction=0.4, seed=3)
    (xtr, ytr), (xte, yte) = split.train, split.test
    for x, y in ((xtr, ytr), (xte, yte)):
        for (a, b), c in zip(x.tolist(), y.tolist()):
            assert c == _reference(op, a, b, p)
    pairs_tr = {tuple(r) for r in xtr.tolist()}
    pairs_te = {tuple(r) for r in xte.tolist()}
    expected = {(a, b) for a in range(p) for b in range(p) if op != "div" or b != 0}
    assert len(pairs_tr) == xtr.shape[0] and len(pairs_te) == xte.shape[0]  # no duplicates
    assert pairs_tr.isdisjoint(pairs_te)
    assert pairs_tr | pairs_te == expected
    assert xtr.shape[0] == round(0.4 * len(expected))
    assert split.info["n_pairs"] == len(expected) == (p * (p - 1) if op == "div" else p * p)


def test_modular_large_prime_div_exact() -> None:
    # 2^20-ish modulus: the square-and-multiply inverse must stay exact in int64.
    p = 1_048_573  # prime
    a = torch.tensor([5, 123456, 1_048_572])
    b = torch.tensor([7, 999_983, 2])
    from dynascope.datasets.algorithmic import OPERATIONS

    got = OPERATIONS["div"](a, b, p).tolist()
    assert got == [(x * pow(y, -1, p)) % p for x, y in zip(a.tolist(), b.tolist())]


def test_modular_tokens_format() -> None:
    p = 11
    pairs = D.load("modular_arithmetic", p=p, seed=4)
    tokens = D.load("modular_arithmetic", p=p, seed=4, format="tokens")
    assert tokens.train[0].shape[1] == 3
    assert torch.equal(tokens.train[0][:, :2], pairs.train[0])
    assert torch.equal(tokens.train[1], pairs.train[1])
    assert (tokens.train[0][:, 2] == p).all()
    assert tokens.info["vocab_size"] == p + 1 and tokens.info["equals_token"] == p
    assert tokens.info["n_classes"] == p
    assert int(tokens.train[0].max()) == p


def test_modular_grokking_default_split_size() -> None:
    split = D.load("modular_arithmetic")
    assert split.config["p"] == 97 and split.config["train_fraction"] == 0.3
    assert (
        split.info["n_train"] == round(0.3 * 97 * 97)
        and split.info["n_test"] == 97 * 97 - split.info["n_train"]
    )


# ------------------------------------------------------------------ digits
def _raw_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float64), torch.tensor(d.target)


def test_digits_first_n_in_file_order_centered_onehot() -> None:
    """The edge-of-stability setting: first 1000 digits, centred pixels (x/16 minus train mean)."""
    split = D.load("digits", n_train=1000, shuffle=False, normalize="center", targets="onehot")
    raw_x, raw_y = _raw_digits()
    x, y = split.train
    ref = raw_x[:1000] / 16
    ref = ref - ref.mean(0)
    torch.testing.assert_close(x.double(), ref, atol=1e-6, rtol=0)
    assert y.dtype == torch.float32 and y.shape == (1000, 10)
    assert torch.equal(y.argmax(1), raw_y[:1000]) and torch.equal(y.sum(1), torch.ones(1000))
    assert split.test[0].shape == (797, 64)
    torch.testing.assert_close(split.test[0].double(), raw_x[1000:] / 16 - (raw_x[:1000] / 16).mean(0))
    assert split.info["source_indices"]["train"] == list(range(1000))


def test_digits_normalizations_and_shape() -> None:
    raw_x, raw_y = _raw_digits()
    kw = {"n_train": 200, "n_test": 100, "seed": 7}
    idx = D.load("digits", **kw).info["source_indices"]
    tr, te = torch.tensor(idx["train"]), torch.tensor(idx["test"])
    assert set(idx["train"]).isdisjoint(idx["test"])
    none = D.load("digits", normalize="none", **kw)
    torch.testing.assert_close(none.train[0].double(), raw_x[tr])
    assert torch.equal(none.train[1], raw_y[tr]) and torch.equal(none.test[1], raw_y[te])
    scale = D.load("digits", normalize="scale", **kw)
    torch.testing.assert_close(scale.test[0].double(), raw_x[te] / 16)
    std = D.load("digits", normalize="standard", **kw).train[0].double()
    torch.testing.assert_close(std.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5, rtol=0)
    s = std.std(0, unbiased=False)
    assert torch.all(((s - 1).abs() < 1e-4) | (s == 0)) and (s == 0).any()  # constant pixels stay 0
    img = D.load("digits", flatten=False, **kw)
    assert img.train[0].shape == (200, 1, 8, 8)
    assert torch.equal(img.train[0].reshape(200, 64), scale.train[0])


@pytest.mark.parametrize("mode", ["random", "wrong"])
def test_digits_label_noise_fraction_exact(mode: str) -> None:
    """Double-descent setting: n=300, 20% of training labels randomised -> exactly 60 chosen."""
    clean = D.load("digits", n_train=300, seed=11)
    noisy = D.load("digits", n_train=300, seed=11, label_noise=0.2, label_noise_mode=mode, targets="onehot")
    chosen = noisy.info["noisy_indices"]
    assert len(chosen) == 60 and len(set(chosen)) == 60 and all(0 <= i < 300 for i in chosen)
    assert torch.equal(noisy.train[0], clean.train[0]) and torch.equal(noisy.test[0], clean.test[0])
    assert torch.equal(noisy.test[1].argmax(1), clean.test[1])  # test labels untouched
    changed = (noisy.train[1].argmax(1) != clean.train[1]).nonzero().flatten().tolist()
    assert set(changed) <= set(chosen)
    assert noisy.info["n_labels_changed"] == len(changed)
    if mode == "wrong":
        assert changed == chosen
    else:
        assert 40 <= len(changed) < 60  # ~9/10 of the randomised labels actually change


def test_digits_label_noise_is_uniform_over_classes() -> None:
    split = D.load("digits", n_train=1700, n_test=97, label_noise=1.0, seed=0)
    counts = torch.bincount(split.train[1], minlength=10).double()
    # chi-square with 9 d.o.f.; the 0.999 quantile is 27.9
    chi2 = ((counts - 170) ** 2 / 170).sum().item()
    assert chi2 < 27.9


# ------------------------------------------------------------------ synthetic
def test_xor_labels_and_exact_flips() -> None:
    clean = D.load("xor", n_train=100, n_test=40, std=0.1, seed=2)
    x, y = clean.train
    assert torch.equal(y, (x[:, 0] * x[:, 1] < 0).long())  # std 0.1: no sample leaves its quadrant
    assert torch.equal(torch.bincount(y), torch.tensor([50, 50]))
    flipped = D.load("xor", n_train=100, n_test=40, std=0.1, seed=2, label_flip=0.3)
    idx = flipped.info["flipped_indices"]
    assert len(idx) == 30
    changed = (flipped.train[1] != y).nonzero().flatten().tolist()
    assert changed == idx
    assert torch.equal(flipped.test[1], clean.test[1])


def test_gaussian_mixture_means_and_balance() -> None:
    split = D.load("gaussian_mixture", n_classes=4, dim=3, n_train=4000, n_test=10, separation=5.0, noise=0.5)
    x, y = split.train
    means = torch.tensor(split.info["means"])
    torch.testing.assert_close(means.norm(dim=1), torch.full((4,), 5.0, dtype=means.dtype))
    assert torch.equal(torch.bincount(y), torch.full((4,), 1000))
    for k in range(4):
        xk = x[y == k].double()
        assert (xk.mean(0) - means[k]).norm() < 0.1  # 4 s.e. of sqrt(3)·0.5/sqrt(1000)
        assert abs(xk.std(0).mean() - 0.5) < 0.05


def test_teacher_student_linear_is_exactly_linear_and_noise_on_train_only() -> None:
    clean = D.load("teacher_student", dim=5, out_dim=2, n_train=50, n_test=20, seed=4)
    for x, y in (clean.train, clean.test):
        design = x.double()
        w = torch.linalg.lstsq(design, y.double()).solution
        torch.testing.assert_close(design @ w, y.double(), atol=1e-5, rtol=0)
    noisy = D.load("teacher_student", dim=5, out_dim=2, n_train=50, n_test=20, seed=4, noise=0.5)
    assert torch.equal(noisy.train[0], clean.train[0])
    resid = (noisy.train[1] - clean.train[1]).double()
    assert 0.3 < resid.std().item() < 0.7
    assert torch.equal(noisy.test[1], clean.test[1])
    both = D.load(
        "teacher_student", dim=5, out_dim=2, n_train=50, n_test=20, seed=4, noise=0.5, test_noise=True
    )
    assert not torch.equal(both.test[1], clean.test[1])


def test_teacher_student_mlp_not_linear() -> None:
    split = D.load("teacher_student", teacher="mlp", activation="relu", dim=3, n_train=400, n_test=5)
    x, y = split.train
    design = torch.cat([x, torch.ones(400, 1)], 1).double()
    resid = y.double() - design @ torch.linalg.lstsq(design, y.double()).solution
    assert resid.norm() / y.double().norm() > 0.05


def test_polynomial_targets_and_features() -> None:
    coef = [0.5, -1.0, 0.0, 2.0]
    split = D.load("polynomial", coefficients=coef, noise=0.0, n_train=30, n_test=10, seed=1)
    assert split.info["degree"] == 3 and split.info["coefficients"] == coef
    x, y = split.train
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    xd = x.double()[:, 0]
    torch.testing.assert_close(y.double()[:, 0], 0.5 - xd + 2 * xd**3, atol=1e-6, rtol=0)
    mono = D.load("polynomial", coefficients=coef, n_train=30, seed=1, features=5)
    torch.testing.assert_close(mono.train[0][:, 1], x[:, 0])
    torch.testing.assert_close(
        mono.train[0].double(), torch.stack([xd**j for j in range(5)], 1), atol=1e-6, rtol=0
    )
    leg = D.load("polynomial", coefficients=coef, n_train=30, seed=1, features=4, basis="legendre")
    ref = torch.stack([torch.ones_like(xd), xd, (3 * xd**2 - 1) / 2, (5 * xd**3 - 3 * xd) / 2], 1)
    torch.testing.assert_close(leg.train[0].double(), ref, atol=1e-6, rtol=0)
    noisy = D.load("polynomial", coefficients=coef, noise=0.1, n_train=30, n_test=10, seed=1)
    assert not torch.equal(noisy.train[1], y)
    assert torch.equal(noisy.test[1], split.test[1])
    random_coef = D.load("polynomial", degree=5, seed=3).info["coefficients"]
    assert len(random_coef) == 6


def test_xor_cluster_means_flips_and_bayes_accuracy() -> None:
    split = D.load("xor_cluster", n_train=400, n_test=400, dim=20, mean_norm=6.0, label_flip=0.1, seed=3)
    x, y = split.test
    # label 1 lives on the e₁ axis (±μ₁), label 0 on the e₂ axis (±μ₂); the mean of each cluster pair is 0
    assert (x[y == 1, 0].abs().mean() > 5) and (x[y == 1, 1].abs().mean() < 1.5)
    assert (x[y == 0, 1].abs().mean() > 5) and abs(float(x[:, 0].mean())) < 0.7
    flipped = split.info["flipped_indices"]
    assert len(flipped) == 40
    # the Bayes rule |x₁| > |x₂| on the clean test set matches the computed Bayes accuracy
    acc = float(((x[:, 0].abs() > x[:, 1].abs()).long() == y).double().mean())
    assert split.info["bayes_accuracy"] == pytest.approx(acc, abs=0.02)
    from dynascope.datasets.synthetic import xor_bayes_accuracy

    assert xor_bayes_accuracy(0.0) == pytest.approx(0.5, abs=1e-7)
    assert xor_bayes_accuracy(1.0) == pytest.approx(0.6353, abs=2e-3)  # P(|1+Z₁| > |Z₂|), Monte Carlo 2e6
