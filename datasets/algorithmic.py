"""Algorithmic datasets: modular arithmetic (the grokking benchmark).

Every pair ``(a, b)`` with ``a, b ∈ {0, …, p-1}`` (``b ≠ 0`` for division) is labelled by
``c = a ∘ b (mod p)``; the pairs are randomly permuted (local generator, ``seed``) and the
first ``round(train_fraction · N)`` form the training set, the rest the test set.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import Pair, check_choice, check_float, check_int, check_seed, register, torch_generator


def _mod_inverse(b: torch.Tensor, p: int) -> torch.Tensor:
    """b^{-1} mod p for prime p by Fermat's little theorem: b^{p-2} mod p (square and multiply)."""
    result = torch.ones_like(b)
    base = b % p
    e = p - 2
    while e > 0:
        if e & 1:
            result = result * base % p
        base = base * base % p
        e >>= 1
    return result


# c = f(a, b) mod p; ``a``, ``b`` are int64 tensors with values < p (p ≤ 2^20 keeps products exact).
OPERATIONS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: (a * _mod_inverse(b, p)) % p,
    "x2+y2": lambda a, b, p: (a * a + b * b) % p,
    "x2+xy+y2": lambda a, b, p: (a * a + a * b + b * b) % p,
    "x2+xy+y2+x": lambda a, b, p: (a * a + a * b + b * b + a) % p,
    "x3+xy": lambda a, b, p: (a * a % p * a + a * b) % p,
    "x3+xy2+y": lambda a, b, p: (a * a % p * a + a * (b * b % p) + b) % p,
}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


@register("modular_arithmetic")
def modular_arithmetic(
    *,
    p: int = 97,
    operation: str = "add",
    train_fraction: float = 0.3,
    format: str = "pairs",
    seed: int = 0,
) -> tuple[Pair, Pair, dict[str, Any]]:
    """``(a, b) -> a ∘ b mod p``.

    ``format="pairs"``: x is int64 ``[N, 2]`` of ``(a, b)``. ``format="tokens"``: x is int64
    ``[N, 3]`` of ``(a, b, p)`` with token ``p`` playing "=" (vocabulary size ``p + 1``).
    y is int64 ``[N]`` in ``[0, p)``. Division uses the modular inverse and needs prime ``p``.
    """
    p = check_int("p", p, low=2, high=2**20)
    operation = check_choice("operation", operation, OPERATIONS)
    train_fraction = check_float(
        "train_fraction", train_fraction, low=0.0, high=1.0, low_open=True, high_open=True
    )
    format = check_choice("format", format, ("pairs", "tokens"))
    seed = check_seed(seed)
    if operation == "div" and not _is_prime(p):
        raise ValueError(f"operation 'div' needs a prime modulus p, got p={p}")

    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if operation == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    c = OPERATIONS[operation](a, b, p)
    n = a.numel()
    n_train = int(round(train_fraction * n))
    if not 1 <= n_train <= n - 1:
        raise ValueError(
            f"train_fraction={train_fraction} leaves {n_train} of {n} pairs for training; "
            "both splits must be non-empty"
        )
    if format == "pairs":
        x = torch.stack([a, b], dim=1)
    else:
        x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    perm = torch.randperm(n, generator=torch_generator(seed))
    tr, te = perm[:n_train], perm[n_train:]
    info = {
        "task": "classification",
        "n_classes": p,
        "vocab_size": p + 1 if format == "tokens" else p,
        "n_pairs": n,
    }
    if format == "tokens":
        info["equals_token"] = p
    return (x[tr], c[tr]), (x[te], c[te]), info
