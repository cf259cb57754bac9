"""scikit-learn's 8×8 handwritten digits (1797 images, 10 classes; shipped with scikit-learn).

Pipeline (in this order):

1. *order*: file order (``shuffle=False``) or a seeded random permutation (``shuffle=True``);
   the first ``n_train`` samples are the training set, the next ``n_test`` the test set
   (``n_test=None``: all remaining samples).
2. *label noise* (training set only): exactly ``round(label_noise · n_train)`` distinct
   training samples, chosen at random, get a new label: ``label_noise_mode="random"``
   draws it uniformly from all 10 classes (it may equal the old one — the classic
   "randomised labels" of double-descent papers), ``"wrong"`` uniformly from the 9 other
   classes (so exactly that many labels change). The chosen indices (into the training
   set) are ``info["noisy_indices"]``.
3. *normalize* pixels (raw values 0…16), statistics from the training set only:
   ``"none"`` raw; ``"scale"`` x/16 ∈ [0, 1]; ``"center"`` x/16 minus its per-pixel training
   mean; ``"standard"`` per-pixel (x − mean)/std (std 0 → 1).
4. *shape*: ``flatten=True`` → ``[N, 64]``, else ``[N, 1, 8, 8]``; *targets*: ``"index"``
   (int64 ``[N]``) or ``"onehot"`` (float32 ``[N, 10]``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
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

N_DIGITS = 1797
N_CLASSES = 10


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@register("digits")
def digits(
    *,
    n_train: int = 1000,
    n_test: int | None = None,
    shuffle: bool = True,
    label_noise: float = 0.0,
    label_noise_mode: str = "random",
    normalize: str = "scale",
    flatten: bool = True,
    targets: str = "index",
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """Digits split into ``n_train`` / ``n_test`` samples (see the module docstring)."""
    n_train = check_int("n_train", n_train, low=1, high=N_DIGITS - 1)
    if n_test is None:
        n_test = N_DIGITS - n_train
    n_test = check_int("n_test", n_test, low=1, high=N_DIGITS - n_train)
    if not isinstance(shuffle, bool):
        raise ValueError(f"shuffle must be True or False, got {shuffle!r}")
    if not isinstance(flatten, bool):
        raise ValueError(f"flatten must be True or False, got {flatten!r}")
    label_noise = check_float("label_noise", label_noise, low=0.0, high=1.0)
    label_noise_mode = check_choice("label_noise_mode", label_noise_mode, ("random", "wrong"))
    normalize = check_choice("normalize", normalize, ("none", "scale", "center", "standard"))
    targets = check_choice("targets", targets, ("index", "onehot"))
    seed = check_seed(seed)

    x_all, y_all = _raw()
    gen = torch_generator(seed)
    order = torch.randperm(N_DIGITS, generator=gen).numpy() if shuffle else np.arange(N_DIGITS)
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    x_tr, x_te = x_all[tr].copy(), x_all[te].copy()
    y_tr, y_te = torch.from_numpy(y_all[tr].copy()), torch.from_numpy(y_all[te].copy())

    noisy = exact_subset(n_train, label_noise, gen)
    if noisy.numel():
        if label_noise_mode == "random":
            new = torch.randint(0, N_CLASSES, (noisy.numel(),), generator=gen)
        else:  # a uniformly random *other* class
            new = (y_tr[noisy] + torch.randint(1, N_CLASSES, (noisy.numel(),), generator=gen)) % N_CLASSES
        y_tr[noisy] = new

    if normalize != "none":
        x_tr, x_te = x_tr / 16.0, x_te / 16.0
    if normalize in ("center", "standard"):
        mean = x_tr.mean(axis=0)
        x_tr, x_te = x_tr - mean, x_te - mean
    if normalize == "standard":
        std = x_tr.std(axis=0)
        std[std == 0] = 1.0
        x_tr, x_te = x_tr / std, x_te / std

    def finish(x: np.ndarray, y: torch.Tensor) -> Pair:
        xt = torch.from_numpy(x).to(torch.float32)
        if not flatten:
            xt = xt.reshape(-1, 1, 8, 8)
        if targets == "onehot":
            y = torch.nn.functional.one_hot(y, N_CLASSES).to(torch.float32)
        return xt, y

    info = {
        "task": "classification",
        "n_classes": N_CLASSES,
        "targets": targets,
        "noisy_indices": noisy.tolist(),
        "n_labels_changed": int((y_tr != torch.from_numpy(y_all[tr])).sum()),
        "source_indices": {"train": tr.tolist(), "test": te.tolist()},
    }
    return finish(x_tr, y_tr), finish(x_te, y_te), info
